"""The Dockerfiles and the compose file agree with the Kubernetes manifests: images, ports, users,
settings, entry points; images are multi-stage, non-root and built on a pinned base."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from services.launcher import SERVICES as SERVABLE
from tests.support import REPO

DOCKER = REPO / "deploy" / "docker"
K8S_BASE = REPO / "deploy" / "k8s" / "base"
NAMES = ["inference", "batch", "monitor", "gateway"]


def dockerfile(name: str) -> str:
    return (DOCKER / f"{name}.Dockerfile").read_text()


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


@pytest.mark.parametrize("name", NAMES)
def test_dockerfile_is_multistage_pinned_and_non_root(name: str) -> None:
    text = dockerfile(name)
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base, "the base image is one pinned ARG"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base.group(1)), base.group(1)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS runtime$", text, re.M)
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert "COPY --from=build /opt/venv /opt/venv" in text
    entry = re.search(r'^ENTRYPOINT \["fashion", "serve", "(\w+)"\]$', text, re.M)
    assert entry and entry.group(1) == name and name in SERVABLE
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()}  # type: ignore[union-attr]
    assert exposed == {p["containerPort"] for p in k8s_container(name)["ports"]}


def test_dockerignore_sends_only_the_sources() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("**")] == "**"
    assert {"!pyproject.toml", "!clients/**", "!services/**"} <= set(lines)


@pytest.mark.parametrize("name", NAMES)
def test_compose_matches_the_manifests(name: str) -> None:
    service = compose()["services"][name]
    container = k8s_container(name)
    tag = next(i["newTag"] for i in yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())["images"]
               if i["name"] == container["image"])
    assert service["image"] == f"{container['image']}:{tag}"
    assert service["build"]["dockerfile"] == f"deploy/docker/{name}.Dockerfile"
    assert service["user"] == "10001:10001" and service["read_only"] is True and service["cap_drop"] == ["ALL"]
    published = {int(p.split(":")[1]) for p in service["ports"]}
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
