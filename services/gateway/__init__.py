"""The REST gateway: HTTP/JSON (FastAPI on uvicorn) in front of the gRPC services."""
