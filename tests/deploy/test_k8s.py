"""Every kustomization renders with `kubectl kustomize` and validates (strict) against a current
Kubernetes; the base keeps the house rules (seccomp, no service account token, a /tmp volume, native
grpc probes, a ServiceAccount per service, a port named grpc; test_policy.py checks the general ones);
images, storage, PostgreSQL, placement, labels, tracing and NetworkPolicies are as docs/operations.md
says."""

from __future__ import annotations

import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services import __version__
from tests.deploy.manifests import (
    K8S,
    by_kind,
    config_map,
    folder_id,
    kustomizations,
    needs_kubectl,
    pod_specs,
    pod_template,
    render,
)

KUBERNETES_VERSION = "1.37.0"  # the newest schema kubernetes-validate ships
GRPC_SERVICES = {"fashion-inference": 50051, "fashion-batch": 50052, "fashion-monitor": 50053}
SERVICES = [*GRPC_SERVICES, "fashion-gateway"]
REGISTRY = "ghcr.io/fashion-classifier"


def test_every_kustomization_is_found() -> None:
    names = {folder_id(p) for p in kustomizations()}
    assert {"base", "overlays/gpu", "overlays/tracing", "overlays/secure", "overlays/local",
            "overlays/sharded-batch"} <= names


@needs_kubectl
@pytest.mark.parametrize("folder", kustomizations(), ids=folder_id)
def test_renders_and_validates_strictly(folder: Path) -> None:
    docs = render(folder)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    # Every ConfigMap, PVC and ServiceAccount that a pod names exists (Secrets are the operator's).
    config_maps, pvcs, accounts = by_kind(docs, "ConfigMap"), by_kind(docs, "PersistentVolumeClaim"), \
        by_kind(docs, "ServiceAccount")
    claim_templates = {t["metadata"]["name"] for d in docs if d["kind"] == "StatefulSet"
                       for t in d["spec"].get("volumeClaimTemplates", [])}
    for name, pod in pod_specs(docs):
        assert pod["serviceAccountName"] in accounts, name
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, name
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in {v["name"] for v in pod.get("volumes", [])} | claim_templates, name
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in pvcs, name
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, name


@needs_kubectl
@pytest.mark.parametrize("folder", kustomizations(), ids=folder_id)
def test_pods_are_locked_down(folder: Path) -> None:
    for name, pod in pod_specs(render(folder)):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            assert any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts", [])), name


@needs_kubectl
@pytest.mark.parametrize("folder", kustomizations(), ids=folder_id)
def test_pods_say_what_they_are(folder: Path) -> None:
    """app.kubernetes.io/{name,component,part-of,version} on every pod; selectors keep the name alone
    (a selector cannot change once its Deployment exists)."""
    for doc in render(folder):
        template = pod_template(doc)
        if template is None:
            continue
        labels = template["metadata"]["labels"]
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert {"app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of",
                "app.kubernetes.io/version"} <= set(labels), where
        assert labels["app.kubernetes.io/part-of"] == "fashion-classifier", where
        if labels["app.kubernetes.io/name"].startswith("fashion-") and doc["kind"] != "StatefulSet":
            assert labels["app.kubernetes.io/version"] == __version__, where
        if "selector" in doc["spec"]:
            name = labels["app.kubernetes.io/name"]
            assert doc["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": name}}, where


def test_one_place_sets_the_registry_and_tag() -> None:
    """The base's images: name every image of the project with an explicit registry, at the project's
    version (services.__version__), which the version label, the Dockerfile and `make images` share."""
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    images = {i["name"]: i for i in kustomization["images"]}
    assert set(images) == {f"{REGISTRY}/{name}" for name in ("inference", "batch", "monitor", "gateway")}
    for name, image in images.items():
        assert image["newName"] == name and image["newTag"] == __version__, name
    assert kustomization["labels"][0]["pairs"]["app.kubernetes.io/version"] == __version__
    makefile = (K8S.parents[1] / "Makefile").read_text()
    assert f"REGISTRY ?= {REGISTRY}\n" in makefile


