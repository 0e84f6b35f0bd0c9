"""CIFAR-10 (50,000 train / 10,000 test, 32x32 RGB, 10 classes): the paper's pixel-space DiT run."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torchvision.datasets import CIFAR10

from dbl.data.checks import check_loader_options
from dbl.data.images import InMemoryImageDataModule, check_val_fraction, default_cache_dir, is_writable
from dbl.errors import MissingDataError, UsageError

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
        val_fraction: share of the official training images held out for validation (a seeded
            split; default 2%: 1,000 of CIFAR-10's 50,000); the test split is kept for ``dbl test``.
        seed: seed of that split.
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

    def _unreadable(self, err: Exception) -> UsageError:
        """A file that is not a CIFAR-10 python batch (truncated, corrupt): name the first such file."""
        folder = self.root / CIFAR10.base_folder
        for name in BATCH_FILES:
            try:
                with open(folder / name, "rb") as f:
                    batch = pickle.load(f, encoding="latin1")
                if name != "batches.meta" and ("data" not in batch or len(batch["data"]) != len(batch["labels"])):
                    raise ValueError("no data and labels of equal length")
            except Exception as file_err:  # whatever is wrong with it, this is the file to replace
                err = file_err
                break
        else:
            name = "?"
        return UsageError(f"{folder / name} is not a CIFAR-10 python batch ({type(err).__name__}: {err}); replace it "
                          f"(unpack cifar-10-python.tar.gz again into {self.root})")

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
        except (pickle.UnpicklingError, EOFError, ValueError, KeyError, AttributeError, ImportError, IndexError) as err:
            raise self._unreadable(err) from None
        self._images[split] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW, uint8
        self._labels[split] = torch.tensor(ds.targets, dtype=torch.long)

