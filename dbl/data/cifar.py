"""What CIFAR-10 and CIFAR-100 share: torchvision's "python version" (pickles in
``<root>/<base_folder>/``), found or downloaded, read into memory as uint8, and one-line errors
for files that are missing, not the official ones, or unreadable.

torchvision's ``CIFAR100`` is its ``CIFAR10`` with other file names, URL and label key; likewise
here: a data module names its reader and files (``CIFARDataModule``), the rest is common.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from dbl.data.images import InMemoryImageDataModule
from dbl.errors import MissingDataError, UsageError


class OptionalChecksums:
    """Mixin for a torchvision CIFAR reader (``class _CIFAR10(OptionalChecksums, CIFAR10)``): with
    ``verify_checksums=False`` it checks only that the files exist (torchvision always compares
    md5s, which rejects re-packed or hand-made copies)."""

    def __init__(self, root: str, train: bool, download: bool = False, verify_checksums: bool = True):
        if not verify_checksums:  # the reader class's file lists without their md5s, on this instance only
            self.train_list = [(name, None) for name, _ in self.train_list]
            self.test_list = [(name, None) for name, _ in self.test_list]
            self.meta = {**self.meta, "md5": None}
        super().__init__(root, train=train, download=download)


class CIFARDataModule(InMemoryImageDataModule):
    """The files part of a CIFAR data module: ``prepare_data`` (present, or downloaded by
    torchvision when ``download`` is on) and ``_load`` (the ``train`` / ``test`` split as uint8
    [N, 3, 32, 32] images and long labels).

    A subclass sets, besides what ``InMemoryImageDataModule`` asks for (``root`` among them):
    ``reader`` (torchvision's class with ``OptionalChecksums``; its ``base_folder`` is the folder
    under ``root``, its ``filename`` the archive), ``files`` (the names in that folder, as the
    messages list them), ``display_name`` (``"CIFAR-10"``), ``file_kind`` (what the messages call
    one file) and ``check_file``, and saves the hyperparameters ``download`` and
    ``verify_checksums``.
    """

    reader: type
    files: tuple[str, ...]
    display_name: str
    file_kind: str
    root: Path

    @staticmethod
    def check_file(name: str, content) -> None:
        """Raise unless ``content``, the unpickled file ``name``, holds what the reader needs."""
        raise NotImplementedError

    @property
    def folder(self) -> Path:
        return self.root / self.reader.base_folder

    def _present(self) -> bool:
        return all((self.folder / name).exists() for name in self.files)

    def _missing(self, why: str) -> MissingDataError:
        return MissingDataError(
            f"{self.display_name} not found in {self.folder} ({why}): put the python version there "
            f"({', '.join(self.files)}; unpack {self.reader.filename} into {self.root})"
        )

    def prepare_data(self) -> None:
        if self._present():
            return
        if not self.hparams.download:
            raise self._missing("download is off")
        try:
            self.reader(str(self.root), train=True, download=True, verify_checksums=self.hparams.verify_checksums)
        except (OSError, RuntimeError) as err:  # URLError is an OSError; RuntimeError: md5 mismatch
            raise self._missing(f"download failed: {type(err).__name__}: {err}") from err

    def _unreadable(self, err: Exception) -> UsageError:
        """A file that is not a python pickle of this dataset (truncated, corrupt): name the first such file."""
        name = "?"
        for candidate in self.files:
            try:
                with open(self.folder / candidate, "rb") as f:
                    content = pickle.load(f, encoding="latin1")
                self.check_file(candidate, content)
            except Exception as file_err:  # whatever is wrong with it, this is the file to replace
                err, name = file_err, candidate
                break
        return UsageError(f"{self.folder / name} is not a {self.display_name} {self.file_kind} ({type(err).__name__}: "
                          f"{err}); replace it (unpack {self.reader.filename} again into {self.root})")

    def _load(self, split: str) -> None:
        if split in self._images:
            return
        if not self._present():
            raise self._missing("no files")
        try:
            ds = self.reader(str(self.root), train=split == "train", verify_checksums=self.hparams.verify_checksums)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise MissingDataError(
                f"{self.display_name} files in {self.folder} do not match the official md5s; "
                f"replace them, or set verify_checksums: false for a re-packed copy"
            ) from err
        except (pickle.UnpicklingError, EOFError, ValueError, KeyError, AttributeError, ImportError, IndexError) as err:
            raise self._unreadable(err) from None
        self._images[split] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW, uint8
        self._labels[split] = torch.tensor(ds.targets, dtype=torch.long)