@needs_kubectl
@pytest.mark.parametrize("folder", kustomizations(), ids=folder_id)
def test_every_project_image_comes_from_the_registry(folder: Path) -> None:
    for name, pod in pod_specs(render(folder)):
        for container in pod["containers"]:
            image = container["image"]
            if "fashion" in image:
                assert image.startswith(f"{REGISTRY}/") and image.endswith(f":{__version__}"), (name, image)


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
    config = config_map(docs)["data"]
    assert config["FASHION_INFERENCE_ADDRESS"] == "dns:///fashion-inference-headless:50051"
    assert config["FASHION_GRPC_LB_POLICY"] == "round_robin"
    # The gateway keeps a ClassifyBatch call for every Inference pod the HPA may run.
    assert int(config["FASHION_GATEWAY_CLASSIFY_CALLS"]) >= hpa["spec"]["maxReplicas"]
    assert config["FASHION_BATCH_SCHEDULE"] == "", "the CronJob, not the service's timer, runs the nightly job"
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
@pytest.mark.parametrize("folder", kustomizations(), ids=folder_id)
def test_threads_follow_the_cpu_limit_not_a_setting(folder: Path) -> None:
    """ONNX Runtime sizes its threads by the container's CPU quota (services/common/cpus.py): no
    manifest sets FASHION_INTRA_OP_THREADS by hand."""
    for name, pod in pod_specs(render(folder)):
        for container in pod["containers"]:
            assert "FASHION_INTRA_OP_THREADS" not in {e["name"] for e in container.get("env", [])}, name
    assert "FASHION_INTRA_OP_THREADS" not in config_map(render(folder))["data"]


@needs_kubectl
def test_base_storage_is_one_batch_pod_on_a_read_write_once_claim() -> None:
    """What every cluster's default storage class offers: ReadWriteOnce, mounted by the Batch pod alone,
    which holds the images and the SQLite jobs database, never two at once (Recreate)."""
    docs = render(K8S / "base")
    claims = by_kind(docs, "PersistentVolumeClaim").values()
    assert {pvc["spec"]["accessModes"][0] for pvc in claims} == {"ReadWriteOnce"}
    batch = by_kind(docs, "Deployment")["fashion-batch"]["spec"]
    assert batch["replicas"] == 1 and batch["strategy"] == {"type": "Recreate"}
    data = {"name": "data", "persistentVolumeClaim": {"claimName": "fashion-data"}}
    assert data in batch["template"]["spec"]["volumes"]
    config = config_map(docs)["data"]
    assert config["FASHION_DATA_ROOT"] == "/data" and "FASHION_BATCH_DATABASE_URL" not in config
    mounting = [name for name, pod in pod_specs(docs) if data in pod.get("volumes", [])]
    assert mounting == ["fashion-batch"], "the CronJob calls the Batch service; it mounts nothing"
    text = "".join(p.read_text() for p in K8S.rglob("*.yaml"))
    assert "deploy/k8s/jobs" not in text


