"""The line a `fashion` command prints when a call to a service fails: the status and the server's
reason, and for a service that cannot be reached, where the command looked for it and how to say
where it is. UNAVAILABLE also comes from a service that runs but does not serve (its model still
loading, or failed to load): a health check on the same address tells the two apart."""

from __future__ import annotations

import grpc

HEALTH_PROBE_S = 2.0


def rpc_failure(exc: grpc.RpcError, service: str, address: str, timeout_s: float | None = None) -> str:
    """`service` ("Inference", "Batch", "Monitor") at `address` failed the call with `exc`; `timeout_s`: the
    call's deadline, named when it passed, for a command that takes --timeout."""
    line = f"error: {exc.code().name}: {exc.details()}"
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout_s is not None:
        return line + f" (no answer from the {service} service at {address} within {timeout_s:g} s: --timeout sets it)"
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return line
    status = health_status(address)
    if status is not None:
        return line + (f" (the {service} service at {address} runs but is {status}: its model or its "
                       "dependencies are not ready; its log says why)")
    return line + (f" (the {service} service at {address}: is it running? `fashion run` starts every service; "
                   f"--address or FASHION_{service.upper()}_ADDRESS says where it listens)")


def health_status(address: str) -> str | None:
    """What grpc.health.v1 at `address` answers for the whole server (SERVING, NOT_SERVING, ...), asked once
    without retries; None when nothing there answers it."""
    from fashion.client import ChannelOptions, InferenceClient  # any client's health call will do

    try:
        with InferenceClient(ChannelOptions.from_env(address, retries=1)) as client:
            return client.health(timeout_s=HEALTH_PROBE_S)
    except (grpc.RpcError, ValueError, OSError):  # nothing answers there, or its TLS settings cannot work
        return None
