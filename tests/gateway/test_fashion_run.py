"""`fashion run` (what `make run` runs) as a user runs it: Inference, Batch, Monitor and the gateway
start together, listen on loopback only (nothing set), answer through the gateway (predictions,
batch jobs, monitoring), and all stop on Ctrl-C (SIGINT)."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.images import encode, fashion_images
from tests.support import free_port, health_status, listening_addresses


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"fashion run exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_fashion_run_starts_everything_and_ctrl_c_stops_everything(tmp_path: Path, linear_model) -> None:
    ports = {name: free_port() for name in ("inference", "batch", "monitor", "gateway", "m1", "m2", "m3")}
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_")}  # the defaults, as shipped
    env = {
        **inherited, "PYTHONUNBUFFERED": "1", "OTEL_SDK_DISABLED": "true",
        "FASHION_MODEL_DIR": str(linear_model[0]), "FASHION_INTRA_OP_THREADS": "1",
        "FASHION_INFERENCE_PORT": str(ports["inference"]), "FASHION_BATCH_PORT": str(ports["batch"]),
        "FASHION_MONITOR_PORT": str(ports["monitor"]), "FASHION_GATEWAY_PORT": str(ports["gateway"]),
        "FASHION_INFERENCE_METRICS_PORT": str(ports["m1"]), "FASHION_BATCH_METRICS_PORT": str(ports["m2"]),
        "FASHION_MONITOR_METRICS_PORT": str(ports["m3"]),
        "FASHION_INFERENCE_ADDRESS": f"127.0.0.1:{ports['inference']}",
        "FASHION_BATCH_ADDRESS": f"127.0.0.1:{ports['batch']}",
        "FASHION_MONITOR_ADDRESS": f"127.0.0.1:{ports['monitor']}",
        "FASHION_GATEWAY_ADDRESS": f"127.0.0.1:{ports['gateway']}",
        "FASHION_MONITOR_CHECK_INTERVAL_S": "1", "FASHION_SHUTDOWN_GRACE_S": "3", "FASHION_BATCH_FSYNC": "false",
    }
    inbox = tmp_path / "data" / "inbox"
    inbox.mkdir(parents=True)
    x, _ = fashion_images(4)
    for i, img in enumerate(x):
        (inbox / f"item{i}.png").write_bytes(encode(img))
    log = tmp_path / "run.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fashion.cli", "run"], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    gateway = f"http://127.0.0.1:{ports['gateway']}"
    try:
        for name in ("inference", "batch", "monitor"):
            wait_until(lambda n=name: health_status(f"127.0.0.1:{ports[n]}") == "SERVING", 90, name, proc, log)
        wait_until(lambda: httpx.get(f"{gateway}/health").json()["status"] == "healthy", 60, "gateway", proc, log)
        pids = dict(re.findall(r"started (\w+) \(pid (\d+)\)", log.read_text()))
        assert set(pids) == {"inference", "batch", "monitor", "gateway"}, log.read_text()
        assert f"started gateway (pid {pids['gateway']}): HTTP http://127.0.0.1:{ports['gateway']}" in log.read_text()
        # Each metrics port shows its own service's families only (none of another's at zero).
        own = {"m1": "fashion_inference_", "m2": "fashion_batch_", "m3": "fashion_monitor_"}
        for port_name, prefix in own.items():
            families = set(re.findall(r"^# TYPE (fashion_\w+) ", httpx.get(
                f"http://127.0.0.1:{ports[port_name]}/metrics").text, re.M))
            assert any(f.startswith(prefix) for f in families), (port_name, families)
            assert all(f.startswith((prefix, "fashion_grpc_")) for f in families), (port_name, families)
        gateway_families = set(re.findall(r"^# TYPE (fashion_\w+) ", httpx.get(f"{gateway}/metrics").text, re.M))
        assert gateway_families and all(f.startswith("fashion_http_") for f in gateway_families), gateway_families
        # Secure by default: every listening socket of the whole process tree is on loopback.
        listening = listening_addresses(proc.pid)
        assert {port for _, port in listening} >= set(ports.values()), (listening, ports)
        assert all(ipaddress.ip_address(address).is_loopback for address, _ in listening), listening

        with httpx.Client(base_url=gateway, timeout=30) as client:
            assert client.post("/predict", files={"file": ("a.png", encode(x[0]))}).json()["category"]
            # A batch job through the gateway, to its end.
            resp = client.post("/batch/jobs", json={"input_dir": "inbox", "mode": "copy"})
            assert resp.status_code == 201, resp.text
            job = resp.json()
            assert job["state"] in ("queued", "running", "succeeded") and job["input_dir"]
            wait_until(lambda: client.get(f"/batch/jobs/{job['job_id']}").json()["state"] == "succeeded", 60,
                       "the batch job", proc, log)
            done = client.get(f"/batch/jobs/{job['job_id']}").json()
            assert done["total"] == 4 and done["successful"] + done["uncertain"] == 4
            assert sum(done["categories"].values()) == done["successful"]
            assert isinstance(done["created_at"], str) and done["created_at"].endswith("Z")
            listed = client.get("/batch/jobs", params={"state": "succeeded"})
            assert listed.status_code == 200, listed.text
            listed = listed.json()["jobs"]
            assert job["job_id"] in [j["job_id"] for j in listed]
            cancel = client.post(f"/batch/jobs/{job['job_id']}/cancel")
            assert cancel.status_code == 409 and cancel.json()["error"]["code"] == "FAILED_PRECONDITION"
            missing = client.get("/batch/jobs/no-such-job")
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
            escape = client.post("/batch/jobs", json={"input_dir": "../../etc"})
            assert escape.status_code == 400 and escape.json()["error"]["code"] == "INVALID_ARGUMENT"
            assert client.post("/batch/jobs", json={"input_dir": ""}).status_code == 400
            stats = client.get("/batch/stats").json()
            assert stats["images"] >= 4 and stats["runs"] >= 1
            # Monitoring through the gateway.
            system = client.get("/monitor/health").json()
            assert {s["name"]: s["serving_status"] for s in system["services"]} == {
                "inference": "SERVING", "batch": "SERVING", "gateway": "HTTP 200 healthy"}
            assert system["status"] in ("healthy", "degraded")
            batch_health = client.get("/monitor/batch-health", params={"days": 1}).json()
            assert batch_health["recent_run"] is True and batch_health["stats"]["images"] >= 4
            assert client.get("/monitor/batch-health", params={"days": 999}).status_code == 400
            alerts = client.get("/monitor/alerts").json()
            assert alerts["rules"] and "active" in alerts
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()[-3000:]
    assert "fashion run: stopped" in log.read_text()
    for name, pid in pids.items():
        assert not pid_alive(int(pid)), f"{name} still running"


def test_fashion_run_starts_nothing_when_a_port_is_taken(tmp_path: Path) -> None:
    """Every port of the stack is checked before any service starts: a port another program holds (an
    earlier `make run` still going) is one line naming its setting, exit 2, and no service started."""
    settings = ("FASHION_INFERENCE_PORT", "FASHION_BATCH_PORT", "FASHION_MONITOR_PORT", "FASHION_GATEWAY_PORT",
                "FASHION_INFERENCE_METRICS_PORT", "FASHION_BATCH_METRICS_PORT", "FASHION_MONITOR_METRICS_PORT")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_")}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**inherited, **{name: str(free_port()) for name in settings}, "FASHION_MONITOR_METRICS_PORT": str(port)}
        done = subprocess.run([sys.executable, "-m", "fashion.cli", "run"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{port} (FASHION_MONITOR_METRICS_PORT): the "
                                        "port is in use: another program listens there (an earlier run still going?)"]
    assert "started" not in done.stdout and not (tmp_path / "logs").exists()


def test_fashion_run_starts_nothing_when_two_listeners_want_one_port(tmp_path: Path) -> None:
    """A port set twice (two settings with one value, or FASHION_HEALTH_PORT, which each gRPC service reads,
    with TLS on) is refused before anything starts, naming every setting that wants it: exit 2."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_")}
    ports = {name: str(free_port()) for name in ("FASHION_INFERENCE_PORT", "FASHION_BATCH_PORT", "FASHION_MONITOR_PORT",
                                                 "FASHION_GATEWAY_PORT", "FASHION_INFERENCE_METRICS_PORT")}
    metrics = ports["FASHION_INFERENCE_METRICS_PORT"]
    health = str(free_port())
    cases = [
        ({**ports, "FASHION_BATCH_METRICS_PORT": metrics, "FASHION_MONITOR_METRICS_PORT": "0"},
         [f"error: port {metrics} is set for 2 listeners (inference's FASHION_INFERENCE_METRICS_PORT, batch's "
          "FASHION_BATCH_METRICS_PORT): each needs a port of its own"]),
        ({**ports, "FASHION_BATCH_METRICS_PORT": "0", "FASHION_MONITOR_METRICS_PORT": "0", "FASHION_TLS_CERT": "s.pem",
          "FASHION_TLS_KEY": "s.key", "FASHION_HEALTH_PORT": health},
         [f"error: port {health} is set for 3 listeners (inference's FASHION_HEALTH_PORT, batch's FASHION_HEALTH_PORT, "
          "monitor's FASHION_HEALTH_PORT): each needs a port of its own"]),
        # A certificate without its key: one line, not a traceback from reading where each service listens.
        ({**ports, "FASHION_TLS_CERT": "s.pem"}, ["error: FASHION_TLS_CERT and FASHION_TLS_KEY must be set together"]),
    ]
    for settings, expected in cases:
        done = subprocess.run([sys.executable, "-m", "fashion.cli", "run"], cwd=tmp_path, env={**inherited, **settings},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.splitlines() == expected
        assert "started" not in done.stdout and not (tmp_path / "logs").exists()
    # One service alone may take the health port.
    alone = subprocess.run([sys.executable, "-c", "from services.launcher import listeners, port_clashes; "
                            "print(port_clashes(listeners(), ['inference', 'gateway']))"],
                           env={**inherited, **cases[1][0]}, capture_output=True, text=True, timeout=60)
    assert alone.stdout.strip() == "[]", alone.stderr
