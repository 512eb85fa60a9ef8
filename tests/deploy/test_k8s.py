"""Every kustomization renders with `kubectl kustomize` and validates (strict) against a current
Kubernetes; the base keeps the house rules: non-root, read-only root filesystem, no capabilities,
native grpc probes, requests and limits, a ServiceAccount per service, a port named grpc."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support import REPO

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37.0"  # the newest schema kubernetes-validate ships
GRPC_SERVICES = {"fashion-inference": 50051, "fashion-batch": 50052, "fashion-monitor": 50053}
SERVICES = [*GRPC_SERVICES, "fashion-gateway"]

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def kustomizations() -> list[Path]:
    """Every folder that `kubectl kustomize` can build (components are built through overlays)."""
    found = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind") != "Component":
            found.append(path.parent)
    return found


@cache
def render(folder: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        spec = d.get("spec", {})
        if d["kind"] in ("Deployment", "Job"):
            yield d["metadata"]["name"], spec["template"]["spec"]
        elif d["kind"] == "CronJob":
            yield d["metadata"]["name"], spec["jobTemplate"]["spec"]["template"]["spec"]


def test_every_kustomization_is_found() -> None:
    names = {str(p.relative_to(K8S)) for p in kustomizations()}
    assert {"base", "overlays/gpu", "overlays/tracing", "overlays/secure", "overlays/local",
            "overlays/sharded-batch"} <= names


@needs_kubectl
@pytest.mark.parametrize("folder", kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_renders_and_validates_strictly(folder: Path) -> None:
    docs = render(folder)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    # Every ConfigMap, Secret volume, PVC and ServiceAccount that a pod names exists (or is optional).
    config_maps, pvcs, accounts = by_kind(docs, "ConfigMap"), by_kind(docs, "PersistentVolumeClaim"), \
        by_kind(docs, "ServiceAccount")
    for name, pod in pod_specs(docs):
        assert pod["serviceAccountName"] in accounts, name
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, name
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in pvcs, name
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, name


@needs_kubectl
@pytest.mark.parametrize("folder", kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_pods_are_locked_down(folder: Path) -> None:
    for name, pod in pod_specs(render(folder)):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
            assert any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts", [])) or \
                container["image"].startswith(("otel/", "jaegertracing/")), name


@needs_kubectl
def test_base_services_probes_ports_and_scaling() -> None:
    docs = render(K8S / "base")
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    assert set(SERVICES) <= set(deployments)
    for name, port in GRPC_SERVICES.items():
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (name, probe)
        assert {"name": "grpc", "containerPort": port} in container["ports"], name
        assert any(p["name"] == "grpc" and p["port"] == port for p in services[name]["spec"]["ports"]), name
        assert deployments[name]["spec"]["template"]["spec"]["serviceAccountName"] == name
    assert services["fashion-inference-headless"]["spec"]["clusterIP"] == "None"
    assert services["fashion-inference-headless"]["spec"]["ports"][0]["name"] == "grpc"
    gateway = deployments["fashion-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert services["fashion-gateway"]["spec"]["ports"][0]["port"] == 8080
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["fashion-inference"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "fashion-inference"
    config = next(iter(by_kind(docs, "ConfigMap").values()))["data"]
    assert config["FASHION_INFERENCE_ADDRESS"] == "dns:///fashion-inference-headless:50051"
    assert config["FASHION_GRPC_LB_POLICY"] == "round_robin"
    # The gateway keeps a ClassifyBatch call for every Inference pod the HPA may run.
    assert int(config["FASHION_GATEWAY_CLASSIFY_CALLS"]) >= hpa["spec"]["maxReplicas"]
    assert config["FASHION_BATCH_SCHEDULE"] == "", "the CronJob, not the service's timer, runs the nightly job"
    batch = deployments["fashion-batch"]["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "fashion-data"}} in batch["volumes"]
    cron = by_kind(docs, "CronJob")["fashion-batch-nightly"]
    assert cron["spec"]["schedule"] == "0 2 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert "fashion batch submit inbox --wait" in " ".join(
        cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"])
    monitor_env = deployments["fashion-monitor"]["spec"]["template"]["spec"]["containers"][0]["env"]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in monitor_env if "valueFrom" in e}
    assert secrets["FASHION_SMTP_PASSWORD"]["name"] == "fashion-notifications"
    assert secrets["FASHION_SLACK_WEBHOOK_URL"]["optional"] is True
    assert "SMTP_PASSWORD" not in str(config) and "SLACK" not in str(config)


@needs_kubectl
def test_gpu_overlay() -> None:
    inference = by_kind(render(K8S / "overlays" / "gpu"), "Deployment")["fashion-inference"]
    container = inference["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("fashion/inference-gpu:")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "FASHION_EXECUTION_PROVIDER", "value": "cuda"} in container["env"]


@needs_kubectl
def test_tracing_component_points_every_service_at_the_collector() -> None:
    docs = render(K8S / "overlays" / "tracing")
    deployments = by_kind(docs, "Deployment")
    assert {"otel-collector", "jaeger"} <= set(deployments)
    config_maps = by_kind(docs, "ConfigMap")
    fashion = next(cm for name, cm in config_maps.items() if name.startswith("fashion-config"))
    assert fashion["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    for name in SERVICES:
        env_from = deployments[name]["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        assert env_from == [{"configMapRef": {"name": fashion["metadata"]["name"]}}], name
    collector = yaml.safe_load(config_maps["otel-collector"]["data"]["config.yaml"])
    assert collector["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"


@needs_kubectl
def test_secure_overlay_probes_the_plaintext_health_port() -> None:
    docs = render(K8S / "overlays" / "secure")
    deployments = by_kind(docs, "Deployment")
    config = next(cm for name, cm in by_kind(docs, "ConfigMap").items() if name.startswith("fashion-config"))
    assert config["data"]["FASHION_HEALTH_PORT"] == "50100"
    assert config["data"]["FASHION_AUTH_TOKEN_FILE"] == "/etc/fashion/auth/token"
    for name in GRPC_SERVICES:
        spec = deployments[name]["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert container["readinessProbe"]["grpc"]["port"] == 50100, name
        assert container["livenessProbe"]["grpc"]["port"] == 50100, name
        assert {v["name"] for v in spec["volumes"]} >= {"tls", "auth"}, name
    gateway = deployments["fashion-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert "tcpSocket" in gateway["readinessProbe"] and "httpGet" not in gateway["readinessProbe"]


@needs_kubectl
def test_sharded_batch_is_an_indexed_job_over_the_headless_service() -> None:
    docs = render(K8S / "overlays" / "sharded-batch")
    job = by_kind(docs, "Job")["fashion-batch-sharded"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    shards = int(next(e["value"] for e in container["env"] if e["name"] == "FASHION_BATCH_SHARD_COUNT"))
    assert spec["completions"] == spec["parallelism"] == shards
    script = " ".join(container["args"])
    assert "fashion batch run inbox" in script and "${JOB_COMPLETION_INDEX}" in script
    assert "FASHION_BATCH_DB" in script and "FASHION_RESULTS_DIR" in script
    config = next(cm for name, cm in by_kind(docs, "ConfigMap").items() if name.startswith("fashion-config"))
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert config["data"]["FASHION_INFERENCE_ADDRESS"].startswith("dns:///fashion-inference-headless")
    assert config["data"]["FASHION_GRPC_LB_POLICY"] == "round_robin"
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "fashion-data"
    pvc = by_kind(docs, "PersistentVolumeClaim")["fashion-data"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "shards on several nodes share the data volume"
