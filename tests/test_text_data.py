"""TextDataModule: your own text (a folder of .txt files, JSONL, a datasets folder) as packed token rows.

Tokenizers are built inside the tests (word-level, saved to tmp_path); nothing is downloaded.
Word ids of the tiny tokenizer: <unk> 0, <s> 1, </s> 2, a 3, b 4, c 5, d 6, e 7, f 8.
"""

import json
import re
import socket
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dbl.data import TextDataModule
from dbl.errors import MissingDataError, UsageError

SHARED = Path(__file__).parents[2] / "shared"
TEXT8_ZIP = SHARED / "data" / "text8-standin" / "text8.zip"
LM1B_TAR = SHARED / "data" / "lm1b-standin" / "1-billion-word-language-modeling-benchmark-r13output.tar.gz"
WORDS = ["a", "b", "c", "d", "e", "f"]
# a.txt, b.txt, sub/c.txt, sub/d.txt in sorted order, as [<s>] ids [</s>]
DOCS = {"b.txt": "d e", "sub/d.txt": "e\n", "a.txt": "a b c", "sub/c.txt": "c c d"}
IDS = [[1, 3, 4, 5, 2], [1, 6, 7, 2], [1, 5, 5, 6, 2], [1, 7, 2]]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open an internet connection fails the test."""
    real = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access to {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def write_tokenizer(path, words=WORDS, bos="<s>", eos="</s>", texts=None):
    """A word-level tokenizer saved like a hub one: <unk>, then the special tokens, then ``words``
    (or, with ``texts``, a vocabulary trained on them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(["<unk>", bos, eos]))
    if texts is None:
        backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + list(words))}, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
    else:
        backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        backend.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token=bos, eos_token=eos)
    tok.save_pretrained(path)
    return path


def write_docs(folder, docs=DOCS):
    for name, text in docs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(text.encode() if isinstance(text, str) else text)
    return folder


@pytest.fixture
def tok_dir(tmp_path):
    return write_tokenizer(tmp_path / "tok")


def make(source, tokenizer, tmp_path, **kw):
    args = dict(source=str(source), tokenizer=str(tokenizer), seq_len=5, val_documents=1, seed=0, batch_size=2,
                cache_dir=str(tmp_path / "cache"))
    return TextDataModule(**{**args, **kw})


def rows(dm, split):
    return torch.from_numpy(np.asarray(dm.splits[split].rows, dtype=np.int64))


# -- packing -------------------------------------------------------------------------------------
def test_folder_documents_are_packed_exactly(tmp_path, tok_dir):
    """Seed 0 permutes 4 documents as [2, 0, 1, 3]: sub/c.txt is held out. Training = a.txt, b.txt, sub/d.txt:
    1 3 4 5 2 | 1 6 7 2 | 1 7 2 (12 tokens) -> 2 rows of 5, the tail [7, 2] dropped."""
    src = write_docs(tmp_path / "docs")
    write_docs(src, {".hidden.txt": "f f f", ".git/x.txt": "f", "notes.md": "f f"})  # skipped
    dm = make(src, tok_dir, tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab_size == 9
    assert torch.equal(rows(dm, "train"), torch.tensor([[1, 3, 4, 5, 2], [1, 6, 7, 2, 1]]))
    assert torch.equal(rows(dm, "validation"), torch.tensor([[1, 5, 5, 6, 2]]))
    assert dm.documents["train"].tolist() == [0, 1, 3] and dm.documents["validation"].tolist() == [2]
    tokens, mask = next(iter(dm.train_dataloader()))
    assert tokens.dtype == torch.long and tokens.shape == (2, 5) and mask.dtype == torch.float32 and mask.eq(1).all()
    assert sorted(tokens.tolist()) == rows(dm, "train").tolist()
    (val_tokens, val_mask), = list(dm.val_dataloader())
    assert torch.equal(val_tokens, torch.tensor([[1, 5, 5, 6, 2]])) and val_mask.eq(1).all()
    (test_tokens, _), = list(dm.test_dataloader())  # no test_source: the test stage scores validation
    assert torch.equal(test_tokens, val_tokens)
    assert dm.decode(val_tokens[0]) == "c c d"


def test_jsonl_with_bos_equal_to_eos_only_ends_documents(tmp_path):
    """GPT-2 style (BOS = EOS = </s>, ids: <unk> 0, </s> 1, a 2 ... f 7): every document is ids [</s>]."""
    tok = write_tokenizer(tmp_path / "tok", bos="</s>", eos="</s>")
    src = tmp_path / "docs.jsonl"
    lines = [{"body": "a b c", "id": 1}, {"body": "d e"}, {"body": "  "}, {"body": "c c d"}, {"body": "e"}]
    src.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[2:]) + "\n")
    # non-empty documents: a b c | d e | c c d | e = 2 3 4 1 | 5 6 1 | 4 4 5 1 | 6 1; seed 0 holds out c c d
    dm = make(src, tok, tmp_path, text_field="body", seq_len=4, test_source=str(src))
    dm.setup("test")
    assert torch.equal(rows(dm, "train"), torch.tensor([[2, 3, 4, 1], [5, 6, 1, 6]]))  # the tail [1] dropped
    assert torch.equal(rows(dm, "validation"), torch.tensor([[4, 4, 5, 1]]))
    # test_source: all its documents, 2 3 4 1 5 6 1 4 4 5 1 6 1 -> 3 rows of 4, the tail [1] dropped
    assert torch.equal(rows(dm, "test"), torch.tensor([[2, 3, 4, 1], [5, 6, 1, 4], [4, 5, 1, 6]]))


