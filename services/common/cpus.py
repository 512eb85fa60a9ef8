"""How many CPUs this process may use: the one rule for sizing threads and processes by the cores.

In a container, `os.cpu_count()` is the node's cores (64 on a big node) while the CPU limit may be
2: ONNX Runtime would start 64 threads that the kernel throttles to 2 cores' worth of time. The
container's CPU quota is what counts, then the CPUs the process may run on (cpusets, taskset),
then the machine's count.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 mounts the cpu controller alone or together with cpuacct (either name, or both as links).
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup's CPU limit in CPUs (1.5 for `limits.cpu: 1500m`), or None when there is none or
    it cannot be read. cgroup v2: `cpu.max` ("max 100000" is unlimited, "200000 100000" is 2 CPUs);
    cgroup v1: `cpu.cfs_quota_us` (-1 is unlimited) over `cpu.cfs_period_us`."""
    try:
        fields = (cgroup_root / "cpu.max").read_text().split()
    except OSError:
        pass
    else:
        if not fields or fields[0] == "max":
            return None
        return _ratio(fields[0], fields[1] if len(fields) > 1 else "100000")
    for folder in (cgroup_root / name for name in _V1_CPU_DIRS):
        try:
            quota = (folder / "cpu.cfs_quota_us").read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            continue
        return _ratio(quota, period)
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def affinity_cpus() -> int | None:
    """The CPUs this process may be scheduled on (None where the platform cannot say)."""
    try:
        return len(os.sched_getaffinity(0)) or None
    except (AttributeError, OSError):  # not on Linux
        return None


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The container's CPU quota rounded up (at least 1), no more than the CPUs the process may run
    on; without a quota those CPUs; without either `os.cpu_count()`; 1 when nothing is known."""
    allowed = affinity_cpus() or os.cpu_count()
    quota = cpu_quota(cgroup_root)
    if quota is None:
        return allowed or 1
    limit = max(1, math.ceil(quota))
    return min(limit, allowed) if allowed else limit
