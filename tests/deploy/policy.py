"""A policy check of rendered Kubernetes objects, in the spirit of kube-linter and kube-score (neither
installs here): `violations(docs)` lists, one line each, what a cluster operator would object to.

- every container: an image with a registry and a tag (not `latest`; a digest will do), CPU and memory
  requests and limits, runAsNonRoot, a read-only root filesystem, all capabilities dropped, no
  privilege escalation, not privileged;
- every server container (Deployment, StatefulSet, DaemonSet): readiness and liveness probes;
- no `replicas` on a Deployment that a HorizontalPodAutoscaler scales;
- a PodDisruptionBudget for every Deployment or StatefulSet that runs more than one pod (replicas > 1,
  or an HPA);
- where there are NetworkPolicies (or where they are required): every pod isolated for ingress and for
  egress, and selected by a policy of its own (one that selects no other workload's pods), so that no pod is either
  open or cut off without anyone having written down what it needs; a pod behind a Service is let in
  on at least one of the Service's ports.
"""

from __future__ import annotations

import re
from typing import Any

from tests.deploy.manifests import SERVERS, pod_template

_IMAGE = re.compile(r"(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?")


def image_problem(image: str) -> str | None:
    """Why an image reference will not do, or None. A registry is a first path part with a dot or a
    port, or localhost (`fashion/batch` and `postgres` resolve to Docker Hub by default)."""
    match = _IMAGE.fullmatch(image)
    if not match:
        return f"image {image!r} cannot be parsed"
    first, _, rest = match["name"].partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        return f"image {image!r} names no registry"
    if match["tag"] is None and match["digest"] is None:
        return f"image {image!r} has no tag"
    if match["tag"] == "latest":
        return f"image {image!r} is tagged latest"
    return None


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels and matchExpressions); {} selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _container_violations(where: str, container: dict[str, Any], pod_context: dict[str, Any],
                          server: bool) -> list[str]:
    found = []
    where = f"{where} container {container['name']}"
    if problem := image_problem(container.get("image", "")):
        found.append(f"{where}: {problem}")
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        missing = {"cpu", "memory"} - set(resources.get(kind, {}))
        if missing:
            found.append(f"{where}: no {kind} for {', '.join(sorted(missing))}")
    context = container.get("securityContext", {})
    if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
        found.append(f"{where}: runAsNonRoot is not true")
    if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
        found.append(f"{where}: runs as uid 0")
    if context.get("readOnlyRootFilesystem") is not True:
        found.append(f"{where}: readOnlyRootFilesystem is not true")
    if context.get("allowPrivilegeEscalation") is not False:
        found.append(f"{where}: allowPrivilegeEscalation is not false")
    if context.get("privileged"):
        found.append(f"{where}: privileged")
    if "ALL" not in context.get("capabilities", {}).get("drop", []):
        found.append(f"{where}: capabilities do not drop ALL")
    if server:
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in container:
                found.append(f"{where}: no {probe}")
    return found


def _workload_violations(doc: dict[str, Any]) -> list[str]:
    template = pod_template(doc)
    assert template is not None
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    spec = template["spec"]
    found = [f"{where}: {field}" for field in ("hostNetwork", "hostPID", "hostIPC") if spec.get(field)]
    pod_context = spec.get("securityContext", {})
    for container in spec.get("initContainers", []):
        found += _container_violations(where, container, pod_context, server=False)
    for container in spec["containers"]:
        found += _container_violations(where, container, pod_context, server=doc["kind"] in SERVERS)
    return found


def _scaling_violations(docs: list[dict[str, Any]]) -> list[str]:
    found = []
    scaled = {(h["spec"]["scaleTargetRef"]["kind"], h["spec"]["scaleTargetRef"]["name"])
              for h in docs if h["kind"] == "HorizontalPodAutoscaler"}
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        name, spec = doc["metadata"]["name"], doc["spec"]
        autoscaled = (doc["kind"], name) in scaled
        if autoscaled and "replicas" in spec:
            found.append(f"{doc['kind']}/{name}: sets replicas although a HorizontalPodAutoscaler scales it")
        if autoscaled or spec.get("replicas", 1) > 1:
            labels = spec["template"]["metadata"].get("labels", {})
            if not any(selects(b["spec"].get("selector"), labels) for b in budgets):
                found.append(f"{doc['kind']}/{name}: runs several pods and no PodDisruptionBudget selects them")
    return found


def _policy_types(policy: dict[str, Any]) -> list[str]:
    """Unset policyTypes: Ingress, and Egress when the policy has egress rules (the API's default)."""
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def _network_violations(docs: list[dict[str, Any]], required: bool) -> list[str]:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    if not policies:
        return ["no NetworkPolicy at all"] if required else []
    services = [d for d in docs if d["kind"] == "Service"]
    pods = [t["metadata"].get("labels", {}) for t in map(pod_template, docs) if t is not None]
    found = []
    for doc in docs:
        template = pod_template(doc)
        if template is None:
            continue
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        labels = template["metadata"].get("labels", {})
        selecting = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        for direction in ("Ingress", "Egress"):
            if not any(direction in _policy_types(p) for p in selecting):
                found.append(f"{where}: no NetworkPolicy isolates its {direction.lower()}")
        if not any(sum(selects(p["spec"]["podSelector"], other) for other in pods) == 1 for p in selecting):
            found.append(f"{where}: no NetworkPolicy of its own (only ones shared with other workloads) "
                         "says what it may do")
        for service in services:
            if not selects({"matchLabels": service["spec"].get("selector") or {"": ""}}, labels):
                continue
            ports = _service_ports(service, template["spec"])
            if not any(_admits(rule, ports) for p in selecting for rule in p["spec"].get("ingress", [])):
                found.append(f"{where}: behind Service/{service['metadata']['name']}, but no NetworkPolicy "
                             f"lets anything reach its ports {sorted(ports, key=str)}")
    return found


def _service_ports(service: dict[str, Any], pod: dict[str, Any]) -> set[int | str]:
    """The pod ports a Service sends to, by number and by name."""
    named = {p["name"]: p["containerPort"] for c in pod["containers"] for p in c.get("ports", []) if "name" in p}
    numbers = {number: name for name, number in named.items()}
    found: set[int | str] = set()
    for port in service["spec"].get("ports", []):
        target = port.get("targetPort", port["port"])
        number = named.get(target, target) if isinstance(target, str) else target
        found |= {number, *([numbers[number]] if number in numbers else [])}
    return found


def _admits(rule: dict[str, Any], ports: set[int | str]) -> bool:
    """An ingress rule lets some peer reach one of the ports (a rule without ports: every port)."""
    return "ports" not in rule or any(p.get("port") in ports for p in rule["ports"])


def violations(docs: list[dict[str, Any]], require_network_policies: bool = False) -> list[str]:
    """Everything in `docs` (one rendered kustomization) that breaks the rules above."""
    found = []
    for doc in docs:
        if pod_template(doc) is not None:
            found += _workload_violations(doc)
    found += _scaling_violations(docs)
    found += _network_violations(docs, require_network_policies)
    return found
