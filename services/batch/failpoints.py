"""Crash points for the recovery tests: FASHION_BATCH_FAILPOINT=<name>:<n> kills this process with
SIGKILL the n-th time execution reaches `reached(<name>)`, exactly where a crash is hardest to
recover from. Unset (production), a check is one dictionary lookup.

Points: "planned" (destinations recorded, nothing moved yet), "linked" (a file linked to its
destination, not yet removed from its source: in two places), "moved" (a group moved, not yet
recorded as done).
"""

from __future__ import annotations

import os
import signal

_armed: dict[str, int] = {}
_spec = os.environ.get("FASHION_BATCH_FAILPOINT", "")
if _spec:
    _name, _, _count = _spec.partition(":")
    _armed[_name] = int(_count or 1)


def reached(name: str) -> None:
    remaining = _armed.get(name)
    if remaining is None:
        return
    _armed[name] = remaining - 1
    if remaining <= 1:
        os.kill(os.getpid(), signal.SIGKILL)
