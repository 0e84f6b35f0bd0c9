"""Callbacks for the multi-process tests: what each data-parallel process did, written to <dir>/rank<r>.pt."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import tiny_features  # noqa: F401 - registers the tiny FID extractor in the processes `dbl` starts
import torch


class RecordRanks(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.blocks: list[int] = []
        self.rng: list[str] = []
        self.val: list[dict[str, float]] = []
        self._updates: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # the generator that draws each step's sigmas, noise and label dropout
        self.rng.append(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest())
        self._updates = pl_module.block_updates.clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.blocks.append(int((pl_module.block_updates - self._updates).nonzero().item()))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")})

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"blocks": self.blocks, "rng": self.rng, "val": self.val, "state": state},
                   self.out_dir / f"rank{trainer.global_rank}.pt")


class RecordMetrics(L.Callback):
    """The metrics each process ends validation and test with, written to <dir>/<stage>_rank<r>.pt."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def _save(self, trainer, stage: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith((stage, "fid"))}
        torch.save(metrics, self.out_dir / f"{stage}_rank{trainer.global_rank}.pt")

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._save(trainer, "val")

    def on_test_end(self, trainer, pl_module):
        self._save(trainer, "test")


class RecordState(L.Callback):
    """How many batches each process trained on, and its final state, written to <dir>/rank<r>.pt."""

    def __init__(self, out_dir: str):
        self.out_dir, self.batches = Path(out_dir), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"batches": self.batches, "state": state}, self.out_dir / f"rank{trainer.global_rank}.pt")


class RecordTraffic(L.Callback):
    """Per step: the block trained and the gradient bytes this process all-reduced (strategies that
    count them, ``dbl.training.BlockwiseDDPStrategy``), and the final state; <dir>/rank<r>.pt."""

    def __init__(self, out_dir: str):
        self.out_dir, self.steps, self._before = Path(out_dir), [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = trainer.strategy.bytes_reduced

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((pl_module.last_trained_block, trainer.strategy.bytes_reduced - self._before))

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"steps": self.steps, "state": state}, self.out_dir / f"rank{trainer.global_rank}.pt")
