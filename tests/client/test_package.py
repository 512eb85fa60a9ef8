"""The client is a package of its own (clients/, distribution fashion-client): it installs alone into a
new virtual environment, small, and classifies against a running server; importing it or parsing a
command line loads nothing of the server's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fashion.cli.arguments import JOB_STATES
from fashion.client import InferenceClient
from fashion.client.batch import state_name
from fashion.v1 import batch_pb2
from tests.images import encode, fashion_images
from tests.support import REPO, ServiceProcess

SERVER_MODULES = ("numpy", "onnxruntime", "PIL", "matplotlib", "pydantic", "fastapi", "uvicorn", "services")
MAX_INSTALLED_BYTES = 40 * 1024 * 1024


def _loaded(code: str, modules: tuple[str, ...]) -> list[str]:
    """The `modules` present in sys.modules after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {modules!r} if m in sys.modules))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd="/",
                         check=True)
    return out.stdout.split()


def test_importing_the_client_loads_nothing_of_the_server() -> None:
    code = ("import fashion.client, fashion.client.coalesce, fashion.v1.inference_pb2\n"
            "import fashion.kserve.v2.grpc_service_pb2\n"
            "from fashion.client import AsyncInferenceClient, BatchClient, MonitorClient")
    assert _loaded(code, SERVER_MODULES) == []


def test_the_kserve_clients_load_their_protos_on_first_use_only() -> None:
    """Our KServe messages and tritonclient's register the same `inference.*` names: a program may
    use tritonclient beside our clients as long as it does not use KServeClient."""
    code = "import tritonclient.grpc\nfrom fashion.client import InferenceClient, ChannelOptions"
    assert _loaded(code, ("fashion.kserve.v2.grpc_service_pb2",)) == []
    code = "from fashion.client import KServeClient, AsyncKServeClient"
    assert _loaded(code, ("fashion.kserve.v2.grpc_service_pb2", *SERVER_MODULES)) == [
        "fashion.kserve.v2.grpc_service_pb2"]


def test_parsing_a_command_line_loads_neither_grpc_nor_rich() -> None:
    """`fashion --help` and argument errors answer without importing grpc, protobuf or rich."""
    code = ("from fashion.cli import build_parser\n"
            "build_parser().parse_args(['batch', 'list', '--state', 'failed'])")
    assert _loaded(code, (*SERVER_MODULES, "grpc", "google.protobuf", "rich")) == []


def test_the_cli_job_states_are_the_protos() -> None:
    states = {state_name(value).lower() for value in batch_pb2.JobState.values() if value}
    assert set(JOB_STATES) == states


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """./clients installed alone (with its dependencies from the package index) into a new virtual environment."""
    uv = Path(sys.executable).with_name("uv")
    if not uv.exists():
        pytest.skip("uv is not installed (pip install -r requirements-dev.lock)")
    venv = tmp_path_factory.mktemp("client") / "venv"
    subprocess.run([str(uv), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    # A copy of clients/ without build leftovers, so that nothing of the checkout's state leaks in.
    source = tmp_path_factory.mktemp("source") / "clients"
    shutil.copytree(REPO / "clients", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    subprocess.run([str(uv), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), str(source)],
                   check=True)
    return venv


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("FASHION_", "PYTHON", "VIRTUAL_ENV"))} | {"PYTHONNOUSERSITE": "1"}


@pytest.mark.slow
def test_the_client_installs_alone_and_small(client_venv: Path) -> None:
    python = client_venv / "bin" / "python"
    probe = ("import importlib.util as u; print(' '.join(m for m in "
             f"{(*SERVER_MODULES, 'fashion.client', 'fashion.cli')!r} if u.find_spec(m)))")
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True, cwd="/",
                           env=_clean_env()).stdout.split()
    assert found == ["fashion.client", "fashion.cli"]
    size = sum(p.stat().st_size for p in _site_packages(client_venv).rglob("*") if p.is_file())
    assert size <= MAX_INSTALLED_BYTES, f"the installed client takes {size / 2**20:.1f} MiB"


@pytest.mark.slow
def test_the_installed_client_classifies_against_a_running_server(client_venv: Path, inference_server: ServiceProcess,
                                                                   tmp_path: Path) -> None:
    pixels, _ = fashion_images(2)
    images = []
    for index, image in enumerate(pixels):
        images.append(tmp_path / f"item {index}.png")
        images[-1].write_bytes(encode(image))
    fashion = client_venv / "bin" / "fashion"
    out = subprocess.run([str(fashion), "classify", *map(str, images), "--json", "--address", inference_server.address],
                         capture_output=True, text=True, cwd=tmp_path, env=_clean_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    with InferenceClient(inference_server.address) as client:
        expected = [client.classify(path.read_bytes()).category for path in images]
    assert [row["category"] for row in rows] == expected
    assert [row["file"] for row in rows] == [str(p) for p in images]


@pytest.mark.slow
def test_the_client_alone_says_which_commands_need_the_server(client_venv: Path, tmp_path: Path) -> None:
    fashion = client_venv / "bin" / "fashion"
    for command in (["serve", "inference"], ["config"], ["batch", "run", "inbox"], ["model", "evaluate"]):
        out = subprocess.run([str(fashion), *command], capture_output=True, text=True, cwd=tmp_path, env=_clean_env(),
                             timeout=60)
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        assert "needs the server package" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = subprocess.run([str(fashion), "--help"], capture_output=True, text=True, cwd=tmp_path, env=_clean_env())
    assert out.returncode == 0 and "classify" in out.stdout
