"""Images out of a run: sample grids during training (fixed noise and labels, so grids compare
across steps and runs) and the PNGs of ``dbl predict``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torchvision.utils import make_grid, save_image

from dbl.callbacks.paths import run_dir
from dbl.data.images import to_uint8
from dbl.diffusion.samplers import check_solver
from dbl.errors import UsageError


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` training steps (and at the end), generate a grid and log it.

    Rows are classes 0..``num_classes``-1 (or unconditional samples), ``per_class`` columns.
    The grid goes to TensorBoard (``samples`` tab) and, with ``save_png``, to
    ``<log_dir>/samples/step_<k>.png``.

    Args:
        every_n_steps: interval in optimizer steps; 0 logs only at the end of training.
        num_classes: rows of the grid, one class each; 0 for unconditional models.
        per_class: samples per row.
        seed: seed of the noise, fixed for the whole run.
        num_steps, solver, cfg_scale: sampler settings; None uses the module's defaults.
        save_png: also write each grid as a PNG next to the logs.
        min_pixels: images smaller than this are enlarged (nearest neighbour) in the grid.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_classes: int = 10,
        per_class: int = 8,
        seed: int = 0,
        num_steps: int | None = None,
        solver: str | None = None,
        cfg_scale: float | None = None,
        save_png: bool = True,
        min_pixels: int = 32,
    ):
        self.min_pixels = min_pixels
        self.every_n_steps, self.num_classes, self.per_class, self.seed = every_n_steps, num_classes, per_class, seed
        if solver is not None:
            check_solver(solver)
        if num_steps is not None and num_steps < 1:
            raise UsageError(f"SampleGrid num_steps must be >= 1 (or null: the module's), got {num_steps}")
        self.sampler = dict(num_steps=num_steps, solver=solver, cfg_scale=cfg_scale)
        self.save_png = save_png
        self._last_step = -1

    def make_grid(self, pl_module, decode=None) -> torch.Tensor:
        """``decode``: latents -> pixels in [-1, 1] (the DataModule's ``decode_samples``), for latent models."""
        gen = torch.Generator().manual_seed(self.seed)
        if self.num_classes > 0:
            labels = torch.arange(self.num_classes).repeat_interleave(self.per_class)
            images = pl_module.sample(labels=labels, generator=gen, **self.sampler)
        else:
            images = pl_module.sample(num_samples=self.per_class * 8, generator=gen, **self.sampler)
        if decode is not None:
            images = decode(images)
        images = ((images.clamp(-1, 1) + 1) / 2).cpu()
        if images.shape[-1] < self.min_pixels:  # small images (digits are 8x8): enlarge so a person can see them
            images = torch.nn.functional.interpolate(images, scale_factor=-(-self.min_pixels // images.shape[-1]), mode="nearest")
        return make_grid(images, nrow=self.per_class, padding=1, pad_value=1.0)

    @rank_zero_only
    def log_grid(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        grid = self.make_grid(pl_module, getattr(trainer.datamodule, "decode_samples", None))
        logger = trainer.logger
        if logger is not None and hasattr(logger.experiment, "add_image"):
            logger.experiment.add_image("samples", grid, global_step=step)
        if self.save_png:
            root = run_dir(trainer)
            (root / "samples").mkdir(parents=True, exist_ok=True)
            save_image(grid, root / "samples" / f"step_{step:07d}.png")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.log_grid(trainer, pl_module)


class ImagePredictionWriter(BasePredictionWriter):
    """Writes what ``dbl predict`` generates: one PNG per image, ``<output_dir>/<index>.png``.

    Latents are decoded first through the DataModule's ``decode_samples`` when it has one.

    Args:
        output_dir: destination; default ``<log_dir>/predictions`` of the predict run.
    """

    def __init__(self, output_dir: str | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.written = 0

    def _folder(self, trainer) -> Path:
        root = Path(self.output_dir) if self.output_dir else run_dir(trainer) / "predictions"
        root.mkdir(parents=True, exist_ok=True)
        return root

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        decode = getattr(trainer.datamodule, "decode_samples", None)
        images = decode(prediction) if decode is not None else prediction
        folder = self._folder(trainer)
        for image in to_uint8(images.cpu()):
            array = image.permute(1, 2, 0).numpy()
            Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(folder / f"{self.written:06d}.png")
            self.written += 1