def test_dataset_folders_give_the_same_rows(tmp_path, tok_dir):
    """A save_to_disk DatasetDict (split and column chosen, empty rows dropped) and a folder of CSV
    that load_dataset reads: the same documents as DOCS, so the same rows."""
    from datasets import Dataset, DatasetDict

    texts = ["a b c", "d e", None, "c c d", "", "e"]
    saved = tmp_path / "saved"
    DatasetDict(train=Dataset.from_dict({"content": texts}), other=Dataset.from_dict({"content": ["f"]})).save_to_disk(saved)
    dm = make(saved, tok_dir, tmp_path, text_field="content")
    dm.setup("fit")
    assert torch.equal(rows(dm, "train"), torch.tensor([[1, 3, 4, 5, 2], [1, 6, 7, 2, 1]]))
    assert torch.equal(rows(dm, "validation"), torch.tensor([[1, 5, 5, 6, 2]]))
    csv = tmp_path / "csv"
    csv.mkdir()
    (csv / "train.csv").write_text("content\n" + "\n".join(t for t in texts if t) + "\n")
    other = make(csv, tok_dir, tmp_path, text_field="content")
    other.setup("fit")
    assert torch.equal(rows(other, "train"), rows(dm, "train"))
    with pytest.raises(UsageError, match=r"has no split 'nope' \(has \['other', 'train'\]\)"):
        make(saved, tok_dir, tmp_path, text_field="content", split="nope").setup("fit")
    with pytest.raises(UsageError, match=r"saved has no column 'text' \(has \['content'\]\)"):
        make(saved, tok_dir, tmp_path).setup("fit")


def test_hub_dataset_id_and_gguf_tokenizer_are_passed_on(tmp_path, tok_dir, monkeypatch):
    """A name that is no local path is a datasets id (load_dataset mocked: no network); a GGUF
    tokenizer file is passed to AutoTokenizer.from_pretrained as gguf_file."""
    import datasets
    from transformers import AutoTokenizer

    loads, real_load = [], AutoTokenizer.from_pretrained

    def load_dataset(name, split=None, cache_dir=None):
        loads.append((name, split, cache_dir))
        return datasets.Dataset.from_dict({"body": ["a b c", "d e", "c c d", "e"]})

    def load_tokenizer(name, **kwargs):
        loads.append((name, kwargs))
        return real_load(str(tok_dir))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", load_tokenizer)
    dm = make("someone/corpus", "someone/model", tmp_path, tokenizer_gguf_file="model.Q4.gguf", text_field="body",
              split="train[:4]")
    dm.setup("fit")
    assert loads == [("someone/model", {"gguf_file": "model.Q4.gguf"}),
                     ("someone/corpus", "train[:4]", str(tmp_path / "cache" / "hf_datasets"))]
    assert torch.equal(rows(dm, "train"), torch.tensor([[1, 3, 4, 5, 2], [1, 6, 7, 2, 1]]))


