"""The gateway's HTTP routes: each one call (or two) to a gRPC service through fashion.client, and a
translation of the answer to JSON. No decision is taken here that a service could take."""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime
from typing import Annotated

import grpc
from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BeforeValidator

from fashion.client import AsyncInferenceClient, AsyncKServeClient
from fashion.client.batch import AsyncBatchClient
from fashion.client.inference import image_error_code
from fashion.client.monitor import AsyncMonitorClient
from fashion.client.protojson import enum_number, to_json
from fashion.kserve.v2 import grpc_service_pb2 as kserve_pb
from fashion.v1 import batch_pb2, monitor_pb2
from fashion.v1 import inference_pb2 as pb
from services.common.config import GatewaySettings
from services.common.metrics import retire_dead_processes, summed_registry
from services.common.tensors import TensorError
from services.gateway import openinference, uploads
from services.gateway.backends import Backends
from services.gateway.errors import HTTP_STATUS, ApiError, ErrorBody, OpenInferenceError
from services.gateway.schemas import (
    ApiStats,
    BatchPrediction,
    Health,
    InferenceRequest,
    InferenceResponse,
    Prediction,
    SubmitJob,
    inline_schema,
    schema,
)

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
TOP_K_MAX = 1000


def ascii_digits(value: object) -> object:
    """top_k's rule before it is an int: ASCII digits only (int() and pydantic would also take '１',
    '+5', ' 5', '1_0', '5.0'); the /predict fast path applies the same rule."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError(f"must be a whole number in ASCII digits, 0 to {TOP_K_MAX}")
    return value


TopK = Annotated[int, BeforeValidator(ascii_digits),
                 Query(ge=0, le=TOP_K_MAX, description="categories returned per image; 0: 3")]
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 413, 429, 502, 503, 504)}
Job = schema(batch_pb2.Job.DESCRIPTOR)
JobList = schema(batch_pb2.ListJobsResponse.DESCRIPTOR)
BatchStats = schema(batch_pb2.BatchStats.DESCRIPTOR)
SystemHealth = schema(monitor_pb2.SystemHealth.DESCRIPTOR)
BatchHealth = schema(batch_pb2.BatchHealth.DESCRIPTOR)
Alerts = schema(monitor_pb2.ListAlertsResponse.DESCRIPTOR)
Report = schema(monitor_pb2.Report.DESCRIPTOR)
ModelInfo = schema(pb.ModelInfo.DESCRIPTOR)


def inference(request: Request) -> AsyncInferenceClient:
    return request.app.state.backends.inference


def kserve(request: Request) -> AsyncKServeClient:
    return request.app.state.backends.kserve


def batch(request: Request) -> AsyncBatchClient:
    return request.app.state.backends.batch


def monitor(request: Request) -> AsyncMonitorClient:
    return request.app.state.backends.monitor


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def _top_k(r: pb.ClassifyResponse) -> list[dict[str, object]]:
    return [{"label": c.label, "index": c.index, "confidence": c.confidence} for c in r.top_k]


async def prediction(backends: Backends, body: bytes, content_type: str | None, top_k: int,
                     own_call: bool) -> dict[str, object]:
    """POST /predict's answer: the image of the multipart field `file`, classified."""
    upload = uploads.files(body, content_type, "file")[0]
    r = await backends.classify(upload.data, top_k, own_call)
    return {"filename": upload.filename, "category": r.category, "confidence": r.confidence,
            "uncertain": r.uncertain, "top_k": _top_k(r), "model_name": r.model_name,
            "model_version": r.model_version, "latency_ms": r.latency_ms}


# --- no token needed: probes and scrapers ------------------------------------------------------
public = APIRouter(tags=["health"])


