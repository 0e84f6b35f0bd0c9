"""Your own text as token batches for language models: a folder of ``.txt`` files, a JSONL file, or a
Hugging Face ``datasets`` dataset, tokenised with the model's tokenizer and packed into rows.

Documents: every ``.txt`` file of a folder (recursively, sorted by relative path; hidden files and
folders, whose names start with ``.``, are skipped), every line of a ``.jsonl`` file (its
``text_field``), or every row of a dataset (its ``text_field``). Documents that are empty or only
whitespace are dropped. Each document becomes ``[BOS] ids [EOS]`` (BOS only when the tokenizer has
one that differs from EOS; a tokenizer with no EOS separates documents with its SEP token), and the
documents of a split are concatenated and cut into rows of ``seq_len`` tokens; the last,
incomplete row is dropped, so every row is full and its loss mask is all ones.

Validation holds out whole documents (``val_documents``, or ``val_fraction`` of them), chosen by a
permutation seeded with ``seed``; validation and training never share a document. The test stage
scores the validation split, or all documents of ``test_source`` when one is given.

The packed rows are saved as ``.npy`` arrays under ``<cache_dir>/<key>``, where the key hashes the
bytes of the source files (for a dataset: its ``datasets`` fingerprint), the tokenizer (class,
vocabulary, normaliser and special tokens) and every option that changes the rows, so a second run
reads them back without tokenising, and a changed file gives a new key. A cache is written to a
temporary folder, read back and checked, then renamed into place.

Batches: ``(tokens [N, seq_len] long, loss_mask [N, seq_len] float)``, as ``LM1BDataModule``'s.

Generation (``dbl.callbacks.LMGenerationMetrics``, ``dbl predict``), as ``LM1BDataModule``'s:
``generation_examples`` takes prompts and their human continuations from the validation documents
(or the test documents), each example starting at a document's first token (its BOS, when the
documents have one) and running on across document ends as the packed rows do, the next starting at
the next document; for that the cache also keeps each evaluation split's document lengths and the
tokens of its dropped last row. ``predict_file`` holds prompts, one per line, for ``dbl predict``;
``encode_prompt`` starts them with the documents' BOS.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from dbl.data.checks import check_loader_options
from dbl.data.download import atomic_path
from dbl.data.lm1b import (
    chained_examples,
    check_generation_split,
    load_tokenizer,
    prompt_loader,
    tokenizer_fingerprint,
)
from dbl.data.loaders import evaluation_loader
from dbl.errors import MissingDataError, UsageError
from dbl.hub import from_pretrained, looks_like_a_path

CACHE_VERSION = "text-v2"  # v2: the evaluation splits' document lengths and tails
SOURCE_KINDS = "a folder of .txt files, a .jsonl file, or a Hugging Face datasets id or local dataset directory"


# -- reading documents -------------------------------------------------------------------------
def text_files(folder: Path) -> list[Path]:
    """The ``.txt`` files under ``folder``, recursively, sorted by relative path; hidden ones skipped."""
    files = [p for p in folder.rglob("*") if p.suffix.lower() == ".txt" and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def decode_utf8(data: bytes, path: Path) -> str:
    """``data`` as text; a byte sequence that is not UTF-8 is a one-line error naming file and offset."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not valid UTF-8 (byte offset {err.start}: {data[err.start:err.start + 4]!r}); "
                         f"convert it to UTF-8 (e.g. iconv -t utf-8)") from None
    return text.removeprefix("\ufeff")  # a byte-order mark is no part of the text


def read_jsonl(path: Path, text_field: str) -> list[str]:
    """The ``text_field`` of every line of a JSONL file (blank lines skipped); one-line errors name the line."""
    texts = []
    for number, line in enumerate(decode_utf8(path.read_bytes(), path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} line {number} is not JSON ({err.msg}); write one JSON object per line") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise UsageError(f"{path} line {number} has no field {text_field!r} (has {keys}); "
                             f"set data.init_args.text_field to the field holding the text")
        texts.append(_text_value(record[text_field], f"{path} line {number}", text_field))
    return texts


