"""The line a `fashion` command prints when a call to a service fails: the status and the server's
reason, and for a service that cannot be reached, where the command looked for it and how to say
where it is."""

from __future__ import annotations

import grpc


def rpc_failure(exc: grpc.RpcError, service: str, address: str) -> str:
    """`service` ("Inference", "Batch", "Monitor") at `address` failed the call with `exc`."""
    line = f"error: {exc.code().name}: {exc.details()}"
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        line += (f" (the {service} service at {address}: is it running? `fashion run` starts every service; "
                 f"--address or FASHION_{service.upper()}_ADDRESS says where it listens)")
    return line
