"""The KServe ModelStatistics of one server process (services.inference.statistics): its JSON form,
as the server processes sharing a port publish it, and the sum of several processes' statistics."""

from __future__ import annotations

import json

from services.inference.batcher import BatchTiming
from services.inference.statistics import Duration, ModelStatistics


def recorded(successes: int, failures: int, batch_sizes: list[int]) -> ModelStatistics:
    stats = ModelStatistics()
    for _ in range(successes):
        stats.record_success(0.0, BatchTiming(0.001, 0.002, 0.003, 0.004, 1), images=2)
    for _ in range(failures):
        stats.record_failure(0.0)
    for size in batch_sizes:
        stats.record_execution(size, 0.001, 0.002)
    return stats


def test_the_json_form_gives_back_the_same_statistics() -> None:
    stats = recorded(3, 1, [1, 4, 4])
    assert ModelStatistics.from_json(json.loads(json.dumps(stats.to_json()))) == stats
    assert ModelStatistics.from_json(json.loads(json.dumps(ModelStatistics().to_json()))) == ModelStatistics()


def test_the_sum_adds_counts_and_durations_merges_batch_sizes_and_keeps_the_last_inference() -> None:
    mine, theirs, retired = recorded(3, 1, [1, 4, 4]), recorded(2, 2, [4, 8]), recorded(0, 0, [])
    theirs.last_inference_ms = mine.last_inference_ms + 5_000
    mine_before = ModelStatistics.from_json(mine.to_json())

    total = mine.summed([theirs, retired])

    assert mine == mine_before, "the process's own statistics stay its own"
    assert total.success == Duration(5, mine.success.ns + theirs.success.ns)
    assert total.fail == Duration(3, mine.fail.ns + theirs.fail.ns)
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(total, part).count == 5, part
        assert getattr(total, part).ns == getattr(mine, part).ns + getattr(theirs, part).ns, part
    assert (total.inference_count, total.execution_count) == (10, 5)
    assert total.last_inference_ms == theirs.last_inference_ms
    assert {size: runs.compute_infer.count for size, runs in total.batches.items()} == {1: 1, 4: 3, 8: 1}
    fours = (mine.batches[4].compute_input.ns, theirs.batches[4].compute_input.ns)
    assert total.batches[4].compute_input == Duration(3, sum(fours))
    assert mine.summed([]) == mine
