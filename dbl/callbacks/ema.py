"""An exponential moving average of the weights, for block-wise and end-to-end runs alike."""

from __future__ import annotations

from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import get_ema_avg_fn

from dbl.errors import UsageError


class EMA(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` with two changes for block-wise training.

    The average is used for validation, saved as the checkpoint's weights (the raw weights go
    under ``current_model_state``, from which training resumes) and left in the module when
    training ends, so ``dbl test`` and ``dbl predict`` evaluate it.

    - ``decay`` is per update of a block. A trained block changes on about 1/T of the steps, T the
      number of blocks that train (all B, or the engine's ``train_blocks``), so each step applies
      ``decay ** (1 / T)``: the average then spans the same number of a block's own updates in a
      block-wise run as in its end-to-end twin at equal layer-updates.
    - Integer buffers (the engine's per-block ``block_updates`` counts) are copied, not averaged.

    Args:
        decay: EMA decay per update of a block (DiT uses 0.9999 per step of its end-to-end model).
        update_starting_at_step: first training step (in block steps) that updates the average;
            None: from the first.
        device: where the average lives; None: with the model. ``cpu`` keeps it off the accelerator
            (the natural choice with ``offload_inactive``).
    """

    def __init__(self, decay: float = 0.9999, update_starting_at_step: int | None = None, device: str | None = None):
        if not 0.0 < decay < 1.0:
            raise UsageError(f"decay must be in (0, 1), got {decay}")
        super().__init__(device=device, decay=decay, update_starting_at_step=update_starting_at_step)
        self.decay = decay

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            schedule = getattr(pl_module, "schedule", None)  # the blocks that train (train_blocks)
            trained = len(schedule.blocks) if schedule is not None else getattr(pl_module, "num_blocks", 1)
            self.step_decay = self.decay ** (1.0 / trained)
            self._kwargs["avg_fn"] = get_ema_avg_fn(self.step_decay)
        # The average is a deep copy of the module. Its optimizer factories (jsonargparse partials under
        # the CLI) reach the CLI's trainer and, in the process that launched the others, their Popen
        # objects, which cannot be copied; the average needs no optimizer, so it is made without them.
        names = ("optimizer_factory", "lr_scheduler_factory", "shared_lr_scheduler_factory")
        factories = {name: getattr(pl_module, name) for name in names
                     if hasattr(pl_module, name)}
        for name in factories:
            setattr(pl_module, name, None)
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            for name, factory in factories.items():
                setattr(pl_module, name, factory)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._average_model is not None:
            for averaged, current in zip(self._average_model.module.buffers(), pl_module.buffers()):
                if not current.is_floating_point():  # counters: an average of a count means nothing
                    averaged.copy_(current)
