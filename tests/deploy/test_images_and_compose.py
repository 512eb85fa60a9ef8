"""The Dockerfile and the compose file agree with the Kubernetes manifests: images, ports, users,
settings, entry points; one multi-stage Dockerfile with a target per service, each non-root, labelled
(OCI) and built on a pinned base from requirements.lock; `make images` builds and pushes them all."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from services.launcher import SERVICES as SERVABLE
from tests.support import REPO

DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
K8S_BASE = REPO / "deploy" / "k8s" / "base"
NAMES = ["inference", "batch", "monitor", "gateway"]
TARGETS = [*NAMES, "inference-gpu"]
REGISTRY = "ghcr.io/fashion-classifier"


def stages() -> dict[str, dict[str, Any]]:
    """The Dockerfile's stages by name: the image they start FROM and their instructions."""
    found: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text()).splitlines():
        if match := re.match(r"FROM (\S+) AS (\S+)$", line):
            current = found[match.group(2)] = {"from": match.group(1), "lines": []}
        elif current is not None and line and not line.startswith("#"):
            current["lines"].append(line)
    return found


def chain(target: str) -> list[dict[str, Any]]:
    """A target and the stages it is built on, the target first."""
    all_stages, found = stages(), []
    while target in all_stages:
        found.append(all_stages[target])
        target = all_stages[target]["from"]
    return found


def instructions(target: str, keyword: str) -> list[str]:
    """Every `keyword` instruction's arguments a target inherits, the nearest (the effective one) first."""
    return [line[len(keyword) + 1:] for stage in chain(target) for line in reversed(stage["lines"])
            if line.startswith(keyword + " ")]


def labels(target: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for args in reversed(instructions(target, "LABEL")):
        found |= dict(re.findall(r'(\S+?)="([^"]*)"', args))
    return found


def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S_BASE.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s_container(name: str) -> dict[str, Any]:
    deployment = next(d for d in k8s_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == f"fashion-{name}")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def k8s_config() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (K8S_BASE / "fashion.env").read_text().splitlines()
             if line and not line.startswith("#")]
    return {k: v for k, v in pairs}


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())


def test_one_dockerfile_pinned_base_and_build_from_the_lock() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base, "the base image is one pinned ARG"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base.group(1)), base.group(1)
    assert not list(DOCKERFILE.parent.glob("*.Dockerfile")), "one Dockerfile, a target per service"
    build = stages()["build"]
    assert build["from"] == "${PYTHON_IMAGE}"
    runs = [line for line in build["lines"] if line.startswith("RUN ")]
    assert "RUN pip install --no-deps -r requirements.lock" in runs
    assert any(line.startswith("RUN pip install --no-deps ./clients .") for line in runs)
    assert set(TARGETS) <= set(stages())


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_is_multistage_non_root_and_labelled(target: str) -> None:
    from services import __version__

    bases = chain(target)
    assert bases[-1]["from"] == "${PYTHON_IMAGE}", "built on the pinned base"
    assert instructions(target, "USER")[0] == "10001:10001"
    venv = instructions(target, "COPY")
    assert venv[0] == ("--from=build-gpu /opt/venv /opt/venv" if target.endswith("-gpu")
                       else "--from=build /opt/venv /opt/venv"), "only the virtual environment comes along"
    service = target.removesuffix("-gpu")
    assert instructions(target, "ENTRYPOINT")[0] == f'["fashion", "serve", "{service}"]' and service in SERVABLE
    exposed = {int(p) for p in instructions(target, "EXPOSE")[0].split()}
    assert exposed == {p["containerPort"] for p in k8s_container(service)["ports"]}
    found = labels(target)
    assert found["org.opencontainers.image.title"] == f"fashion-{target}"
    assert found["org.opencontainers.image.source"].startswith("https://github.com/")
    assert found["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert found["org.opencontainers.image.version"] == "${VERSION}"
    assert re.search(rf"^ARG VERSION={re.escape(__version__)}$", DOCKERFILE.read_text(), re.M)


def test_the_gpu_target_swaps_onnxruntime_at_the_same_version() -> None:
    gpu = stages()["build-gpu"]
    assert gpu["from"] == "build"
    script = " ".join(gpu["lines"])
    assert "pip uninstall --yes onnxruntime" in script and 'onnxruntime-gpu[cuda,cudnn]==${version}' in script


def test_dockerignore_sends_only_the_sources() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("**")] == "**"
    assert {"!pyproject.toml", "!requirements.lock", "!clients/**", "!services/**"} <= set(lines)
    # Everything the Dockerfile copies from the context is let through.
    copied = {word for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ") and "--from" not in line
              for word in line.split()[1:-1]}
    for path in copied:
        assert f"!{path}" in lines or f"!{path}/**" in lines, path


