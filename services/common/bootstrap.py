"""One bootstrap for the three gRPC service processes (Inference, Batch, Monitor).

A service declares itself as a GrpcService: its name, settings class, where it listens, and how to
build its ServiceParts (what it serves, its start, readiness and stop hooks) plus an optional check
of its own settings. `run(service)` is the whole process around that:

  settings      load_settings (an unusable FASHION_* value: one line, exit 2), then the TLS and token
                settings and the service's own check (the same: one line, exit 2, nothing started)
  observability logs/<log_name>.log and logs/<log_name>_errors.log, OpenTelemetry (before any
                channel: calls to other services carry the trace context), the Prometheus port
  server        the gRPC server (services.common.server: options, access log and metrics, token
                check, TLS), grpc.health.v1 NOT_SERVING until the parts are ready, reflection unless
                FASHION_REFLECTION=false, bound on CommonSettings.listen_address; a service whose
                ready_before_listening says so gets ready first and binds SERVING (a process joining
                siblings that already serve a shared port: no connection reaches it while it warms up)
  event loop    uvloop when installed, else asyncio's
  shutdown      on SIGTERM or SIGINT: NOT_SERVING (enter_graceful_shutdown), in-flight calls drained
                for up to shutdown_grace_s, the parts' stop hook, traces flushed

The REST gateway is not a gRPC service (uvicorn runs it) but shares `load` and `observe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, NoReturn, TypeVar

from opentelemetry.sdk.trace import TracerProvider

from fashion.client import TlsFileError, TokenFileError
from services.common import server as grpc_server
from services.common.config import CommonSettings, GatewaySettings, load_settings
from services.common.logs import log_folder_problem, setup_logging
from services.common.metrics import start_metrics_server
from services.common.ports import listen_problem
from services.common.security import (
    SecurityConfigError,
    TokenSource,
    client_options,
    metrics_tls,
    metrics_token_check,
    server_credentials,
    tls_enabled,
)
from services.common.tracing import configuration_problem as tracing_problem
from services.common.tracing import setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)

S = TypeVar("S", bound=CommonSettings)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StartupError(Exception):
    """A setting that cannot work, found before anything starts: the process prints
    "error: <message>" and exits 2."""


class Port(NamedTuple):
    """A port a process listens on, and the setting that names it."""

    host: str
    port: int
    setting: str
    shared: bool = False
    """Sibling server processes of ours may listen there too (SO_REUSEPORT)."""


class Listener(NamedTuple):
    """Where a service listens: its own interface setting (None: bind_address), gRPC and metrics ports."""

    host: str | None
    port: int
    metrics_port: int
    """0: no metrics port."""


class ServiceParts:
    """The parts of a service process that are its own, built by GrpcService.build once its logs,
    tracing and metrics are set up: what it serves and its hooks (the defaults do nothing)."""

    servicers: grpc_server.Servicers = ()
    """(generated add_*Servicer_to_server function, servicer) pairs: what the gRPC server serves;
    health and readiness cover each service they register."""

    def describe(self) -> str:
        """What the "listening on" log line adds: folders, peers, schedules."""
        return ""

    async def start(self) -> None:
        """Runs once the server listens (before it does when the service gets ready before listening),
        while still NOT_SERVING: start the background work."""

    async def ready(self) -> str:
        """Returns once the service can take calls (SERVING from then on), with what the SERVING log
        line adds. Runs as a task, cancelled when the process stops first. Default: ready at once."""
        return ""

    async def stop(self) -> None:
        """Runs after the server drained its calls: stop the background work, close what is open."""


@dataclass(frozen=True)
class GrpcService(Generic[S]):
    """What a gRPC service process is; `run` and `serve` do the rest."""

    name: str
    """"inference": its metric families and request metrics' label, access logger, tracing service
    (fashion-<name>), and the log lines' "Inference service ..."."""
    settings_class: type[S]
    log_name: str
    """Its log files: logs/<log_name>.log and logs/<log_name>_errors.log."""
    listener: Callable[[S], Listener]
    """Where it listens, from its settings."""
    build: Callable[[S], ServiceParts]
    """Its own parts, built inside the event loop after logs, tracing and metrics are set up."""
    check: Callable[[S], None] | None = None
    """Refuses settings of its own that cannot work (raises StartupError), before anything starts."""
    reuse_port: Callable[[S], bool] | None = None
    """Whether its gRPC port is shared with sibling processes (SO_REUSEPORT), from its settings."""
    ready_before_listening: Callable[[S], bool] | None = None
    """Whether it gets ready (its parts' start and ready hooks) before it binds its port, from its
    settings: for a process that joins siblings already serving the shared port, which would
    otherwise be handed connections it cannot answer yet. A signal meanwhile stops it unbound."""

    @property
    def title(self) -> str:
        return f"{self.name.capitalize()} service"


