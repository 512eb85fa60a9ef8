"""Rendering the Kubernetes manifests (`kubectl kustomize`) and walking what they render."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO

K8S = REPO / "deploy" / "k8s"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
SERVERS = ("Deployment", "StatefulSet", "DaemonSet")  # long-running pods: probed

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def kustomizations() -> list[Path]:
    """Every folder that `kubectl kustomize` can build (components are built through overlays)."""
    found = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind") != "Component":
            found.append(path.parent)
    return found


def folder_id(folder: Path) -> str:
    return str(folder.relative_to(K8S))


@cache
def _rendered(folder: Path) -> str:
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def render(folder: Path) -> list[dict[str, Any]]:
    """A fresh copy each time (callers may change it)."""
    return [doc for doc in yaml.safe_load_all(_rendered(folder)) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_template(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pod template (metadata and spec) of a workload, None for anything else."""
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]
    if doc["kind"] in WORKLOADS:
        return doc["spec"]["template"]
    return None


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        template = pod_template(d)
        if template is not None:
            yield d["metadata"]["name"], template["spec"]


def config_map(docs: list[dict[str, Any]], prefix: str = "fashion-config") -> dict[str, Any]:
    return next(cm for name, cm in by_kind(docs, "ConfigMap").items() if name.startswith(prefix))
