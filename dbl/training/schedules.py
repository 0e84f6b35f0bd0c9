"""Which block trains at a given optimizer step: a pure function of (schedule, step).

The choice never comes from RNG state that could drift between processes: ``random`` hashes
(seed, step), so every rank of a multi-process run picks the same block, and a run resumed from a
checkpoint at step k continues with exactly the blocks it would have trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dbl.errors import UsageError

ScheduleKind = Literal["random", "phased"]


@dataclass(frozen=True)
class BlockSchedule:
    """``random``: a uniform draw among ``blocks`` per step. ``phased``: ``blocks[0]`` for
    ``phase_steps`` steps, then ``blocks[1]``, ..., cycling back to the first after the last."""

    kind: str
    blocks: tuple[int, ...]
    phase_steps: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.kind not in ("random", "phased"):
            raise UsageError(f"unknown block_schedule {self.kind!r}; choose 'random' or 'phased'")
        if not self.blocks:
            raise UsageError("train_blocks is empty; list at least one block to train")
        if self.phase_steps < 1:
            raise UsageError(f"phase_steps must be >= 1, got {self.phase_steps}")

    def block_at(self, step: int) -> int:
        if self.kind == "phased":
            return self.blocks[(step // self.phase_steps) % len(self.blocks)]
        rng = np.random.default_rng([self.seed, step])
        return self.blocks[int(rng.integers(len(self.blocks)))]


def make_schedule(kind: str, num_blocks: int, train_blocks: Sequence[int] | None, phase_steps: int, seed: int) -> BlockSchedule:
    blocks = tuple(range(num_blocks)) if train_blocks is None else tuple(train_blocks)
    bad = [b for b in blocks if not 0 <= b < num_blocks]
    if bad:
        raise UsageError(f"train_blocks {list(blocks)} has blocks outside 0..{num_blocks - 1}: {bad}")
    if len(set(blocks)) != len(blocks):
        raise UsageError(f"train_blocks {list(blocks)} lists a block twice")
    return BlockSchedule(kind, blocks, phase_steps, seed)
