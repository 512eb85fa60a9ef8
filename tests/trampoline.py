"""Run a command with its process changed first: root's right to ignore file permissions dropped, another
user, an address-space limit, stdout closed. Tests start it with a plain subprocess call instead of giving
subprocess a preexec_fn (or user=): those make it fork without vfork, and a child forked from a test process
whose gRPC poller runs may abort before exec ("epoll_wait error: Bad file descriptor", grpc/grpc#43055).

    python -I -S tests/trampoline.py [--no-file-capabilities] [--user UID:GID] [--memory-limit BYTES]
                                     [--close-stdout] -- COMMAND [ARG...]

Standard library only: it runs before the command, at every such start."""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import sys

# CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER: what lets root ignore file permissions.
FILE_CAPABILITIES = (1, 2, 3)
PR_CAPBSET_DROP = 24


def drop_file_capabilities() -> None:
    """As root, leave the capabilities that bypass file permissions out of the bounding set: the command
    runs as an ordinary owner of its files (read-only folders, unreadable subfolders refuse it), and root's
    own interpreter under /root stays reachable, which a setuid to another user would lose. Nothing to drop
    when not root."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in FILE_CAPABILITIES:
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="trampoline")
    parser.add_argument("--no-file-capabilities", action="store_true")
    parser.add_argument("--user", help="UID:GID to run as, with no supplementary groups")
    parser.add_argument("--memory-limit", type=int, help="RLIMIT_AS in bytes")
    parser.add_argument("--close-stdout", action="store_true")
    parser.add_argument("command", nargs="+")
    options = parser.parse_args(argv)
    if options.no_file_capabilities:
        drop_file_capabilities()
    if options.user:
        uid, gid = (int(part) for part in options.user.split(":"))
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    if options.memory_limit:
        resource.setrlimit(resource.RLIMIT_AS, (options.memory_limit, options.memory_limit))
    if options.close_stdout:
        os.close(1)
    os.execvp(options.command[0], options.command)


if __name__ == "__main__":
    main(sys.argv[1:])
