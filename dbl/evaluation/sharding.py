"""Sharing an evaluation that works batch by batch among processes.

Batch k goes to process k mod W. The work is done in rounds of W batches, one per process (a
process whose batches have run out sits a round out), and after each round every process gathers
that round's results in process order. So all processes run the same collectives, and each ends
with every batch's result in batch order: what one process would have computed alone, when each
batch's draws depend on its samples' indices only (``dbl.diffusion.draws``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch.distributed as dist


class Shard:
    """Process ``rank`` of ``world_size``; ``Shard.current()``: this process in the default process
    group (Lightning's under DDP), or a lone process."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size

    @classmethod
    def current(cls) -> Shard:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def rounds(self, num_batches: int) -> Iterator[int | None]:
        """This process's batch index in each round, None where it sits the round out."""
        for first in range(0, num_batches, self.world_size):
            k = first + self.rank
            yield k if k < num_batches else None

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` of this round, in process order, leaving out None."""
        if self.world_size == 1:
            return [] if value is None else [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return [v for v in values if v is not None]

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process (so that all take the same branch)."""
        return all(self.gather(bool(flag))) if self.world_size > 1 else bool(flag)
