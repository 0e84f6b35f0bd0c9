"""text8 (Mahoney): 100M characters of Wikipedia over 27 symbols, as fixed-length chunks of ids.

Vocabulary: ``a``..``z`` are ids 0..25, space is 26; the masked-diffusion model adds the mask
token as id 27. Splits are contiguous character ranges: the first ``train_chars`` characters,
the next ``val_chars``, the next ``test_chars`` (the standard 90M/5M/5M by default).

Which characters count in BPC: evaluation cuts a split into consecutive chunks of ``seq_len``
characters, the last chunk holding the remainder (shorter, alone in its batch), so every character
of the split is scored exactly once, as part of one chunk, with no BOS/EOS or padding and no
context across chunk boundaries. BPC is total negative ELBO (nats) over total characters, / ln 2.
"""

from __future__ import annotations

import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

from dbl.data.checks import check_loader_options
from dbl.data.download import download
from dbl.data.loaders import evaluation_loader
from dbl.errors import UsageError

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
ALPHABET = "abcdefghijklmnopqrstuvwxyz "
_LOOKUP = np.full(256, 255, dtype=np.uint8)
_LOOKUP[np.frombuffer(ALPHABET.encode(), dtype=np.uint8)] = np.arange(len(ALPHABET), dtype=np.uint8)


def encode(text: str | bytes) -> np.ndarray:
    """Characters -> uint8 ids; anything outside ``[a-z ]`` is an error."""
    raw = np.frombuffer(text.encode() if isinstance(text, str) else text, dtype=np.uint8)
    ids = _LOOKUP[raw]
    if (ids == 255).any():
        bad = sorted(set(bytes(raw[ids == 255][:20]).decode(errors="replace")))
        raise UsageError(f"text holds characters outside text8's alphabet [a-z ]: {bad}")
    return ids


def decode(ids) -> str:
    """Ids -> string; the mask id (27) prints as ``_``."""
    return "".join(ALPHABET[i] if i < len(ALPHABET) else "_" for i in torch.as_tensor(ids).tolist())


def text8_path(root: str | Path) -> Path:
    return Path(root) / "text8.zip"


def missing_file_message(root: str | Path) -> str:
    return f"{text8_path(root)} not found; put text8.zip ({TEXT8_URL}) there, or allow data download"