def _text_value(value, where: str, text_field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UsageError(f"{where}: field {text_field!r} holds a {type(value).__name__}, not text; "
                         f"set data.init_args.text_field to a text field")
    return value


def hash_files(paths: list[Path], base: Path) -> str:
    """A hash of the files' names (relative to ``base``) and every byte of them."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"\n{path.relative_to(base).as_posix()}\t{path.stat().st_size}\t".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (folder / "dataset_dict.json").exists() or ((folder / "state.json").exists()
                                                       and (folder / "dataset_info.json").exists())


class Source:
    """What ``source`` names, decided by what it is; ``fingerprint()`` hashes its content and
    ``documents()`` reads its texts (a ``datasets.Dataset`` with one column ``text``).

    ``split``: the split of a dataset; ``hf_cache``: ``datasets``' cache folder for ``load_dataset``.
    """

    def __init__(self, source: str, text_field: str, split: str, hf_cache: Path, option: str = "source"):
        self.name, self.text_field, self.split, self.hf_cache, self.option = str(source), text_field, split, hf_cache, option
        path = Path(source).expanduser()
        self._dataset = None
        files = text_files(path) if path.is_dir() and not is_saved_dataset(path) else []
        if files:
            self.kind, self.path, self.files = "folder", path, files
        elif path.is_dir() and not is_saved_dataset(path) and not self._dataset_folder(path):
            raise UsageError(f"{option} folder {path} has no .txt files; put one .txt file per document in it "
                             f"(subfolders are read too), or give {SOURCE_KINDS}")
        elif path.is_file() and path.suffix.lower() == ".jsonl":
            self.kind, self.path, self.files = "jsonl", path, [path]
        elif path.is_file():
            raise UsageError(f"{option} {path} is a file but not .jsonl; give {SOURCE_KINDS} "
                             f"(for one .txt file: put it in a folder, one file per document)")
        elif path.exists():
            self.kind, self.path, self.files = "dataset", path, []
        elif looks_like_a_path(str(source)) or path.suffix.lower() in (".jsonl", ".txt", ".json"):
            raise MissingDataError(f"{option} {path} does not exist; fix data.init_args.{option} ({SOURCE_KINDS})")
        else:
            self.kind, self.path, self.files = "dataset", None, []

    @staticmethod
    def _dataset_folder(folder: Path) -> bool:
        """A folder without ``.txt`` files that ``datasets.load_dataset`` could read: data files or a script."""
        readable = {".parquet", ".arrow", ".csv", ".tsv", ".json", ".jsonl", ".py"}
        return any(p.suffix.lower() in readable for p in folder.rglob("*") if p.is_file())

    def fingerprint(self) -> str:
        if self.kind == "dataset":
            return f"dataset:{self.dataset()._fingerprint}"
        return f"{self.kind}:{hash_files(self.files, self.path if self.kind == 'folder' else self.path.parent)}"

    def dataset(self):
        """The dataset split (kind ``dataset``), loaded once."""
        if self._dataset is None:
            self._dataset = self._load_dataset()
            if self.text_field not in self._dataset.column_names:
                raise UsageError(f"{self.option} {self.name} has no column {self.text_field!r} (has "
                                 f"{self._dataset.column_names}); set data.init_args.text_field")
        return self._dataset

    def _load_dataset(self):
        from datasets import DatasetDict, load_dataset, load_from_disk

        try:
            if self.path is not None and is_saved_dataset(self.path):
                data = load_from_disk(str(self.path))
            else:
                data = load_dataset(str(self.path or self.name), split=self.split, cache_dir=str(self.hf_cache))
        except (OSError, ValueError, ConnectionError) as err:  # FileNotFoundError, DatasetNotFoundError, a bad split
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UsageError(f"cannot load {self.option} {self.name!r} as a dataset ({first}); give {SOURCE_KINDS}") from None
        if isinstance(data, DatasetDict):
            if self.split not in data:
                raise UsageError(f"{self.option} {self.name} has no split {self.split!r} (has {sorted(data)}); "
                                 f"set data.init_args.split")
            data = data[self.split]
        return data

    def documents(self):
        """The non-empty documents as a ``datasets.Dataset`` with the column ``text``."""
        from datasets import Dataset

        if self.kind == "folder":
            texts = [decode_utf8(p.read_bytes(), p) for p in self.files]
        elif self.kind == "jsonl":
            texts = read_jsonl(self.path, self.text_field)
        else:
            field, name = self.text_field, self.name
            data = self.dataset().select_columns([field])

            def keep(batch):
                return [bool(_text_value(t, f"{self.option} {name}", field).strip()) for t in batch]

            data = data.filter(keep, input_columns=field, batched=True, keep_in_memory=True, desc="dropping empty documents")
            if len(data) == 0:
                raise UsageError(f"every document of {self.option} {name} is empty (column {field!r}); give text")
            return data.rename_column(field, "text") if field != "text" else data
        total = len(texts)
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise UsageError(f"all {total} documents of {self.option} {self.path} are empty; give files with text")
        return Dataset.from_dict({"text": texts})


# -- the packed rows ---------------------------------------------------------------------------
class PackedRows(Dataset):
    """The rows of an ``[N, seq_len]`` int32 ``.npy`` file, memory-mapped (opened lazily in each
    loader worker, so a worker does not receive a copy of the array)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._rows = None

    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = np.load(self.path, mmap_mode="r")
        return self._rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.rows[index].astype(np.int64))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": None}


