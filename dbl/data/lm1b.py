"""The One Billion Word Benchmark (LM1B, Chelba et al. 2013) as token batches for language models.

Source: the release archive ``1-billion-word-language-modeling-benchmark-r13output.tar.gz``
(downloaded into ``root`` when online and ``download`` is true; otherwise put it there), or a
Hugging Face ``datasets`` id (``hf_dataset``, splits ``train``/``test``, column ``text``).
Train = ``training-monolingual.tokenized.shuffled/news.en-*``; held-out =
``heldout-monolingual.tokenized.shuffled/news.en.heldout-*`` = test, kept for ``dbl test``. LM1B
has no validation split, so validation holds out ``val_sentences`` training sentences (a random
choice seeded with ``seed``, removed from training); generation prompts for validation come from
those sentences, for test from the held-out ones.

The release is Moses-tokenised (``don 't``, ``" fine , "``); lines are detokenised with
sacremoses before the model's tokenizer sees them, so that subword tokenizers get natural text.
Sentences become sequences of ``seq_len`` tokens either packed (concatenated with the
tokenizer's own separators and cut; every position counts) or padded (one sentence per row,
truncated; padding is masked out of the loss). Validation and test are packed as one stream whose
last, incomplete row is padded and masked, so every token of them is scored; training drops the
incomplete tail of every 1,000 sentences. The processed splits are saved under
``<root>/tokenized/<key>``, where the key hashes the source files' content (names, sizes, and
their first and last 64 KiB), the tokenizer and every processing option, so the second run starts
without tokenising again; they are written to a temporary folder, read back and checked, then
renamed into place.

Batches: ``(tokens [N, seq_len] long, loss_mask [N, seq_len] float)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from fnmatch import fnmatch
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from dbl.data.checks import check_loader_options
from dbl.data.download import atomic_path
from dbl.data.download import download as download_file
from dbl.data.loaders import evaluation_loader
from dbl.errors import MissingDataError, UsageError
from dbl.hub import from_pretrained, resolve

ARCHIVE = "1-billion-word-language-modeling-benchmark-r13output.tar.gz"
ARCHIVE_URL = f"http://www.statmt.org/lm-benchmark/{ARCHIVE}"
TOP_DIR = "1-billion-word-language-modeling-benchmark-r13output"
TRAIN_GLOB = "training-monolingual.tokenized.shuffled/news.en-*"
HELDOUT_GLOB = "heldout-monolingual.tokenized.shuffled/news.en.heldout-*"


def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer from a hub id or a local directory.

    A directory holding only a BERT ``vocab.txt`` (what ``shared/tools/offline_assets.sh`` writes
    for bert-base-uncased) loads as an uncased ``BertTokenizerFast``.
    """
    from transformers import AutoTokenizer, BertTokenizerFast

    path = Path(resolve(name_or_path, "tokenizer directory"))
    if path.is_dir() and (path / "vocab.txt").exists() and not (path / "tokenizer_config.json").exists():
        return BertTokenizerFast.from_pretrained(str(path))
    return from_pretrained(AutoTokenizer.from_pretrained, name_or_path, "tokenizer")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the token ids (vocabulary, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def detokenizer():
    """Moses-tokenised English -> natural text (sacremoses, the Python port of Moses' own detokenizer)."""
    from sacremoses import MosesDetokenizer

    moses = MosesDetokenizer(lang="en")
    return lambda line: moses.detokenize(line.split())


def ensure_archive(root: Path, download: bool, archive: Path | None = None) -> Path:
    """The release archive's extracted directory under ``root``; downloads and extracts when needed.

    ``archive``: where the tarball is (default ``<root>/<ARCHIVE>``, where a download goes).
    """
    top, marker = root / TOP_DIR, root / TOP_DIR / ".extracted"
    archive = archive or root / ARCHIVE
    if marker.exists() and (not archive.exists() or marker.read_text() == file_stamp(archive)):
        return top  # extracted from this very archive (or the archive is gone and the files stay)
    if not archive.exists():
        if archive != root / ARCHIVE:
            raise MissingDataError(f"LM1B archive {archive} does not exist; fix data.init_args.archive or leave it unset")
        if not download:
            raise MissingDataError(f"LM1B archive not found: put {ARCHIVE} into {root} (or set download: true when online)")
        download_file(ARCHIVE_URL, archive, check=_archive_members)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TOP_DIR}.", suffix=".tmp", dir=root))
    try:  # extract next to the target, then swap it in: a failure leaves no half-extracted tree
        try:
            with tarfile.open(archive) as tar:
                wanted = _archive_members(archive, tar)
                tar.extractall(staging, members=wanted, filter="data")
        except (tarfile.TarError, EOFError, OSError, ValueError) as err:
            raise UsageError(f"LM1B archive {archive} is damaged or not the release ({type(err).__name__}: {err}); "
                             f"replace it") from None
        (staging / TOP_DIR / ".extracted").write_text(file_stamp(archive))
        if top.exists():
            os.replace(top, staging / "old")
        os.replace(staging / TOP_DIR, top)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return top


