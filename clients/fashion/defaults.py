"""Where the services listen in the local stack; FASHION_<SERVICE>_ADDRESS overrides it. The services'
settings take their defaults from here, so a client and a server on one machine agree. (A module of its
own, without grpc, so that `fashion --help` stays quick.)"""

from __future__ import annotations

import os

DEFAULT_ADDRESSES = {"inference": "localhost:50051", "batch": "localhost:50052", "monitor": "localhost:50053",
                     "gateway": "localhost:8080"}


def service_address(service: str) -> str:
    """The address of `service` ("inference", "batch", "monitor" or "gateway"): FASHION_<SERVICE>_ADDRESS, else the
    local stack's default."""
    return os.environ.get(f"FASHION_{service.upper()}_ADDRESS") or DEFAULT_ADDRESSES[service]
