# Fashion classifier: the two commands are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: run test chaos install lock dataset test-tools proto docs lint bench train evaluate install-gpu install-train images clean

# The virtual environment, created and filled when missing or when the project or its lock changed:
# the exact versions of requirements-dev.lock, then the two distributions of this checkout (editable).
$(STAMP): pyproject.toml clients/pyproject.toml requirements-dev.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements-dev.lock
	$(PIP) install --quiet --no-deps -e ./clients -e .
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST (tests, training, evaluation, benchmarks): Debian's dataset-fashion-mnist, installed with
# apt-get when missing and we are root; otherwise one line saying what to install, before anything runs.
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
dataset:
	@ls $(FASHION_MNIST_DIR)/t10k-images-idx3-ubyte* >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get && \
		{ $(APT_INSTALL) dataset-fashion-mnist || { apt-get update -qq && $(APT_INSTALL) dataset-fashion-mnist; }; }; } \
		>/dev/null 2>&1; ls $(FASHION_MNIST_DIR)/t10k-images-idx3-ubyte* >/dev/null 2>&1 || \
		{ echo "make: Fashion-MNIST is missing: install Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist) or set FASHION_MNIST_DIR to a folder of its idx files"; exit 2; }

# Tools some tests use (kubectl for the manifests, Debian's prometheus for promtool and the monitoring tests, Debian's
# postgresql for the Batch service's PostgreSQL job store): installed when root and apt-get exist; without them those
# tests skip and say why.
test-tools:
	@command -v kubectl >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get && \
		{ $(APT_INSTALL) kubectl || $(APT_INSTALL) kubernetes-client || \
		  { apt-get update -qq && { $(APT_INSTALL) kubectl || $(APT_INSTALL) kubernetes-client; }; }; }; } >/dev/null 2>&1; \
		command -v kubectl >/dev/null || echo "make: kubectl not found (apt-get install kubectl): the Kubernetes manifest tests will be skipped"
	@{ command -v prometheus && command -v promtool; } >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get && \
		{ $(APT_INSTALL) prometheus || { apt-get update -qq && $(APT_INSTALL) prometheus; }; }; } >/dev/null 2>&1; \
		{ command -v prometheus && command -v promtool; } >/dev/null || echo "make: prometheus not found (apt-get install prometheus): the monitoring tests will be skipped"
	@{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get && \
		{ $(APT_INSTALL) postgresql || { apt-get update -qq && $(APT_INSTALL) postgresql; }; }; } >/dev/null 2>&1; \
		{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 || echo "make: PostgreSQL not found (apt-get install postgresql): the PostgreSQL store tests of the Batch service will be skipped"

## make run: start the whole local stack in the foreground (Ctrl-C stops it)
run: $(STAMP)
	$(VENV)/bin/fashion run

## make test: install and run the whole test suite
test: $(STAMP) dataset test-tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

## make chaos SEEDS=50: the Batch service's seeded chaos test over more seeds than `make test` runs (5)
SEEDS ?= 50
chaos: $(STAMP) dataset
	FASHION_CHAOS_SEEDS=$(SEEDS) $(PY) -m pytest -q -s -p no:cacheprovider tests/batch/test_chaos.py

## make proto: regenerate clients/fashion/{v1,kserve} from protos/
proto: $(STAMP)
	$(PY) protos/generate.py

## make docs: regenerate docs/configuration.md from the settings classes (services/common/config.py)
docs: $(STAMP)
	$(PY) docs/generate_configuration.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

## make lock: pin every dependency again from pyproject.toml and clients/pyproject.toml (uv pip compile):
## requirements.lock for the images, requirements-dev.lock (with the dev extra) for make and CI
LOCK := $(VENV)/bin/uv pip compile - --universal --python-version 3.11 --quiet --no-header \
	--no-emit-package fashion-client --no-emit-package fashion-classifier
lock: $(STAMP)
	printf './clients\n.\n' | $(LOCK) -o requirements.lock
	printf './clients\n.[dev]\n' | $(LOCK) -o requirements-dev.lock

## make bench: benchmarks, results written to bench/results/ (SECTIONS="peers gateway" runs only those)
SECTIONS ?=
bench: $(STAMP) dataset
	@# The C++ load generator needs gRPC C++ and protobuf; installed when this is a Debian machine and we are root.
	@pkg-config --exists grpc++ protobuf 2>/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		g++ pkg-config libgrpc++-dev libprotobuf-dev protobuf-compiler-grpc >/dev/null; } || \
		echo "bench: no gRPC C++ (apt-get install libgrpc++-dev libprotobuf-dev protobuf-compiler-grpc): C++ load generator skipped"
	$(PY) -m bench.run $(if $(SECTIONS),--only $(SECTIONS))

## make train: train the default model (needs torch; about 30 minutes on 2 cores)
install-train: $(STAMP)
	$(PIP) install --quiet -e ./clients -e ".[dev,train]"

train: install-train dataset
	$(PY) -m services.inference.training

evaluate: $(STAMP) dataset
	$(VENV)/bin/fashion model evaluate

## make install-gpu: onnxruntime-gpu (the `gpu` extra: CUDA 13 and cuDNN wheels) in place of the CPU wheel
install-gpu: $(STAMP)
	$(PIP) uninstall --quiet --yes onnxruntime
	$(PIP) install --quiet "$$($(PY) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"][0])')"

## make images REGISTRY=registry.example.com/fashion TAG=0.1.0: build every image of deploy/docker/Dockerfile
## (IMAGES, one target each) with docker or podman and push it (PUSH=0: build only). The defaults are the
## registry and tag of deploy/k8s/base/kustomization.yaml (images:); another registry: change it there.
REGISTRY ?= ghcr.io/fashion-classifier
TAG ?= $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' services/__init__.py)
IMAGES ?= inference inference-gpu batch monitor gateway
PUSH ?= 1
CONTAINER_TOOL ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
images:
	@[ -n "$(CONTAINER_TOOL)" ] || { echo "make images: neither docker nor podman is installed: install one of them (or set CONTAINER_TOOL to a compatible command) to build the images"; exit 2; }
	$(foreach t,$(IMAGES),$(CONTAINER_TOOL) build -f deploy/docker/Dockerfile --target $(t) --build-arg VERSION=$(TAG) -t $(REGISTRY)/$(t):$(TAG) . &&) true
	$(if $(filter 1,$(PUSH)),$(foreach t,$(IMAGES),$(CONTAINER_TOOL) push $(REGISTRY)/$(t):$(TAG) &&) true,echo "make images: PUSH=$(PUSH): built, not pushed")

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
