"""Shards of a large catalog for scale-out runs: pod i of an n-pod Kubernetes Indexed Job sorts the
images whose path hashes to i. The hash (BLAKE2b of the path relative to the data root) is stable
across processes, machines and Python versions, so every image belongs to exactly one shard and a
restarted pod takes the same images again."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass


def shard_of(relative_path: str, count: int) -> int:
    digest = hashlib.blake2b(relative_path.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is not in 0..{self.count - 1}")

    @classmethod
    def resolve(cls, index: int | None, count: int) -> Shard:
        """`index` unset: the Indexed Job's JOB_COMPLETION_INDEX when sharding, else 0."""
        if index is None:
            index = int(os.environ.get("JOB_COMPLETION_INDEX", "0")) if count > 1 else 0
        return cls(index, count)

    def owns(self, relative_path: str) -> bool:
        return self.count == 1 or shard_of(relative_path, self.count) == self.index

    def __str__(self) -> str:
        return f"shard {self.index + 1} of {self.count}"
