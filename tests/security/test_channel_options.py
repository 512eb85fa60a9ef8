"""One set of variables, one reading: the channels a service opens to the others (built from its
settings object by security.client_options) and those of a client user (ChannelOptions.from_env)
come out equal for the same environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from fashion.client import ChannelOptions
from services.common.config import BatchSettings, CommonSettings, GatewaySettings, MonitorSettings
from services.common.security import client_options

ADDRESS = "dns:///fashion-inference-headless:50051"
ENVIRONMENTS = {
    "nothing set": {},
    "TLS with system roots": {"FASHION_TLS": "true"},
    "TLS, other spellings": {"FASHION_TLS": "On"},
    "TLS implied by the CA": {"FASHION_TLS_CA": "/pki/ca.pem"},
    "TLS off explicitly": {"FASHION_TLS": "no", "FASHION_TLS_SERVER_NAME": ""},
    "mutual TLS": {"FASHION_TLS": "1", "FASHION_TLS_CA": "/pki/ca.pem", "FASHION_TLS_CERT": "/pki/client.pem",
                   "FASHION_TLS_KEY": "/pki/client.key", "FASHION_TLS_SERVER_NAME": "fashion.internal"},
    "token": {"FASHION_AUTH_TOKEN": "s3cret"},
    "token file": {"FASHION_AUTH_TOKEN_FILE": "/run/secrets/token"},
    "token beats the token file": {"FASHION_AUTH_TOKEN": "s3cret", "FASHION_AUTH_TOKEN_FILE": "/run/secrets/token"},
    "empty token: the token file": {"FASHION_AUTH_TOKEN": "", "FASHION_AUTH_TOKEN_FILE": "/run/secrets/token"},
    "max message bytes": {"FASHION_MAX_MESSAGE_BYTES": "33554432"},
    "lb policy": {"FASHION_GRPC_LB_POLICY": "round_robin"},
    "everything": {"FASHION_TLS": "yes", "FASHION_TLS_CA": "/pki/ca.pem", "FASHION_TLS_CERT": "/pki/c.pem",
                   "FASHION_TLS_KEY": "/pki/c.key", "FASHION_AUTH_TOKEN_FILE": "/run/secrets/token",
                   "FASHION_MAX_MESSAGE_BYTES": "1048576", "FASHION_GRPC_LB_POLICY": "round_robin"},
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FASHION_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("settings_class", [CommonSettings, BatchSettings, MonitorSettings, GatewaySettings])
@pytest.mark.parametrize("env", ENVIRONMENTS.values(), ids=ENVIRONMENTS.keys())
def test_services_and_client_users_read_the_variables_alike(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                            settings_class: type[CommonSettings]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from_settings = client_options(settings_class(), ADDRESS)
    assert from_settings == ChannelOptions.from_env(ADDRESS)
    assert from_settings.grpc_options() == ChannelOptions.from_env(ADDRESS).grpc_options()


def test_what_the_variables_set() -> None:
    """The mapping itself (both builders share it): each variable lands on its option."""
    settings = CommonSettings(tls_ca=Path("/pki/ca.pem"), tls_cert=Path("/pki/c.pem"), tls_key=Path("/pki/c.key"),
                              tls_server_name="fashion.internal", auth_token_file=Path("/run/secrets/token"),
                              max_message_bytes=1024, grpc_lb_policy="round_robin")
    options = client_options(settings, ADDRESS, timeout_s=7.0)
    assert options == ChannelOptions(ADDRESS, timeout_s=7.0, tls=True, root_ca=Path("/pki/ca.pem"),
                                     client_cert=Path("/pki/c.pem"), client_key=Path("/pki/c.key"),
                                     server_name="fashion.internal", token_file=Path("/run/secrets/token"),
                                     max_message_bytes=1024, lb_policy="round_robin")
    assert client_options(CommonSettings(auth_token="t0k", auth_token_file=Path("/x")), ADDRESS).token_file is None


def test_overrides_win_and_none_is_no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_MAX_MESSAGE_BYTES", "2048")
    overrides: dict[str, object] = {"retries": 1, "max_message_bytes": None, "lb_policy": "round_robin"}
    for options in (client_options(CommonSettings(), ADDRESS, **overrides),
                    ChannelOptions.from_env(ADDRESS, **overrides)):
        assert (options.retries, options.max_message_bytes, options.lb_policy) == (1, 2048, "round_robin")