def collate(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.stack(rows)
    return tokens, torch.ones(tokens.shape, dtype=torch.float32)


def pack_rows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Consecutive rows of ``seq_len`` tokens; the incomplete tail is dropped."""
    n = len(ids) // seq_len
    return np.ascontiguousarray(ids[: n * seq_len].reshape(n, seq_len))


class TextDataModule(L.LightningDataModule):
    """A language model's training data from your own text (see the module's docstring for the format).

    Args:
        source: where the documents are, decided by what it is:
            a folder: every ``.txt`` file under it (recursively, sorted by path, hidden ones skipped)
            is one document;
            a ``.jsonl`` file: every line is a JSON object, its ``text_field`` one document;
            a folder written by ``save_to_disk``, any other local folder ``datasets.load_dataset``
            reads (parquet, csv, json files) or a Hugging Face ``datasets`` id: every row's
            ``text_field`` (of ``split``) is one document.
            A folder holding ``.txt`` files is read as text files even if it holds other files.
        tokenizer: the model's tokenizer, a local directory or hub id (``AutoTokenizer.from_pretrained``).
        tokenizer_gguf_file: load the tokenizer from this GGUF file of ``tokenizer`` (``gguf_file=``).
        text_field: the JSON field or dataset column holding the text.
        split: the dataset split to read (datasets only; a ``save_to_disk`` folder of one split needs none).
        test_source, test_split: documents for ``dbl test`` (same kinds as ``source``); default:
            the test stage scores the validation split.
        seq_len: tokens per row.
        val_fraction: share of the documents held out for validation (rounded, at least one).
        val_documents: hold out this many documents instead (overrides ``val_fraction``).
        seed: seed of the permutation choosing the validation documents, and of the training shuffle.
        batch_size: training rows per batch; ``eval_batch_size`` for validation and test (default the same).
        cache_dir: where the packed rows are kept, one folder per cache key (default
            ``runs/data/text`` under the working directory: git ignores it, and it works for
            read-only sources and hub ids alike; ``load_dataset``'s own cache goes to
            ``<cache_dir>/hf_datasets``). Old keys are not deleted.
        num_proc: worker processes for tokenising (``datasets.map``).
        num_workers: DataLoader workers.
        predict_file: text file of prompts, one per line, continued by ``dbl predict`` (each starts
            with the documents' BOS, as ``encode_prompt`` makes it).
        predict_batch_size: prompts per generation batch (prompts of equal token length share a batch).
    """

    def __init__(
        self,
        source: str,
        tokenizer: str,
        tokenizer_gguf_file: str | None = None,
        text_field: str = "text",
        split: str = "train",
        test_source: str | None = None,
        test_split: str = "test",
        seq_len: int = 256,
        val_fraction: float = 0.05,
        val_documents: int | None = None,
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        cache_dir: str = "runs/data/text",
        num_proc: int | None = None,
        num_workers: int = 0,
        predict_file: str | None = None,
        predict_batch_size: int = 16,
    ):
        super().__init__()
        if seq_len < 2:
            raise UsageError(f"data seq_len must be >= 2, got {seq_len}")
        if val_documents is None and not 0 < val_fraction < 1:
            raise UsageError(f"data val_fraction must be in (0, 1), got {val_fraction}; or set val_documents")
        check_loader_options(batch_size=batch_size, eval_batch_size=eval_batch_size, val_documents=val_documents,
                             num_proc=num_proc, num_workers=num_workers, predict_batch_size=predict_batch_size)
        self.save_hyperparameters()
        self.cache_dir = Path(cache_dir).expanduser()
        self._tokenizer = None
        self.cache_path: Path | None = None
        self.splits: dict[str, PackedRows] = {}
        self.documents: dict[str, np.ndarray] = {}
        self.lengths: dict[str, np.ndarray] = {}  # evaluation split -> its documents' token counts, in order
        self.tails: dict[str, np.ndarray] = {}  # evaluation split -> the tokens after its last full row
        self.predict_lines: list[str] = []

    # -- the tokenizer ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            name, gguf = self.hparams.tokenizer, self.hparams.tokenizer_gguf_file
            if gguf:
                from transformers import AutoTokenizer

                self._tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer", gguf_file=gguf)
            else:
                self._tokenizer = load_tokenizer(name)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def separators(self) -> tuple[int | None, int]:
        """(BOS or None, EOS): the ids put before and after every document."""
        t = self.tokenizer
        eos = t.eos_token_id if t.eos_token_id is not None else t.sep_token_id
        if eos is None:
            raise UsageError(f"tokenizer {self.hparams.tokenizer!r} has no EOS (or SEP) token to end documents with; "
                             f"use a tokenizer that has one")
        bos = t.bos_token_id if t.bos_token_id is not None else t.cls_token_id
        return (bos if bos != eos else None), eos

    @property
    def bos_id(self) -> int | None:
        """The id every document (and every prompt) starts with; None when the documents have no BOS."""
        return self.separators()[0]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=True)

    # -- building and caching -------------------------------------------------------------------
    def _sources(self) -> tuple[Source, Source | None]:
        hp, hf_cache = self.hparams, self.cache_dir / "hf_datasets"
        main = Source(hp.source, hp.text_field, hp.split, hf_cache)
        test = Source(hp.test_source, hp.text_field, hp.test_split, hf_cache, "test_source") if hp.test_source else None
        return main, test

    def _cache_key(self, main: Source, test: Source | None) -> str:
        hp, t = self.hparams, self.tokenizer
        parts = [CACHE_VERSION, main.fingerprint(), test.fingerprint() if test else None, hp.text_field,
                 hp.split if main.kind == "dataset" else None, hp.test_split if test and test.kind == "dataset" else None,
                 type(t).__name__, tokenizer_fingerprint(t), self.separators(), hp.seq_len,
                 None if hp.val_documents is not None else hp.val_fraction, hp.val_documents, hp.seed]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]

    def _encode(self, documents) -> list[np.ndarray]:
        """Every document as ``[BOS] ids [EOS]`` (int32)."""
        tokenizer = self.tokenizer
        bos, eos = self.separators()
        head = [bos] if bos is not None else []

        def encode(batch):
            ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            return {"input_ids": [head + s + [eos] for s in ids]}

        encoded = documents.map(encode, batched=True, remove_columns=documents.column_names, keep_in_memory=True,
                                num_proc=self.hparams.num_proc, desc="tokenising")
        import pyarrow.compute as pc

        column = encoded.data.column("input_ids")
        values = pc.list_flatten(column).to_numpy().astype(np.int32)
        ends = np.cumsum(pc.list_value_length(column).to_numpy())
        return np.split(values, ends[:-1])

    def _split_documents(self, n: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) document indices, each in document order: a permutation seeded with ``seed``
        holds out ``val_documents`` (or ``val_fraction`` of ``n``, rounded, at least one)."""
        hp = self.hparams
        k = hp.val_documents if hp.val_documents is not None else max(1, round(hp.val_fraction * n))
        if k >= n:
            option = f"val_documents={hp.val_documents}" if hp.val_documents is not None else f"val_fraction={hp.val_fraction}"
            raise UsageError(f"{option} holds out {k} of the {n} documents of {name}, leaving none for training; "
                             f"lower it or add documents")
        order = np.random.default_rng(hp.seed).permutation(n)
        return np.sort(order[k:]), np.sort(order[:k])

    def _rows(self, encoded: list[np.ndarray], split: str, name: str) -> dict[str, np.ndarray]:
        """``{split: rows}``; for an evaluation split also ``<split>_lengths`` (its documents' token
        counts) and ``<split>_tail`` (the tokens of the dropped last row), which give back its
        documents for ``generation_examples``."""
        seq_len = self.hparams.seq_len
        ids = np.concatenate(encoded) if encoded else np.zeros(0, np.int32)
        if len(ids) < seq_len:
            more = "hold out more documents (val_fraction, val_documents), " if split == "validation" else ""
            raise UsageError(f"the {split} split of {name} has {len(ids)} tokens, fewer than one row of "
                             f"seq_len={seq_len}; {more}lower seq_len or add text")
        rows = pack_rows(ids, seq_len)
        if split == "train":
            return {split: rows}
        return {split: rows, f"{split}_lengths": np.array([len(e) for e in encoded], dtype=np.int64),
                f"{split}_tail": np.ascontiguousarray(ids[rows.size:])}

    def _build(self, main: Source, test: Source | None) -> dict[str, np.ndarray]:
        encoded = self._encode(main.documents())
        train_docs, val_docs = self._split_documents(len(encoded), main.name)
        arrays = {**self._rows([encoded[i] for i in train_docs], "train", main.name),
                  **self._rows([encoded[i] for i in val_docs], "validation", main.name),
                  "train_documents": train_docs, "validation_documents": val_docs}
        if test is not None:
            arrays.update(self._rows(self._encode(test.documents()), "test", test.name))
        return arrays

    def _load_or_build(self) -> Path:
        """The cache folder of these options and this content, built when missing."""
        if self.cache_path is not None and (self.cache_path / "meta.json").exists():
            return self.cache_path
        sources = self._sources()
        path = self.cache_dir / self._cache_key(*sources)
        if not (path / "meta.json").exists():
            arrays = self._build(*sources)
            meta = {"source": self.hparams.source, "test_source": self.hparams.test_source, "tokenizer": self.hparams.tokenizer,
                    "seq_len": self.hparams.seq_len, "rows": {k: len(v) for k, v in arrays.items()}}
            try:
                with atomic_path(path) as tmp:  # a half-written cache never looks finished
                    tmp.mkdir()
                    for name, array in arrays.items():
                        np.save(tmp / f"{name}.npy", array)
                        if not np.array_equal(np.load(tmp / f"{name}.npy", mmap_mode="r"), array):
                            raise OSError(f"the cached {name} rows in {tmp} read back different")
                    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            except OSError:
                if not (path / "meta.json").exists():  # not a concurrent run that finished first
                    raise
        self.cache_path = path
        return path

    # -- Lightning hooks --------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self._load_or_build()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        path = self._load_or_build()
        self.splits = {name: PackedRows(path / f"{name}.npy") for name in ("train", "validation", "test")
                       if (path / f"{name}.npy").exists()}
        self.splits.setdefault("test", self.splits["validation"])
        self.documents = {name: np.load(path / f"{name}_documents.npy") for name in ("train", "validation")}
        stored = [name for name in ("validation", "test") if (path / f"{name}_lengths.npy").exists()]
        self.lengths = {name: np.load(path / f"{name}_lengths.npy") for name in stored}
        self.tails = {name: np.load(path / f"{name}_tail.npy") for name in stored}
        for name in ("lengths", "tails"):
            getattr(self, name).setdefault("test", getattr(self, name)["validation"])

    def train_dataloader(self) -> DataLoader:
        hp, data = self.hparams, self.splits["train"]
        if len(data) < hp.batch_size:
            raise UsageError(f"the train split has {len(data)} rows of seq_len={hp.seq_len} tokens, fewer than "
                             f"batch_size={hp.batch_size}; lower batch_size or seq_len, or add text")
        return StatefulDataLoader(data, batch_size=hp.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                                  generator=torch.Generator().manual_seed(hp.seed), num_workers=hp.num_workers)

    def _eval_loader(self, split: str) -> DataLoader:
        hp = self.hparams
        return evaluation_loader(self, self.splits[split], batch_size=hp.eval_batch_size or hp.batch_size,
                                 collate_fn=collate, num_workers=hp.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # -- generation -------------------------------------------------------------------------------
    def evaluation_documents(self, split: str):
        """The documents of an evaluation split (``validation``, or ``test``: ``test_source``'s, else
        validation's), in order, each as its tokens ``[BOS] ids [EOS]`` (an int32 array, read lazily
        from the memory-mapped rows, and from the tail for the last ones)."""
        flat, tail, start = self.splits[split].rows.reshape(-1), self.tails[split], 0
        n = len(flat)
        for length in self.lengths[split].tolist():
            stop = start + length
            yield flat[start:stop] if stop <= n else np.concatenate([flat[start:], tail[max(start - n, 0) : stop - n]])
            start = stop

    def generation_examples(self, num_prompts: int, prompt_length: int, continuation_length: int,
                            split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts [P, prompt_length] and the human continuations [P, continuation_length] that follow them.

        Taken in order from the documents of ``split``: ``validation`` the held-out validation
        documents, ``test`` those of ``test_source`` (without one, the validation documents). Each
        example starts at a document's first token (its BOS, when documents have one, as a prompt from
        ``encode_prompt`` does) and runs on across document ends (as the packed rows do); the next
        example starts at the next document. Deterministic, so every model is scored on the same prompts.
        """
        check_generation_split(split)
        self.setup("test")
        return chained_examples(self.evaluation_documents(split), num_prompts, prompt_length, continuation_length,
                                f"the {split} documents")

    def encode_prompt(self, text: str) -> list[int]:
        """A user prompt as ids: the documents' BOS (when they have one), then the text's ids, no end marker."""
        ids = self.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def predict_dataloader(self) -> DataLoader:
        """Prompts from ``predict_file``; each batch is ``(prompts [n, p], line indices [n])`` of one length
        (``predict_lines`` keeps the lines)."""
        return prompt_loader(self)
