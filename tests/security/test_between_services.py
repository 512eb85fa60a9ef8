"""Calls between services carry TLS client certificates and the bearer token: the Monitor service
checks an Inference service that requires both, configured by the same variables."""

from __future__ import annotations

from pathlib import Path

from fashion.client import ChannelOptions, MonitorClient
from tests.conftest import start_inference
from tests.monitor.conftest import monitor_env
from tests.security.pki import make_pki
from tests.security.test_grpc_security import TOKEN, assert_secret_absent
from tests.support import ServiceProcess, free_port, start_service


def test_monitor_reaches_inference_over_mtls_with_the_token(tmp_path: Path, linear_model) -> None:
    pki = make_pki(tmp_path / "pki")
    shared = {"FASHION_TLS": "true", "FASHION_TLS_CA": str(pki.ca), "FASHION_TLS_CERT": str(pki.server_cert),
              "FASHION_TLS_KEY": str(pki.server_key), "FASHION_TLS_CLIENT_CA": str(pki.ca),
              "FASHION_AUTH_TOKEN": TOKEN}
    inference_health, monitor_health = free_port(), free_port()
    inference = start_inference(tmp_path / "inference", linear_model[0], FASHION_HEALTH_PORT=str(inference_health),
                                **shared)
    env = monitor_env(tmp_path / "monitor", inference.address, f"127.0.0.1:{free_port()}",
                      FASHION_HEALTH_PORT=str(monitor_health), **shared)
    monitor = start_service("services.monitor", tmp_path / "monitor", env, f"127.0.0.1:{env['FASHION_MONITOR_PORT']}")
    try:
        ServiceProcess(inference.proc, f"127.0.0.1:{inference_health}", inference.log_path, {}).wait_serving()
        ServiceProcess(monitor.proc, f"127.0.0.1:{monitor_health}", monitor.log_path, {}).wait_serving()
        options = ChannelOptions(monitor.address, root_ca=pki.ca, client_cert=pki.client_cert,
                                 client_key=pki.client_key, token=TOKEN, timeout_s=20)
        with MonitorClient(options) as client:
            health = client.system_health()
        checked = {s.name: s for s in health.services}
        assert checked["inference"].serving_status == "SERVING", checked["inference"]
        # GetStats is not a public method: it answered because the Monitor sent the token.
        assert checked["inference"].HasField("inference_stats"), checked["inference"]
        assert checked["inference"].inference_stats.model_loaded
    finally:
        monitor.terminate()
        inference.terminate()
    assert_secret_absent(tmp_path / "inference", TOKEN)
    assert_secret_absent(tmp_path / "monitor", TOKEN)