@public.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(request: Request) -> JSONResponse:
    """The REST API's health check: healthy (200) when the Inference service is SERVING with its
    model loaded, else unhealthy (503)."""
    client = inference(request)
    try:
        serving, stats = await asyncio.gather(client.health(timeout_s=HEALTH_TIMEOUT_S),
                                              client.stats(timeout_s=HEALTH_TIMEOUT_S))
    except grpc.aio.AioRpcError as exc:
        log.warning("Health: Inference service check failed: %s %s", exc.code().name, exc.details())
        return JSONResponse({"status": "unhealthy", "model_loaded": False, "classes": 0, "timestamp": _now()}, 503)
    healthy = serving == "SERVING" and stats.model_loaded
    if not healthy:
        log.warning("Health: Inference service is %s, model loaded: %s", serving, stats.model_loaded)
    body = {"status": "healthy" if healthy else "unhealthy", "model_loaded": stats.model_loaded,
            "classes": stats.classes, "timestamp": _now()}
    return JSONResponse(body, 200 if healthy else 503)


@public.get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    """The gateway process itself (Kubernetes liveness and readiness): no backend is called."""
    return {"status": "ok"}


metrics = APIRouter(tags=["metrics"])


@metrics.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def prometheus_metrics() -> Response:
    """Prometheus metrics of the gateway: HTTP requests by route and status, latency, in flight (with
    several workers, summed over all of them, whichever answers)."""
    if folder := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        retire_dead_processes(folder)
    return Response(generate_latest(summed_registry("gateway") or REGISTRY), media_type=CONTENT_TYPE_LATEST)


# --- Inference -------------------------------------------------------------------------------
def inference_router(settings: GatewaySettings) -> APIRouter:
    router = APIRouter(tags=["inference"], responses=ERRORS)
    max_files = settings.max_batch_files

    @router.get("/stats", response_model=ApiStats)
    async def stats(request: Request) -> JSONResponse:
        """The REST API's statistics: counters of the Inference service since its start."""
        s = await inference(request).stats()
        return JSONResponse({
            "uptime_seconds": int(s.uptime_seconds), "uptime_human": s.uptime_human,
            "total_requests": int(s.total_requests), "total_images_processed": int(s.total_images_processed),
            "successful_predictions": int(s.successful_predictions), "failed_predictions": int(s.failed_predictions),
            "success_rate": float(s.success_rate), "model_loaded": s.model_loaded, "timestamp": s.timestamp,
        })

    @router.post("/predict", response_model=Prediction,
                 openapi_extra=uploads.openapi_body("file", "The image file (JPEG, PNG, WebP, BMP, GIF, TIFF)"))
    async def predict(request: Request, top_k: TopK = 0) -> JSONResponse:
        """Classify one uploaded image: its category, confidence and the top-k categories."""
        # Served here when traces are exported (with FastAPI's server span); else by PredictFastPath.
        own_call = request.app.state.trace_http or "traceparent" in request.headers
        return JSONResponse(await prediction(request.app.state.backends, await request.body(),
                                             request.headers.get("content-type"), top_k, own_call))

    @router.post("/predict/batch", response_model=BatchPrediction,
                 openapi_extra=uploads.openapi_body("files", "The image files", many=True))
    async def predict_batch(request: Request, top_k: TopK = 0) -> JSONResponse:
        """Classify several images in one call. A bad image fails only its own result (`error`)."""
        files = uploads.files(await request.body(), request.headers.get("content-type"), "files")
        if len(files) > max_files:
            raise ApiError(400, f"{len(files)} files in one batch; at most {max_files} (FASHION_MAX_BATCH_FILES)")
        resp = await inference(request).classify_batch([f.data for f in files], top_k=top_k)
        results = []
        for f, r in zip(files, resp.results, strict=True):
            if r.HasField("error"):
                code = image_error_code(r.error)
                results.append({"filename": f.filename, "error": {
                    "status": HTTP_STATUS.get(code, 500), "code": code.name, "message": r.error.message}})
            else:
                results.append({"filename": f.filename, "category": r.category, "confidence": r.confidence,
                                "uncertain": r.uncertain, "top_k": _top_k(r)})
        return JSONResponse({"results": results, "model_name": resp.model_name, "model_version": resp.model_version,
                             "latency_ms": resp.latency_ms})

    @router.get("/model", response_model=ModelInfo)
    async def model_info(request: Request) -> JSONResponse:
        """The served model: name, version, labels, input, execution provider."""
        return JSONResponse(to_json(await inference(request).model_info()))

    return router


