"""Checkpoints for runs you can leave alone: the final step is always saved, and an interrupted run
(Ctrl-C, SIGTERM from a scheduler, a crash) saves where it stopped.

Running the same command again resumes from the newest checkpoint of the experiment, whichever of
these wrote it (``dbl.cli``); ``--fresh`` starts over.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from dbl.errors import DivergenceError, UsageError


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also saves ``last.ckpt`` at the final step when
    ``max_steps`` is not a multiple of ``every_n_train_steps`` (Lightning saves ``last`` at the end only
    if it never saved one before, so the steps after the last interval were lost)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class OnExceptionCheckpoint(Callback):
    """Save ``<dirpath>/<filename>.ckpt`` when a fit is interrupted after it has trained.

    - Saved only once the run has trained (an error before step 0 is a configuration or data
      problem; the corrected rerun must not resume from the old configuration's weights), and not
      on divergence (the diverged run's state is no use; resume from the last periodic checkpoint).
    - Deleted only by a fit that then trains to its end, never by ``validate``, ``test``,
      ``predict`` or a fit that trained no step (Lightning's own callback deleted it on every teardown).

    Args:
        dirpath: folder of the checkpoint; one per experiment.
        filename: checkpoint name without extension.
    """

    def __init__(self, dirpath: str | Path, filename: str = "on_exception") -> None:
        if not filename:
            raise UsageError("OnExceptionCheckpoint filename must not be empty")
        self.dirpath = Path(dirpath)
        self.filename = filename
        self._step_at_start: int | None = None

    @property
    def ckpt_path(self) -> Path:
        return self.dirpath / f"{self.filename}.ckpt"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_at_start = trainer.global_step  # after any checkpoint was restored

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING or isinstance(exception, DivergenceError):
            return
        if self._step_at_start is None or trainer.global_step == self._step_at_start:
            return  # nothing trained in this run: the checkpoint it resumed from (if any) stays as it is
        trainer.save_checkpoint(self.ckpt_path)
        if trainer.is_global_zero and self.ckpt_path.is_file():  # a strategy may decline (BlockParallelStrategy)
            print(f"dbl: saved {self.ckpt_path} at step {trainer.global_step}; run the same command to resume",
                  file=sys.stderr)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_fit_end runs only when the fit was not interrupted
        trained = self._step_at_start is not None and trainer.global_step != self._step_at_start
        if trained and trainer.is_global_zero:
            self.ckpt_path.unlink(missing_ok=True)
