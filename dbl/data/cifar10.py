"""CIFAR-10 (50,000 train / 10,000 test, 32x32 RGB, 10 classes): the paper's pixel-space DiT run."""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import CIFAR10

from dbl.data.checks import check_loader_options
from dbl.data.cifar import CIFARDataModule, OptionalChecksums
from dbl.data.images import check_val_fraction, default_cache_dir, is_writable

BATCH_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta")


class _CIFAR10(OptionalChecksums, CIFAR10):
    """torchvision's CIFAR-10 reader; ``verify_checksums=False`` skips its md5s (``OptionalChecksums``)."""


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10 as ``(image [3, 32, 32] in [-1, 1], label)`` batches, read by torchvision.

    Args:
        root: folder that holds (or will hold) ``cifar-10-batches-py/`` (the "python version":
            ``data_batch_1..5``, ``test_batch``, ``batches.meta``).
        download: when the files are missing, download them with torchvision (needs the internet).
            Offline and missing is a one-line error that says where to put the files.
        verify_checksums: compare the files' md5s with the official release.
        cache_dir: writable folder for FID statistics; default ``root`` when writable, else
            ``$DBL_CACHE/cifar10``.
        batch_size: training batch size (training drops the last partial batch; evaluation does not).
        eval_batch_size: batch size of validation/test loaders; default ``batch_size``.
        random_flip: mirror training images left-right with probability 1/2 (DiT/EDM practice).
        val_fraction: share of the official training images held out for validation (a seeded
            split; default 2%: 1,000 of CIFAR-10's 50,000); the test split is kept for ``dbl test``.
        seed: seed of that split.
        num_predict: number of samples ``dbl predict`` generates, labels cycling 0..9.
        num_workers: DataLoader workers.
    """

    reference_name = "cifar10"
    reader = _CIFAR10
    files = BATCH_FILES
    display_name = "CIFAR-10"
    file_kind = "python batch"

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = True,
        verify_checksums: bool = True,
        cache_dir: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        random_flip: bool = True,
        val_fraction: float = 0.02,
        seed: int = 0,
        num_predict: int = 100,
        num_workers: int = 4,
    ):
        super().__init__()
        check_val_fraction(val_fraction)
        check_loader_options(batch_size=batch_size, eval_batch_size=eval_batch_size, num_predict=num_predict,
                             num_workers=num_workers)
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else (
            self.root if is_writable(self.root) else default_cache_dir("cifar10"))

    @staticmethod
    def check_file(name: str, content) -> None:
        """A data batch holds ``data`` and ``labels`` of equal length (``batches.meta``: any pickle)."""
        if name != "batches.meta" and ("data" not in content or len(content["data"]) != len(content["labels"])):
            raise ValueError("no data and labels of equal length")