# -- the validation split ----------------------------------------------------------------------------
def test_validation_split_is_by_document_and_seeded(tmp_path):
    """40 documents, each one repeated word of its own: a row's words say which documents it came from."""
    words = [f"w{i}" for i in range(40)]
    tok = write_tokenizer(tmp_path / "tok", words=words)
    src = write_docs(tmp_path / "docs", {f"{i:02d}.txt": " ".join([w] * (3 + i % 4)) for i, w in enumerate(words)})

    def split(seed):
        dm = make(src, tok, tmp_path, seq_len=8, val_documents=None, val_fraction=0.25, seed=seed)
        dm.setup("fit")
        docs = {name: {int(t) - 3 for t in rows(dm, name).flatten() if t >= 3} for name in ("train", "validation")}
        return dm.documents["train"].tolist(), dm.documents["validation"].tolist(), docs

    train, val, seen = split(0)
    assert len(val) == 10 and sorted(train + val) == list(range(40))  # round(0.25 * 40) held out, all used
    assert seen["validation"] <= set(val) and seen["train"] <= set(train)  # no document in both
    assert len(seen["validation"]) >= 8 and len(seen["train"]) >= 28  # only the dropped tails can be missing
    assert split(0)[:2] == (train, val)  # reproducible
    assert set(split(1)[1]) != set(val)  # another seed holds out other documents


# -- the cache -----------------------------------------------------------------------------------
def test_cache_is_reused_and_follows_the_bytes(tmp_path, tok_dir, monkeypatch):
    src = write_docs(tmp_path / "docs")
    first = make(src, tok_dir, tmp_path)
    first.setup("fit")
    tokenizer_class = type(first.tokenizer)
    calls = []
    real_call = tokenizer_class.__call__

    def refuse(self, *args, **kwargs):
        calls.append(args)
        raise AssertionError("tokenised again")

    monkeypatch.setattr(tokenizer_class, "__call__", refuse)
    again = make(src, tok_dir, tmp_path)
    again.prepare_data()
    again.setup("fit")  # read back: the tokenizer is never called
    assert calls == [] and again.cache_path == first.cache_path
    assert torch.equal(rows(again, "train"), rows(first, "train"))
    # the same size, one byte changed ("c" -> "d" in a.txt): a new key, tokenised again
    (src / "a.txt").write_text("a b d")
    with pytest.raises(AssertionError, match="tokenised again"):
        make(src, tok_dir, tmp_path).setup("fit")
    monkeypatch.setattr(tokenizer_class, "__call__", real_call)
    changed = make(src, tok_dir, tmp_path)
    changed.setup("fit")
    assert changed.cache_path != first.cache_path
    assert torch.equal(rows(changed, "train"), torch.tensor([[1, 3, 4, 6, 2], [1, 6, 7, 2, 1]]))
    # options that change the rows change the key too; a different vocabulary as well
    assert make(src, tok_dir, tmp_path, seq_len=4)._cache_key(*changed._sources()) != changed.cache_path.name
    assert make(src, tok_dir, tmp_path, seed=1)._cache_key(*changed._sources()) != changed.cache_path.name
    other_tok = write_tokenizer(tmp_path / "tok2", words=["b", "a", "c", "d", "e", "f"])
    assert make(src, other_tok, tmp_path)._cache_key(*changed._sources()) != changed.cache_path.name
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.cache_path.name, changed.cache_path.name])


# -- loaders -------------------------------------------------------------------------------------
def test_loaders_shuffle_with_the_seed_resume_exactly_and_shard_evaluation(tmp_path, tok_dir):
    src = write_docs(tmp_path / "docs", {f"{i:02d}.txt": "a b c d e f " * (i + 1) for i in range(12)})
    dm = make(src, tok_dir, tmp_path, seq_len=4, val_documents=3, batch_size=3, eval_batch_size=2)
    dm.setup("fit")
    order = [t.tolist() for t, _ in dm.train_dataloader()]
    assert order == [t.tolist() for t, _ in dm.train_dataloader()]  # seeded
    flat, train = sum(order, []), rows(dm, "train").tolist()
    assert len(flat) == len(train) // 3 * 3 and all(r in train for r in flat)  # whole batches of training rows
    assert flat != train[: len(flat)]  # shuffled
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    rest = [t.tolist() for t, _ in it]
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert [t.tolist() for t, _ in resumed] == rest == order[2:]
    # validation under 2 processes: each reads whole batches r, r + 2, ... of the one-process batches
    whole = [t.tolist() for t, _ in dm.val_dataloader()]
    assert len(whole) >= 3
    shards = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        shards.append([t.tolist() for t, _ in dm.val_dataloader()])
    dm.trainer = None
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]


