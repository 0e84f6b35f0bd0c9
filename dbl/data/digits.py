"""Handwritten digits that ship inside scikit-learn (1,797 images, 8x8, 10 classes): no download.

Used by the quickstart: small enough to train a recognisable class-conditional model on a CPU
in a few minutes, real enough to show whether training works.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset, random_split
from torchdata.stateful_dataloader import StatefulDataLoader

from dbl.data.checks import check_loader_options
from dbl.data.loaders import evaluation_loader
from dbl.errors import UsageError


class DigitsDataModule(L.LightningDataModule):
    """``sklearn.datasets.load_digits`` as ``(image [1, 8, 8] in [-1, 1], label)`` batches.

    Args:
        batch_size: training batch size.
        val_fraction: share of the 1,797 images held out for validation (a fixed, seeded split).
        seed: seed of that split.
        num_predict: number of samples ``dbl predict`` generates, labels cycling 0..9.
        num_workers: DataLoader workers (the data is in memory, 0 is fastest).
    """

    num_classes = 10

    def __init__(self, batch_size: int = 128, val_fraction: float = 0.1, seed: int = 0, num_predict: int = 100, num_workers: int = 0):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise UsageError(f"val_fraction must be in (0, 1), got {val_fraction}")
        check_loader_options(batch_size=batch_size, num_predict=num_predict, num_workers=num_workers)
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> [-1, 1]
        labels = torch.tensor(digits.target, dtype=torch.long)
        full = TensorDataset(images, labels)
        n_val = round(len(full) * self.hparams.val_fraction)
        self.train_set, self.val_set = random_split(
            full, [len(full) - n_val, n_val], generator=torch.Generator().manual_seed(self.hparams.seed)
        )

    def train_dataloader(self) -> DataLoader:
        return StatefulDataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return evaluation_loader(self, self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

    def predict_dataloader(self) -> DataLoader:
        labels = torch.arange(self.hparams.num_predict) % 10
        return DataLoader(labels, batch_size=self.hparams.batch_size)
