"""TLS and token settings checked as a user meets them: files that cannot work stop a server before
it listens (one line naming the variable and the file, exit 2), a client certificate without its key
is a line rather than an abort, tokens are read as the clients send them, and a token file that
goes bad, empty or missing later keeps the last tokens and says so in the log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from fashion.client import ChannelOptions, InferenceClient, MonitorClient
from fashion.client._token import RECHECK_S
from tests.conftest import start_inference
from tests.deploy.manifests import K8S, config_map, needs_kubectl, render
from tests.images import encode, fashion_images
from tests.monitor.conftest import monitor_env
from tests.security.pki import Pki, make_pki
from tests.support import ServiceProcess, free_port, start_service

pytestmark = pytest.mark.timeout(180)
TOKEN, NEW = "tok-5d2e91-checked", "tok-0b7c44-next"
TOGETHER = "error: FASHION_TLS_CERT and FASHION_TLS_KEY must be set together"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def start(module: str, cwd: Path, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m module` on free ports, logging under cwd/logs; what it printed once it ended."""
    ports = {name: str(free_port()) for name in ("FASHION_MONITOR_PORT", "FASHION_MONITOR_METRICS_PORT",
                                                 "FASHION_GATEWAY_PORT")}
    full = {**os.environ, "FASHION_BIND_ADDRESS": "127.0.0.1", "FASHION_LOG_DIR": str(cwd / "logs"), **ports, **env}
    return subprocess.run([sys.executable, "-m", module], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)


