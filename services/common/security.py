"""Transport security shared by the gRPC services, their metrics ports and the REST gateway: TLS
(optionally mutual) from certificate files, and an optional bearer token checked on every call but
health checks and reflection (and on metrics ports unless metrics_public).

One set of settings (FASHION_TLS*, FASHION_AUTH_TOKEN[_FILE], see config.CommonSettings) configures
a process's server side and its calls to the other services. A token file may list several tokens,
one per line: servers accept any of them and clients send the first, and both follow the file as
it changes (fashion.client.TokenFile), so a token rotates without a restart or a failed call. Tokens
are compared in constant time and never logged: refusals name the reason ("missing", "invalid"),
not the value.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from fashion.client import ChannelOptions, TokenFileError, setting_token, token_file
from services.common import tracing
from services.common.config import CommonSettings

log = logging.getLogger(__name__)


class SecurityConfigError(ValueError):
    """TLS or token settings that cannot work (a key without its certificate, an unreadable file)."""


def _read(path: Path, variable: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:  # worded as the clients' TlsFileError
        raise SecurityConfigError(f"cannot read the TLS file {path} ({variable}): {exc.strerror}") from exc


def check_certificate_files(key: Path, chain: Path, client_ca: Path | None) -> None:
    """Raises SecurityConfigError, naming the variable and the file, unless `chain` holds PEM
    certificates, `key` is the PEM private key of the first, and `client_ca` (when set) holds PEM
    certificates: what grpcio and uvicorn would otherwise fail on only when they bind."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=chain)  # certificates alone, so that a bad key is told apart
    except ssl.SSLError:
        raise SecurityConfigError(f"the TLS certificate {chain} (FASHION_TLS_CERT) holds no PEM certificate") from None
    try:
        context.load_cert_chain(chain, key)
    except ssl.SSLError as exc:
        what = "is not the private key of" if exc.reason == "KEY_VALUES_MISMATCH" else "is not a PEM private key for"
        raise SecurityConfigError(f"the TLS key {key} (FASHION_TLS_KEY) {what} the certificate {chain} "
                                  "(FASHION_TLS_CERT)") from None
    if client_ca is not None:
        try:  # an empty or non-PEM file too: no client certificate would ever be accepted
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=client_ca)
        except ssl.SSLError:
            raise SecurityConfigError(f"the client CA {client_ca} (FASHION_TLS_CLIENT_CA) holds no PEM "
                                      "certificate") from None


def tls_enabled(settings: CommonSettings) -> bool:
    """Whether servers serve TLS: both the certificate and its key are set (one alone is an error)."""
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise SecurityConfigError("FASHION_TLS_CERT and FASHION_TLS_KEY must be set together")
    if settings.tls_client_ca and not settings.tls_cert:
        raise SecurityConfigError("FASHION_TLS_CLIENT_CA (mutual TLS) needs FASHION_TLS_CERT and FASHION_TLS_KEY")
    return settings.tls_cert is not None


_VARIABLES = ("FASHION_TLS_KEY", "FASHION_TLS_CERT", "FASHION_TLS_CLIENT_CA")
"""The settings naming a server's TLS files, in the order of CertificateFiles.paths."""


def _signature(paths: list[Path]) -> tuple[tuple[int, ...], ...]:
    """What tells a renewal of the files at `paths` (inode, size, modification time of each, links
    followed); () while one of them is missing."""
    signature = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            return ()  # one file missing while a Secret is swapped: try again at the next connection
        signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(signature)


class CertificateFiles:
    """A server's TLS files (key, certificate chain, client CA), read again when one of them changes:
    grpcio asks before every new connection's handshake (dynamic server credentials), so a renewed
    certificate (cert-manager) is served from the next connection on, without a restart."""

    def __init__(self, settings: CommonSettings) -> None:
        assert settings.tls_cert is not None and settings.tls_key is not None
        self.paths = [p for p in (settings.tls_key, settings.tls_cert, settings.tls_client_ca) if p is not None]
        self.require_client_auth = settings.tls_client_ca is not None
        self._signature = self._stat()
        self._refused: tuple[tuple[int, ...], ...] | None = None  # the files as last refused (read, logged once)
        self.initial = self._configuration()

    def _stat(self) -> tuple[tuple[int, ...], ...]:
        return _signature(self.paths)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files as they are now, read and checked (SecurityConfigError when they cannot work)."""
        key, chain, *ca = [_read(path, variable) for path, variable in zip(
            self.paths, ("FASHION_TLS_KEY", "FASHION_TLS_CERT", "FASHION_TLS_CLIENT_CA"), strict=False)]
        check_certificate_files(*self.paths[:2], self.paths[2] if ca else None)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca[0] if ca else None)

    def changed(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when the files changed (and read whole), else None: keep the current."""
        signature = self._stat()
        if not signature or signature in (self._signature, self._refused):
            return None
        try:
            configuration = self._configuration()
        except SecurityConfigError as exc:  # e.g. a new key beside the old certificate
            self._refused = signature  # not read again, nor logged, at every connection until they change
            log.error("Keeping the current TLS certificate until the files agree: %s", exc)
            return None
        self._signature = signature
        log.info("TLS certificate files changed: new connections get the new certificate")
        return configuration


