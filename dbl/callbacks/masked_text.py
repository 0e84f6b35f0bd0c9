"""Samples of the masked-diffusion text task (text8): logged to TensorBoard during training, written to a
file by ``dbl predict``.

Both decode token ids with the datamodule's ``decode`` (``Text8DataModule.decode`` for text8).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only

from dbl.callbacks.paths import run_dir
from dbl.errors import UsageError


def _decoder(trainer: L.Trainer):
    decode = getattr(trainer.datamodule, "decode", None)
    if decode is None:
        raise UsageError(f"{type(trainer.datamodule).__name__} has no `decode`; text callbacks need one to print samples")
    return decode


class MaskedTextSamples(L.Callback):
    """Every ``every_n_steps`` training steps (and at the end), sample text and log it.

    The samples go to TensorBoard's Text tab (tag ``samples``) and, with ``save_txt``, to
    ``<log_dir>/samples/step_<k>.txt``. The sampler's randomness is seeded with ``seed``, so
    samples compare across steps and runs.

    Args:
        every_n_steps: interval in optimizer steps; 0 logs only at the end of training.
        num_samples: sequences per log.
        length: characters per sequence; None: the module's ``sample_length``.
        num_steps: ancestral sampling steps; None: the module's ``sample_steps``.
        seed: seed of the sampler.
        save_txt: also write each set of samples to a text file next to the logs.
    """

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 4, length: int | None = None,
                 num_steps: int | None = None, seed: int = 0, save_txt: bool = True):
        self.every_n_steps, self.num_samples, self.length = every_n_steps, num_samples, length
        if num_steps is not None and num_steps < 1:
            raise UsageError(f"MaskedTextSamples num_steps must be >= 1 (or null: the module's), got {num_steps}")
        self.num_steps, self.seed, self.save_txt = num_steps, seed, save_txt
        self._last_step = -1

    def samples(self, trainer: L.Trainer, pl_module) -> list[str]:
        ids = pl_module.sample(self.num_samples, self.length, self.num_steps, torch.Generator().manual_seed(self.seed))
        decode = _decoder(trainer)
        return [decode(row) for row in ids.cpu()]

    @rank_zero_only
    def log_samples(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        texts = self.samples(trainer, pl_module)
        logger = trainer.logger
        if logger is not None and hasattr(logger.experiment, "add_text"):
            # Markdown: a fenced block keeps spaces and line breaks as they are
            logger.experiment.add_text("samples", "\n\n".join(f"```\n{t}\n```" for t in texts), global_step=step)
        if self.save_txt:
            out = run_dir(trainer) / "samples"
            out.mkdir(parents=True, exist_ok=True)
            (out / f"step_{step:07d}.txt").write_text("\n".join(texts) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.log_samples(trainer, pl_module)


class MaskedTextPredictionWriter(BasePredictionWriter):
    """Writes what ``dbl predict`` generates, one decoded sample per line, to ``path``.

    Args:
        path: output file; None: ``<log_dir>/samples.txt``. It is overwritten at the start of
            each prediction run.
    """

    def __init__(self, path: str | None = None):
        super().__init__(write_interval="batch")
        self.path = path
        self._file: Path | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        self._file = Path(self.path) if self.path else run_dir(trainer) / "samples.txt"
        self._file.parent.mkdir(parents=True, exist_ok=True)
        self._file.write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        decode = _decoder(trainer)
        with self._file.open("a") as f:
            f.writelines(decode(row) + "\n" for row in prediction.cpu())

    def on_predict_end(self, trainer, pl_module) -> None:
        print(f"wrote {self._file}")
