# syntax=docker/dockerfile:1.7
# The Inference service (fashion.v1.InferenceService, KServe V2) with the shipped model
# (services/inference/models/fashion-mnist, installed as package data).
# Build from the repository root:
#   CPU: docker build -f deploy/docker/inference.Dockerfile -t fashion/inference:0.1.0 .
#   GPU: docker build -f deploy/docker/inference.Dockerfile --build-arg ONNXRUNTIME=gpu -t fashion/inference-gpu:0.1.0 .
#        (onnxruntime-gpu with its CUDA 13 and cuDNN 9 wheels; the node provides the NVIDIA driver, 580 or newer)
# Runs as uid 10001 with a read-only root filesystem: only /tmp and /var/log/fashion need to be writable.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG ONNXRUNTIME=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, the exact versions of requirements.lock (make lock), so that code changes reuse
# this layer.
COPY requirements.lock ./
RUN pip install --no-deps -r requirements.lock
# onnxruntime-gpu provides the same `onnxruntime` module: it replaces the CPU wheel (same pin).
RUN if [ "$ONNXRUNTIME" = "gpu" ]; then \
        version="$(pip show onnxruntime | sed -n 's/^Version: //p')" \
        && pip uninstall --yes onnxruntime \
        && pip install "onnxruntime-gpu[cuda,cudnn]==${version}"; \
    fi
COPY pyproject.toml README.md ./
COPY clients ./clients
COPY services ./services
RUN pip install --no-deps ./clients . \
    && python -c "from services.common.config import SHIPPED_MODEL_DIR as d; assert (d / 'model.onnx').exists(), d"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 fashion \
    && useradd --system --uid 10001 --gid fashion --no-create-home --home-dir /tmp --shell /usr/sbin/nologin fashion \
    && mkdir -p /var/log/fashion && chown fashion:fashion /var/log/fashion
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    FASHION_LOG_DIR=/var/log/fashion
WORKDIR /tmp
USER 10001:10001
EXPOSE 50051 9101
ENTRYPOINT ["fashion", "serve", "inference"]