def test_fits_a_language_model(tmp_path, tok_dir, one_thread):
    """The batches and vocab_size fit the LM modules (check_data, a few training and validation steps)."""
    import lightning as L

    from dbl.models.llama import Llama
    from dbl.training.autoregressive import NextTokenLMModule

    src = write_docs(tmp_path / "docs", {f"{i:02d}.txt": "a b c d e f " * (i + 2) for i in range(8)})
    dm = make(src, tok_dir, tmp_path, seq_len=8, batch_size=4)
    torch.manual_seed(0)
    module = NextTokenLMModule(Llama(9, hidden_size=16, depth=1, num_heads=2))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, max_steps=2, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    small = NextTokenLMModule(Llama(8, hidden_size=16, depth=1, num_heads=2))
    with pytest.raises(UsageError, match="the tokenizer has 9 tokens"):
        small.check_data(dm, "fit")


# -- errors --------------------------------------------------------------------------------------
def error_cases(tmp_path):
    """(name, source folder or file, options, a regex the one-line message must match)."""
    d = tmp_path
    (d / "empty").mkdir()
    write_docs(d / "only_md", {"readme.md": "a b"})
    write_docs(d / "blank", {"one.txt": "  \n", "two.txt": ""})
    write_docs(d / "latin1", {"good.txt": "a b", "sub/bad.txt": b"a b \xe9 c"})
    (d / "broken.jsonl").write_text('{"text": "a b"}\n{"text": "c"\n')
    (d / "nofield.jsonl").write_text('{"text": "a b"}\n\n{"body": "c"}\n')
    (d / "notext.jsonl").write_text('{"text": "a b"}\n{"text": 3}\n')
    (d / "doc.txt").write_text("a b")
    write_docs(d / "short", {"a.txt": "a b", "b.txt": "c", "c.txt": "d e f"})
    write_docs(d / "two", {"a.txt": "a b", "b.txt": "c"})
    return [
        ("missing", d / "nowhere", {}, MissingDataError, r"source .*nowhere does not exist; fix data.init_args.source"),
        ("missing jsonl", d / "nowhere.jsonl", {}, MissingDataError, r"nowhere\.jsonl does not exist"),
        ("no txt", d / "empty", {}, UsageError, r"folder .*empty has no \.txt files"),
        ("only md", d / "only_md", {}, UsageError, r"folder .*only_md has no \.txt files"),
        ("all empty", d / "blank", {}, UsageError, r"all 2 documents of source .*blank are empty"),
        ("utf-8", d / "latin1", {}, UsageError, r"sub/bad\.txt is not valid UTF-8 \(byte offset 4: b'\\xe9 c'\)"),
        ("not json", d / "broken.jsonl", {}, UsageError, r"broken\.jsonl line 2 is not JSON"),
        ("no field", d / "nofield.jsonl", {}, UsageError, r"nofield\.jsonl line 3 has no field 'text' \(has \['body'\]\)"),
        ("not text", d / "notext.jsonl", {}, UsageError, r"notext\.jsonl line 2: field 'text' holds a int"),
        ("a txt file", d / "doc.txt", {}, UsageError, r"doc\.txt is a file but not \.jsonl"),
        ("short", d / "short", {"seq_len": 6}, UsageError,
         r"the validation split of .*short has 5 tokens, fewer than one row of seq_len=6"),
        ("train empty", d / "two", {"val_documents": 2}, UsageError,
         r"val_documents=2 holds out 2 of the 2 documents of .*two, leaving none for training"),
        ("fraction", d / "two", {"val_documents": None, "val_fraction": 0.75}, UsageError,
         r"val_fraction=0.75 holds out 2 of the 2 documents"),
    ]


