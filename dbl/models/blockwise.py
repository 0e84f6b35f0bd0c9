"""Split a layered network into B contiguous blocks that can each run alone (no Lightning here).

A network qualifies if it has ``layers`` (an ``nn.ModuleList``, each called ``h = layer(h, c)``)
and methods ``embed(x, c_noise, cond) -> (h, c)`` and ``head(h, c) -> out``. Everything that is not
in ``layers`` is its input/output part: shared by all blocks (``shared_io=True``, as the official
code) or copied once per block (``shared_io=False``: blocks share nothing and can train in
separate processes with no communication).

A network that sets ``chained_clean_stream = True`` (a pretrained decoder, ``dbl.models.pretrained``)
gives block b > 0 the clean rows it was pretrained on: the clean tokens' hidden states after the
layers of blocks 0..b-1, computed without gradients (so blocks still train independently), instead
of the token embeddings. Its clean path through all blocks is then the pretrained model's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dbl.errors import UsageError


def split_layers(depth: int, num_blocks: int, layers_per_block: Sequence[int] | None = None) -> list[int]:
    """Layers per block, checked: explicit lists must sum to ``depth``; otherwise B must divide depth."""
    if num_blocks < 1:
        raise UsageError(f"num_blocks must be >= 1, got {num_blocks}")
    if num_blocks > depth:
        raise UsageError(f"num_blocks {num_blocks} is larger than the network's depth {depth}; every block needs a layer")
    if layers_per_block is not None:
        sizes = list(layers_per_block)
        if len(sizes) != num_blocks or sum(sizes) != depth or min(sizes) < 1:
            raise UsageError(
                f"layers_per_block {sizes} must have num_blocks={num_blocks} positive entries summing to depth={depth}"
            )
        return sizes
    if depth % num_blocks:
        base, extra = divmod(depth, num_blocks)
        hint = [base + (i < extra) for i in range(num_blocks)]
        raise UsageError(
            f"depth {depth} is not divisible by num_blocks {num_blocks}; set layers_per_block explicitly, e.g. {hint}"
        )
    return [depth // num_blocks] * num_blocks


class BlockwiseNetwork(nn.Module):
    """The network's layers grouped into blocks; ``forward(..., block=b)`` runs block b alone.

    Block 0 holds the input-side layers (and owns the highest noise, see ``dbl.diffusion.partition``).
    """

    def __init__(
        self,
        net: nn.Module,
        num_blocks: int,
        layers_per_block: Sequence[int] | None = None,
        shared_io: bool = True,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        # Recompute each layer's activations in backward instead of storing them (training only).
        self.activation_checkpointing = activation_checkpointing
        for attr in ("layers", "embed", "head"):
            if not hasattr(net, attr):
                raise UsageError(f"{type(net).__name__} cannot be split into blocks: it has no `{attr}`")
        self.layers_per_block = split_layers(len(net.layers), num_blocks, layers_per_block)
        self.shared_io = shared_io
        self.net = net
        starts = [0]
        for n in self.layers_per_block:
            starts.append(starts[-1] + n)
        self.bounds = list(zip(starts[:-1], starts[1:]))
        # Per-block copies of everything but the layers; block 0 uses the network's own.
        self.io_copies = nn.ModuleList()
        if not shared_io:
            layers, net.layers = net.layers, nn.ModuleList()
            try:
                self.io_copies.extend(copy.deepcopy(net) for _ in range(num_blocks - 1))
            finally:
                net.layers = layers

    @property
    def num_blocks(self) -> int:
        return len(self.layers_per_block)

    def io(self, block: int) -> nn.Module:
        return self.net if self.shared_io or block == 0 else self.io_copies[block - 1]

    def block_layers(self, block: int) -> nn.ModuleList:
        start, end = self.bounds[block]
        return self.net.layers[start:end]

    def io_parameters(self, block: int) -> Iterator[nn.Parameter]:
        return (p for name, p in self.io(block).named_parameters() if not name.startswith("layers."))

    def block_parameters(self, block: int) -> list[nn.Parameter]:
        """Parameters that only ``block`` trains: its layers, plus its own input/output copy if not shared."""
        params = list(self.block_layers(block).parameters())
        if not self.shared_io:
            params += list(self.io_parameters(block))
        return params

    def shared_parameters(self) -> list[nn.Parameter]:
        """Input/output parameters every block trains (empty when ``shared_io`` is False)."""
        return list(self.io_parameters(0)) if self.shared_io else []

    def chains_clean_stream(self, cond) -> bool:
        """Whether this call's clean rows must enter a later block as the earlier blocks leave them."""
        if not getattr(self.net, "chained_clean_stream", False) or getattr(cond, "tokens", None) is None:
            return False
        if cond.cache is not None:  # a cached prefix was extended through all layers (denoisers.text)
            raise ValueError("with a chained clean stream, extend the cached prefix through all layers (block=None)")
        return True

    @torch.no_grad()
    def clean_rows_entering(self, block: int, cond) -> torch.Tensor:
        """[N, m, d] the clean rows of ``cond`` after the layers of blocks 0..block-1."""
        start = self.bounds[block][0]
        h, c = self.io(block).embed(None, None, cond)
        for layer in self.net.layers[:start]:
            h = layer(h, c)
        return h

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond=None, block: int | None = None) -> torch.Tensor:
        """Run one block (``block=b``) or, with shared input/output parts, all layers (``block=None``)."""
        if block is None:
            if not self.shared_io and self.num_blocks > 1:
                raise ValueError("with shared_io=False every block has its own input/output layers; pass block=")
            layers, io = self.net.layers, self.net
        else:
            layers, io = self.block_layers(block), self.io(block)
        h, c = io.embed(x, c_noise, cond)
        if block and self.chains_clean_stream(cond):
            h = torch.cat([h[:, : c.num_noisy], self.clean_rows_entering(block, cond)], dim=1)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in layers:
            h = checkpoint(layer, h, c, use_reentrant=False) if recompute else layer(h, c)
        return io.head(h, c)
