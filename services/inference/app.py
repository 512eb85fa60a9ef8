"""The Inference service process: one gRPC port with fashion.v1, KServe V2, health and
reflection; Prometheus metrics on their own HTTP port."""

from __future__ import annotations

import asyncio
import logging

from fashion.kserve.v2 import grpc_service_pb2 as kserve_pb
from fashion.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from fashion.v1 import inference_pb2 as pb
from fashion.v1 import inference_pb2_grpc as pb_grpc
from services.common import server as grpc_server
from services.common.config import InferenceSettings, load_settings
from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.common.security import metrics_token_check
from services.common.tracing import setup_tracing, shutdown_tracing
from services.inference.classifier import Classifier
from services.inference.kserve import KServeServicer
from services.inference.servicer import InferenceServicer

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)
MODEL_RETRY_S = (1, 2, 5, 10, 30)


async def serve(settings: InferenceSettings | None = None) -> None:
    """Run the Inference service until SIGTERM/SIGINT."""
    settings = settings or InferenceSettings()
    setup_logging(settings, "api")
    setup_tracing("fashion-inference")
    start_metrics_server("inference", settings.inference_metrics_port, settings.listen_host(settings.inference_host),
                         metrics_token_check(settings))

    classifier = Classifier(settings)
    server = grpc_server.create_server(settings, "inference", [
        (pb_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(classifier)),
        (kserve_grpc.add_GRPCInferenceServiceServicer_to_server, KServeServicer(classifier, settings.server_name)),
    ])
    health = await grpc_server.add_health_and_reflection(server, SERVICE_NAMES, settings.reflection)
    address = settings.listen_address(settings.inference_host, settings.inference_port)
    await grpc_server.bind(server, settings, address, health)
    await server.start()
    log.info("Inference service listening on %s (NOT_SERVING until the model is loaded)", address)

    loader = asyncio.ensure_future(_load_until_ready(classifier, health))

    async def on_stop() -> None:
        loader.cancel()
        await classifier.close()
        shutdown_tracing()

    await grpc_server.serve_until_signal(server, health, settings.shutdown_grace_s, on_stop)


async def _load_until_ready(classifier: Classifier, health: grpc_server.health.aio.HealthServicer) -> None:
    """Load and warm up the model, retrying with backoff; SERVING only once that succeeded."""
    attempt = 0
    while True:
        try:
            await classifier.load()
        except Exception:
            delay = MODEL_RETRY_S[min(attempt, len(MODEL_RETRY_S) - 1)]
            attempt += 1
            log.error("Model not loaded (attempt %d); retrying in %ds", attempt, delay)
            await asyncio.sleep(delay)
            continue
        await grpc_server.set_serving(health, SERVICE_NAMES, True)
        m = classifier.manifest
        assert m is not None and classifier.model is not None
        log.info("Model %s v%s ready on %s: SERVING", m.name, m.version, classifier.model.provider)
        return


def main() -> None:
    grpc_server.run_service(serve(load_settings(InferenceSettings)))