def test_bad_input_is_one_line_naming_the_file(tmp_path, tok_dir):
    for name, source, options, kind, pattern in error_cases(tmp_path):
        with pytest.raises(kind) as err:
            make(source, tok_dir, tmp_path, **options).setup("fit")
        message = str(err.value)
        assert "\n" not in message, name
        assert Path(source).name in message, name
        assert re.search(pattern, message), f"{name}: {message}"
    with pytest.raises(UsageError, match="val_fraction must be in"):
        make(tmp_path, tok_dir, tmp_path, val_documents=None, val_fraction=0)
    with pytest.raises(UsageError, match="val_documents must be >= 1"):
        make(tmp_path, tok_dir, tmp_path, val_documents=0)
    assert not (tmp_path / "cache").exists() or not [p for p in (tmp_path / "cache").iterdir() if p.name != "hf_datasets"]


def test_fewer_train_rows_than_a_batch_is_one_line(tmp_path, tok_dir):
    dm = make(write_docs(tmp_path / "docs"), tok_dir, tmp_path, batch_size=3)
    dm.setup("fit")
    with pytest.raises(UsageError, match="the train split has 2 rows of seq_len=5 tokens, fewer than batch_size=3"):
        dm.train_dataloader()


# -- real data -----------------------------------------------------------------------------------
@pytest.mark.skipif(not TEXT8_ZIP.exists(), reason=f"{TEXT8_ZIP} not present")
def test_text8_standin_as_a_folder_of_documents(tmp_path):
    """The first 400 kB of the text8 stand-in cut into 40 documents of 10 kB (at a word end)."""
    with zipfile.ZipFile(TEXT8_ZIP) as zf, zf.open("text8") as f:
        text = f.read(400_000).decode()
    docs, start = [], 0
    for end in range(10_000, 400_001, 10_000):
        end = text.rfind(" ", start, end)
        docs.append(text[start:end].strip())
        start = end
    src = write_docs(tmp_path / "docs", {f"part{i:02d}.txt": d for i, d in enumerate(docs)})
    tok = write_tokenizer(tmp_path / "tok", texts=docs)
    dm = make(src, tok, tmp_path, seq_len=64, val_documents=None, val_fraction=0.1, batch_size=16)
    dm.setup("fit")
    lengths = np.array([len(d.split()) + 2 for d in docs])  # <s> words </s>
    assert dm.documents["validation"].size == 4
    assert len(dm.splits["train"]) == lengths[dm.documents["train"]].sum() // 64
    assert len(dm.splits["validation"]) == lengths[dm.documents["validation"]].sum() // 64
    first_doc = dm.documents["train"][0]
    assert dm.decode(rows(dm, "train")[0]) == " ".join(docs[first_doc].split()[:63])  # <s> + 63 words
    assert not (rows(dm, "train") == 0).any()  # no <unk>: the vocabulary covers the text
    tokens, mask = next(iter(dm.train_dataloader()))
    assert tokens.shape == (16, 64) and mask.eq(1).all()


@pytest.mark.skipif(not LM1B_TAR.exists(), reason=f"{LM1B_TAR} not present")
def test_lm1b_standin_heldout_sentences_as_jsonl(tmp_path):
    """The 3,500 held-out sentences of the LM1B stand-in, one JSON line each."""
    with tarfile.open(LM1B_TAR) as tar:
        member = next(m for m in tar.getmembers() if "heldout" in m.name and m.isfile())
        sentences = tar.extractfile(member).read().decode().splitlines()
    src = tmp_path / "sentences.jsonl"
    src.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    tok = write_tokenizer(tmp_path / "tok", texts=sentences)
    dm = make(src, tok, tmp_path, seq_len=128, val_documents=None, val_fraction=0.05)
    dm.setup("fit")
    lengths = np.array([len(dm.tokenizer(s)["input_ids"]) + 2 for s in sentences])
    assert len(sentences) == 3500 and dm.documents["validation"].size == 175
    assert len(dm.splits["train"]) == lengths[dm.documents["train"]].sum() // 128
    assert len(dm.splits["validation"]) == lengths[dm.documents["validation"]].sum() // 128
    assert rows(dm, "train")[0, 0] == dm.tokenizer.bos_token_id
