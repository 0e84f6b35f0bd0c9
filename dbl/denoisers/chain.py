"""Routing: which block of a ``BlockwiseNetwork`` answers which noise level (sigma or t)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dbl.diffusion.partition import NoisePartition
from dbl.models.blockwise import BlockwiseNetwork

# fn(index, block) -> the result for the samples selected by ``index`` (a boolean mask, or
# ``slice(None)`` when one block owns the whole batch), computed by ``block``
RoutedFn = Callable[[torch.Tensor | slice, int], torch.Tensor]


class BlockChain:
    """A blockwise network whose blocks own the slices of a partitioned noise range.

    Args:
        network: the blocks (``dbl.models.blockwise.BlockwiseNetwork``).
        partition: the blocks' nominal (inference) and widened (training) ranges; a
            ``NoisePartition`` of sigma, or a ``TimePartition`` of masking time t.
    """

    def __init__(self, network: BlockwiseNetwork, partition: NoisePartition):
        if partition.num_blocks != network.num_blocks:
            raise ValueError(f"the partition has {partition.num_blocks} blocks but the network {network.num_blocks}")
        self.network, self.partition = network, partition

    @property
    def num_blocks(self) -> int:
        return self.network.num_blocks

    def owner(self, level: torch.Tensor) -> torch.Tensor:
        """The block whose NOMINAL range holds each noise level (long, on ``level``'s device)."""
        return self.partition.block_of(level.detach().cpu()).to(level.device)

    def block_at(self, level: torch.Tensor | float) -> int:
        """The one block that owns ``level`` (a scalar, or a batch at a single noise level)."""
        # on the CPU: one copy of the levels per solver step, no round trip of the block ids
        blocks = self.partition.block_of(torch.as_tensor(level).detach().flatten().cpu()).unique().tolist()
        if len(blocks) != 1:
            raise ValueError(f"these noise levels belong to blocks {blocks}; one call runs one block: use route()")
        return blocks[0]

    def route(self, level: torch.Tensor, fn: RoutedFn) -> torch.Tensor:
        """Evaluate ``fn`` on each owning block's share of a batch at noise levels ``level`` [N]
        and put the results back in batch order."""
        owner = self.partition.block_of(level.detach().cpu())
        blocks = owner.unique().tolist()
        if len(blocks) == 1:
            return fn(slice(None), blocks[0])
        owner, out = owner.to(level.device), None
        for block in blocks:
            index = owner == block
            part = fn(index, block)
            if out is None:
                out = part.new_empty((level.shape[0], *part.shape[1:]))
            out[index] = part
        return out
