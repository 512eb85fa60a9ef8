"""Prometheus and Grafana files (deploy/monitoring, deploy/k8s/components/prometheus-operator): the
rules pass promtool and their unit tests, mirror the Monitor's rules, and agree with the generated
PrometheusRule; the Operator component renders and scrapes ports that exist; and a real Prometheus
scraping a running stack (`fashion run`) finds a series for every metric the rules and the dashboard
name, evaluates every rule without error, and fires the High Error Rate alert when images fail.

Without promtool, prometheus (Debian's `prometheus` package) or kubectl, the tests that need them are
skipped, saying so."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from services.common import metrics
from services.common.config import MonitorSettings
from services.monitor.rules import build_rules
from tests.images import encode, fashion_images
from tests.support import REPO, free_port, health_status

PROMETHEUS_DIR = REPO / "deploy" / "monitoring" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rules_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "monitoring" / "grafana" / "fashion-dashboard.json"
GENERATOR = REPO / "deploy" / "monitoring" / "generate_prometheusrule.py"
COMPONENT = REPO / "deploy" / "k8s" / "components" / "prometheus-operator"
K8S = REPO / "deploy" / "k8s"
JOBS = {"inference": "fashion-inference", "batch": "fashion-batch", "monitor": "fashion-monitor",
        "gateway": "fashion-gateway"}
"""Scrape job of each service: its Kubernetes Service's name, which the rules select `up` by."""

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (apt-get install prometheus)")
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="prometheus is not installed (apt-get install prometheus)")
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


# --- what the rules and the dashboard query ---------------------------------------------------------

def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def recorded() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def dashboard_panels() -> list[dict[str, Any]]:
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return found


def dashboard_exprs() -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every query."""
    return [(p["title"], t) for p in dashboard_panels() for t in p.get("targets", [])]


GRAFANA_RANGES = {"$__rate_interval": "15s", "$__range": "1h"}


def runnable(expr: str, interval: str = "15s") -> str:
    """A dashboard query with Grafana's variables given values a running Prometheus can use."""
    for variable, value in {**GRAFANA_RANGES, "$__interval": interval}.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}


