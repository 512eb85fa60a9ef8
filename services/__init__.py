"""The fashion classifier's services: Inference, Batch, Monitor and the REST gateway."""

import os

__version__ = "0.1.0"
"""The project's one version: pyproject.toml reads it (setuptools dynamic version), and every service
reports it (KServe ServerMetadata, the gateway's OpenAPI document). The client distribution
(clients/, fashion.__version__) is released with it and carries the same number."""

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"
"""grpcio's experiments our processes turn off unless GRPC_EXPERIMENTS is set: with the EventEngine TCP
client and listener, every read and write passes through threads of their own before grpc.aio's
poller sees it, which lengthens each call at low load (docs/performance.md). grpcio reads the
variable when it is imported, so it is set here, before any service module imports grpc."""
os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
