"""MemoryMonitor: per-block activation bytes, resident training state and peak device memory."""

from __future__ import annotations

import lightning as L
import torch

from dbl.memory import SavedTensorCounter, resident_state_bytes


class MemoryMonitor(L.Callback):
    """Every ``every_n_steps`` steps, measure one training step and log, for the block it trained:

    - ``memory/activations_block<b>``: bytes saved for backward (weights excluded), from
      ``torch.autograd.graph.saved_tensors_hooks``: works on every device;
    - ``memory/state_block<b>``: weights, gradients and optimizer state resident on the device
      (offloaded blocks excluded), also split as ``memory/{weights,grads,optimizer}_block<b>``;
    - ``memory/peak_block<b>``: ``torch.cuda.max_memory_allocated`` during the step (CUDA only).

    ``records`` keeps every measurement as a dict (the benchmark scripts read it).
    """

    def __init__(self, every_n_steps: int = 100, log: bool = True):
        self.every_n_steps = every_n_steps
        self.log = log
        self.records: list[dict] = []
        self._counter: SavedTensorCounter | None = None
        self._state: dict[str, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._counter = SavedTensorCounter(pl_module.parameters())
        self._counter.__enter__()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # gradients exist now (they are freed right after the step)
        if self._counter is not None:
            self._state = resident_state_bytes(pl_module, trainer.optimizers)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counter is None:
            return
        self._counter.__exit__(None, None, None)
        step, block = trainer.global_step - 1, pl_module.last_trained_block  # the step just taken
        state = self._state
        record = {"step": step, "block": block, "activations": self._counter.bytes, **state,
                  "state": sum(state.values())}
        if pl_module.device.type == "cuda":
            record["peak"] = torch.cuda.max_memory_allocated(pl_module.device)
        self._counter = None
        self.records.append(record)
        if self.log:
            pl_module.log_dict({f"memory/{k}_block{block}": float(v) for k, v in record.items() if k not in ("step", "block")})
