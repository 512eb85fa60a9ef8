#!/bin/bash
# bench.scaling on a lent 16-core device machine, whose Python (3.12) lacks our packages and which
# reaches no registry: `prepare` here gathers what it needs into .dev/ (ignored through
# .git/info/exclude), then the device tool runs `run` there with carry [".dev"].
#   bench/device_scaling.sh prepare
#   bench/device_scaling.sh run [bench.scaling arguments]   # on the device; report under $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=.dev
# What the Inference service and bench.scaling import that the device's image does not hold.
PACKAGES="grpcio grpcio-health-checking grpcio-reflection protobuf onnxruntime opentelemetry-api opentelemetry-sdk
opentelemetry-semantic-conventions opentelemetry-instrumentation opentelemetry-instrumentation-grpc pydantic
pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions wrapt simplejpeg
prometheus-client packaging"

prepare() {
    grep -qx "/$DEV/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$DEV/" >> .git/info/exclude; }
    rm -rf "$DEV" && mkdir -p "$DEV/whl" "$DEV/fmnist" "$DEV/native/lib"
    pins=$(for name in $PACKAGES; do grep -m1 "^$name==" requirements.lock | cut -d' ' -f1; done)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEV/whl" $pins
    cp "${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"/t10k-* "$DEV/fmnist/"
    rm -f bench/work/native/classify_load  # a rebuild: `run` puts the wrapper there
    binary=$(.venv/bin/python -c "from bench import native; print(native.build())")
    cp "$binary" "$DEV/native/classify_load.bin"
    # gRPC C++ and its libraries travel beside the binary; the C runtime is the device's own.
    ldd "$binary" | awk '/=>/ {print $3}' | grep -v -E '/(libc|libm|libstdc\+\+|libgcc_s)\.so' |
        xargs -I{} cp -L {} "$DEV/native/lib/"
    printf '#!/bin/sh\nhere=$(dirname "$0")\nLD_LIBRARY_PATH="$here/lib" exec "$here/classify_load.bin" "$@"\n' \
        > "$DEV/native/classify_load"
    chmod +x "$DEV/native/classify_load"
    du -sh "$DEV"
}

run() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DEV"/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD:$PWD/clients PYTHONUNBUFFERED=1 FASHION_MNIST_DIR=$PWD/$DEV/fmnist
    mkdir -p bench/work/native && cp -r "$DEV/native/." bench/work/native/
    touch bench/work/native/classify_load  # newer than its source: bench.native uses it as built
    lscpu | grep -E 'Model name|^CPU\(s\)|Thread' || true
    python3 -m bench.scaling "$@" --out "${OUT:-bench/results}/scaling_$(date +%Y%m%d_%H%M%S).md"
}

"$@"