# --- Batch -----------------------------------------------------------------------------------
JobId = Annotated[str, Path(min_length=1, max_length=200)]


def batch_router() -> APIRouter:
    router = APIRouter(prefix="/batch", tags=["batch"], responses={**ERRORS, 404: {"model": ErrorBody}})

    @router.post("/jobs", response_model=Job, status_code=201)
    async def submit_job(request: Request, body: SubmitJob) -> JSONResponse:
        """Start sorting a folder. Paths are relative to the Batch service's data root."""
        job = await batch(request).submit(body.input_dir, mode=body.mode or "", min_confidence=body.min_confidence,
                                          recursive=body.recursive, output_dir=body.output_dir,
                                          idempotency_key=body.idempotency_key)
        return JSONResponse(to_json(job), 201)

    @router.get("/jobs", response_model=JobList)
    async def list_jobs(request: Request, limit: Annotated[int, Query(ge=0, le=1000)] = 0,
                        state: Annotated[str | None, Query(description="queued, running, waiting, succeeded, "
                                                                       "failed or cancelled")] = None) -> JSONResponse:
        """Jobs, most recent first (limit 0: 50)."""
        number = batch_pb2.JOB_STATE_UNSPECIFIED
        if state:
            try:
                number = enum_number(batch_pb2.JobState.DESCRIPTOR, state)
            except ValueError as exc:
                raise ApiError(400, str(exc)) from None
        jobs = await batch(request).list(limit=limit, state=number)
        return JSONResponse({"jobs": [to_json(job) for job in jobs]})

    @router.get("/jobs/{job_id}", response_model=Job)
    async def get_job(request: Request, job_id: JobId) -> JSONResponse:
        return JSONResponse(to_json(await batch(request).get(job_id)))

    @router.post("/jobs/{job_id}/cancel", response_model=Job)
    async def cancel_job(request: Request, job_id: JobId) -> JSONResponse:
        """Stop a queued or running job; files already sorted stay sorted."""
        return JSONResponse(to_json(await batch(request).cancel(job_id)))

    @router.get("/stats", response_model=BatchStats)
    async def batch_stats(request: Request, days: Annotated[int, Query(ge=0, le=366)] = 0) -> JSONResponse:
        """Run history of the last `days` (0: 7)."""
        return JSONResponse(to_json(await batch(request).stats(days=days)))

    return router


# --- Monitor ---------------------------------------------------------------------------------
def monitor_router() -> APIRouter:
    router = APIRouter(prefix="/monitor", tags=["monitor"], responses=ERRORS)

    @router.get("/health", response_model=SystemHealth)
    async def system_health(request: Request) -> JSONResponse:
        """The Monitor service's check of every service and disk, now."""
        return JSONResponse(to_json(await monitor(request).system_health()))

    @router.get("/batch-health", response_model=BatchHealth)
    async def batch_health(request: Request, days: Annotated[int, Query(ge=0, le=366)] = 0) -> JSONResponse:
        """The batch processing health check: last run age, recent errors, statistics (days 0: 7)."""
        return JSONResponse(to_json(await monitor(request).batch_health(days=days)))

    @router.get("/alerts", response_model=Alerts)
    async def alerts(request: Request, history_limit: Annotated[int, Query(ge=0, le=10000)] = 0,
                     rule: str = "") -> JSONResponse:
        """Active alerts, the alert history and the configured rules."""
        return JSONResponse(to_json(await monitor(request).alerts(history_limit=history_limit, rule=rule)))

    @router.post("/reports", response_model=Report, status_code=201)
    async def generate_report(request: Request, chart_days: Annotated[int, Query(ge=0, le=366)] = 0,
                              text_only: bool = False) -> JSONResponse:
        """Write the dashboard (text report, charts, HTML page) on the Monitor service's machine."""
        report = await monitor(request).generate_report(chart_days=chart_days, text_only=text_only)
        return JSONResponse(to_json(report), 201)

    return router


