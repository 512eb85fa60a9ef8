"""Channels for every client: message limits, retries on UNAVAILABLE with backoff, deadlines,
optional TLS (and mTLS) and bearer token."""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fashion.client._token import setting_token, token_file

MIB = 1024 * 1024


@dataclass(frozen=True)
class ChannelOptions:
    """How to reach a service. Defaults suit the local stack; `from_env` reads the transport's
    fields from FASHION_TLS, FASHION_TLS_CA, FASHION_TLS_CERT, FASHION_TLS_KEY, FASHION_TLS_SERVER_NAME,
    FASHION_AUTH_TOKEN / FASHION_AUTH_TOKEN_FILE, FASHION_MAX_MESSAGE_BYTES and FASHION_GRPC_LB_POLICY:
    the same variables that configure the services' server side, which build their own channels from
    them with `from_settings` (one mapping, CHANNEL_SETTINGS, for both)."""

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
    reconnect_backoff_s: float = 0.0
    """Longest wait between two attempts to reconnect to a server that went away (0: gRPC's own, up
    to two minutes). A health checker sets its interval, so a restarted service is seen at its next check."""
    call_metadata: Callable[[], tuple[tuple[str, str], ...]] | None = field(default=None, repr=False, compare=False)
    """More metadata for each call, asked for as the call starts (the services pass the caller's W3C
    trace context here: cheaper per call than a client interceptor)."""

    def __post_init__(self) -> None:
        if self.root_ca is not None and not self.tls:
            object.__setattr__(self, "tls", True)

    @classmethod
    def from_env(cls, address: str, **overrides: object) -> ChannelOptions:
        """Options from the FASHION_* variables of CHANNEL_SETTINGS (unset or empty: the default),
        then `overrides` (None: not overridden)."""
        return cls.from_settings(address, _Environment(), **overrides)

    @classmethod
    def from_settings(cls, address: str, settings: object, **overrides: object) -> ChannelOptions:
        """Options from the settings named in CHANNEL_SETTINGS, read as attributes of `settings`: the
        services' settings objects (their fields are the FASHION_* variables without the prefix), or
        the environment itself (from_env); values typed or as the environment writes them, unset or
        empty: the default. Then `overrides` (None: not overridden)."""
        values: dict[str, object] = {"address": address}
        for name, (option, parse) in CHANNEL_SETTINGS.items():
            raw = getattr(settings, name, None)
            raw = raw.get_secret_value() if hasattr(raw, "get_secret_value") else raw
            if raw is not None and raw != "":
                values[option] = parse(raw)
        if values.get("token"):  # a fixed token wins over the token file
            values.pop("token_file", None)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata: the bearer token, as of now, and `call_metadata`'s. Raises TokenFileError when
        the token file cannot be read (and never could be)."""
        token = self.token or (token_file(self.token_file).primary() if self.token_file else None)
        metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        return metadata + self.call_metadata() if self.call_metadata is not None else metadata

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
        if self.reconnect_backoff_s > 0:
            backoff_ms = int(self.reconnect_backoff_s * 1000)
            options += [("grpc.initial_reconnect_backoff_ms", min(200, backoff_ms)),
                        ("grpc.min_reconnect_backoff_ms", min(200, backoff_ms)),
                        ("grpc.max_reconnect_backoff_ms", backoff_ms)]
        return options

    def ssl_context(self) -> ssl.SSLContext | None:
        """The same TLS for an HTTPS call to the peer (the gateway's /health): its CA, the client
        certificate for mutual TLS; None for plain HTTP. The name the peer's certificate must hold
        (server_name, else the address's host) is the caller's to give when it connects. Raises
        TlsFileError for a file that cannot be read."""
        if not self.tls:
            return None
        root_ca = self._tls_files()[0]  # every file readable, or TlsFileError naming the one that is not
        context = ssl.create_default_context(cadata=root_ca.decode() if root_ca else None)
        if self.client_cert and self.client_key:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context

    def credentials(self) -> grpc.ChannelCredentials | None:
        """gRPC's TLS credentials (None: plaintext). Raises TlsFileError for a file that cannot be read, or
        a client certificate without its key (or the reverse)."""
        if not self.tls:
            return None
        root_ca, client_cert, client_key = self._tls_files()
        return grpc.ssl_channel_credentials(root_certificates=root_ca, private_key=client_key,
                                            certificate_chain=client_cert)

    def _tls_files(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """The CA bundle, client certificate and key, as they are now (None: not set)."""
        if (self.client_cert is None) != (self.client_key is None):  # grpc aborts the process on either alone
            raise TlsFileError("FASHION_TLS_CERT and FASHION_TLS_KEY must be set together")

        def read(path: Path | None, variable: str) -> bytes | None:
            if path is None:
                return None
            try:
                return path.read_bytes()
            except OSError as exc:
                raise TlsFileError(f"cannot read the TLS file {path} ({variable}): {exc.strerror}") from exc

        files = (read(self.root_ca, "FASHION_TLS_CA"), read(self.client_cert, "FASHION_TLS_CERT"),
                 read(self.client_key, "FASHION_TLS_KEY"))
        self._check_pem(files[0])
        return files

    def _check_pem(self, root_ca: bytes | None) -> None:
        """Raises TlsFileError naming the variable and file unless the CA bundle holds PEM certificates and the
        key is the client certificate's: gRPC would otherwise fail each call with UNAVAILABLE, and only its
        own log would say why."""
        if root_ca is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=root_ca.decode("latin-1"))
            except (ssl.SSLError, ValueError):  # ValueError: an empty file
                raise TlsFileError(f"the TLS CA bundle {self.root_ca} (FASHION_TLS_CA) holds no PEM "
                                   "certificate") from None
        if self.client_cert is not None and self.client_key is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(self.client_cert, self.client_key)
            except ssl.SSLError:
                raise TlsFileError(f"the TLS key {self.client_key} (FASHION_TLS_KEY) and certificate "
                                   f"{self.client_cert} (FASHION_TLS_CERT) are not a PEM certificate and its "
                                   "private key") from None


class TlsFileError(ValueError):
    """A TLS file of the settings (CA bundle, client certificate or key) cannot be read, or the client
    certificate comes without its key (or the reverse); the message names the file and its variable."""


class _Environment:
    """The FASHION_* variables as a settings object: `.tls_ca` is FASHION_TLS_CA (None when unset)."""

    def __getattr__(self, name: str) -> str | None:
        return os.environ.get(f"FASHION_{name.upper()}")


TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
"""Values of a flag that mean yes (the ones the services' settings accept; anything else: no)."""


def _flag(value: object) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in TRUE


def _path(value: object) -> Path:
    return Path(value)  # type: ignore[arg-type]


def _token(value: object) -> str:
    return setting_token(str(value))  # cleaned, or TokenFileError naming FASHION_AUTH_TOKEN


# The one mapping from settings to ChannelOptions, used by from_env and from_settings alike: each
# setting (FASHION_<NAME> in the environment, <name> on the services' settings objects) and the
# option it sets, with how a value written in the environment is read.
CHANNEL_SETTINGS: dict[str, tuple[str, Callable[[object], object]]] = {
    "tls": ("tls", _flag),
    "tls_ca": ("root_ca", _path),
    "tls_cert": ("client_cert", _path),
    "tls_key": ("client_key", _path),
    "tls_server_name": ("server_name", str),
    "auth_token": ("token", _token),
    "auth_token_file": ("token_file", _path),
    "max_message_bytes": ("max_message_bytes", int),  # type: ignore[dict-item]
    "grpc_lb_policy": ("lb_policy", str),
}


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
