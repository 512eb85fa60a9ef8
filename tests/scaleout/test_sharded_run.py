"""Scale-out batch runs: n processes (the pods of a Kubernetes Indexed Job) each sort shard i of n of
one folder, chosen by a stable hash of the path; together they sort every image exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from services.batch.sharding import Shard, shard_of
from tests.images import encode, fashion_images
from tests.support import ServiceProcess

SHARDS = 3


def test_shards_partition_paths_stably_and_evenly() -> None:
    paths = [f"inbox/{d}/product_{i:05d}.jpg" for d in ("a", "b") for i in range(3000)]
    owners = [[s for s in range(4) if Shard(s, 4).owns(p)] for p in paths]
    assert all(len(o) == 1 for o in owners), "every path in exactly one shard"
    sizes = Counter(o[0] for o in owners)
    assert min(sizes.values()) > 0.8 * len(paths) / 4, sizes
    # Stable across processes and Python versions: a fixed function of the path, not hash().
    assert shard_of("inbox/product_001.jpg", 1000) == 865
    assert Shard(0, 1).owns("anything")
    with pytest.raises(ValueError, match=r"not in 0\.\.2"):
        Shard(3, 3)


def test_shard_index_defaults_to_the_indexed_jobs_completion_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert Shard.resolve(None, 4) == Shard(2, 4)
    assert Shard.resolve(1, 4) == Shard(1, 4)
    assert Shard.resolve(None, 1) == Shard(0, 1)


def test_sharded_cli_runs_sort_every_image_once(tmp_path: Path, inference_server: ServiceProcess) -> None:
    data = tmp_path / "data"
    inbox = data / "inbox"
    inbox.mkdir(parents=True)
    x, _ = fashion_images(30)
    for i, img in enumerate(x):
        (inbox / f"product_{i:03d}.png").write_bytes(encode(img))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("FASHION_", "JOB_COMPLETION"))}
    base_env.update(FASHION_DATA_ROOT=str(data), FASHION_INFERENCE_ADDRESS=inference_server.address,
                    FASHION_BATCH_FSYNC="false", FASHION_LOG_DIR=str(tmp_path / "logs"), OTEL_SDK_DISABLED="true")
    procs = []
    for i in range(SHARDS):
        env = {**base_env, "FASHION_BATCH_DB": str(data / ".batch" / f"shard-{i}" / "jobs.db"),
               "FASHION_RESULTS_DIR": str(tmp_path / "results" / f"shard-{i}")}
        args = [sys.executable, "-m", "fashion.cli", "batch", "run", "inbox", "--copy", "--json",
                "--shard-count", str(SHARDS)]
        if i == 0:
            env["JOB_COMPLETION_INDEX"] = "0"  # as Kubernetes sets it
        else:
            args += ["--shard-index", str(i)]
        procs.append(subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    sorted_files = [f.name for f in (data / "processed_batches").rglob("*.png")]
    assert sorted(sorted_files) == sorted(f.name for f in inbox.iterdir()), "each image sorted exactly once"
    expected = Counter(shard_of(f"inbox/{f.name}", SHARDS) for f in inbox.iterdir())
    for i in range(SHARDS):
        summaries = list((tmp_path / "results" / f"shard-{i}").rglob("batch_summary_*.json"))
        assert len(summaries) == 1, summaries
        assert f'"total_processed": {expected[i]}' in summaries[0].read_text()


def test_bad_shard_arguments_are_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "data" / "inbox").mkdir(parents=True)
    env = {**os.environ, "FASHION_DATA_ROOT": str(tmp_path / "data")}
    out = subprocess.run([sys.executable, "-m", "fashion.cli", "batch", "run", "inbox", "--shard-count", "2",
                          "--shard-index", "2"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "shard index 2 is not in 0..1" in out.stderr
