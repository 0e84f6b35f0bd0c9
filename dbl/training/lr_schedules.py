"""Learning-rate schedules that torch does not offer as one class a YAML can name."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from dbl.errors import UsageError


class WarmupCosineLR(LambdaLR):
    """Linear warm-up from 0 over ``warmup_steps``, then a half cosine down to ``min_factor`` x the base
    learning rate at ``total_steps`` (held there after): the official ViT recipe's schedule
    (``transformers.get_cosine_schedule_with_warmup`` with a floor).

    Counted in the steps of the optimizer it drives: a block's scheduler steps when that block
    trains, the shared part's on every step (``BlockwiseLightningModule.shared_lr_scheduler``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_factor: float = 0.0,
                 last_epoch: int = -1):
        if warmup_steps < 0 or total_steps < 1 or warmup_steps >= total_steps:
            raise UsageError(f"WarmupCosineLR needs 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                             f"total_steps={total_steps}")
        if not 0 <= min_factor <= 1:
            raise UsageError(f"WarmupCosineLR's min_factor must be in [0, 1], got {min_factor}")
        self.warmup_steps, self.total_steps, self.min_factor = warmup_steps, total_steps, min_factor
        super().__init__(optimizer, self.factor, last_epoch)

    def factor(self, step: int) -> float:
        """The learning rate at optimizer step ``step`` over the base learning rate."""
        if step < self.warmup_steps:
            return step / self.warmup_steps
        progress = min((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 1.0)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