# --- Open Inference Protocol (KServe V2 REST) ---------------------------------------------------
ServerMetadata = schema(kserve_pb.ServerMetadataResponse.DESCRIPTOR)
ModelMetadata = schema(kserve_pb.ModelMetadataResponse.DESCRIPTOR)
ModelStatistics = schema(kserve_pb.ModelStatisticsResponse.DESCRIPTOR)
V2_ERRORS = {code: {"model": OpenInferenceError} for code in (400, 401, 404, 413, 429, 502, 503, 504)}
HEALTH = {200: {"description": "Yes (empty body)"}, 400: {"description": "No (empty body)"}}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": inline_schema(InferenceRequest)},
    "application/octet-stream": {"schema": {
        "type": "string", "format": "binary",
        "description": "Triton's binary tensor data extension: the JSON request (Inference-Header-Content-Length "
                       "bytes), then each input's raw data, in input order, of its parameters.binary_data_size "
                       "bytes (BYTES elements: a 4-byte little-endian length, then the bytes)."}},
}}}
INFER_ANSWERS = {200: {"content": {"application/octet-stream": {"schema": {
    "type": "string", "format": "binary",
    "description": "With binary outputs: the JSON response (Inference-Header-Content-Length bytes), then each "
                   "binary output's data, of its parameters.binary_data_size bytes."}}}}}
HeaderLength = Annotated[int | None, Header(alias="Inference-Header-Content-Length", ge=0, description=(
    "Triton's binary tensor data extension: the length of the JSON request before the binary data"))]


def _yes_no(answer: bool) -> Response:
    """The protocol's health answers: 200 for yes, 400 for no, no body."""
    return Response(status_code=200 if answer else 400)


def open_inference_router(settings: GatewaySettings) -> APIRouter:
    """The Open Inference Protocol's REST API (what tritonclient.http calls), forwarded to the
    Inference service's KServe V2 gRPC API: metadata, health, statistics and inference, with
    Triton's binary tensor data, classification and statistics extensions."""
    router = APIRouter(prefix="/v2", tags=["open inference protocol"], responses=V2_ERRORS)
    limit = settings.max_batch_upload_bytes

    @router.get("", response_model=ServerMetadata)
    async def server_metadata(request: Request) -> JSONResponse:
        """The server: its name, version and the protocol extensions it serves."""
        meta = await kserve(request).server_metadata()
        body = to_json(meta)
        body["extensions"] = [*meta.extensions, *openinference.REST_EXTENSIONS]
        return JSONResponse(body)

    @router.get("/health/live", responses=HEALTH)
    async def server_live(request: Request) -> Response:
        """Whether the Inference service is live."""
        return _yes_no(await kserve(request).server_live())

    @router.get("/health/ready", responses=HEALTH)
    async def server_ready(request: Request) -> Response:
        """Whether the Inference service is ready: its model loaded."""
        return _yes_no(await kserve(request).server_ready())

    @router.get("/models/stats", response_model=ModelStatistics)
    async def all_statistics(request: Request) -> JSONResponse:
        """Every model's statistics (Triton's statistics extension)."""
        return JSONResponse(to_json(await kserve(request).model_statistics()))

    @router.get("/models/{name}", response_model=ModelMetadata)
    async def model_metadata(request: Request, name: str) -> JSONResponse:
        """The model: its versions, and its inputs and outputs (name, datatype, shape; -1: any size).
        A request carries one of the inputs."""
        return JSONResponse(to_json(await kserve(request).model_metadata(name)))

    @router.get("/models/{name}/versions/{version}", response_model=ModelMetadata)
    async def model_version_metadata(request: Request, name: str, version: str) -> JSONResponse:
        return JSONResponse(to_json(await kserve(request).model_metadata(name, version)))

    @router.get("/models/{name}/ready", responses=HEALTH)
    async def model_ready(request: Request, name: str) -> Response:
        return _yes_no(await kserve(request).model_ready(name))

    @router.get("/models/{name}/versions/{version}/ready", responses=HEALTH)
    async def model_version_ready(request: Request, name: str, version: str) -> Response:
        return _yes_no(await kserve(request).model_ready(name, version))

    @router.get("/models/{name}/stats", response_model=ModelStatistics)
    async def model_statistics(request: Request, name: str) -> JSONResponse:
        """Inference and execution counts, and the time requests spent queued, preparing input, in the
        model and answering (Triton's statistics extension)."""
        return JSONResponse(to_json(await kserve(request).model_statistics(name)))

    @router.get("/models/{name}/versions/{version}/stats", response_model=ModelStatistics)
    async def model_version_statistics(request: Request, name: str, version: str) -> JSONResponse:
        return JSONResponse(to_json(await kserve(request).model_statistics(name, version)))

    @router.post("/models/{name}/infer", response_model=InferenceResponse, openapi_extra=INFER_BODY,
                 responses=INFER_ANSWERS)
    async def model_infer(request: Request, name: str, header_length: HeaderLength = None) -> Response:
        """Run the model on one input: pixels (UINT8 0-255 or FP32 in [0, 1]) or encoded image files
        (BYTES). As JSON, or with binary tensor data after the JSON (Inference-Header-Content-Length).
        Outputs: the probabilities, or with parameters.classification k the top k as
        "score:index:label" strings."""
        return await _infer(request, name, "", header_length, limit)

    @router.post("/models/{name}/versions/{version}/infer", response_model=InferenceResponse,
                 openapi_extra=INFER_BODY, responses=INFER_ANSWERS)
    async def model_version_infer(request: Request, name: str, version: str,
                                  header_length: HeaderLength = None) -> Response:
        return await _infer(request, name, version, header_length, limit)

    return router