def file_stamp(path: Path) -> str:
    """Size and modification time of a file: a replaced archive is extracted again."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _archive_members(path: Path, tar: tarfile.TarFile | None = None) -> list[tarfile.TarInfo]:
    """The archive's train and held-out files; reads the whole archive (a truncated one raises)."""
    if tar is None:
        try:
            with tarfile.open(path) as opened:
                return _archive_members(path, opened)
        except tarfile.TarError as err:
            raise ValueError(f"{path.name} is not a readable tar archive: {err}") from None
    wanted = [m for m in tar.getmembers() if m.isfile() and any(
        fnmatch(m.name, f"{TOP_DIR}/{pattern}") for pattern in (TRAIN_GLOB, HELDOUT_GLOB))]
    if not any(fnmatch(m.name, f"{TOP_DIR}/{TRAIN_GLOB}") for m in wanted):
        raise UsageError(f"{path} does not have the LM1B layout: no {TOP_DIR}/{TRAIN_GLOB} files")
    return wanted


def files_fingerprint(paths: list[Path], base: Path) -> str:
    """A hash of files' names (relative to ``base``), sizes and first and last 64 KiB."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        size = path.stat().st_size
        digest.update(f"\n{path.relative_to(base)}\t{size}\t".encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 16))
            f.seek(max(0, size - (1 << 16)))
            digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]


def pack(sequences: list[list[int]], seq_len: int) -> list[list[int]]:
    """Concatenate token lists and cut into rows of ``seq_len``; the incomplete tail is dropped."""
    flat = [t for seq in sequences for t in seq]
    return [flat[i : i + seq_len] for i in range(0, len(flat) - seq_len + 1, seq_len)]


def pack_all(sequences: list[list[int]], seq_len: int, pad_id: int) -> tuple[list[list[int]], list[list[float]]]:
    """As ``pack``, but the incomplete tail is kept as a last row right-padded with ``pad_id``
    (mask 0 there, 1 on every real token): every token lands in exactly one row."""
    flat = [t for seq in sequences for t in seq]
    rows = [flat[i : i + seq_len] for i in range(0, len(flat), seq_len)]
    masks = [[1.0] * len(r) + [0.0] * (seq_len - len(r)) for r in rows]
    return [r + [pad_id] * (seq_len - len(r)) for r in rows], masks


def pad(sequences: list[list[int]], seq_len: int, pad_id: int) -> tuple[list[list[int]], list[list[float]]]:
    """One sequence per row, truncated to ``seq_len`` and right-padded; mask 1 on real tokens."""
    rows, masks = [], []
    for seq in sequences:
        seq = seq[:seq_len]
        rows.append(seq + [pad_id] * (seq_len - len(seq)))
        masks.append([1.0] * len(seq) + [0.0] * (seq_len - len(seq)))
    return rows, masks


def collate(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([r["input_ids"] for r in rows]), torch.stack([r["loss_mask"] for r in rows]).float()


class LM1BDataModule(L.LightningDataModule):
    """LM1B sentences, detokenised, tokenised and packed (or padded) to ``seq_len``.

    Args:
        root: folder holding (or receiving) the release archive, its extracted files and the
            tokenised cache.
        archive: path of the release archive when it is not in ``root`` (e.g. a read-only copy).
        download: fetch the archive from statmt.org when it is not in ``root``.
        hf_dataset: read this Hugging Face ``datasets`` id instead of the archive (e.g. ``lm1b``).
        tokenizer: Hugging Face tokenizer id or local directory (default bert-base-uncased, as
            MDLM's LM1B setup; the paper used Llama-2's).
        seq_len: tokens per row (paper: 256).
        packing: pack sentences into full rows (true) or pad one sentence per row (false).
        detokenize: undo the release's Moses tokenisation before tokenising.
        batch_size: training batch size; ``eval_batch_size`` for validation/test (default the same).
        val_sentences: training sentences held out for validation (a random choice seeded with
            ``seed``, removed from training); the test split is all held-out sentences.
        seed: seed of that choice.
        max_train_sentences: use only the first N training sentences (quick runs); None: all.
        num_proc: worker processes for tokenising (``datasets.map``).
        num_workers: DataLoader workers.
        predict_file: text file of prompts, one per line, continued by ``dbl predict``.
        predict_batch_size: prompts per generation batch (prompts of equal token length share a batch).
    """

    def __init__(
        self,
        root: str = "data/lm1b",
        archive: str | None = None,
        download: bool = True,
        hf_dataset: str | None = None,
        tokenizer: str = "bert-base-uncased",
        seq_len: int = 128,
        packing: bool = True,
        detokenize: bool = True,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_sentences: int = 10000,
        seed: int = 0,
        max_train_sentences: int | None = None,
        num_proc: int | None = None,
        num_workers: int = 0,
        predict_file: str | None = None,
        predict_batch_size: int = 16,
    ):
        super().__init__()
        if seq_len < 2:
            raise UsageError(f"seq_len must be >= 2, got {seq_len}")
        check_loader_options(batch_size=batch_size, eval_batch_size=eval_batch_size, val_sentences=val_sentences,
                             max_train_sentences=max_train_sentences, predict_batch_size=predict_batch_size,
                             num_proc=num_proc, num_workers=num_workers)
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self._tokenizer = None
        self.splits: dict = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def bos_id(self) -> int | None:
        """The id a sequence starts with ([CLS] for BERT, BOS for Llama-style tokenizers)."""
        t = self.tokenizer
        return t.cls_token_id if t.cls_token_id is not None else t.bos_token_id

    # -- reading and processing --------------------------------------------------------------
    def _source(self) -> tuple[dict[str, str] | None, str]:
        """The text files to read (None for ``hf_dataset``) and a fingerprint of their content."""
        if self.hparams.hf_dataset:
            return None, f"hf:{self.hparams.hf_dataset}"
        archive = Path(self.hparams.archive).expanduser() if self.hparams.archive else None
        top = ensure_archive(self.root, self.hparams.download, archive)
        files = sorted(top.glob(TRAIN_GLOB)) + sorted(top.glob(HELDOUT_GLOB))
        return {"train": str(top / TRAIN_GLOB), "heldout": str(top / HELDOUT_GLOB)}, files_fingerprint(files, top)

    def _raw_splits(self, files: dict[str, str] | None, fingerprint: str):
        from datasets import load_dataset

        cache = str(self.root / "hf_cache")
        if files is None:
            raw = load_dataset(self.hparams.hf_dataset, cache_dir=cache)
            return raw["train"], raw["test"]
        # the configuration name carries the content fingerprint: datasets' own cache of the parsed
        # text is keyed by paths and modification times, which a re-extracted archive may repeat
        raw = load_dataset("text", name=f"lm1b-{fingerprint}", data_files=files, cache_dir=cache)
        return raw["train"], raw["heldout"]

    def _cache_key(self, source_fingerprint: str) -> str:
        hp = self.hparams
        parts = [source_fingerprint, tokenizer_fingerprint(self.tokenizer), hp.seq_len, hp.packing, hp.detokenize,
                 hp.val_sentences, hp.seed, hp.max_train_sentences, "v2"]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def _tokenize(self, dataset):
        tokenizer, detok = self.tokenizer, detokenizer() if self.hparams.detokenize else None
        sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id

        def encode(batch):
            texts = [detok(t) for t in batch["text"]] if detok else batch["text"]
            ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
            # tokenizers that add no end marker (GPT-2, Llama) get their EOS, so sentences stay delimited
            return {"input_ids": [s + [sep] if sep is not None and (not s or s[-1] != sep) else s for s in ids]}

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, num_proc=self.hparams.num_proc,
                           desc="tokenising")

    def _rows(self, dataset, every_token: bool = False):
        """Rows of ``seq_len`` tokens. ``every_token`` (evaluation): packing runs over the whole split
        at once and keeps its last, incomplete row (padded, masked), so no token goes unscored."""
        hp, pad_id = self.hparams, self.tokenizer.pad_token_id

        def to_rows(batch):
            if hp.packing and every_token:
                rows, masks = pack_all(batch["input_ids"], hp.seq_len, pad_id if pad_id is not None else 0)
                return {"input_ids": rows, "loss_mask": masks}
            if hp.packing:
                rows = pack(batch["input_ids"], hp.seq_len)
                return {"input_ids": rows, "loss_mask": [[1.0] * hp.seq_len for _ in rows]}
            if pad_id is None:
                raise UsageError(f"tokenizer {hp.tokenizer!r} has no pad token; use packing: true")
            rows, masks = pad(batch["input_ids"], hp.seq_len, pad_id)
            return {"input_ids": rows, "loss_mask": masks}

        whole = hp.packing and every_token  # one batch, one process: a single tail for the whole split
        return dataset.map(to_rows, batched=True, batch_size=None if whole else 1000, remove_columns=dataset.column_names,
                           num_proc=None if whole else self.hparams.num_proc, desc="packing" if hp.packing else "padding")

    def prepare_data(self) -> None:
        self._load_or_build()

    def _load_or_build(self) -> dict:
        from datasets import DatasetDict, load_from_disk

        files, fingerprint = self._source()
        path = self.root / "tokenized" / self._cache_key(fingerprint)
        if (path / "dataset_dict.json").exists():
            return load_from_disk(str(path))
        train, heldout = self._raw_splits(files, fingerprint)
        if self.hparams.max_train_sentences is not None:
            train = train.select(range(min(self.hparams.max_train_sentences, len(train))))
        train, val = self._hold_out(train)
        train, val, heldout = self._tokenize(train), self._tokenize(val), self._tokenize(heldout)
        splits = DatasetDict(train=self._rows(train), validation=self._rows(val, every_token=True),
                             test=self._rows(heldout, every_token=True), validation_sentences=val, heldout_sentences=heldout)
        try:
            with atomic_path(path) as tmp:  # a half-written cache never looks finished
                splits.save_to_disk(str(tmp))
                written = load_from_disk(str(tmp))
                if {k: len(v) for k, v in written.items()} != {k: len(v) for k, v in splits.items()}:
                    raise OSError(f"the tokenised cache in {tmp} read back with different sizes")
        except OSError:
            if not (path / "dataset_dict.json").exists():  # not a concurrent run that finished first
                raise
        return load_from_disk(str(path))

    def _hold_out(self, train):
        """(training, validation) sentences: ``val_sentences`` of the training sentences, chosen at
        random with ``seed`` and kept in file order, held out from training."""
        import numpy as np

        n, k = len(train), self.hparams.val_sentences
        if k >= n:
            raise UsageError(f"val_sentences {k} leaves none of the {n} training sentences for training; lower it")
        held = np.zeros(n, dtype=bool)
        held[np.random.default_rng(self.hparams.seed).choice(n, size=k, replace=False)] = True
        return train.select(np.flatnonzero(~held)), train.select(np.flatnonzero(held))

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            splits = self._load_or_build()
            for name in ("train", "validation", "test"):
                splits[name].set_format("torch")
            self.splits = splits

    # -- loaders ---------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if len(self.splits[split]) == 0:
            raise UsageError(f"the {split} split has no rows of seq_len={self.hparams.seq_len} tokens; lower seq_len")
        size = self.hparams.batch_size if split == "train" else self.hparams.eval_batch_size or self.hparams.batch_size
        if split != "train":
            return evaluation_loader(self, self.splits[split], batch_size=size, collate_fn=collate,
                                     num_workers=self.hparams.num_workers)
        return StatefulDataLoader(self.splits[split], batch_size=size, shuffle=shuffle, drop_last=shuffle, collate_fn=collate,
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # -- prompts for generation ------------------------------------------------------------
    def generation_examples(self, num_prompts: int, prompt_length: int, continuation_length: int,
                            split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts [P, prompt_length] and the human continuations [P, continuation_length] that follow them.

        Taken in order from the tokenised sentences of ``split``: ``test`` the held-out sentences,
        ``validation`` the training sentences held out for validation. Each example starts at the
        start of a sentence and runs on across sentence ends (as packed training rows do); the next
        example starts at the next sentence. Deterministic, so every model is scored on the same prompts.
        """
        check_generation_split(split)
        self.setup("test")
        source = "heldout_sentences" if split == "test" else "validation_sentences"
        return chained_examples(self.splits[source]["input_ids"], num_prompts, prompt_length, continuation_length,
                                f"the {split} sentences")

    def encode_prompt(self, text: str) -> list[int]:
        """A user prompt as ids starting with the BOS/[CLS] token and without an end marker."""
        ids = self.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=True)

    def predict_dataloader(self) -> DataLoader:
        """Prompts from ``predict_file``; each batch is ``(prompts [n, p], line indices [n])`` of one length."""
        return prompt_loader(self)


