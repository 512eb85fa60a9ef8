"""ONNX Runtime's threads (and the Inference worker processes) are sized by the CPUs the container
may use: its cgroup CPU quota rounded up, no more than the process's CPU affinity; without a quota
the affinity; without either os.cpu_count(). Checked on fake cgroup folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common import cpus


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> dict[str, int | None]:
    """A 16-core machine that lets the process run on 8 of them (change the values per test)."""
    machine: dict[str, int | None] = {"affinity": 8, "count": 16}
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: machine["affinity"])
    monkeypatch.setattr(cpus.os, "cpu_count", lambda: machine["count"])
    return machine


def v2(root: Path, cpu_max: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def v1(root: Path, quota: int, period: int, folder: str = "cpu,cpuacct") -> Path:
    (root / folder).mkdir(parents=True)
    (root / folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / folder / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("200000 100000", 2),   # limits.cpu: 2
    ("150000 100000", 2),   # 1500m: rounded up
    ("25000 100000", 1),    # 250m: at least one
    ("50000 50000", 1),     # another period
    ("600000 100000", 6),
    ("max 100000", 8),      # no limit: the affinity
    ("max", 8),
])
def test_cgroup_v2_quota(tmp_path: Path, host: dict[str, int | None], cpu_max: str, expected: int) -> None:
    assert cpus.available_cpus(v2(tmp_path, cpu_max)) == expected


@pytest.mark.parametrize(("quota", "period", "expected"), [
    (200000, 100000, 2),
    (250000, 100000, 3),
    (10000, 100000, 1),
    (-1, 100000, 8),        # unlimited
])
@pytest.mark.parametrize("folder", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_quota(tmp_path: Path, host: dict[str, int | None], quota: int, period: int,
                         expected: int, folder: str) -> None:
    assert cpus.available_cpus(v1(tmp_path, quota, period, folder)) == expected


def test_quota_above_the_affinity_is_capped_by_it(tmp_path: Path, host: dict[str, int | None]) -> None:
    host["affinity"] = 2  # a cpuset of 2 cores with a limit of 6: only 2 can run at once
    assert cpus.available_cpus(v2(tmp_path, "600000 100000")) == 2


def test_no_cgroup_files_fall_back_to_affinity_then_cpu_count(tmp_path: Path, host: dict[str, int | None]) -> None:
    assert cpus.cpu_quota(tmp_path) is None
    assert cpus.available_cpus(tmp_path) == 8
    host["affinity"] = None  # no sched_getaffinity (not Linux)
    assert cpus.available_cpus(tmp_path) == 16
    host["count"] = None  # os.cpu_count() may say nothing
    assert cpus.available_cpus(tmp_path) == 1
    assert cpus.available_cpus(v2(tmp_path / "limited", "300000 100000")) == 3


@pytest.mark.parametrize("cpu_max", ["", "garbage 100000", "0 100000", "100000 0"])
def test_unreadable_quota_is_no_quota(tmp_path: Path, host: dict[str, int | None], cpu_max: str) -> None:
    assert cpus.available_cpus(v2(tmp_path, cpu_max)) == 8


def test_v2_wins_over_leftover_v1_files(tmp_path: Path, host: dict[str, int | None]) -> None:
    root = v1(v2(tmp_path, "100000 100000"), 400000, 100000)
    assert cpus.available_cpus(root) == 1


def test_this_machine_gives_a_sane_answer() -> None:
    assert 1 <= cpus.available_cpus() <= (cpus.os.cpu_count() or 1)

