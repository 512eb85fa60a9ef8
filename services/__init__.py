"""The fashion classifier's services: Inference, Batch, Monitor and the REST gateway."""

__version__ = "0.1.0"
"""The project's one version: pyproject.toml reads it (setuptools dynamic version), and every service
reports it (KServe ServerMetadata, the gateway's OpenAPI document). The client distribution
(clients/, fashion.__version__) is released with it and carries the same number."""
