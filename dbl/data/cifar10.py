"""CIFAR-10 (50,000 train / 10,000 test, 32x32 RGB, 10 classes): the paper's pixel-space DiT run."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets import CIFAR10

from dbl.data.images import InMemoryImageDataModule, default_cache_dir, is_writable
from dbl.errors import MissingDataError

BATCH_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta")


class _CIFAR10(CIFAR10):
    """torchvision's reader; with ``verify_checksums=False`` it checks only that the files exist
    (torchvision always compares md5s, which rejects re-packed or hand-made copies)."""

    def __init__(self, root: str, train: bool, download: bool = False, verify_checksums: bool = True):
        if not verify_checksums:
            self.train_list = [(name, None) for name, _ in CIFAR10.train_list]
            self.test_list = [(name, None) for name, _ in CIFAR10.test_list]
            self.meta = {**CIFAR10.meta, "md5": None}
        super().__init__(root, train=train, download=download)


class CIFAR10DataModule(InMemoryImageDataModule):
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
        num_predict: number of samples ``dbl predict`` generates, labels cycling 0..9.
        num_workers: DataLoader workers.
    """

    reference_name = "cifar10"

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = True,
        verify_checksums: bool = True,
        cache_dir: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        random_flip: bool = True,
        num_predict: int = 100,
        num_workers: int = 4,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else (
            self.root if is_writable(self.root) else default_cache_dir("cifar10"))

    def _present(self) -> bool:
        return all((self.root / CIFAR10.base_folder / name).exists() for name in BATCH_FILES)

    def _missing(self, why: str) -> MissingDataError:
        return MissingDataError(
            f"CIFAR-10 not found in {self.root / CIFAR10.base_folder} ({why}): put the python version there "
            f"({', '.join(BATCH_FILES)}; unpack cifar-10-python.tar.gz into {self.root})"
        )

    def prepare_data(self) -> None:
        if self._present():
            return
        if not self.hparams.download:
            raise self._missing("download is off")
        try:
            _CIFAR10(str(self.root), train=True, download=True, verify_checksums=self.hparams.verify_checksums)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise self._missing(f"download failed: {type(err).__name__}: {err}") from err

    def _load(self, split: str) -> None:
        if split in self._images:
            return
        if not self._present():
            raise self._missing("no files")
        try:
            ds = _CIFAR10(str(self.root), train=split == "train", verify_checksums=self.hparams.verify_checksums)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise MissingDataError(
                f"CIFAR-10 files in {self.root / CIFAR10.base_folder} do not match the official md5s; "
                f"replace them, or set verify_checksums: false for a re-packed copy"
            ) from err
        self._images[split] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW, uint8
        self._labels[split] = torch.tensor(ds.targets, dtype=torch.long)

