"""Whether a process can listen where its settings say, asked before it starts anything: a port that
another program holds (often an earlier run still going) is one line naming the setting, not a
traceback from deep inside grpcio or uvicorn after half the service has started."""

from __future__ import annotations

import errno
import socket


def listen_problem(host: str, port: int, shared: bool = False) -> str | None:
    """Why this process cannot listen on `host`:`port` (None: it can), found by binding a socket the
    way the servers bind theirs (SO_REUSEADDR, and SO_REUSEPORT when `shared`: sibling server
    processes of ours may already listen there). A listener of another program is found either way,
    unless it too set SO_REUSEPORT as this user."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"the address {host!r} cannot be resolved ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "the port is in use: another program listens there (an earlier run still going?)"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"this machine has no address {host}"
        if exc.errno == errno.EACCES:
            return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        return exc.strerror or str(exc)
    finally:
        probe.close()
    return None
