"""Start MLServer 1.7.1 (in .venv-mlserver, created on first use) on a model.onnx."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services import GRPC_EXPERIMENTS

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV = REPO / ".venv-mlserver"
# The peer runs the same ONNX Runtime release as our service, so that the comparison is of the servers.
REQUIREMENTS = ["mlserver==1.7.1", "uvloop<0.22", f"onnxruntime=={importlib.metadata.version('onnxruntime')}"]


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    installed = VENV / "requirements.txt"
    wanted = "\n".join(REQUIREMENTS)
    if not (VENV / "bin" / "mlserver").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if not installed.exists() or installed.read_text() != wanted:
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS], check=True)
        installed.write_text(wanted)
    return VENV / "bin" / "mlserver"


@dataclass(frozen=True)
class Tuning:
    """The knobs MLServer's users tune for a small CPU model (bench.peers tries each combination)."""

    intra_op_threads: int = 2
    """ONNX Runtime's intra-op threads in the runtime."""
    spinning: bool = True
    """ONNX Runtime's intra-op threads spin while waiting for work (its default) or sleep."""
    max_batch_size: int = 64
    """Adaptive batching: the most requests in one model run."""
    parallel_workers: int = 1
    """MLServer's inference pool: worker processes that run the model (its default is 1)."""

    def label(self) -> str:
        return (f"threads {self.intra_op_threads}, spinning {'on' if self.spinning else 'off'}, "
                f"batch {self.max_batch_size}, parallel_workers {self.parallel_workers}")


def start(model_onnx: Path, workdir: Path, name: str, input_name: str, output_name: str,
          grpc_port: int, http_port: int, metrics_port: int, tuning: Tuning = Tuning(),
          max_batch_time_s: float = 0.005) -> subprocess.Popen[bytes]:
    """Write an MLServer model repository into `workdir` and start `mlserver start` on it."""
    mlserver = ensure_venv()
    model_dir = workdir / name
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_onnx, model_dir / "model.onnx")
    shutil.copy(BENCH / "mlserver" / "onnx_runtime.py", workdir / "onnx_runtime.py")
    (workdir / "settings.json").write_text(json.dumps({
        "grpc_port": grpc_port, "http_port": http_port, "metrics_port": metrics_port,
        "debug": False, "load_models_at_startup": True, "parallel_workers": tuning.parallel_workers,
    }))
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": name,
        "implementation": "onnx_runtime.OnnxRuntimeModel",
        "max_batch_size": tuning.max_batch_size,
        "max_batch_time": max_batch_time_s,
        "inputs": [{"name": input_name, "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [{"name": output_name, "datatype": "FP32", "shape": [-1, 10]}],
        "parameters": {"uri": str(model_dir / "model.onnx"), "extra": {
            "intra_op_threads": tuning.intra_op_threads, "allow_spinning": tuning.spinning}},
    }))
    log = open(workdir / "mlserver.out", "ab")
    # The same grpcio transport as our services (services.GRPC_EXPERIMENTS): MLServer serves gRPC with grpc.aio too.
    env = {**os.environ, "GRPC_EXPERIMENTS": os.environ.get("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)}
    return subprocess.Popen([str(mlserver), "start", str(workdir)], cwd=workdir, stdout=log,
                            stderr=subprocess.STDOUT, env=env)


def wait_ready(address: str, name: str, timeout: float = 120) -> None:
    import tritonclient.grpc as triton

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with triton.InferenceServerClient(address) as client:
                if client.is_model_ready(name):
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"MLServer at {address} not ready after {timeout}s")