def assert_refused(done: subprocess.CompletedProcess[str], line: str, cwd: Path) -> None:
    """Exit 2, the one line, and nothing started (no log file: no metrics port either)."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.splitlines() == [line], done.stderr
    assert not (cwd / "logs").exists()


@pytest.mark.parametrize("given", ["FASHION_TLS_CERT", "FASHION_TLS_KEY"])
def test_a_client_certificate_without_its_key_is_one_line_not_an_abort(tmp_path: Path, pki: Pki, given: str) -> None:
    """grpc aborted the CLI (SIGABRT, "Check failed: private_key != nullptr") on either alone."""
    env = {**os.environ, "FASHION_TLS_CA": str(pki.ca),
           given: str(pki.client_cert if given == "FASHION_TLS_CERT" else pki.client_key)}
    for command in (["monitor", "alerts", "--address", f"127.0.0.1:{free_port()}"],
                    ["stats", "--address", f"127.0.0.1:{free_port()}"]):
        done = subprocess.run([sys.executable, "-m", "fashion.cli", *command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr.splitlines()) == (2, [TOGETHER]), (command, done.returncode, done.stderr)


def test_client_tls_files_that_cannot_work_are_one_line_not_unavailable(tmp_path: Path, pki: Pki) -> None:
    """A CA bundle that is not PEM (or empty), a client key that is not the certificate's: the CLI says which
    file in one line, exit 2, before any call (each call failed UNAVAILABLE, after its retries, before)."""
    junk, empty = tmp_path / "junk.pem", tmp_path / "empty.pem"
    junk.write_text("not a certificate\n")
    empty.write_text("")
    cases = [
        ({"FASHION_TLS_CA": str(junk)}, f"error: the TLS CA bundle {junk} (FASHION_TLS_CA) holds no PEM certificate"),
        ({"FASHION_TLS_CA": str(empty)}, f"error: the TLS CA bundle {empty} (FASHION_TLS_CA) holds no PEM certificate"),
        ({"FASHION_TLS_CA": str(pki.ca), "FASHION_TLS_CERT": str(pki.client_cert),
          "FASHION_TLS_KEY": str(pki.server_key)},
         f"error: the TLS key {pki.server_key} (FASHION_TLS_KEY) and certificate {pki.client_cert} (FASHION_TLS_CERT) "
         "are not a PEM certificate and its private key"),
    ]
    for settings, line in cases:
        done = subprocess.run([sys.executable, "-m", "fashion.cli", "monitor", "alerts", "--address",
                               f"127.0.0.1:{free_port()}"], cwd=tmp_path, env={**os.environ, **settings},
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr.splitlines()) == (2, [line]), (settings, done.returncode, done.stderr)


def tls_cases(pki: Pki, folder: Path) -> dict[str, tuple[dict[str, str], str]]:
    """Settings that cannot work, and the line that says why."""
    junk, empty = folder / "junk.pem", folder / "empty.pem"
    junk.write_text("not a certificate\n")
    empty.write_text("")
    pair = {"FASHION_TLS_CERT": str(pki.server_cert), "FASHION_TLS_KEY": str(pki.server_key)}
    return {
        "another certificate's key": (
            {**pair, "FASHION_TLS_KEY": str(pki.client_key)},
            f"error: the TLS key {pki.client_key} (FASHION_TLS_KEY) is not the private key of the certificate "
            f"{pki.server_cert} (FASHION_TLS_CERT)"),
        "certificate not PEM": (
            {**pair, "FASHION_TLS_CERT": str(junk)},
            f"error: the TLS certificate {junk} (FASHION_TLS_CERT) holds no PEM certificate"),
        "key not PEM": (
            {**pair, "FASHION_TLS_KEY": str(junk)},
            f"error: the TLS key {junk} (FASHION_TLS_KEY) is not a PEM private key for the certificate "
            f"{pki.server_cert} (FASHION_TLS_CERT)"),
        "client CA not PEM": (
            {**pair, "FASHION_TLS_CLIENT_CA": str(junk)},
            f"error: the client CA {junk} (FASHION_TLS_CLIENT_CA) holds no PEM certificate"),
        "client CA empty": (  # it started, then refused every client
            {**pair, "FASHION_TLS_CLIENT_CA": str(empty)},
            f"error: the client CA {empty} (FASHION_TLS_CLIENT_CA) holds no PEM certificate"),
        "health port without TLS": (  # it was ignored
            {"FASHION_HEALTH_PORT": "50100"},
            "error: FASHION_HEALTH_PORT=50100 (plaintext health checks beside a TLS port) needs FASHION_TLS_CERT "
            "and FASHION_TLS_KEY; without TLS, probe the service's own port"),
    }


@pytest.mark.parametrize("module", ["services.monitor", "services.gateway"])
def test_tls_settings_that_cannot_work_stop_a_server_before_it_listens(tmp_path: Path, pki: Pki, module: str) -> None:
    """The Monitor exited 1 with "Failed to bind to address" and the gateway with an ssl.SSLError
    traceback, both after the metrics port listened; an empty client CA started a server no client
    could reach; a health port without TLS was ignored."""
    for case, (env, line) in tls_cases(pki, tmp_path).items():
        cwd = tmp_path / case.replace(" ", "-")
        cwd.mkdir()
        try:
            done = start(module, cwd, **env)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{case}: {module} started")
        assert_refused(done, line, cwd)


def test_tls_settings_that_reach_only_the_clients_are_a_warning(tmp_path: Path) -> None:
    """FASHION_TLS=true without a certificate: the process calls the others over TLS, serves plaintext."""
    env = monitor_env(tmp_path, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", FASHION_TLS="true",
                      FASHION_MONITOR_CHECK_INTERVAL_S="30")
    monitor = start_service("services.monitor", tmp_path, env, f"127.0.0.1:{env['FASHION_MONITOR_PORT']}")
    try:
        monitor.wait_serving()
    finally:
        monitor.terminate()
    assert ("WARNING services.common.bootstrap [trace_id=-] FASHION_TLS (or FASHION_TLS_CA) is set but "
            "FASHION_TLS_CERT and FASHION_TLS_KEY are not: this process calls the other services over TLS but "
            "serves plaintext itself") in monitor.output(), monitor.output()


@needs_kubectl
def test_the_secure_overlay_settings_still_start_every_service(tmp_path: Path, pki: Pki) -> None:
    """The `secure` overlay's fashion-config (mutual TLS, health port, token file), its files mounted
    as the overlay mounts them (mode 0440): the checks let every service through, and the Monitor
    serves without the plaintext warning."""
    mounts = {"/etc/fashion/tls": tmp_path / "tls", "/etc/fashion/auth": tmp_path / "auth"}
    for folder in mounts.values():
        folder.mkdir()
    for source, name in ((pki.ca, "ca.crt"), (pki.server_cert, "tls.crt"), (pki.server_key, "tls.key")):
        (mounts["/etc/fashion/tls"] / name).write_bytes(source.read_bytes())
    (mounts["/etc/fashion/auth"] / "token").write_text(f"{TOKEN}\n")
    for folder in mounts.values():
        for path in folder.iterdir():
            path.chmod(0o440)
    data = config_map(render(K8S / "overlays" / "secure"))["data"]
    secure = {name: value for name, value in data.items() if name.startswith(("FASHION_TLS", "FASHION_AUTH"))}
    for mount, folder in mounts.items():
        secure = {name: value.replace(mount, str(folder)) for name, value in secure.items()}
    health = free_port()
    secure.update(FASHION_HEALTH_PORT=str(health), FASHION_REFLECTION=data["FASHION_REFLECTION"])
    assert {"FASHION_TLS", "FASHION_TLS_CERT", "FASHION_TLS_KEY", "FASHION_TLS_CLIENT_CA",
            "FASHION_AUTH_TOKEN_FILE"} <= secure.keys()

    loaded = subprocess.run([sys.executable, "-c", "from services.common import config; "
                             "from services.common.bootstrap import load\n"
                             "for name in ('InferenceSettings', 'BatchSettings', 'GatewaySettings'): "
                             "load(getattr(config, name))"],
                            cwd=tmp_path, env={**os.environ, **secure}, capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0 and not loaded.stderr, loaded.stderr
    env = monitor_env(tmp_path / "monitor", f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                      FASHION_MONITOR_CHECK_INTERVAL_S="30", **secure)
    monitor = start_service("services.monitor", tmp_path / "monitor", env, f"127.0.0.1:{env['FASHION_MONITOR_PORT']}")
    try:
        ServiceProcess(monitor.proc, f"127.0.0.1:{health}", monitor.log_path, {}).wait_serving()
    finally:
        monitor.terminate()
    assert "WARNING" not in monitor.output(), monitor.output()


@pytest.mark.parametrize(("env", "line"), [
    ({"FASHION_AUTH_TOKEN": "   "}, "error: FASHION_AUTH_TOKEN is empty once stripped of surrounding whitespace"),
    ({"FASHION_AUTH_TOKEN": "jeton-réservé"},
     "error: FASHION_AUTH_TOKEN holds characters other than printable ASCII (an HTTP header carries no others)"),
])
def test_a_token_no_client_can_send_stops_the_start_and_the_cli(tmp_path: Path, env: dict[str, str],
                                                                line: str) -> None:
    """It was accepted, and matched nothing a client sends (or could send over HTTP/2)."""
    assert_refused(start("services.monitor", tmp_path, **env), line, tmp_path)
    cli = subprocess.run([sys.executable, "-m", "fashion.cli", "stats", "--address", f"127.0.0.1:{free_port()}"],
                         cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert (cli.returncode, cli.stderr.splitlines()) == (2, [line]), cli.stderr


@pytest.mark.parametrize(("content", "mode", "why"), [
    (f"{TOKEN}\r\nnouveau-jeton-é\r\n".encode(), 0o600,
     "line 2 holds characters other than printable ASCII (an HTTP header carries no others)"),
    (f"{TOKEN}\n".encode(), 0o666, "is writable by group or others (mode 0666): any local user could add a token; "
                                   "make it writable by its owner alone (chmod go-w)"),
    (f"{TOKEN}\n".encode(), 0o620, "is writable by group or others (mode 0620): any local user could add a token; "
                                   "make it writable by its owner alone (chmod go-w)"),
])
def test_a_token_file_that_cannot_work_stops_the_start(tmp_path: Path, content: bytes, mode: int, why: str) -> None:
    token_file = tmp_path / "secret" / "token"
    token_file.parent.mkdir()
    token_file.write_bytes(content)
    token_file.chmod(mode)
    cwd = tmp_path / "monitor"
    cwd.mkdir()
    assert_refused(start("services.monitor", cwd, FASHION_AUTH_TOKEN_FILE=str(token_file)),
                   f"error: the token file {token_file} {why}", cwd)


def test_a_token_with_a_trailing_newline_is_the_token_clients_send(tmp_path: Path) -> None:
    """A Kubernetes Secret made with `echo`: FASHION_AUTH_TOKEN ends with a newline. The server and the
    CLI both read it as the token."""
    env = monitor_env(tmp_path, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                      FASHION_AUTH_TOKEN=f"{TOKEN}\n", FASHION_MONITOR_CHECK_INTERVAL_S="30")
    monitor = start_service("services.monitor", tmp_path, env, f"127.0.0.1:{env['FASHION_MONITOR_PORT']}")
    try:
        monitor.wait_serving()
        with MonitorClient(ChannelOptions(monitor.address, token=TOKEN, retries=1)) as client:
            client.alerts()
        cli = subprocess.run([sys.executable, "-m", "fashion.cli", "monitor", "alerts", "--address", monitor.address],
                             cwd=tmp_path, env={**os.environ, "FASHION_AUTH_TOKEN": f" {TOKEN}\r\n"},
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
    finally:
        monitor.terminate()


def replace(path: Path, content: bytes, mode: int = 0o644) -> None:
    """As a Secret update does: the new file appears whole, with its mode (written, then renamed over)."""
    staging = path.with_name(f".{path.name}.new")
    staging.write_bytes(content)
    staging.chmod(mode)
    os.replace(staging, path)


def classify(address: str, image: bytes, token: str | None = None, token_file: Path | None = None) -> str:
    """"ok", or the status code of the refusal."""
    with InferenceClient(ChannelOptions(address, token=token, token_file=token_file, retries=1)) as client:
        try:
            client.classify(image)
        except grpc.RpcError as exc:
            return exc.code().name
    return "ok"


def test_a_token_file_is_read_as_written_and_a_bad_rewrite_keeps_the_last_tokens(tmp_path: Path,
                                                                                 linear_model) -> None:
    """Written by a Windows editor (BOM, CRLF), the token is the one clients send (the server accepted
    "\\ufefftoken" alone). Rewritten later with a line no client could send, or made writable by
    others: the last tokens stay, logged once. Emptied or deleted: the last tokens stay (a Secret
    being swapped must not refuse calls), and an ERROR says so, once per state within a minute."""
    token_file = tmp_path / "secret" / "token"
    token_file.parent.mkdir()
    token_file.write_bytes(f"\ufeff{TOKEN}\r\n".encode())
    inference = start_inference(tmp_path / "inference", linear_model[0], FASHION_AUTH_TOKEN_FILE=str(token_file))
    image = encode(fashion_images(1)[0][0])

    def settle() -> None:  # past the recheck interval, with calls meanwhile
        for _ in range(3):
            assert classify(inference.address, image, TOKEN) == "ok"
            time.sleep(RECHECK_S / 2)

    try:
        inference.wait_serving()
        assert classify(inference.address, image, TOKEN) == "ok"
        assert classify(inference.address, image, token_file=token_file) == "ok"  # the client reads it alike

        replace(token_file, f"{NEW}\nnew\x07token\n".encode())
        settle()
        assert classify(inference.address, image, NEW) == "UNAUTHENTICATED"

        replace(token_file, f"{NEW}\n".encode(), 0o666)
        settle()
        assert classify(inference.address, image, NEW) == "UNAUTHENTICATED"
        token_file.chmod(0o644)
        time.sleep(RECHECK_S)
        assert classify(inference.address, image, NEW) == "ok"
        assert classify(inference.address, image, TOKEN) == "UNAUTHENTICATED"

        replace(token_file, b"")
        for _ in range(3):
            assert classify(inference.address, image, NEW) == "ok"
            time.sleep(RECHECK_S / 2)
        token_file.unlink()
        for _ in range(3):
            assert classify(inference.address, image, NEW) == "ok"
    finally:
        inference.terminate()
    out = inference.output()
    kept = "the last tokens read stay in use"
    assert out.count(f"The token file {token_file} line 2 holds characters other than printable ASCII") == 1, out
    assert out.count(f"The token file {token_file} is writable by group or others (mode 0666)") == 1, out
    assert out.count(kept) == 2, out
    stale = "the last tokens read are still accepted (and sent); to revoke them, write the new token to it"
    for state in ("holds no token", "cannot be read (No such file or directory)"):
        lines = [line for line in out.splitlines() if f"The token file {token_file} {state}: {stale}" in line]
        assert len(lines) == 1 and " ERROR fashion.client._token " in lines[0], out
    assert TOKEN not in out and NEW not in out