async def _infer(request: Request, name: str, version: str, header_length: int | None, limit: int) -> Response:
    """POST /v2/models/{name}[/versions/{version}]/infer: the REST request as a gRPC ModelInfer
    call, its answer as the REST response."""
    headers = request.headers
    try:
        body = openinference.decompressed(await request.body(), headers.get("content-encoding"), limit)
        infer, binary = openinference.infer_request(name, version, body, header_length)
    except openinference.BodyTooLarge as exc:
        raise ApiError(413, str(exc)) from None
    except TensorError as exc:
        raise ApiError(400, str(exc)) from None
    client = kserve(request)
    _refuse_oversized(infer, client.options.max_message_bytes)
    payload, json_length = openinference.infer_response(await client.model_infer(infer), binary)
    payload, encoding = openinference.compressed(payload, headers.get("accept-encoding"))
    answer_headers = {} if encoding is None else {"Content-Encoding": encoding}
    if json_length is None:
        return Response(payload, media_type="application/json", headers=answer_headers)
    answer_headers["Inference-Header-Content-Length"] = str(json_length)
    return Response(payload, media_type="application/octet-stream", headers=answer_headers)


def _refuse_oversized(infer: kserve_pb.ModelInferRequest, max_message_bytes: int) -> None:
    """413 for a request the gRPC channel would refuse to send (RESOURCE_EXHAUSTED, which is no
    reason to retry): JSON `data` takes fewer bytes than the raw tensor data it becomes."""
    size = infer.ByteSize()
    if size <= max_message_bytes:
        return
    advice = "send fewer images per request"
    batch = infer.inputs[0].shape[0] if infer.inputs and infer.inputs[0].shape else 0
    if batch > 1:
        # How many images fit under the limit at this request's bytes per image.
        fitting = max(1, max_message_bytes * batch // size)
        advice = f"split its {batch} images into requests of at most {fitting}"
    raise ApiError(413, f"the inference request is {size} bytes as a gRPC message, over the Inference channel's "
                        f"limit of {max_message_bytes} bytes (FASHION_MAX_MESSAGE_BYTES); {advice}")