def selectors(expr: str) -> set[tuple[str, str]]:
    """(metric name, label matchers as written) of every vector selector in a PromQL expression: what
    is left once strings, ranges, grouping clauses and function calls are set aside."""
    expr = runnable(expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    found = set()
    position = 0
    token = re.compile(r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|[a-zA-Z_:][a-zA-Z0-9_:]*')
    while (match := token.search(expr, position)) is not None:
        position = match.end()
        word = match.group()
        if word[0] in '"{' or word in PROMQL_WORDS or expr[position:].lstrip().startswith("("):
            continue  # a string (label_replace's arguments), matchers of a name seen, a keyword, a function
        braces = re.match(r"\s*(\{[^}]*\})", expr[position:])
        if braces:
            position += braces.end()
        found.add((word, braces.group(1) if braces else ""))
    return found


def used_selectors() -> dict[tuple[str, str], str]:
    """Every selector of the rules and the dashboard -> where it is used."""
    used: dict[tuple[str, str], str] = {}
    for rule in rules():
        for selector in selectors(rule["expr"]):
            used.setdefault(selector, f"rules.yml {rule.get('alert') or rule.get('record')}")
    for title, target in dashboard_exprs():
        for selector in selectors(target["expr"]):
            used.setdefault(selector, f"dashboard panel {title!r}")
    return used


def exposed_names() -> dict[str, tuple[str, set[str]]]:
    """Every sample name the services expose -> (its family in services/common/metrics.py, the
    services that expose it): counters as name_total, histograms as name_bucket, _sum and _count."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: dict[str, tuple[str, set[str]]] = {}
    for service, groups in metrics.SERVICE_FAMILIES.items():
        for group in groups:
            for family in metrics.FAMILIES[group]:
                described = family.describe()[0]
                for suffix in suffixes[described.type]:
                    names.setdefault(described.name + suffix, (described.name, set()))[1].add(service)
    return names


PROMETHEUS_NAMES = {"up": set(JOBS), "process_start_time_seconds": set(JOBS)}
"""Series Prometheus makes itself (up) or every service's prometheus-client exposes (process_*)."""


# --- promtool ------------------------------------------------------------------------------------------

@needs_promtool
def test_promtool_checks_the_rules_and_the_example_configuration() -> None:
    for command in (["check", "rules", str(RULES)], ["check", "config", str(PROMETHEUS_CONFIG)]):
        out = subprocess.run(["promtool", *command], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    out = subprocess.run(["promtool", "test", "rules", RULES_TEST.name], cwd=PROMETHEUS_DIR,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_unit_tests_show_every_alert_firing_and_silent() -> None:
    firing, silent = set(), set()
    for group in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    assert set(alerts()) - firing == set(), "alerts never shown firing in rules_test.yml"
    assert set(alerts()) - silent == set(), "alerts never shown silent in rules_test.yml"


# --- the rules against the Monitor's ------------------------------------------------------------------

MONITOR_DEFAULTS = {
    # rule: [(MonitorSettings field, its default, where rules.yml uses it)]
    "high_error_rate": [("alert_success_rate_min", 95.0, "< 95"), ("alert_api_window_s", 900.0, "[15m]"),
                        ("alert_min_images", 20, ">= 20")],
    "no_recent_batch_run": [("batch_max_age_hours", 26.0, "> 26 * 3600")],
    "high_response_time": [("alert_response_time_max_s", 5.0, "> 5\n"), ("alert_api_window_s", 900.0, "[15m]"),
                           ("alert_min_images", 20, ">= 20")],
    "model_load_failure": [("alert_model_load_grace_s", 300.0, "for: 5m")],
}
"""The thresholds rules.yml copies from the Monitor's defaults: a changed default must change it too."""


def test_every_monitor_rule_has_its_alert_with_the_same_title_and_severity() -> None:
    monitor_rules = {r.name: r for r in build_rules(MonitorSettings.model_construct())}  # defaults, no env
    mirrored = {a["labels"]["rule"]: (name, a) for name, a in alerts().items() if "rule" in a["labels"]}
    assert set(mirrored) == set(monitor_rules)
    for rule_name, (alert_name, alert) in mirrored.items():
        rule = monitor_rules[rule_name]
        assert alert["annotations"]["title"] == rule.title, alert_name
        assert alert["labels"]["severity"] == rule.severity.lower(), alert_name
        assert alert_name == "Fashion" + rule.title.title().replace(" ", ""), alert_name
        assert f"Monitor rule {rule_name} ({rule.title}, {rule.severity})" in RULES.read_text(), \
            f"rules.yml has no comment saying which Monitor rule {alert_name} mirrors"
    for alert_name, alert in alerts().items():
        assert alert["labels"]["severity"] in {"info", "warning", "error", "critical"}, alert_name
        assert alert["annotations"]["title"] and alert["annotations"]["summary"], alert_name


def test_thresholds_are_the_monitors_defaults() -> None:
    fields = MonitorSettings.model_fields
    text = RULES.read_text()
    for rule_name, uses in MONITOR_DEFAULTS.items():
        alert = next(a for a in alerts().values() if a["labels"].get("rule") == rule_name)
        written = yaml.safe_dump(alert)
        for field, default, snippet in uses:
            assert fields[field].default == default, \
                f"MonitorSettings.{field} is now {fields[field].default}: change {snippet!r} in rules.yml to match"
            assert snippet in alert["expr"] or snippet in written, (rule_name, snippet)
    # `for: 1m` stands for two checks a minute apart.
    assert fields["alert_confirm_checks"].default == 2 and fields["monitor_check_interval_s"].default == 60
    assert "FASHION_ALERT_CONFIRM_CHECKS (2) checks 60 s apart" in text


def test_every_metric_used_is_one_the_services_define() -> None:
    exposed = exposed_names()
    unknown = {}
    for (name, _), where in used_selectors().items():
        if name not in exposed and name not in PROMETHEUS_NAMES and name not in recorded():
            unknown[name] = where
    assert not unknown, f"not defined in services/common/metrics.py (histograms: name_bucket/_sum/_count): {unknown}"
    # Selecting by job: the job names the rules use are the services' scrape jobs.
    jobs_used = set(re.findall(r'job="([^"]+)"', RULES.read_text()))
    assert jobs_used <= set(JOBS.values())


# --- the Prometheus Operator resources -----------------------------------------------------------------------

def test_prometheusrule_is_generated_from_the_rules_file() -> None:
    out = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    resource = yaml.safe_load((COMPONENT / "prometheusrule.yaml").read_text())
    assert resource["apiVersion"] == "monitoring.coreos.com/v1" and resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


@cache
def render_with(resources: str, *components: str) -> list[dict[str, Any]]:
    """`kubectl kustomize` of an overlay of `resources` (a folder under deploy/k8s) with `components`."""
    with tempfile.TemporaryDirectory() as folder:
        relative = os.path.relpath(K8S, folder)
        Path(folder, "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [f"{relative}/{resources}"], "components": [f"{relative}/{c}" for c in components]}))
        out = subprocess.run(["kubectl", "kustomize", folder], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        value, values = labels.get(expression["key"]), expression.get("values", [])
        matched = {"In": value in values, "NotIn": value not in values, "Exists": value is not None,
                   "DoesNotExist": value is None}[expression["operator"]]
        if not matched:
            return False
    return True


def scraped_ports(docs: list[dict[str, Any]]) -> dict[str, list[tuple[dict[str, Any], int]]]:
    """Service name -> (ServiceMonitor endpoint, the container port it reaches) of each target."""
    services = [d for d in docs if d["kind"] == "Service"]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    targets: dict[str, list[tuple[dict[str, Any], int]]] = {}
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        for service in services:
            if not selects(monitor["spec"]["selector"], service["metadata"].get("labels", {})):
                continue
            for endpoint in monitor["spec"]["endpoints"]:
                port = next((p for p in service["spec"]["ports"] if p.get("name") == endpoint["port"]), None)
                if port is None:
                    continue  # this Service has no such port (the headless Inference Service): no target
                pods = [d for d in deployments if selects({"matchLabels": service["spec"]["selector"]},
                                                          d["spec"]["template"]["metadata"]["labels"])]
                assert len(pods) == 1, (service["metadata"]["name"], [d["metadata"]["name"] for d in pods])
                container = pods[0]["spec"]["template"]["spec"]["containers"][0]
                number = next(p["containerPort"] for p in container["ports"] if p["name"] == port["targetPort"])
                targets.setdefault(service["metadata"]["name"], []).append((endpoint, number))
    return targets


@needs_kubectl
def test_operator_component_scrapes_every_services_metrics_port() -> None:
    docs = render_with("base", "components/prometheus-operator")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("PrometheusRule", "fashion") in kinds
    targets = scraped_ports(docs)
    # One target per service, named as the rules' jobs (a ServiceMonitor's job is the Service's name).
    assert {name: len(found) for name, found in targets.items()} == {job: 1 for job in JOBS.values()}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for service, job in JOBS.items():
        endpoint, number = targets[job][0]
        env = {e["name"]: e.get("value") for e in deployments[job]["spec"]["template"]["spec"]["containers"][0]["env"]}
        # The port is the one the process serves its metrics on.
        setting = "FASHION_GATEWAY_PORT" if service == "gateway" else f"FASHION_{service.upper()}_METRICS_PORT"
        assert env[setting] == str(number), (job, env.get(setting), number)
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert endpoint.get("scheme", "http") == "http" and "authorization" not in endpoint
        annotations = deployments[job]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(number), job


@needs_kubectl
def test_operator_component_on_the_secure_overlay_sends_the_token_and_a_client_certificate() -> None:
    docs = render_with("overlays/secure", "components/prometheus-operator",
                       "components/prometheus-operator/secure")
    targets = scraped_ports(docs)
    assert set(targets) == set(JOBS.values())
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    secrets = {(v["secret"]["secretName"]) for d in deployments for v in d["spec"]["template"]["spec"]["volumes"]
               if "secret" in v}
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("fashion-config"))
    for job, found in targets.items():
        endpoint = found[0][0]
        credentials = endpoint["authorization"]["credentials"]
        assert endpoint["authorization"]["type"] == "Bearer" and credentials["name"] in secrets, job
        # The key is the file the services read their token from (FASHION_AUTH_TOKEN_FILE).
        assert config["data"]["FASHION_AUTH_TOKEN_FILE"].endswith("/" + credentials["key"])
        # Every scrape is HTTPS with a client certificate: the gateway's port, and the gRPC services' metrics
        # ports, which serve TLS with the same files (their shared certificate carries every Service name).
        tls = endpoint["tlsConfig"]
        assert endpoint["scheme"] == "https", job
        assert tls["serverName"] == ("fashion-gateway" if job == "fashion-gateway" else "fashion-inference"), job
        for key, setting in (("ca", "FASHION_TLS_CA"), ("cert", "FASHION_TLS_CERT")):
            assert tls[key]["secret"]["name"] in secrets
            assert config["data"][setting].endswith("/" + tls[key]["secret"]["key"])
        assert config["data"]["FASHION_TLS_KEY"].endswith("/" + tls["keySecret"]["key"])


# --- the dashboard ---------------------------------------------------------------------------------------

def test_dashboard_uses_the_datasource_variable_and_has_the_guides_charts() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        if panel["type"] in ("row", "text"):
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip(), panel["title"]
    titles = {p["title"] for p in panels}
    # The monitoring guide's charts (daily volume, success/failure, categories, summary statistics), the
    # KPIs (success rate, average response time), queue vs compute time and the batch jobs.
    for wanted in ("Daily processing volume", "Success / failure breakdown", "Category distribution",
                   "Summary statistics", "Success rate", "Average response time", "Queue vs compute time (p50, p95)",
                   "Batch jobs ended per day", "Active batch jobs", "Time since the last batch run"):
        assert wanted in titles, wanted
    # Panels of one row do not overlap.
    cells = set()
    for panel in panels:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))
        assert g["x"] + g["w"] <= 24, panel["title"]


# --- a real Prometheus scraping a running stack --------------------------------------------------------

class SlackHook:
    """A loopback Slack webhook that accepts every post (so the Monitor's notification metrics exist)."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def poll(problems: Callable[[], list[str]], timeout: float, what: str, *logs: Path) -> None:
    """Wait until `problems()` finds none; fail with the last ones (and the logs' tails) after `timeout`."""
    deadline = time.monotonic() + timeout
    found = ["not checked yet"]
    while time.monotonic() < deadline:
        try:
            found = problems()
        except (httpx.HTTPError, grpc.RpcError, OSError, KeyError, ValueError, AssertionError) as exc:
            found = [repr(exc)]
        if not found:
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}" for log in logs if log.exists())
    pytest.fail(f"timed out waiting for {what}: {found}\n{tails}")


def stop(proc: subprocess.Popen[bytes], sig: int) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def prometheus_config(ports: dict[str, int]) -> dict[str, Any]:
    """The example prometheus.yml with its jobs pointed at this stack, scraping every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert {job["job_name"] for job in config["scrape_configs"]} == set(JOBS.values())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    service_of = {job: service for service, job in JOBS.items()}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[service_of[job['job_name']]]}"]}]
    return config


# Selectors that match nothing in a healthy stack: what they watch has not happened.
ONLY_ON_INCIDENTS = {
    ("fashion_monitor_alert_firing", '{rule="disk_space_low"}'): "the Monitor's disk rule is not firing",
    ("fashion_monitor_alert_firing", '{rule="drift"}'): "the Monitor's drift rule is not firing",
    ("fashion_http_requests_total", '{status=~"5.."}'): "the gateway answered no 5xx",
    ("fashion_monitor_notifications_total", '{outcome="dropped"}'): "the Monitor dropped no notification",
}


@pytest.fixture
def stack(tmp_path: Path, linear_model: tuple[Path, Any]) -> Iterator[dict[str, Any]]:
    """`fashion run` on free ports (Slack notifications to a loopback hook), with 4 images and a broken
    file in its inbox, and a Prometheus scraping it with rules.yml loaded."""
    ports = {name: free_port() for name in ("inference", "batch", "monitor", "gateway", "inference-metrics",
                                             "batch-metrics", "monitor-metrics", "prometheus")}
    hook = SlackHook()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_")}
    env = {
        **inherited, "PYTHONUNBUFFERED": "1", "OTEL_SDK_DISABLED": "true",
        "FASHION_MODEL_DIR": str(linear_model[0]), "FASHION_INTRA_OP_THREADS": "1",
        "FASHION_INFERENCE_PORT": str(ports["inference"]), "FASHION_BATCH_PORT": str(ports["batch"]),
        "FASHION_MONITOR_PORT": str(ports["monitor"]), "FASHION_GATEWAY_PORT": str(ports["gateway"]),
        "FASHION_INFERENCE_METRICS_PORT": str(ports["inference-metrics"]),
        "FASHION_BATCH_METRICS_PORT": str(ports["batch-metrics"]),
        "FASHION_MONITOR_METRICS_PORT": str(ports["monitor-metrics"]),
        "FASHION_INFERENCE_ADDRESS": f"127.0.0.1:{ports['inference']}",
        "FASHION_BATCH_ADDRESS": f"127.0.0.1:{ports['batch']}",
        "FASHION_MONITOR_ADDRESS": f"127.0.0.1:{ports['monitor']}",
        "FASHION_MONITOR_CHECK_INTERVAL_S": "1", "FASHION_SHUTDOWN_GRACE_S": "3", "FASHION_BATCH_FSYNC": "false",
        "FASHION_SLACK_WEBHOOK_URL": hook.url,
    }
    inbox = tmp_path / "data" / "inbox"
    inbox.mkdir(parents=True)
    for i, img in enumerate(fashion_images(4)[0]):
        (inbox / f"item{i}.png").write_bytes(encode(img))
    (inbox / "broken.png").write_bytes(encode(fashion_images(1)[0][0])[:40])  # a failed file
    scrape_ports = {"inference": ports["inference-metrics"], "batch": ports["batch-metrics"],
                    "monitor": ports["monitor-metrics"], "gateway": ports["gateway"]}
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(scrape_ports)))
    run_log, prometheus_log = tmp_path / "run.out", tmp_path / "prometheus.out"
    with open(run_log, "wb") as out:
        run = subprocess.Popen([sys.executable, "-m", "fashion.cli", "run"], cwd=tmp_path, env=env,
                               stdout=out, stderr=subprocess.STDOUT)
    with open(prometheus_log, "wb") as out:
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{ports['prometheus']}"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield {"gateway": f"http://127.0.0.1:{ports['gateway']}", "ports": ports, "logs": (run_log, prometheus_log),
               "prometheus": f"http://127.0.0.1:{ports['prometheus']}/api/v1", "run": run}
    finally:
        stop(prometheus, signal.SIGTERM)
        stop(run, signal.SIGINT)
        hook.stop()


def api(base: str, path: str, **params: Any) -> Any:
    body = httpx.get(f"{base}{path}", params=params, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]


@needs_prometheus
def test_prometheus_finds_every_metric_the_rules_and_dashboard_use(stack: dict[str, Any]) -> None:
    prom, gateway, logs, ports = stack["prometheus"], stack["gateway"], stack["logs"], stack["ports"]

    def serving() -> list[str]:
        if stack["run"].poll() is not None:
            pytest.fail(f"fashion run exited ({stack['run'].returncode}):\n{logs[0].read_text()[-3000:]}")
        down = [n for n in ("inference", "batch", "monitor") if health_status(f"127.0.0.1:{ports[n]}") != "SERVING"]
        return down + ([] if httpx.get(f"{gateway}/health").json()["status"] == "healthy" else ["gateway"])

    poll(serving, 120, "the stack to serve", *logs)

    def targets_down() -> list[str]:
        active = api(prom, "/targets")["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in active}
        return [f"{job}: {health.get(job, 'not scraped')}" for job in JOBS.values() if health.get(job) != "up"]

    poll(targets_down, 60, "Prometheus to scrape every service", *logs)

    good, bad = encode(fashion_images(1)[0][0]), b"this is not an image"
    with httpx.Client(base_url=gateway, timeout=30) as client:
        def predict(image: bytes, times: int = 1) -> None:
            for _ in range(times):
                client.post("/predict", files={"file": ("x.png", image)})

        # A counter's first sample is its baseline (increase() counts from it): let Prometheus see both
        # outcomes once before the traffic the alert judges.
        predict(good)
        predict(bad)

        def outcomes_seen() -> list[str]:
            seen = {s["outcome"] for s in api(prom, "/series", **{"match[]": "fashion_inference_images_total"})}
            return sorted({"success", "failed"} - seen)

        poll(outcomes_seen, 30, "both image outcomes in Prometheus", *logs)
        job = client.post("/batch/jobs", json={"input_dir": "inbox", "mode": "copy"})
        assert job.status_code == 201, job.text
        poll(lambda: [] if client.get(f"/batch/jobs/{job.json()['job_id']}").json()["state"] == "succeeded"
             else ["running"], 60, "the batch job", *logs)
        predict(bad, 30)  # 30 failed of 35 images: under 95%, for the Monitor and for Prometheus
        predict(good, 3)
        assert client.get("/batch/jobs/no-such-job").status_code == 404  # a failed gRPC call (NOT_FOUND)

    used = used_selectors()
    exposed = exposed_names()

    def missing_series() -> list[str]:
        names = set(api(prom, "/label/__name__/values"))
        problems = [f"{name}: no series (used by {where})" for (name, _), where in used.items()
                    if name not in names and name not in recorded()]
        for (name, matchers), where in used.items():
            if not matchers or name in recorded() or (name, matchers) in ONLY_ON_INCIDENTS:
                continue
            if not api(prom, "/series", **{"match[]": name + matchers}):
                problems.append(f"{name}{matchers}: no series (used by {where})")
        problems += [f"{name}: recording rule has no series" for name in recorded() if name not in names]
        return problems

    poll(missing_series, 90, "a series for every metric the rules and the dashboard use", *logs)

    # Each metric comes from the service that owns its family, and from no other.
    for name, _ in used:
        if name in recorded():
            continue
        owners = PROMETHEUS_NAMES.get(name) or exposed[name][1]
        jobs = {s["job"] for s in api(prom, "/series", **{"match[]": name})}
        assert jobs <= {JOBS[o] for o in owners}, (name, jobs)
    for (name, matchers), why in ONLY_ON_INCIDENTS.items():
        assert api(prom, "/series", **{"match[]": name}), (name, why)  # the metric itself exists
        relayed = re.fullmatch(r'\{rule="(\w+)"\}', matchers)
        if name == "fashion_monitor_alert_firing":
            assert relayed and relayed.group(1) in {r.name for r in build_rules(MonitorSettings.model_construct())}

    def rules_unhealthy() -> list[str]:
        groups = api(prom, "/rules")["groups"]
        return [f"{r['name']}: {r['health']} {r.get('lastError', '')}" for g in groups for r in g["rules"]
                if r["health"] != "ok"]

    poll(rules_unhealthy, 30, "every rule evaluated without error", *logs)

    def high_error_rate() -> list[str]:
        problems = []
        active = {(a["labels"]["alertname"], a["labels"].get("source")): a["state"]
                  for a in api(prom, "/alerts")["alerts"]}
        if active.get(("FashionHighErrorRate", "api")) not in ("pending", "firing"):
            problems.append(f"Prometheus: FashionHighErrorRate not pending or firing ({active})")
        monitor = api(prom, "/query", query='fashion_monitor_alert_firing{rule="high_error_rate"} == 1')["result"]
        if not monitor:
            problems.append("the Monitor's high_error_rate is not firing")
        return problems

    poll(high_error_rate, 60, "the High Error Rate alert, from Prometheus and from the Monitor", *logs)

    # Every dashboard query runs and returns data.
    for title, target in dashboard_exprs():
        expr = runnable(target["expr"], target.get("interval") or "15s")
        result = api(prom, "/query", query=expr)["result"]
        assert result or any(s in ONLY_ON_INCIDENTS for s in selectors(target["expr"])), (title, expr)
