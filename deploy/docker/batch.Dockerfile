# syntax=docker/dockerfile:1.7
# The Batch service (fashion.v1.BatchService); also runs the scheduled and sharded runs (fashion batch ...).
# Build from the repository root:  docker build -f deploy/docker/batch.Dockerfile -t fashion/batch:0.1.0 .
# Runs as uid 10001 with a read-only root filesystem: only /tmp and /var/log/fashion, /data need to be writable.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, the exact versions of requirements.lock (make lock), so that code changes reuse
# this layer.
COPY requirements.lock ./
RUN pip install --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY clients ./clients
COPY services ./services
RUN pip install --no-deps ./clients .

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 fashion \
    && useradd --system --uid 10001 --gid fashion --no-create-home --home-dir /tmp --shell /usr/sbin/nologin fashion \
    && mkdir -p /var/log/fashion /data && chown fashion:fashion /var/log/fashion /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    FASHION_LOG_DIR=/var/log/fashion \
    FASHION_DATA_ROOT=/data \
    FASHION_RESULTS_DIR=/data/results
WORKDIR /tmp
USER 10001:10001
EXPOSE 50052 9102
ENTRYPOINT ["fashion", "serve", "batch"]
