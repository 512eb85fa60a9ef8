"""Every door checked: with a token set, every RPC of every service (listed from the descriptors each
server publishes by reflection, checked against the protos' service names, not by hand) and every
operation of the gateway (listed from its OpenAPI document) is called without a token, with a
wrong one and with the right one. The public ones are a short explicit list; everything else must
refuse the first two and let the third through.

The KServe descriptors come from the server, not from fashion.kserve: the test process may hold
tritonclient's protos, which register the same `inference.*` names (see tests/inference/test_kserve.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from fashion.v1 import batch_pb2, inference_pb2, monitor_pb2
from tests.batch.conftest import BatchHome
from tests.conftest import start_inference
from tests.gateway.conftest import start_gateway
from tests.monitor.conftest import monitor_env, start_monitor

pytestmark = pytest.mark.timeout(240)
TOKEN = "matrix-token-5be1"
WRONG = {"": (), "wrong": (("authorization", "Bearer not-the-token"),)}
PUBLIC_ROUTES = {("GET", "/health")}  # the old API's health check; /healthz and the docs are not operations


NOT_OURS = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}


def served_methods(channel: grpc.Channel, expected: set[str]) -> Iterator[MethodDescriptor]:
    """Every method of every service the server publishes (health and reflection aside), after checking
    that these services are exactly `expected`."""
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services()) - NOT_OURS
    assert services == expected, services
    pool = descriptor_pool.DescriptorPool(database)
    for name in sorted(services):
        yield from pool.FindServiceByName(name).methods


def call(channel: grpc.Channel, method: MethodDescriptor, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    """Call `method` with an empty request; the status it ends with (OK when it answered)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request = message_factory.GetMessageClass(method.input_type)()
    serialize = type(request).SerializeToString
    kw = {"timeout": 5, "metadata": metadata}
    try:
        if method.client_streaming and method.server_streaming:
            next(iter(channel.stream_stream(path, serialize, None)(iter([request]), **kw)))
        elif method.server_streaming:
            next(iter(channel.unary_stream(path, serialize, None)(request, **kw)))
        elif method.client_streaming:
            channel.stream_unary(path, serialize, None)(iter([request]), **kw)
        else:
            channel.unary_unary(path, serialize, None)(request, **kw)
    except grpc.RpcError as exc:
        return exc.code()
    except StopIteration:
        pass
    return grpc.StatusCode.OK


def test_every_rpc_and_every_route_refuses_a_missing_or_wrong_token(tmp_path: Path, linear_model) -> None:
    token = {"FASHION_AUTH_TOKEN": TOKEN}
    inference = start_inference(tmp_path / "inference", linear_model[0], **token)
    processes = [inference]
    try:
        inference.wait_serving()
        home = BatchHome(tmp_path / "batch")
        batch = home.start(inference.address, **token)
        processes.append(batch)
        monitor = start_monitor(tmp_path / "monitor", monitor_env(tmp_path / "monitor", inference.address,
                                                                  batch.address, **token))
        processes.append(monitor)
        gateway = start_gateway(tmp_path / "gateway", inference.address, FASHION_BATCH_ADDRESS=batch.address,
                                FASHION_MONITOR_ADDRESS=monitor.address, **token)
        processes.append(gateway)
        gateway.wait_ready()

        def names(*files: object) -> set[str]:
            return {s.full_name for f in files for s in f.services_by_name.values()}  # type: ignore[attr-defined]

        servers = {inference.address: names(inference_pb2.DESCRIPTOR) | {"inference.GRPCInferenceService"},
                   batch.address: names(batch_pb2.DESCRIPTOR), monitor.address: names(monitor_pb2.DESCRIPTOR)}
        checked, leaks = 0, []
        right = (("authorization", f"Bearer {TOKEN}"),)
        for address, expected in servers.items():
            with grpc.insecure_channel(address) as channel:
                for method in served_methods(channel, expected):
                    for name, metadata in WRONG.items():
                        code = call(channel, method, metadata)
                        if code != grpc.StatusCode.UNAUTHENTICATED:
                            leaks.append(f"{method.full_name} with {name or 'no'} token: {code.name}")
                    code = call(channel, method, right)
                    if code == grpc.StatusCode.UNAUTHENTICATED:
                        leaks.append(f"{method.full_name} refused the right token")
                    checked += 1
        assert checked >= 20, checked  # every RPC of every service
        assert not leaks, leaks

        spec = httpx.get(f"{gateway.url}/openapi.json").json()  # the description itself is public
        operations = [(verb.upper(), path) for path, item in spec["paths"].items() for verb in item]
        assert len(operations) >= 15, operations
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            for verb, path in operations:
                url = re.sub(r"\{[^}]+\}", "x", path)
                kw: dict[str, object] = {"json": {}} if verb in ("POST", "PUT", "PATCH") else {}
                statuses = {name: client.request(verb, url, headers=dict(metadata), **kw).status_code  # type: ignore[arg-type]
                            for name, metadata in WRONG.items()}
                allowed = client.request(verb, url, headers=dict(right), **kw).status_code  # type: ignore[arg-type]
                if (verb, path) in PUBLIC_ROUTES:
                    assert 401 not in statuses.values(), (verb, path, statuses)
                    continue
                if set(statuses.values()) != {401}:
                    leaks.append(f"{verb} {path}: {statuses}")
                if allowed == 401:
                    leaks.append(f"{verb} {path} refused the right token")
        assert not leaks, leaks
        print(f"checked {checked} RPCs and {len(operations)} gateway operations, "
              f"{len(PUBLIC_ROUTES)} public, each without, with a wrong and with the right token")
    finally:
        for process in reversed(processes):
            process.terminate()
