"""The Inference service process: one gRPC port with fashion.v1 and KServe V2 (health and
reflection beside them), Prometheus metrics on their own HTTP port; NOT_SERVING until the model is
loaded and warm. The process around it is services.common.bootstrap's."""

from __future__ import annotations

import asyncio
import logging
import os

from fashion.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from fashion.v1 import inference_pb2_grpc as pb_grpc
from services.common.bootstrap import (
    GrpcService,
    Listener,
    ServiceParts,
    load,
    refuse_unusable_ports,
    run_loop,
    serve,
    service_ports,
    stop_with_parent,
)
from services.common.config import InferenceSettings
from services.inference import processes
from services.inference.classifier import Classifier
from services.inference.cpus import server_processes
from services.inference.kserve import KServeServicer
from services.inference.servicer import InferenceServicer

log = logging.getLogger(__name__)

MODEL_RETRY_S = (1, 2, 5, 10, 30)


class InferenceParts(ServiceParts):
    """The classifier behind both APIs; ready once the model is loaded and warmed up."""

    def __init__(self, settings: InferenceSettings) -> None:
        self.classifier = Classifier(settings)
        self.servicers = [
            (pb_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(self.classifier)),
            (kserve_grpc.add_GRPCInferenceServiceServicer_to_server,
             KServeServicer(self.classifier, settings.server_name)),
        ]

    def describe(self) -> str:
        if self.classifier.ready:  # a replacement server process, warm before it listened
            return ""
        siblings = self.classifier.siblings
        return "NOT_SERVING until the model is loaded" + (
            f" in all {siblings.processes} server processes" if siblings is not None else "")

    async def start(self) -> None:
        if self.classifier.siblings is not None:
            self.classifier.siblings.start()

    async def ready(self) -> str:
        """Load and warm up the model, retrying with backoff."""
        attempt = 0
        while True:
            try:
                await self.classifier.load()
            except Exception:
                delay = MODEL_RETRY_S[min(attempt, len(MODEL_RETRY_S) - 1)]
                attempt += 1
                log.error("Model not loaded (attempt %d); retrying in %ds", attempt, delay)
                await asyncio.sleep(delay)
                continue
            m, model = self.classifier.manifest, self.classifier.model
            assert m is not None and model is not None
            siblings = self.classifier.siblings
            if siblings is None:
                return f"model {m.name} v{m.version} ready on {model.provider}"
            await siblings.wait_all_ready()
            return f"model {m.name} v{m.version} ready on {model.provider} in all {siblings.processes} processes"

    async def stop(self) -> None:
        await self.classifier.close()
        if self.classifier.siblings is not None:
            await self.classifier.siblings.stop()


SERVICE = GrpcService(
    name="inference", settings_class=InferenceSettings, log_name="api",
    listener=lambda s: Listener(s.inference_host, s.inference_port, s.inference_metrics_port),
    build=InferenceParts, reuse_port=lambda s: server_processes(s) > 1,
    ready_before_listening=lambda s: processes.is_replacement(),
)


def main() -> None:
    """One server process (the default on up to 2 cores), else a parent that starts
    FASHION_INFERENCE_PROCESSES of them on the one port (services.inference.processes)."""
    settings = load(SERVICE.settings_class, SERVICE.check)
    # The parent looks for any listener on the port; a server process, beside its siblings' listeners.
    refuse_unusable_ports(settings, service_ports(SERVICE, settings, shared=processes.is_child()))
    count = server_processes(settings)
    if count > 1 and not processes.is_child():
        raise SystemExit(processes.supervise(settings, count))
    if processes.is_child():
        stop_with_parent(os.environ.get(processes.PARENT_PID_ENV))
    run_loop(serve(SERVICE, settings))
