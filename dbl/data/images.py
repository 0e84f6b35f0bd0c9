"""What the image DataModules share: in-memory uint8 datasets, flips, caches, FID reference sets.

Every image DataModule here keeps its images as uint8 (as stored on disk) and scales them to
[-1, 1] per item, so the FID reference set is exactly the pixels the model was trained on
(``ReferenceImages``), with no second decoding path that could drift.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchdata.stateful_dataloader import StatefulDataLoader

from dbl.data.loaders import evaluation_loader
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


def check_val_fraction(val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise UsageError(f"val_fraction must be in (0, 1) (a share of the training images held out for validation), "
                         f"got {val_fraction}")


# Training augmentation is drawn in the training process, once per step, after the batch reached
# the device (the data modules' ``on_after_batch_transfer``), not in the datasets: the loader
# (prefetching, its workers) would draw it at other moments in a resumed run than in the whole
# one, whereas the training process's random streams are checkpointed (``dbl.training.rng``).
def mirror_at_random(images: torch.Tensor) -> torch.Tensor:
    """Each image of [N, C, H, W] mirrored left-right with probability 1/2 (DiT/EDM training practice)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def pick_view_at_random(views: torch.Tensor) -> torch.Tensor:
    """[N, V, C, h, w] -> [N, C, h, w]: one of each item's V views (e.g. a latent and its mirror's), uniformly."""
    chosen = torch.randint(views.shape[1], (views.shape[0],), device=views.device)
    return views[torch.arange(views.shape[0], device=views.device), chosen]


class UInt8ImageDataset(Dataset):
    """``(image, label)`` items of uint8 images [N, C, H, W] and long labels [N]: each image as
    float32 [C, H, W] in [-1, 1] (``x / 127.5 - 1``), or with ``scale=False`` the uint8 [C, H, W]
    image as stored (the classification data modules normalise whole batches later)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, scale: bool = True):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.scale = images, labels, scale

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        image = self.images[i]
        return (image.float() / 127.5 - 1.0 if self.scale else image), self.labels[i]


class UInt8Images(Dataset):
    """Items are the uint8 [C, H, W] images themselves (what FID feature extractors take)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]

    def fingerprint(self) -> str:
        """A hash of the pixels themselves (shape, dtype and bytes)."""
        return tensor_digest(self.images)


def tensor_digest(tensor: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
    digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def dataset_fingerprint(dataset: Dataset) -> str | None:
    """A hash of what a FID reference dataset holds (its ``fingerprint()``; a ``Subset`` adds its
    indices), or None for a dataset that cannot say."""
    if isinstance(dataset, Subset):
        base = dataset_fingerprint(dataset.dataset)
        return None if base is None else f"{base}:{tensor_digest(torch.as_tensor(list(dataset.indices), dtype=torch.long))}"
    fingerprint = getattr(dataset, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


@dataclass
class ReferenceImages:
    """A FID reference set: uint8 [C, H, W] images, a description of exactly what they are, and the
    writable folder where their statistics are cached. The cache key hashes the description and
    the dataset's content (``dataset_fingerprint``), so changed images never reuse old statistics."""

    dataset: Dataset
    description: dict = field(default_factory=dict)
    cache_dir: Path = field(default_factory=lambda: default_cache_dir("fid"))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255] (round to nearest); exact inverse of ``x / 127.5 - 1``."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class InMemoryImageDataModule(L.LightningDataModule):
    """Shared part of the labelled image sets held in memory as uint8 (CIFAR-10, Fashion-MNIST).

    A subclass saves its hyperparameters (``batch_size``, ``eval_batch_size``, ``random_flip``,
    ``val_fraction``, ``seed``, ``num_predict``, ``num_workers``), sets ``cache_dir`` and
    ``reference_name``, and fills ``self._images[split]`` / ``self._labels[split]`` in
    ``_load(split)`` for ``train`` and ``test``. The datasets' items are images in [-1, 1], or
    with ``scale_images = False`` the uint8 images as stored (``UInt8ImageDataset``).

    Validation uses ``val_fraction`` of the official training images, held out from training by a
    random permutation seeded with ``seed`` (the same split on every run and rank); training uses
    the rest, and the official test split is kept for ``dbl test``. FID's ``train`` reference is
    the whole official training split (the usual protocol). Evaluation loaders never drop the
    last batch.
    """

    num_classes = 10
    reference_name = ""
    scale_images = True
    cache_dir: Path

    def __init__(self):
        super().__init__()
        self._images: dict[str, torch.Tensor] = {}
        self._labels: dict[str, torch.Tensor] = {}

    def _load(self, split: str) -> None:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # idempotent; also covers use outside a Trainer
        if stage in (None, "fit", "validate"):
            self._load("train")
        self._load("test")

    def split_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(training, validation) indices into the official training split: a seeded permutation,
        the first ``round(n * val_fraction)`` of it held out for validation (each part sorted)."""
        n = len(self._images["train"])
        n_val = round(n * self.hparams.val_fraction)
        if not 0 < n_val < n:
            raise UsageError(f"val_fraction {self.hparams.val_fraction} of {n} training images leaves "
                             f"{n_val} for validation and {n - n_val} for training; choose a fraction that leaves both")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams.seed))
        return order[n_val:].sort().values, order[:n_val].sort().values

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.hparams.random_flip and self.trainer is not None and self.trainer.training:
            images, labels = batch
            batch = mirror_at_random(images), labels
        return batch

    def _dataset(self, split: str) -> UInt8ImageDataset:
        """``train`` (minus the validation images), ``val`` (held out of train) or ``test``."""
        self._load("train" if split == "val" else split)
        if split == "test":
            images, labels = self._images[split], self._labels[split]
        else:
            index = self.split_indices()[split == "val"]
            images, labels = self._images["train"][index], self._labels["train"][index]
        return UInt8ImageDataset(images, labels, scale=self.scale_images)

    def train_dataloader(self) -> DataLoader:
        return StatefulDataLoader(self._dataset("train"), batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def _eval_loader(self, split: str) -> DataLoader:
        return evaluation_loader(self, self._dataset(split), batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

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