def test_make_images_builds_every_target_and_says_when_no_tool_is_there() -> None:
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    run = subprocess.run(["make", "-s", "images", "CONTAINER_TOOL="], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and "neither docker nor podman is installed" in run.stdout
    run = subprocess.run(["make", "-s", "images", "CONTAINER_TOOL=echo", "REGISTRY=registry.example.com/team",
                          "TAG=9.9.9"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for target in TARGETS:
        assert (f"build -f deploy/docker/Dockerfile --target {target} --build-arg VERSION=9.9.9 "
                f"-t registry.example.com/team/{target}:9.9.9 .") in run.stdout
        assert f"push registry.example.com/team/{target}:9.9.9" in run.stdout
    run = subprocess.run(["make", "-s", "images", "CONTAINER_TOOL=echo", "PUSH=0", "IMAGES=batch"], cwd=REPO,
                         capture_output=True, text=True)
    assert f"-t {REGISTRY}/batch:" in run.stdout and "push" not in run.stdout.replace("not pushed", "")


@pytest.mark.parametrize("name", NAMES)
def test_compose_matches_the_manifests(name: str) -> None:
    service = compose()["services"][name]
    container = k8s_container(name)
    image = next(i for i in yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())["images"]
                 if i["name"] == container["image"])
    assert service["image"] == f"{image['newName']}:{image['newTag']}"
    assert service["build"] == {"context": "..", "dockerfile": "deploy/docker/Dockerfile", "target": name}
    assert service["user"] == "10001:10001" and service["read_only"] is True and service["cap_drop"] == ["ALL"]
    # Published on the host's loopback only (no token in this file; Docker's ports bypass host firewalls).
    assert all(p.startswith("127.0.0.1:") for p in service["ports"]), service["ports"]
    published = {int(p.rsplit(":", 1)[1]) for p in service["ports"]}
    assert published == {p["containerPort"] for p in container["ports"]}
    env = service["environment"]
    for key, value in {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}.items():
        if not key.startswith("FASHION_EXECUTION"):
            assert env[key] == value, key
    # Shared settings agree, except how services are reached (Kubernetes: Service names, a headless
    # Service with round robin over up to maxReplicas Inference pods, the gateway's calls sized to
    # match) and who runs the nightly job (Kubernetes: a CronJob).
    local = {"FASHION_INFERENCE_ADDRESS", "FASHION_GRPC_LB_POLICY", "FASHION_MAX_CONNECTION_AGE_S",
             "FASHION_GATEWAY_CLASSIFY_CALLS", "FASHION_BATCH_ADDRESS", "FASHION_MONITOR_ADDRESS",
             "FASHION_GATEWAY_ADDRESS", "FASHION_BATCH_SCHEDULE"}
    for key, value in k8s_config().items():
        if key not in local:
            assert env.get(key) == value, key
    assert env["FASHION_BATCH_ADDRESS"] == "batch:50052" and env["FASHION_MONITOR_ADDRESS"] == "monitor:50053"
    assert env["FASHION_INFERENCE_ADDRESS"] == "inference:50051"


def test_compose_volumes_are_where_the_manifests_mount_them() -> None:
    services = compose()["services"]
    for name in NAMES:
        mounts = {m["mountPath"] for m in k8s_container(name)["volumeMounts"]} - {"/tmp"}
        compose_mounts = {v.split(":")[1] for v in services[name].get("volumes", [])}
        assert mounts == compose_mounts, name
    assert "secrets.env" in str(services["monitor"]["env_file"])
    assert "/deploy/secrets.env" in (REPO / ".gitignore").read_text()
