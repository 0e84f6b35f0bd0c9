"""torchmetrics for block-wise evaluation: one state vector per metric, one entry per block.

A vector state (rather than one metric object per block) keeps evaluation safe with several
processes: every rank computes and syncs the same metric once, whatever blocks its own batches
happened to visit, so no rank waits on a collective that another rank skips.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torchmetrics import Metric


class PerBlockMean(Metric):
    """Mean of per-sample values grouped by the block that handled each sample.

    ``update(values [N], owner [N])``; ``compute()`` gives [num_blocks], NaN for a block that no
    sample reached on any process.
    """

    full_state_update = False

    def __init__(self, num_blocks: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros(num_blocks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_blocks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, owner: torch.Tensor) -> None:
        owner = owner.to(self.total.device).long()
        self.total.index_add_(0, owner, values.detach().to(self.total))
        self.count.index_add_(0, owner, torch.ones_like(owner, dtype=self.count.dtype))

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class BitsPerCharacter(Metric):
    """Accumulates negative ELBO (nats, float64) and characters; ``compute`` gives bits per character.

    ``update(nats, chars)``: total nats of some sequences and how many characters they hold.
    BPC = sum(nats) / sum(chars) / ln 2: a character-weighted mean, so a short last chunk counts
    in proportion to its length. With ``num_blocks``, ``nats`` is [N, num_blocks] (each block's
    part of each sequence's nats) and ``compute`` gives each block's share of the BPC: [num_blocks],
    summing to the BPC of the whole.
    """

    full_state_update = False

    def __init__(self, num_blocks: int | None = None, **kwargs):
        super().__init__(**kwargs)
        shape = () if num_blocks is None else (num_blocks,)
        self.add_state("nats", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("chars", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nats: torch.Tensor, chars: int | torch.Tensor) -> None:
        self.nats += nats.detach().double().sum(0) if self.nats.dim() else nats.detach().double().sum()
        self.chars += torch.as_tensor(chars, dtype=torch.float64, device=self.chars.device).sum()

    def compute(self) -> torch.Tensor:
        return self.nats / self.chars / math.log(2)


STAGES: tuple[str, ...] = ("val", "test")


def per_stage(make: Callable[[], dict[str, Metric]]) -> nn.ModuleDict:
    """The same metrics, once for validation and once for test: ``metrics[stage][name]``.

    Evaluation runs one step for both stages (``BlockwiseLightningModule.evaluation_step``); each
    stage keeps its own states, so a test run in the middle of a fit never mixes with validation.
    """
    return nn.ModuleDict({stage: nn.ModuleDict(make()) for stage in STAGES})
