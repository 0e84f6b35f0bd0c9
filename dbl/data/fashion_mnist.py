"""Fashion-MNIST (60,000 train / 10,000 test, 28x28 gray, 10 classes) for CPU-scale image runs.

Real images, small enough for a CPU, in the CIFAR-10 run's shape (padded to 32x32). Its FID is
not comparable with CIFAR-10's. ``root`` may be read-only and hold only the original ``.gz``
files (as ``shared/data/fashion-mnist`` does): they are unpacked once into a writable cache,
without the network.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import torch.nn.functional as F

from dbl.data.images import InMemoryImageDataModule, default_cache_dir, is_writable
from dbl.errors import MissingDataError

RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def unpack_gz(raw_dir: Path, dest_raw_dir: Path) -> None:
    """Write each ``<raw_dir>/<name>.gz`` unpacked to ``<dest_raw_dir>/<name>`` (skips files already there)."""
    dest_raw_dir.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        dest = dest_raw_dir / name
        if dest.exists():
            continue
        part = dest.with_name(f"{name}.part{os.getpid()}")  # atomic: concurrent runs never read half a file
        with gzip.open(raw_dir / f"{name}.gz", "rb") as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out)
        part.replace(dest)


class FashionMNISTDataModule(InMemoryImageDataModule):
    """torchvision's FashionMNIST as ``(image [C, 32, 32] in [-1, 1], label)`` batches.

    Args:
        root: folder holding ``FashionMNIST/raw/`` (unpacked files, or only the ``.gz`` files).
        cache_dir: writable folder for unpacked files and FID statistics; default ``root`` when it
            is writable, else ``$DBL_CACHE/fashion-mnist`` (``~/.cache/dbl/fashion-mnist``).
        download: fetch the dataset with torchvision when it is missing (needs the internet).
        batch_size: training batch size (evaluation loaders use ``eval_batch_size``, no drop_last).
        eval_batch_size: batch size of validation/test loaders; default ``batch_size``.
        image_size: side after zero-padding (black border) the 28x28 images; 28 keeps them as they are.
        channels: 1 (gray) or 3 (gray repeated, for models built for RGB).
        random_flip: mirror training images left-right with probability 1/2.
        num_predict: number of samples ``dbl predict`` generates, labels cycling 0..9.
        num_workers: DataLoader workers.
    """

    reference_name = "fashion-mnist"

    def __init__(
        self,
        root: str = "data/fashion-mnist",
        cache_dir: str | None = None,
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        image_size: int = 32,
        channels: int = 1,
        random_flip: bool = True,
        num_predict: int = 100,
        num_workers: int = 0,
    ):
        super().__init__()
        if image_size < 28 or (image_size - 28) % 2:
            raise ValueError(f"image_size must be 28 + an even padding (28, 30, 32, ...), got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else (
            self.root if is_writable(self.root) else default_cache_dir("fashion-mnist"))

    def dataset_root(self) -> Path:
        """The folder to hand torchvision: ``root`` if it holds unpacked files, else the cache."""
        raw = self.root / "FashionMNIST" / "raw"
        if all((raw / n).exists() for n in RAW_FILES):
            return self.root
        cached = self.cache_dir / "FashionMNIST" / "raw"
        if all((cached / n).exists() for n in RAW_FILES) or all((raw / f"{n}.gz").exists() for n in RAW_FILES):
            return self.cache_dir
        if self.hparams.download:
            return self.cache_dir
        raise MissingDataError(
            f"Fashion-MNIST not found: put {', '.join(n + '[.gz]' for n in RAW_FILES)} in {raw} "
            f"(or set download: true on a machine with internet)"
        )

    def prepare_data(self) -> None:
        from torchvision.datasets import FashionMNIST

        target = self.dataset_root()
        raw = self.root / "FashionMNIST" / "raw"
        if target == self.cache_dir and all((raw / f"{n}.gz").exists() for n in RAW_FILES):
            unpack_gz(raw, self.cache_dir / "FashionMNIST" / "raw")
        elif self.hparams.download:
            FashionMNIST(str(target), train=True, download=True)

    def _load(self, split: str) -> None:
        if split in self._images:
            return
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(str(self.dataset_root()), train=split == "train", download=False)
        pad = (self.hparams.image_size - 28) // 2
        images = F.pad(ds.data.unsqueeze(1), (pad, pad, pad, pad))  # black border, like the digit's background
        self._images[split] = images.repeat(1, self.hparams.channels, 1, 1).contiguous()
        self._labels[split] = ds.targets.long()

    def reference_description(self, split: str) -> dict:
        return {**super().reference_description(split), "image_size": self.hparams.image_size,
                "channels": self.hparams.channels}
