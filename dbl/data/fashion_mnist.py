"""Fashion-MNIST (60,000 train / 10,000 test, 28x28 gray, 10 classes) for CPU-scale image runs.

Real images, small enough for a CPU, in the CIFAR-10 run's shape (padded to 32x32). Its FID is
not comparable with CIFAR-10's. ``root`` may be read-only and hold only the original ``.gz``
files (as ``shared/data/fashion-mnist`` does): they are unpacked once into a writable cache,
without the network.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import shutil
from pathlib import Path

import torch.nn.functional as F

from dbl.data.checks import check_loader_options
from dbl.data.download import atomic_path
from dbl.data.images import InMemoryImageDataModule, check_val_fraction, default_cache_dir, is_writable
from dbl.errors import MissingDataError, UsageError

RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


IDX_MAGIC = {2049: 1, 2051: 3}  # labels: [N]; images: [N, 28, 28] (unsigned bytes)


def check_idx(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is a whole IDX file: the size its header promises."""
    with open(path, "rb") as f:
        header = f.read(4)
        magic = int.from_bytes(header, "big") if len(header) == 4 else -1
        if magic not in IDX_MAGIC:
            raise ValueError(f"not an IDX file of unsigned bytes (magic {magic})")
        dims = [int.from_bytes(f.read(4), "big") for _ in range(IDX_MAGIC[magic])]
    expected = 4 + 4 * len(dims) + math.prod(dims)
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"holds {size:,} bytes, but its header {dims} needs {expected:,}")


def gz_digest(raw_dir: Path) -> str:
    """A hash of the four ``.gz`` files' bytes: the key of the folder they are unpacked into."""
    digest = hashlib.sha256()
    for name in RAW_FILES:
        with open(raw_dir / f"{name}.gz", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def unpack_gz(raw_dir: Path, dest_raw_dir: Path) -> None:
    """Write each ``<raw_dir>/<name>.gz`` unpacked to ``<dest_raw_dir>/<name>`` (skips files already there).

    Each file is written to a temporary file next to it, checked (a complete gzip stream holding a
    whole IDX file) and only then renamed into place; a truncated or short ``.gz`` is a one-line
    ``MissingDataError`` naming it, and leaves nothing in ``dest_raw_dir``.
    """
    dest_raw_dir.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        dest = dest_raw_dir / name
        if dest.exists():
            continue
        source = raw_dir / f"{name}.gz"
        try:
            with atomic_path(dest) as part:  # concurrent runs never read half a file
                with gzip.open(source, "rb") as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out)
                check_idx(part)
        except (OSError, EOFError, ValueError) as err:  # BadGzipFile is an OSError
            raise MissingDataError(f"{source} is damaged ({type(err).__name__}: {err}); replace it with the "
                                   f"original Fashion-MNIST file") from None


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
        val_fraction: share of the official training images held out for validation (a seeded
            split; default 2%: 1,200 of Fashion-MNIST's 60,000); the test split is kept for ``dbl test``.
        seed: seed of that split.
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
        val_fraction: float = 0.02,
        seed: int = 0,
        num_predict: int = 100,
        num_workers: int = 0,
    ):
        super().__init__()
        check_val_fraction(val_fraction)
        if image_size < 28 or (image_size - 28) % 2:
            raise UsageError(f"image_size must be 28 + an even padding (28, 30, 32, ...), got {image_size}")
        if channels not in (1, 3):
            raise UsageError(f"channels must be 1 or 3, got {channels}")
        check_loader_options(batch_size=batch_size, eval_batch_size=eval_batch_size, num_predict=num_predict,
                             num_workers=num_workers)
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else (
            self.root if is_writable(self.root) else default_cache_dir("fashion-mnist"))

    def dataset_root(self) -> Path:
        """The folder to hand torchvision: ``root`` if it holds unpacked files; for ``.gz`` files,
        ``<cache_dir>/unpacked/<hash of the .gz files>`` (so a replaced ``.gz`` is unpacked afresh,
        never read from a stale cache); else ``cache_dir`` (a download's target)."""
        raw = self.root / "FashionMNIST" / "raw"
        if all((raw / n).exists() for n in RAW_FILES):
            return self.root
        if all((raw / f"{n}.gz").exists() for n in RAW_FILES):
            if getattr(self, "_unpacked_root", None) is None:
                self._unpacked_root = self.cache_dir / "unpacked" / gz_digest(raw)
            return self._unpacked_root
        cached = self.cache_dir / "FashionMNIST" / "raw"
        if all((cached / n).exists() for n in RAW_FILES) or self.hparams.download:
            return self.cache_dir
        raise MissingDataError(
            f"Fashion-MNIST not found: put {', '.join(n + '[.gz]' for n in RAW_FILES)} in {raw} "
            f"(or set download: true on a machine with internet)"
        )

    def prepare_data(self) -> None:
        from torchvision.datasets import FashionMNIST

        target = self.dataset_root()
        raw = self.root / "FashionMNIST" / "raw"
        if target != self.root and all((raw / f"{n}.gz").exists() for n in RAW_FILES):
            if all((target / "FashionMNIST" / "raw" / n).exists() for n in RAW_FILES):
                return
            if target.exists():  # incomplete (written by hand, or by an older dbl): the cache is ours to redo
                shutil.rmtree(target)
            try:
                with atomic_path(target) as staging:  # all four files or none
                    unpack_gz(raw, staging / "FashionMNIST" / "raw")
            except OSError:
                if not all((target / "FashionMNIST" / "raw" / n).exists() for n in RAW_FILES):
                    raise  # else a concurrent run unpacked the same files first
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