# -- generation prompts, shared with dbl.data.TextDataModule ------------------------------------
def check_generation_split(split: str) -> None:
    if split not in ("validation", "test"):
        raise UsageError(f"generation prompts come from 'validation' or 'test', not {split!r}")


def chained_examples(documents, num_prompts: int, prompt_length: int, continuation_length: int,
                     what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts [P, prompt_length], continuations [P, continuation_length]) from ``documents``, token id
    sequences in order (lists, arrays or tensors): each example starts at the start of a document and
    runs on across document ends; the next example starts at the document after the one it ended in.
    ``what`` names the documents in the error when they give fewer than ``num_prompts`` examples."""
    need = prompt_length + continuation_length
    examples, current = [], []
    for ids in documents:
        ids = ids[: need - len(current)]  # a long document is read no further than the example needs
        current += ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if len(current) == need:
            examples.append(current)
            current = []
            if len(examples) == num_prompts:
                break
    if len(examples) < num_prompts:
        raise UsageError(f"{what} give only {len(examples)} examples of {need} tokens; lower num_prompts or the lengths")
    rows = torch.tensor(examples, dtype=torch.long)
    return rows[:, :prompt_length], rows[:, prompt_length:]


def prompt_loader(datamodule) -> DataLoader:
    """The prompts of ``datamodule.hparams.predict_file`` (one per non-blank line, ``encode_prompt``-ed;
    the lines kept as ``datamodule.predict_lines``), batched by token length, at most
    ``predict_batch_size`` per batch: each batch is ``(prompts [n, p], line indices [n])``."""
    hp = datamodule.hparams
    if not hp.predict_file:
        raise UsageError("dbl predict needs data.init_args.predict_file: a text file with one prompt per line")
    path = Path(hp.predict_file).expanduser()
    if not path.exists():
        raise MissingDataError(f"predict_file {path} does not exist; write one prompt per line into it")
    lines = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    datamodule.predict_lines = lines
    if not lines:
        raise UsageError(f"predict_file {path} has no prompts; write one prompt per line")
    encoded = [datamodule.encode_prompt(line) for line in lines]
    if any(len(e) == 0 for e in encoded):
        raise UsageError(f"a prompt in {path} encodes to no tokens and the tokenizer has no BOS; give non-empty prompts")
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_length.setdefault(len(e), []).append(i)
    batches = []
    for length in sorted(by_length):
        idx = by_length[length]
        for start in range(0, len(idx), hp.predict_batch_size):
            chunk = idx[start : start + hp.predict_batch_size]
            batches.append((torch.tensor([encoded[i] for i in chunk]), torch.tensor(chunk)))
    return DataLoader(batches, batch_size=None)
