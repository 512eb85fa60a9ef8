"""Every rendered kustomization passes the policy check of tests/deploy/policy.py (images, resources,
security contexts, probes, autoscaling, disruption budgets, NetworkPolicies), and the check itself
catches each kind of mistake on a deliberately broken copy."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.manifests import K8S, folder_id, kustomizations, needs_kubectl, pod_template, render
from tests.deploy.policy import image_problem, selects, violations

Docs = list[dict[str, Any]]


@needs_kubectl
@pytest.mark.parametrize("folder", kustomizations(), ids=folder_id)
def test_every_kustomization_passes_the_policy_check(folder: Path) -> None:
    assert violations(render(folder)) == []


@needs_kubectl
def test_the_secure_overlay_isolates_every_pod_with_network_policies() -> None:
    docs = render(K8S / "overlays" / "secure")
    assert any(d["kind"] == "NetworkPolicy" for d in docs)
    assert violations(docs, require_network_policies=True) == []


@needs_kubectl
def test_network_policies_cover_postgres_and_tracing_too() -> None:
    """The component's policies also cover the optional pods (PostgreSQL, collector, Jaeger): combine
    it with those components and every pod is still covered."""
    combined = {}
    for overlay in ("sharded-batch", "tracing"):
        combined |= {(d["kind"], d["metadata"]["name"]): d for d in render(K8S / "overlays" / overlay)}
    docs = [*combined.values(), *(d for d in render(K8S / "overlays" / "secure") if d["kind"] == "NetworkPolicy")]
    assert {"fashion-postgres", "otel-collector", "jaeger", "fashion-batch-sharded"} <= {
        d["metadata"]["name"] for d in docs if pod_template(d) is not None}
    assert violations(docs, require_network_policies=True) == []


def _container(docs: Docs, name: str) -> dict[str, Any]:
    return _pod(docs, name)["spec"]["containers"][0]


def _pod(docs: Docs, name: str) -> dict[str, Any]:
    doc = next(d for d in docs if d["metadata"]["name"] == name and pod_template(d) is not None)
    template = pod_template(doc)
    assert template is not None
    return template


def _object(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _drop(docs: Docs, kind: str, name: str) -> None:
    docs.remove(_object(docs, kind, name))


def _set_image(image: str) -> Callable[[Docs], None]:
    return lambda docs: _container(docs, "fashion-batch").__setitem__("image", image)


def _new_deployment(docs: Docs) -> None:
    extra = copy.deepcopy(_object(docs, "Deployment", "fashion-gateway"))
    extra["metadata"]["name"] = "unplanned"
    extra["spec"]["replicas"] = 1
    extra["spec"]["template"]["metadata"]["labels"] = {"app.kubernetes.io/name": "unplanned"}
    docs.append(extra)


MUTATIONS: dict[str, tuple[Callable[[Docs], None], str]] = {
    "image tagged latest": (_set_image("ghcr.io/fashion-classifier/batch:latest"), "tagged latest"),
    "image without a registry": (_set_image("fashion/batch:0.1.0"), "names no registry"),
    "image without a tag": (_set_image("ghcr.io/fashion-classifier/batch"), "has no tag"),
    "no memory limit": (lambda d: _container(d, "fashion-monitor")["resources"]["limits"].pop("memory"),
                        "no limits for memory"),
    "no requests": (lambda d: _container(d, "fashion-batch-nightly")["resources"].pop("requests"),
                    "no requests for cpu, memory"),
    "may run as root": (lambda d: _pod(d, "fashion-inference")["spec"]["securityContext"].update(runAsNonRoot=False),
                        "runAsNonRoot is not true"),
    "writable root filesystem": (
        lambda d: _container(d, "fashion-gateway")["securityContext"].update(readOnlyRootFilesystem=False),
        "readOnlyRootFilesystem is not true"),
    "capabilities kept": (lambda d: _container(d, "fashion-gateway")["securityContext"].pop("capabilities"),
                          "capabilities do not drop ALL"),
    "privilege escalation": (
        lambda d: _container(d, "fashion-monitor")["securityContext"].update(allowPrivilegeEscalation=True),
        "allowPrivilegeEscalation is not false"),
    "no liveness probe": (lambda d: _container(d, "fashion-gateway").pop("livenessProbe"), "no livenessProbe"),
    "no readiness probe": (lambda d: _container(d, "fashion-batch").pop("readinessProbe"), "no readinessProbe"),
    "replicas under an HPA": (lambda d: _object(d, "Deployment", "fashion-inference")["spec"].update(replicas=3),
                              "sets replicas although a HorizontalPodAutoscaler scales it"),
    "autoscaled without a PDB": (lambda d: _drop(d, "PodDisruptionBudget", "fashion-inference"),
                                 "Deployment/fashion-inference: runs several pods and no PodDisruptionBudget"),
    "several pods without a PDB": (lambda d: _object(d, "Deployment", "fashion-monitor")["spec"].update(replicas=2),
                                   "Deployment/fashion-monitor: runs several pods and no PodDisruptionBudget"),
    "a service nothing may reach": (lambda d: _drop(d, "NetworkPolicy", "fashion-batch"),
                                    "Deployment/fashion-batch: behind Service/fashion-batch, but no NetworkPolicy"),
    "a pod without a policy of its own": (lambda d: _drop(d, "NetworkPolicy", "fashion-batch-nightly"),
                                          "CronJob/fashion-batch-nightly: no NetworkPolicy of its own"),
    "no default deny": (lambda d: _drop(d, "NetworkPolicy", "fashion-default-deny"),
                        "CronJob/fashion-batch-nightly: no NetworkPolicy isolates its ingress"),
    "a new workload no policy knows": (_new_deployment, "Deployment/unplanned: no NetworkPolicy of its own"),
}


@needs_kubectl
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_check_reports_a_broken_copy(mutation: str) -> None:
    docs = render(K8S / "overlays" / "secure")
    assert violations(docs, require_network_policies=True) == []
    mutate, expected = MUTATIONS[mutation]
    mutate(docs)
    found = violations(docs, require_network_policies=True)
    assert any(expected in line for line in found), found


@needs_kubectl
def test_network_policies_required_but_absent() -> None:
    assert violations(render(K8S / "base"), require_network_policies=True) == ["no NetworkPolicy at all"]


@pytest.mark.parametrize(("image", "problem"), [
    ("ghcr.io/fashion-classifier/batch:0.1.0", None),
    ("docker.io/library/postgres:17.6", None),
    ("localhost:5000/batch:1", None),
    ("registry.example.com/a/b/c@sha256:" + "0" * 64, None),
    ("registry.example.com:5000/batch:1.2@sha256:" + "a" * 64, None),
    ("postgres:17", "names no registry"),
    ("jaegertracing/jaeger:2.10.0", "names no registry"),
    ("ghcr.io/fashion-classifier/batch", "has no tag"),
    ("ghcr.io/fashion-classifier/batch:latest", "tagged latest"),
])
def test_image_references(image: str, problem: str | None) -> None:
    found = image_problem(image)
    assert (found is None) if problem is None else (problem in (found or "")), found


def test_label_selectors() -> None:
    labels = {"app.kubernetes.io/name": "fashion-batch", "tier": "x"}
    assert selects({}, labels) and selects(None, labels)
    assert selects({"matchLabels": {"app.kubernetes.io/name": "fashion-batch"}}, labels)
    assert not selects({"matchLabels": {"app.kubernetes.io/name": "fashion-gateway"}}, labels)
    expression = {"key": "app.kubernetes.io/name", "operator": "In", "values": ["fashion-batch", "x"]}
    assert selects({"matchExpressions": [expression]}, labels)
    assert not selects({"matchExpressions": [{**expression, "operator": "NotIn"}]}, labels)
    assert selects({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, labels)
    assert not selects({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, labels)