def server_credentials(settings: CommonSettings) -> grpc.ServerCredentials | None:
    """TLS credentials of a gRPC server, requiring client certificates when tls_client_ca is set, and
    following the files as they are renewed (CertificateFiles); None for plaintext. Raises
    SecurityConfigError for files that cannot work (check_certificate_files), and for health_port
    without TLS."""
    if not tls_enabled(settings):
        if settings.health_port:  # it would be ignored: health checks are on the plaintext port itself
            raise SecurityConfigError(f"FASHION_HEALTH_PORT={settings.health_port} (plaintext health checks beside "
                                      "a TLS port) needs FASHION_TLS_CERT and FASHION_TLS_KEY; without TLS, probe "
                                      "the service's own port")
        return None
    files = CertificateFiles(settings)
    return grpc.dynamic_ssl_server_credentials(files.initial, files.changed,
                                               require_client_authentication=files.require_client_auth)


class ServerSslContext:
    """The TLS of a process's servers that grpcio does not run (the metrics ports), as an ssl.SSLContext
    from the same files as CertificateFiles: FASHION_TLS_CERT and FASHION_TLS_KEY, and with
    FASHION_TLS_CLIENT_CA client certificates signed by it required. `current()`, asked before each new
    connection's handshake, builds a new context when the files changed, so a renewed certificate is
    served from the next connection on, without a restart; files that do not agree (a new key beside
    the old certificate) are not used: the current context stays, and an ERROR says so once."""

    def __init__(self, settings: CommonSettings) -> None:
        assert settings.tls_cert is not None and settings.tls_key is not None
        self.paths = [p for p in (settings.tls_key, settings.tls_cert, settings.tls_client_ca) if p is not None]
        self.require_client_auth = settings.tls_client_ca is not None
        self._lock = threading.Lock()  # connections are handled in threads of their own
        self._signature = _signature(self.paths)
        self._refused: tuple[tuple[int, ...], ...] = ()
        self._context = self._build()

    def _build(self) -> ssl.SSLContext:
        """A context from the files as they are now (SecurityConfigError when they cannot work)."""
        for path, variable in zip(self.paths, _VARIABLES, strict=False):
            _read(path, variable)  # a missing or unreadable file, named as CertificateFiles names it
        key, chain, *ca = self.paths
        check_certificate_files(key, chain, ca[0] if ca else None)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(chain, key)
            if ca:
                context.load_verify_locations(cafile=ca[0])
                context.verify_mode = ssl.CERT_REQUIRED
        except OSError as exc:  # ssl.SSLError too: the files changed again since they were checked
            raise SecurityConfigError(f"the TLS files changed while they were read: {exc}") from None
        return context

    def current(self) -> ssl.SSLContext:
        """The context for a new connection: the files' as they are now when they changed and agree,
        else the one in use."""
        signature = _signature(self.paths)
        with self._lock:
            if not signature or signature in (self._signature, self._refused):
                return self._context
            try:
                context = self._build()
            except SecurityConfigError as exc:
                self._refused = signature  # logged once for these files, not at every connection
                log.error("Keeping the current TLS certificate of the metrics port until the files agree: %s", exc)
                return self._context
            self._context, self._signature, self._refused = context, signature, ()
        log.info("TLS certificate files changed: new metrics connections get the new certificate")
        return context


def metrics_tls(settings: CommonSettings) -> ServerSslContext | None:
    """The TLS of a process's metrics port: the certificate and key of its gRPC port (and its client CA:
    client certificates required), followed as they are renewed, when the process serves TLS; None:
    plain HTTP. Raises SecurityConfigError for files that cannot work (check_certificate_files)."""
    return ServerSslContext(settings) if tls_enabled(settings) else None