def give_closed_outputs_devnull() -> None:
    """Started with stdout or stderr closed (`fashion run >&-`, a daemon manager): the next file or socket
    opened would take descriptor 1 or 2 (uvloop aborts on that; a child inherits no such output); /dev/null
    takes its place, and the logs' stdout sink goes quiet (sys.stdout is None)."""
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:  # EBADF: closed
            devnull = os.open(os.devnull, os.O_WRONLY)  # may be given `fd` itself, the lowest free number
            if devnull == fd:
                os.set_inheritable(fd, True)  # os.open's descriptors are close-on-exec
            else:
                os.dup2(devnull, fd)
                os.close(devnull)


def load(settings_class: type[S], check: Callable[[S], None] | None = None) -> S:
    """The settings of a process's entry point. An unusable FASHION_* value, TLS or token settings
    that cannot work (a key without its certificate or not its own, a file that is not PEM, an empty
    CA bundle, FASHION_HEALTH_PORT without TLS, an unreadable or group-writable token file, a token
    that is not printable ASCII) and what `check` refuses end the process with one line per problem
    on stderr and exit code 2."""
    give_closed_outputs_devnull()
    settings = load_settings(settings_class)
    try:
        if (problem := tracing_problem()) is not None:
            raise StartupError(problem)
        server_credentials(settings)  # reads and checks the certificate files when TLS is on
        client_options(settings, "").credentials()  # and those of the calls to other services
        TokenSource(settings)  # checks the token, or reads the token file when one is set
        if check is not None:
            check(settings)
        if (problem := log_folder_problem(settings)) is not None:
            raise StartupError(problem)
    except (StartupError, SecurityConfigError, TlsFileError, TokenFileError) as exc:
        exit_before_start(f"error: {exc}")
    return settings


PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies


def stop_with_parent(parent_pid: str | None) -> None:
    """In a child started by a supervisor (`fashion run`, the Inference service's parent) whose pid is
    `parent_pid`: SIGTERM when that parent dies (even SIGKILLed), so that no service is left over holding
    its ports; SIGTERM at once when it died before the prctl took effect. Done here, after exec, rather
    than in a preexec_fn: forking without vfork under a running gRPC poller can abort the child."""
    if not parent_pid:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def killing_signal(returncode: int | None) -> str | None:
    """The signal that ended a child process, by name ("SIGKILL"), from its negative return code; None when
    it exited (or runs)."""
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def exit_before_start(lines: str) -> NoReturn:
    """`lines` on stderr, then exit code 2, before anything started. Through os._exit: checking the TLS
    settings made gRPC credentials, whose threads may run, and an interpreter exiting under them can end in
    SIGABRT (its poller finds its descriptor closed) instead of exit 2."""
    print(lines, file=sys.stderr, flush=True)
    os._exit(2)


def refuse_unusable_ports(settings: CommonSettings, ports: list[Port]) -> None:
    """End the process with one line per port it cannot listen on (another program holds it, an
    address this machine lacks), naming the setting, and exit code 2: before anything starts."""
    problems = [f"error: cannot listen on {settings.listen_address(p.host, p.port)} ({p.setting}): {problem}"
                for p in ports if p.port > 0 and (problem := listen_problem(p.host, p.port, p.shared))]
    if problems:
        exit_before_start("\n".join(problems))


def grpc_service_ports(name: str, host: str, port: int, metrics_port: int, shared: bool = False) -> list[Port]:
    """The gRPC and metrics ports of service `name` on `host`, named by FASHION_<NAME>_PORT and
    FASHION_<NAME>_METRICS_PORT; the gRPC one `shared` with sibling processes or not."""
    prefix = f"FASHION_{name.upper()}"
    return [Port(host, port, f"{prefix}_PORT", shared), Port(host, metrics_port, f"{prefix}_METRICS_PORT")]


def gateway_port(settings: GatewaySettings) -> Port:
    """The REST gateway's one port (its metrics are served on it too), named by FASHION_GATEWAY_PORT."""
    return Port(settings.listen_host(settings.gateway_host), settings.gateway_port, "FASHION_GATEWAY_PORT")