@needs_kubectl
def test_availability_and_placement() -> None:
    """The HPA owns Inference's replicas; the gateway's two pods and Inference's have budgets and spread
    over zones and nodes without ever blocking scheduling (one-node clusters)."""
    docs = render(K8S / "base")
    deployments, budgets = by_kind(docs, "Deployment"), by_kind(docs, "PodDisruptionBudget")
    assert "replicas" not in deployments["fashion-inference"]["spec"]
    assert deployments["fashion-gateway"]["spec"]["replicas"] == 2
    assert set(budgets) == {"fashion-inference", "fashion-gateway"}
    for name in budgets:
        assert budgets[name]["spec"]["maxUnavailable"] == 1
        spread = deployments[name]["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        for constraint in spread:
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
            assert constraint["labelSelector"] == {"matchLabels": {"app.kubernetes.io/name": name}}
    local = by_kind(render(K8S / "overlays" / "local"), "Deployment")
    assert "replicas" not in local["fashion-inference"]["spec"] and local["fashion-gateway"]["spec"]["replicas"] == 1


@needs_kubectl
def test_gpu_overlay() -> None:
    inference = by_kind(render(K8S / "overlays" / "gpu"), "Deployment")["fashion-inference"]
    assert "replicas" not in inference["spec"]
    container = inference["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"{REGISTRY}/inference-gpu:{__version__}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "FASHION_EXECUTION_PROVIDER", "value": "cuda"} in container["env"]


@needs_kubectl
def test_tracing_component_is_the_collector_and_jaeger_v2() -> None:
    docs = render(K8S / "overlays" / "tracing")
    deployments = by_kind(docs, "Deployment")
    assert {"otel-collector", "jaeger"} <= set(deployments)
    fashion = config_map(docs)
    assert fashion["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    for name in SERVICES:
        env_from = deployments[name]["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        assert env_from == [{"configMapRef": {"name": fashion["metadata"]["name"]}}], name
    collector_image = deployments["otel-collector"]["spec"]["template"]["spec"]["containers"][0]["image"]
    jaeger_image = deployments["jaeger"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert collector_image.startswith("docker.io/otel/opentelemetry-collector-contrib:0.")
    assert jaeger_image.startswith("docker.io/jaegertracing/jaeger:2."), "Jaeger v2, not all-in-one 1.x"
    config_maps = by_kind(docs, "ConfigMap")
    collector = yaml.safe_load(config_maps["otel-collector"]["data"]["config.yaml"])
    assert collector["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    assert collector["service"]["pipelines"]["traces"]["exporters"] == ["otlp/jaeger"]
    jaeger = yaml.safe_load(config_maps["jaeger"]["data"]["config.yaml"])
    assert jaeger["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert jaeger["extensions"]["jaeger_query"]["http"]["endpoint"] == "0.0.0.0:16686"
    store = jaeger["extensions"]["jaeger_query"]["storage"]["traces"]
    assert store in jaeger["extensions"]["jaeger_storage"]["backends"]
    assert jaeger["exporters"]["jaeger_storage_exporter"]["trace_storage"] == store
    # The probes ask the health extensions where the configurations put them.
    for name, config, path in (("otel-collector", collector, "/"), ("jaeger", jaeger, "/status")):
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        health = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
        extension = config["extensions"].get("health_check") or config["extensions"]["healthcheckv2"]["http"]
        assert extension["endpoint"] == f"0.0.0.0:{health}", name
        assert container["readinessProbe"]["httpGet"] == {"path": path, "port": "health"}, name
        mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
        assert container["args"] == [f"--config={mount}/config.yaml"], name


@needs_kubectl
def test_secure_overlay_probes_the_plaintext_health_port() -> None:
    docs = render(K8S / "overlays" / "secure")
    deployments = by_kind(docs, "Deployment")
    config = config_map(docs)
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


def _allowed(docs: list[dict], source: str, target: str, port: int) -> bool:
    """Whether the NetworkPolicies let pods named `source` reach pods named `target` on `port`, both
    ways: the source's egress and the target's ingress (same namespace, pod selectors only)."""
    from tests.deploy.policy import selects

    policies = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy"]
    src, dst = {"app.kubernetes.io/name": source}, {"app.kubernetes.io/name": target}

    def lets(rules: list[dict], peer_key: str, peer: dict[str, str]) -> bool:
        return any(("ports" not in r or any(p["port"] == port for p in r["ports"]))
                   and (peer_key not in r or any("namespaceSelector" not in x and "ipBlock" not in x
                                                 and selects(x.get("podSelector"), peer) for x in r[peer_key]))
                   for r in rules)
    egress = any(selects(p["podSelector"], src) and lets(p.get("egress", []), "to", dst) for p in policies)
    ingress = any(selects(p["podSelector"], dst) and lets(p.get("ingress", []), "from", src) for p in policies)
    return egress and ingress


@needs_kubectl
def test_network_policies_allow_what_the_services_need_and_nothing_else() -> None:
    docs = render(K8S / "overlays" / "secure")
    needed = [("fashion-gateway", "fashion-inference", 50051), ("fashion-gateway", "fashion-batch", 50052),
              ("fashion-gateway", "fashion-monitor", 50053), ("fashion-batch", "fashion-inference", 50051),
              ("fashion-batch-sharded", "fashion-inference", 50051), ("fashion-monitor", "fashion-inference", 50051),
              ("fashion-monitor", "fashion-batch", 50052), ("fashion-monitor", "fashion-gateway", 8080),
              ("fashion-batch-nightly", "fashion-batch", 50052), ("fashion-batch", "fashion-postgres", 5432),
              ("fashion-batch-sharded", "fashion-postgres", 5432), ("fashion-inference", "otel-collector", 4317),
              ("otel-collector", "jaeger", 4317)]
    for source, target, port in needed:
        assert _allowed(docs, source, target, port), (source, target, port)
    refused = [("fashion-inference", "fashion-batch", 50052), ("fashion-inference", "fashion-monitor", 50053),
               ("fashion-batch", "fashion-monitor", 50053), ("fashion-batch-nightly", "fashion-inference", 50051),
               ("fashion-gateway", "fashion-postgres", 5432), ("fashion-monitor", "fashion-postgres", 5432),
               ("fashion-inference", "fashion-gateway", 8080), ("fashion-gateway", "fashion-inference", 9101)]
    for source, target, port in refused:
        assert not _allowed(docs, source, target, port), (source, target, port)
    policies = by_kind(docs, "NetworkPolicy")
    assert policies["fashion-default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    dns = policies["fashion-dns"]["spec"]["egress"][0]["ports"]
    assert {(p["protocol"], p["port"]) for p in dns} == {("UDP", 53), ("TCP", 53)}
    # From outside the namespace: the ingress controller to the gateway, Prometheus to the metrics ports.
    gateway_from = policies["fashion-gateway"]["spec"]["ingress"][0]["from"]
    assert any(p.get("namespaceSelector") == {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}
               for p in gateway_from)
    for name, port in (("fashion-inference", 9101), ("fashion-batch", 9102), ("fashion-monitor", 9103)):
        rules = policies[name]["spec"]["ingress"]
        assert any(r["ports"] == [{"protocol": "TCP", "port": port}] and r["from"][0]["namespaceSelector"]
                   == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}} for r in rules), name
    assert not any(d["kind"] == "NetworkPolicy" for d in render(K8S / "base")), "opt-in: a component"


@needs_kubectl
def test_sharded_batch_is_an_indexed_job_on_shared_storage_and_postgres() -> None:
    docs = render(K8S / "overlays" / "sharded-batch")
    job = by_kind(docs, "Job")["fashion-batch-sharded"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    shards = int(next(e["value"] for e in container["env"] if e["name"] == "FASHION_BATCH_SHARD_COUNT"))
    assert spec["completions"] == spec["parallelism"] == shards
    script = " ".join(container["args"])
    assert "fashion batch run inbox" in script and "${JOB_COMPLETION_INDEX}" in script
    assert "FASHION_RESULTS_DIR" in script and "FASHION_BATCH_DB" not in script, "the jobs are in PostgreSQL"
    config = config_map(docs)
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert config["data"]["FASHION_INFERENCE_ADDRESS"].startswith("dns:///fashion-inference-headless")
    assert config["data"]["FASHION_GRPC_LB_POLICY"] == "round_robin"
    batch = by_kind(docs, "Deployment")["fashion-batch"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == batch["image"] == f"{REGISTRY}/batch:{__version__}"
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "fashion-data"
    pvc = by_kind(docs, "PersistentVolumeClaim")["fashion-data"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "shards on several nodes share the data volume"
    # Every pod that keeps Batch jobs reads the database URL from the Secret; the CronJob only submits.
    url = {"name": "FASHION_BATCH_DATABASE_URL",
           "valueFrom": {"secretKeyRef": {"name": "fashion-batch-database", "key": "url"}}}
    assert url in container["env"] and url in batch["env"]
    cron = by_kind(docs, "CronJob")["fashion-batch-nightly"]["spec"]["jobTemplate"]["spec"]["template"]
    assert "FASHION_BATCH_DATABASE_URL" not in str(cron)


@needs_kubectl
def test_postgres_statefulset() -> None:
    docs = render(K8S / "overlays" / "sharded-batch")
    postgres = by_kind(docs, "StatefulSet")["fashion-postgres"]
    pod = postgres["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"].startswith("docker.io/library/postgres:17.")
    env = {e["name"]: e for e in container["env"]}
    password = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password == {"name": "fashion-batch-database", "key": "password"}
    assert env["PGDATA"]["value"].startswith(next(m["mountPath"] for m in container["volumeMounts"]
                                                  if m["name"] == "data") + "/")
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)
    assert pod["securityContext"]["runAsUser"] == 999 and pod["securityContext"]["fsGroup"] == 999
    claim = postgres["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    service = by_kind(docs, "Service")[postgres["spec"]["serviceName"]]
    assert service["spec"]["ports"][0]["port"] == 5432
    assert "fashion-postgres:5432" in (K8S / "components" / "postgres" / "kustomization.yaml").read_text()


@needs_kubectl
def test_a_managed_postgres_needs_only_the_secret(tmp_path: Path) -> None:
    """components/batch-database alone: the Batch pods read the URL, no StatefulSet is added."""
    overlay = tmp_path / "managed"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "base", overlay)],
        "components": [os.path.relpath(K8S / "components" / "batch-database", overlay)]}))
    docs = render(overlay)
    assert "StatefulSet" not in {d["kind"] for d in docs}
    batch = by_kind(docs, "Deployment")["fashion-batch"]["spec"]["template"]["spec"]["containers"][0]
    assert any(e["name"] == "FASHION_BATCH_DATABASE_URL" for e in batch["env"])
