"""Channels for every client: message limits, retries on UNAVAILABLE with backoff, deadlines,
optional TLS (and mTLS) and bearer token."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fashion.client._token import token_file

MIB = 1024 * 1024


@dataclass(frozen=True)
class ChannelOptions:
    """How to reach a service. Defaults suit the local stack; every field has an env override
    in `from_env` (FASHION_TLS, FASHION_TLS_CA, FASHION_TLS_CERT, FASHION_TLS_KEY,
    FASHION_TLS_SERVER_NAME, FASHION_AUTH_TOKEN / FASHION_AUTH_TOKEN_FILE, FASHION_MAX_MESSAGE_BYTES,
    FASHION_GRPC_LB_POLICY): the same variables that configure the services' server side."""

    address: str
    timeout_s: float = 30.0
    """Deadline of each call."""
    max_message_bytes: int = 16 * MIB
    retries: int = 5
    """Attempts per call when the server answers UNAVAILABLE (exponential backoff 0.1 s .. 5 s)."""
    tls: bool = False
    """Reach the service over TLS (implied by root_ca)."""
    root_ca: Path | None = None
    """CA bundle that signed the server certificate (system roots when unset)."""
    client_cert: Path | None = None
    """Client certificate for mutual TLS."""
    client_key: Path | None = None
    token: str | None = field(default=None, repr=False)
    """Bearer token sent as `authorization: Bearer <token>`."""
    token_file: Path | None = None
    """File holding the bearer token (its first line), used when `token` is unset; read again whenever
    it changes, so a rotated Secret is sent from the next call on (see fashion.client.TokenFile)."""
    server_name: str = ""
    """Name expected in the server certificate when it differs from the address's host."""
    lb_policy: str = "pick_first"
    """"round_robin" spreads calls over every address the name resolves to (headless Service)."""

    def __post_init__(self) -> None:
        if self.root_ca is not None and not self.tls:
            object.__setattr__(self, "tls", True)

    @classmethod
    def from_env(cls, address: str, **overrides: object) -> ChannelOptions:
        env = os.environ
        token = env.get("FASHION_AUTH_TOKEN")
        values: dict[str, object] = {
            "address": address,
            "tls": env.get("FASHION_TLS", "").lower() in ("1", "true", "yes", "on"),
            "root_ca": Path(env["FASHION_TLS_CA"]) if env.get("FASHION_TLS_CA") else None,
            "client_cert": Path(env["FASHION_TLS_CERT"]) if env.get("FASHION_TLS_CERT") else None,
            "client_key": Path(env["FASHION_TLS_KEY"]) if env.get("FASHION_TLS_KEY") else None,
            "server_name": env.get("FASHION_TLS_SERVER_NAME", ""),
            "lb_policy": env.get("FASHION_GRPC_LB_POLICY") or "pick_first",
            "token": token or None,
            "token_file": Path(env["FASHION_AUTH_TOKEN_FILE"]) if not token and env.get("FASHION_AUTH_TOKEN_FILE")
            else None,
            "max_message_bytes": int(env.get("FASHION_MAX_MESSAGE_BYTES", 16 * MIB)),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata: the bearer token, as of now. Raises TokenFileError when the token file
        cannot be read (and never could be)."""
        token = self.token or (token_file(self.token_file).primary() if self.token_file else None)
        return (("authorization", f"Bearer {token}"),) if token else ()

    def grpc_options(self) -> list[tuple[str, object]]:
        retry: dict[str, object] = {
            "loadBalancingConfig": [{self.lb_policy: {}}],
            "methodConfig": [{
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": max(2, min(self.retries, 5)),
                    "initialBackoff": "0.1s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }]
        }
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.enable_retries", 1 if self.retries > 1 else 0),
            ("grpc.service_config", json.dumps(retry)),
            ("grpc.keepalive_time_ms", 30_000),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_ca.read_bytes() if self.root_ca else None,
            private_key=self.client_key.read_bytes() if self.client_key else None,
            certificate_chain=self.client_cert.read_bytes() if self.client_cert else None,
        )


def sync_channel(options: ChannelOptions) -> grpc.Channel:
    creds = options.credentials()
    if creds is None:
        return grpc.insecure_channel(options.address, options=options.grpc_options())
    return grpc.secure_channel(options.address, creds, options=options.grpc_options())


def aio_channel(options: ChannelOptions) -> grpc.aio.Channel:
    creds = options.credentials()
    if creds is None:
        return grpc.aio.insecure_channel(options.address, options=options.grpc_options())
    return grpc.aio.secure_channel(options.address, creds, options=options.grpc_options())
