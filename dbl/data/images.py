"""What the image DataModules share: in-memory uint8 datasets, flips, caches, FID reference sets.

Every image DataModule here keeps its images as uint8 (as stored on disk) and scales them to
[-1, 1] per item, so the FID reference set is exactly the pixels the model was trained on
(``ReferenceImages``), with no second decoding path that could drift.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from dbl.errors import UsageError


def default_cache_dir(name: str) -> Path:
    """``$DBL_CACHE/<name>`` (default ``~/.cache/dbl/<name>``): writable space for unpacked data and FID stats."""
    return Path(os.environ.get("DBL_CACHE", Path.home() / ".cache" / "dbl")).expanduser() / name


def is_writable(path: Path) -> bool:
    """Whether we may write under ``path`` (or its nearest existing parent).

    A folder whose permission bits say read-only counts as read-only even for root, who could
    write there anyway: shared data folders are marked that way on purpose.
    """
    path = Path(path)
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)


class UInt8ImageDataset(Dataset):
    """``(image in [-1, 1] float32 [C, H, W], label)`` from a uint8 tensor [N, C, H, W].

    ``random_flip`` mirrors each image left-right with probability 1/2 (DiT/EDM training practice).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, random_flip: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.random_flip = images, labels, random_flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.float() / 127.5 - 1.0, self.labels[i]


class UInt8Images(Dataset):
    """Items are the uint8 [C, H, W] images themselves (what FID feature extractors take)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


@dataclass
class ReferenceImages:
    """A FID reference set: uint8 [C, H, W] images, a description of exactly what they are (hashed
    into the key of the cached statistics), and the writable folder where those statistics live."""

    dataset: Dataset
    description: dict = field(default_factory=dict)
    cache_dir: Path = field(default_factory=lambda: default_cache_dir("fid"))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255] (round to nearest); exact inverse of ``x / 127.5 - 1``."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class InMemoryImageDataModule(L.LightningDataModule):
    """Shared part of the labelled image sets held in memory as uint8 (CIFAR-10, Fashion-MNIST).

    A subclass saves its hyperparameters (``batch_size``, ``eval_batch_size``, ``random_flip``,
    ``num_predict``, ``num_workers``), sets ``cache_dir`` and ``reference_name``, and fills
    ``self._images[split]`` / ``self._labels[split]`` in ``_load(split)`` for ``train`` and ``test``.
    Validation uses the test split; evaluation loaders never drop the last batch.
    """

    num_classes = 10
    reference_name = ""
    cache_dir: Path

    def __init__(self):
        super().__init__()
        self._images: dict[str, torch.Tensor] = {}
        self._labels: dict[str, torch.Tensor] = {}

    def _load(self, split: str) -> None:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # idempotent; also covers use outside a Trainer
        if stage in (None, "fit"):
            self._load("train")
        self._load("test")

    def _dataset(self, split: str, train: bool) -> UInt8ImageDataset:
        self._load(split)
        return UInt8ImageDataset(self._images[split], self._labels[split], random_flip=train and self.hparams.random_flip)

    def train_dataloader(self) -> DataLoader:
        return StatefulDataLoader(self._dataset("train", True), batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self._dataset(split, False), batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        labels = torch.arange(self.hparams.num_predict) % self.num_classes
        return DataLoader(labels, batch_size=self.hparams.batch_size)

    def reference_description(self, split: str) -> dict:
        """What the FID reference statistics of ``split`` cover (their cache key)."""
        return dict(dataset=self.reference_name, split=split, n=len(self._images[split]))

    def fid_reference(self, split: str) -> ReferenceImages:
        """The ``train`` or ``test`` split as the model sees it (unflipped), uint8."""
        if split not in ("train", "test"):
            raise UsageError(f"{self.reference_name} has splits 'train' and 'test', not {split!r}")
        self.prepare_data()
        self._load(split)
        return ReferenceImages(UInt8Images(self._images[split]), self.reference_description(split), self.cache_dir)
