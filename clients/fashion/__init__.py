"""Fashion classifier: generated gRPC API (`fashion.v1`, `fashion.kserve.v2`), Python client and CLI."""

__version__ = "0.1.0"