def service_ports(service: GrpcService[S], settings: S, shared: bool = False) -> list[Port]:
    """The ports of a gRPC service process (its gRPC port `shared` with sibling processes or not), each
    with the FASHION_* setting that names it."""
    listener = service.listener(settings)
    host = settings.listen_host(listener.host)
    ports = grpc_service_ports(service.name, host, listener.port, listener.metrics_port, shared)
    if tls_enabled(settings) and settings.health_port:
        ports.append(Port(host, settings.health_port, "FASHION_HEALTH_PORT", shared))
    return ports


def observe(settings: CommonSettings, log_name: str, service: str) -> TracerProvider | None:
    """Logs to logs/<log_name>.log (and _errors.log, and stdout), a warning there when TLS settings
    reach only its clients, and tracing as fashion-<service>; before any channel is made. Returns the
    tracer provider, None when spans are not exported."""
    setup_logging(settings, log_name, service)
    if client_options(settings, "").tls and not tls_enabled(settings):  # shared settings, half of them in effect
        log.warning("FASHION_TLS (or FASHION_TLS_CA) is set but FASHION_TLS_CERT and FASHION_TLS_KEY are not: "
                    "this process calls the other services over TLS but serves plaintext itself")
    return setup_tracing(f"fashion-{service}")


def run(service: GrpcService[S]) -> None:
    """The entry point of a service process (`python -m services.<name>`, `fashion serve <name>`)."""
    settings = load(service.settings_class, service.check)
    refuse_unusable_ports(settings, service_ports(service, settings))
    try:
        run_loop(serve(service, settings))
    except StartupError as exc:  # found while building its parts: the same one line and exit 2
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_loop(main: Coroutine[object, object, None]) -> None:
    """Run a process's main coroutine on uvloop when installed (less CPU per gRPC call than asyncio's
    loop: docs/performance.md), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def serve(service: GrpcService[S], settings: S) -> None:
    """Run `service` with `settings` until SIGTERM or SIGINT, then shut it down gracefully."""
    observe(settings, service.log_name, service.name)
    listener = service.listener(settings)
    start_metrics_server(service.name, listener.metrics_port, settings.listen_host(listener.host),
                         metrics_token_check(settings), tls=metrics_tls(settings))

    parts = service.build(settings)
    reuse_port = service.reuse_port is not None and service.reuse_port(settings)
    ready_first = service.ready_before_listening is not None and service.ready_before_listening(settings)
    server, names = grpc_server.create_server(settings, service.name, parts.servicers, reuse_port)
    health = await grpc_server.add_health_and_reflection(server, names, settings.reflection)
    address = settings.listen_address(listener.host, listener.port)

    async def get_ready() -> str | None:
        """What the SERVING log line adds; None (logged) when the parts never became ready."""
        try:
            return await parts.ready()
        except Exception:
            log.exception("%s never became ready: it stays NOT_SERVING", service.title)
            return None

    def log_serving(about: str) -> None:
        log.info("%s SERVING%s", service.title, f": {about}" if about else "")

    async def serving_once_ready() -> None:
        if (about := await get_ready()) is not None:
            await grpc_server.set_serving(health, names, True)
            log_serving(about)

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in SIGNALS:  # kept until the end: a second signal does not cut the drain short
        loop.add_signal_handler(sig, stopping.set)
    stop_wait = asyncio.ensure_future(stopping.wait())
    readiness: asyncio.Future[Any] | None = None  # the parts getting ready
    try:
        ready_about: str | None = None
        if ready_first:
            log.info("%s getting ready before it listens on %s", service.title, address)
            await parts.start()
            readiness = asyncio.ensure_future(get_ready())
            await asyncio.wait({readiness, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not stopping.is_set() and (ready_about := readiness.result()) is not None:
                await grpc_server.set_serving(health, names, True)  # SERVING from the first connection on
        listening = not stopping.is_set()
        if listening:
            await grpc_server.bind(server, settings, address, health)
            await server.start()
            about = parts.describe()
            log.info("%s listening on %s%s", service.title, address, f": {about}" if about else "")
            if not ready_first:
                await parts.start()
                readiness = asyncio.ensure_future(serving_once_ready())
            elif ready_about is not None:
                log_serving(ready_about)
            server_done = asyncio.ensure_future(server.wait_for_termination())
            await asyncio.wait({server_done, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()

        if listening:
            log.info("Shutting down: marking NOT_SERVING and draining in-flight calls (grace %.1fs)",
                     settings.shutdown_grace_s)
            await health.enter_graceful_shutdown()
            await grpc_server.stop(server, settings.shutdown_grace_s)
        else:
            log.info("Shutting down before it listened")
        if readiness is not None:
            readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await readiness
        await parts.stop()
        shutdown_tracing()
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
    log.info("Stopped")