class TokenSource:
    """The bearer tokens a server accepts: auth_token, or every line of auth_token_file as it is now."""

    def __init__(self, settings: CommonSettings) -> None:
        fixed = settings.auth_token.get_secret_value() if settings.auth_token else None  # "": unset
        self._fixed: tuple[bytes, ...] | None = None
        self._file = token_file(settings.auth_token_file) if not fixed and settings.auth_token_file else None
        try:
            if fixed:  # cleaned as clients clean it (ChannelOptions.from_settings), or refused
                self._fixed = (setting_token(fixed).encode(),)
            if self._file is not None:
                self._file.tokens()
        except TokenFileError as exc:
            raise SecurityConfigError(str(exc)) from exc

    @property
    def enabled(self) -> bool:
        return self._fixed is not None or self._file is not None

    def current(self) -> tuple[bytes, ...]:
        """The accepted tokens (none: no authentication)."""
        if self._file is not None:
            return tuple(t.encode() for t in self._file.tokens())
        return self._fixed or ()

    def check(self, authorization: str | bytes | None) -> str | None:
        """None when the `authorization` header value carries an accepted token, else why not."""
        accepted = self.current()
        if not accepted:
            return None
        if not authorization:
            return "missing bearer token (send 'authorization: Bearer <token>')"
        value = authorization.encode() if isinstance(authorization, str) else authorization
        scheme, _, token = value.partition(b" ")
        token = token.strip()
        matches = [hmac.compare_digest(token, expected) for expected in accepted]  # every one: constant time
        if scheme.lower() != b"bearer" or not any(matches):
            return "invalid bearer token"
        return None


REFUSAL_LOG_INTERVAL_S = 300.0
_refusals_logged: dict[str, float] = {}


def token_refused(settings: CommonSettings, peer: str, details: str) -> str:
    """What to say when `peer` refuses our bearer token: logged as an ERROR naming where our token
    comes from (never the token), and returned for the caller's own report (job error, health)."""
    if settings.auth_token is not None:
        ours = "FASHION_AUTH_TOKEN"
    elif settings.auth_token_file is not None:
        ours = f"the token file FASHION_AUTH_TOKEN_FILE={settings.auth_token_file} (first line)"
    else:
        ours = "no token: set FASHION_AUTH_TOKEN_FILE to the token file the other services use"
    message = f"{peer} refused our bearer token ({details}); we send {ours}"
    now = time.monotonic()
    if now - _refusals_logged.get(message, -REFUSAL_LOG_INTERVAL_S) >= REFUSAL_LOG_INTERVAL_S:
        _refusals_logged[message] = now  # repeated checks do not flood the errors log
        log.error("%s", message)
    return message


def metrics_token_check(settings: CommonSettings) -> Callable[[str | None], str | None] | None:
    """What a metrics port asks of a scrape: the service's bearer token when one is set, unless
    metrics_public; None: nothing."""
    tokens = TokenSource(settings)
    return tokens.check if tokens.enabled and not settings.metrics_public else None


def require_token(handler: grpc.RpcMethodHandler, tokens: TokenSource) -> grpc.RpcMethodHandler:
    """`handler`, refusing calls without the bearer token with UNAUTHENTICATED before it runs.
    Applied to each method handler once, at registration (see server.create_server); health
    checks and reflection are registered without it."""

    async def check(context: grpc.aio.ServicerContext) -> None:
        header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        refusal = tokens.check(header)
        if refusal is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)

    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request: object, context: grpc.aio.ServicerContext) -> object:
            await check(context)
            return await inner(request, context)

        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return make(unary, des, ser)
    inner_stream = handler.unary_stream or handler.stream_stream

    async def streaming(request: object, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await check(context)
        async for response in inner_stream(request, context):
            yield response

    make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return make(streaming, des, ser)


def client_options(settings: CommonSettings, address: str, **overrides: object) -> ChannelOptions:
    """The options of every channel from this process to another service (fashion.client clients
    take them): built from the same settings that configure its server side, by the mapping that
    ChannelOptions.from_env uses for the same variables, so a service and the CLI beside it reach a
    peer alike: TLS when tls (or tls_ca) is set, the client certificate for mTLS, the bearer token,
    message limits, load-balancing policy; and, when no spans are exported, the caller's trace context
    in each call's metadata. `overrides` set other fields (timeouts, retries)."""
    if tracing.propagating_by_metadata():
        overrides.setdefault("call_metadata", tracing.call_metadata)
    return ChannelOptions.from_settings(address, settings, **overrides)