def check_text8_zip(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is a zip whose member ``text8`` is intact (CRC checked)."""
    try:
        with zipfile.ZipFile(path) as zf:
            _text8_member(zf, path)
            bad = zf.testzip()
    except (zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"not a valid zip: {err}") from None
    if bad is not None:
        raise ValueError(f"member {bad!r} fails its CRC check")


def download_text8(root: str | Path) -> None:
    """Fetch text8.zip from the canonical URL into ``root``, atomically and checked (a zip with an
    intact member ``text8``): a partial or corrupt file never remains."""
    download(TEXT8_URL, text8_path(root), check=check_text8_zip)


def _text8_member(zf: zipfile.ZipFile, path: Path) -> zipfile.ZipInfo:
    if "text8" not in zf.namelist():
        raise UsageError(f"{path} has no member named 'text8' (members: {zf.namelist()[:5]}); is it text8.zip?")
    return zf.getinfo("text8")


@contextmanager
def _reading(path: Path):
    """A damaged zip or a text outside the alphabet: one line naming the file and the fix."""
    try:
        yield
    except (zipfile.BadZipFile, EOFError, zlib.error, UsageError) as err:
        raise UsageError(f"{path} cannot be read as text8 ({err}); replace it with text8.zip from {TEXT8_URL}, "
                         f"or set data root to a folder holding it") from None


def text8_length(root: str | Path) -> int:
    """Characters in the member ``text8`` of ``<root>/text8.zip``, read from the zip directory (no unpacking)."""
    with _reading(text8_path(root)), zipfile.ZipFile(text8_path(root)) as zf:
        return _text8_member(zf, text8_path(root)).file_size


def load_text8(root: str | Path) -> np.ndarray:
    """The member ``text8`` of ``<root>/text8.zip`` as uint8 ids."""
    with _reading(text8_path(root)), zipfile.ZipFile(text8_path(root)) as zf:
        return encode(zf.read(_text8_member(zf, text8_path(root))))


class Windows(Dataset):
    """Every window of ``seq_len`` ids, indexed by its start offset. Random crops are these windows
    drawn by a random sampler: the offsets then come from the sampler's generator, whose state the
    ``StatefulDataLoader`` checkpoints, so a resumed run crops exactly where the whole run would
    have (with loader workers too, whose own random streams are not checkpointed)."""

    def __init__(self, ids: torch.Tensor, seq_len: int):
        self.ids, self.seq_len = ids, seq_len

    def __len__(self) -> int:
        return len(self.ids) - self.seq_len + 1

    def __getitem__(self, start: int) -> tuple[torch.Tensor]:
        return (self.ids[start : start + self.seq_len].long(),)


class Chunks(Dataset):
    """Consecutive chunks of ``seq_len`` ids covering ``ids`` exactly once; the last may be shorter."""

    def __init__(self, ids: torch.Tensor, seq_len: int):
        self.ids, self.seq_len = ids, seq_len

    def __len__(self) -> int:
        return -(-len(self.ids) // self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        return (self.ids[index * self.seq_len : (index + 1) * self.seq_len].long(),)


def chunk_batches(num_chunks: int, has_short_last: bool, batch_size: int) -> list[list[int]]:
    """Batches of chunk indices in order; a short last chunk goes alone in the last batch."""
    full = num_chunks - 1 if has_short_last else num_chunks
    batches = [list(range(i, min(i + batch_size, full))) for i in range(0, full, batch_size)]
    return batches + ([[full]] if has_short_last else [])


class ChunkBatches(Dataset):
    """Batches of chunks as items (``chunk_batches``), ``(ids [n, seq_len],)``, so that a short last
    chunk can be a batch of its own."""

    def __init__(self, chunks: Chunks, batch_size: int):
        self.chunks = chunks
        self.batches = chunk_batches(len(chunks), len(chunks.ids) % chunks.seq_len != 0, batch_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        return (torch.stack([self.chunks[i][0] for i in self.batches[index]]),)


class Text8DataModule(L.LightningDataModule):
    """text8 as ``(ids [N, seq_len],)`` batches of character ids in [0, 27).

    Args:
        root: folder holding ``text8.zip``; when it is missing and ``download`` is on,
            ``prepare_data`` fetches it there from the canonical URL (``TEXT8_URL``).
        download: allow the download; off, a missing file is a one-line configuration error that
            says where to put it.
        train_chars, val_chars, test_chars: split sizes in characters, consecutive from the start of
            the file (standard: 90M/5M/5M; the 20M-character stand-in: 18M/1M/1M).
        seq_len: characters per sequence (256 in MD4/MDLM and the paper).
        batch_size: training sequences per batch; ``eval_batch_size`` for validation and test.
        random_crops: training sequences start at random offsets (``train_items`` per epoch,
            default train_chars // seq_len); off, the train split is cut into fixed chunks, shuffled.
        num_predict, predict_batch_size: how many samples ``dbl predict`` draws, and per batch.
        num_workers: DataLoader workers (the data sits in memory; 0 is usually fine).
    """

    vocab_size = len(ALPHABET)

    def __init__(
        self,
        root: str = "data/text8",
        download: bool = True,
        train_chars: int = 90_000_000,
        val_chars: int = 5_000_000,
        test_chars: int = 5_000_000,
        seq_len: int = 256,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        random_crops: bool = True,
        train_items: int | None = None,
        num_predict: int = 16,
        predict_batch_size: int = 16,
        num_workers: int = 0,
    ):
        super().__init__()
        if min(train_chars, val_chars, test_chars) < 0 or seq_len < 1:
            raise UsageError(f"split sizes must be >= 0 and seq_len >= 1, got {train_chars}/{val_chars}/{test_chars}, {seq_len}")
        if train_chars < seq_len:
            raise UsageError(f"train_chars {train_chars} is shorter than one sequence (seq_len {seq_len})")
        check_loader_options(batch_size=batch_size, eval_batch_size=eval_batch_size, train_items=train_items,
                             num_predict=num_predict, predict_batch_size=predict_batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.splits: dict[str, torch.Tensor] = {}
        if text8_path(root).exists():
            self._check_split_sizes(text8_length(root))
        elif not download:
            raise UsageError(missing_file_message(root))

    def _check_split_sizes(self, total: int) -> None:
        hp = self.hparams
        need = hp.train_chars + hp.val_chars + hp.test_chars
        if need > total:
            raise UsageError(
                f"split sizes {hp.train_chars:,}/{hp.val_chars:,}/{hp.test_chars:,} need {need:,} characters but "
                f"{text8_path(hp.root)} has {total:,}; set data train_chars/val_chars/test_chars "
                f"(e.g. 90/5/5 of it: {total * 9 // 10}/{total // 20}/{total // 20})"
            )

    def prepare_data(self) -> None:
        if not text8_path(self.hparams.root).exists():
            download_text8(self.hparams.root)

    decode = staticmethod(decode)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        if not text8_path(hp.root).exists():
            raise FileNotFoundError(missing_file_message(hp.root))
        ids = load_text8(hp.root)
        self._check_split_sizes(len(ids))
        ids = torch.from_numpy(ids)
        edges = np.cumsum([0, hp.train_chars, hp.val_chars, hp.test_chars]).tolist()
        self.splits = {name: ids[a:b] for name, a, b in zip(("train", "val", "test"), edges[:-1], edges[1:])}

    def train_dataloader(self) -> DataLoader:
        hp, ids = self.hparams, self.splits["train"]
        if hp.random_crops:  # uniformly random offsets, train_items per epoch
            data = Windows(ids, hp.seq_len)
            sampler = RandomSampler(data, replacement=True, num_samples=hp.train_items or len(ids) // hp.seq_len)
        else:
            data = Chunks(ids[: len(ids) // hp.seq_len * hp.seq_len], hp.seq_len)
            sampler = RandomSampler(data)
        return StatefulDataLoader(data, batch_size=hp.batch_size, sampler=sampler, drop_last=True,
                                  num_workers=hp.num_workers)

    def _eval_loader(self, split: str) -> DataLoader:
        hp, ids = self.hparams, self.splits[split]
        if len(ids) == 0:
            raise UsageError(f"the {split} split is empty; set data {split}_chars > 0")
        batches = ChunkBatches(Chunks(ids, hp.seq_len), hp.eval_batch_size or hp.batch_size)
        return evaluation_loader(self, batches, batch_size=None, num_workers=hp.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(self.hparams.num_predict), batch_size=self.hparams.predict_batch_size)
