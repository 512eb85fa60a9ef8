"""Crash points for the recovery tests: FASHION_BATCH_FAILPOINT=<name>:<n> kills this process with
SIGKILL the n-th time execution reaches `reached(<name>)`, exactly where a crash is hardest to
recover from. Unset (production), a check is one dictionary lookup.

FASHION_BATCH_STOP_AT=<name> instead stops the calling thread (SIGSTOP, the whole process in effect) each
time it reaches that point, for a test to change the files at that exact moment and then resume it
(SIGCONT): the races between a transfer and an uploader.

Points: "planned" (destinations recorded, nothing moved yet), "staged" (a copy written to its staging
file, not yet placed), "linked" (a file linked to its
destination, not yet removed from its source: in two places), "copied" (a copy, in copy mode or
across filesystems, linked to its destination; staging file and source not yet removed),
"replanned" (a taken destination replaced by a new one in the record, not yet tried), "moved" (a
group moved, not yet recorded as done), "recorded" (recorded as done, not yet in the log and CSV),
"recovering" (an interrupted transfer finished by recovery, not yet recorded), "finishing" (the
end state and the reports written, the job not yet marked finished), "ended" (`fashion batch run`'s job
ended and reported, the command not yet returned).
"""

from __future__ import annotations

import os
import signal
import threading

_armed: dict[str, int] = {}
_stop_at = os.environ.get("FASHION_BATCH_STOP_AT", "")
_spec = os.environ.get("FASHION_BATCH_FAILPOINT", "")
if _spec:
    _name, _, _count = _spec.partition(":")
    _armed[_name] = int(_count or 1)


def reached(name: str) -> None:
    if name == _stop_at:
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    remaining = _armed.get(name)
    if remaining is None:
        return
    _armed[name] = remaining - 1
    if remaining <= 1:
        os.kill(os.getpid(), signal.SIGKILL)
