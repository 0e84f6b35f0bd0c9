"""TextDataModule: your own text (a folder of .txt files, JSONL, a datasets folder) as packed token rows.

Tokenizers are built inside the tests (word-level, saved to tmp_path); nothing is downloaded.
Word ids of the tiny tokenizer: <unk> 0, <s> 1, </s> 2, a 3, b 4, c 5, d 6, e 7, f 8.
"""

import json
import math
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
    # no BOS: examples start at a document's first word (2 3 | 4 1, then 5 6 | 1 4), prompts get nothing prepended
    prompts, continuations = dm.generation_examples(2, 2, 2, split="test")
    assert prompts.tolist() == [[2, 3], [5, 6]] and continuations.tolist() == [[4, 1], [1, 4]]
    assert dm.bos_id is None and dm.encode_prompt(" a b \n") == [2, 3]


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
    prompts, continuations = again.generation_examples(1, 3, 2, "validation")  # document lengths read back too
    assert prompts.tolist() == [[1, 5, 5]] and continuations.tolist() == [[6, 2]]
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


# -- generation ----------------------------------------------------------------------------------
def test_generation_examples_start_at_documents_and_run_across_their_ends(tmp_path, tok_dir):
    """val_documents=2 with seed 0 holds out a.txt and sub/c.txt: 1 3 4 5 2 | 1 5 5 6 2, packed in rows of 4
    as [1 3 4 5], [2 1 5 5] with the tail [6 2] dropped; generation reads the documents, tail included."""
    dm = make(write_docs(tmp_path / "docs"), tok_dir, tmp_path, seq_len=4, val_documents=2)
    dm.setup("fit")
    assert torch.equal(rows(dm, "validation"), torch.tensor([[1, 3, 4, 5], [2, 1, 5, 5]]))

    def examples(*args, **kw):
        return [t.tolist() for t in dm.generation_examples(*args, **kw)]

    # every example starts at a document's start, its BOS included (as encode_prompt's prompts do)
    assert examples(2, 2, 1, split="validation") == [[[1, 3], [1, 5]], [[4], [5]]]
    # one runs on across a document end: a.txt is 5 tokens, the next 2 are sub/c.txt's
    assert examples(1, 4, 3, split="validation") == [[[1, 3, 4, 5]], [[2, 1, 5]]]
    # ... and into the tokens of the dropped last row
    assert examples(1, 5, 5, split="validation") == [[[1, 3, 4, 5, 2]], [[1, 5, 5, 6, 2]]]
    assert examples(1, 5, 5) == examples(1, 5, 5, split="validation")  # no test_source: test reads validation
    with pytest.raises(UsageError, match=r"^the validation documents give only 1 examples of 7 tokens; "
                                         r"lower num_prompts or the lengths$"):
        dm.generation_examples(2, 4, 3, split="validation")
    with pytest.raises(UsageError, match=r"^the validation documents give only 0 examples of 11 tokens"):
        dm.generation_examples(1, 5, 6, split="validation")
    with pytest.raises(UsageError, match=r"^generation prompts come from 'validation' or 'test', not 'train'$"):
        dm.generation_examples(1, 2, 2, split="train")


def test_generation_examples_of_the_test_source_take_the_next_document(tmp_path, tok_dir):
    """test_source x.txt, y.txt, z.txt = 1 8 2 | 1 3 4 5 6 7 2 | 1 7 8 2: the first example (4 tokens)
    ends inside y.txt, the second starts at z.txt, not at y.txt's rest."""
    test = write_docs(tmp_path / "test", {"x.txt": "f", "y.txt": "a b c d e", "z.txt": "e f"})
    dm = make(write_docs(tmp_path / "docs"), tok_dir, tmp_path, test_source=str(test))
    prompts, continuations = dm.generation_examples(2, 2, 2)  # set up on demand; split="test" by default
    assert prompts.tolist() == [[1, 8], [1, 7]] and continuations.tolist() == [[2, 1], [8, 2]]
    assert prompts.dtype == continuations.dtype == torch.long
    prompts, continuations = dm.generation_examples(1, 3, 2, split="validation")  # sub/c.txt, as without test_source
    assert prompts.tolist() == [[1, 5, 5]] and continuations.tolist() == [[6, 2]]
    with pytest.raises(UsageError, match=r"^the test documents give only 2 examples of 4 tokens"):
        dm.generation_examples(3, 2, 2)


def test_predict_file_prompts_start_with_bos_grouped_by_length(tmp_path, tok_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a b\nc\n\n   \n d e \n")
    dm = make(write_docs(tmp_path / "docs"), tok_dir, tmp_path, predict_file=str(prompts), predict_batch_size=1)
    assert dm.encode_prompt(" a b \n") == [1, 3, 4] and dm.bos_id == 1
    batches = [(p.tolist(), i.tolist()) for p, i in dm.predict_dataloader()]
    assert batches == [([[1, 5]], [1]), ([[1, 3, 4]], [0]), ([[1, 6, 7]], [2])]  # by token length, then line
    assert dm.predict_lines == ["a b", "c", " d e "]
    together = make(write_docs(tmp_path / "docs"), tok_dir, tmp_path, predict_file=str(prompts))  # batch size 16
    assert [(p.tolist(), i.tolist()) for p, i in together.predict_dataloader()] == [([[1, 5]], [1]),
                                                                                  ([[1, 3, 4], [1, 6, 7]], [0, 2])]
    with pytest.raises(UsageError, match=r"^dbl predict needs data.init_args.predict_file: a text file with one prompt per line$"):
        make(tmp_path / "docs", tok_dir, tmp_path).predict_dataloader()
    with pytest.raises(MissingDataError, match=r"predict_file .*nowhere.txt does not exist; write one prompt per line"):
        make(tmp_path / "docs", tok_dir, tmp_path, predict_file=str(tmp_path / "nowhere.txt")).predict_dataloader()
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(UsageError, match=r"predict_file .*blank.txt has no prompts; write one prompt per line"):
        make(tmp_path / "docs", tok_dir, tmp_path, predict_file=str(tmp_path / "blank.txt")).predict_dataloader()
    with pytest.raises(UsageError, match="data predict_batch_size must be >= 1, got 0"):
        make(tmp_path / "docs", tok_dir, tmp_path, predict_batch_size=0)


def write_judge(path):
    """A tiny random GPT-2 judge with a word-level tokenizer of WORDS, saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<eos>", eos_token="<eos>").save_pretrained(path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(path)
    return path


def test_generation_metrics_score_continuations_of_validation_and_test_documents(tmp_path, tok_dir, one_thread):
    """LMGenerationMetrics on a TextDataModule: prompts from the validation documents at validation and
    from test_source's at test; gen-PPL under the judge is logged, and the JSONL holds the prompts' text."""
    import lightning as L

    from dbl.callbacks.lm_generation import LMGenerationMetrics
    from dbl.models.llama import Llama
    from dbl.training.autoregressive import NextTokenLMModule

    rotations = [" ".join(WORDS[i % 6:] + WORDS[: i % 6]) for i in range(12)]
    src = write_docs(tmp_path / "docs", {f"{i:02d}.txt": f"{w} {w}" for i, w in enumerate(rotations)})
    test = write_docs(tmp_path / "test", {f"{i}.txt": f"{w} {w} {w}" for i, w in enumerate(rotations[::-1][:6])})
    dm = make(src, tok_dir, tmp_path, seq_len=8, val_documents=6, test_source=str(test))
    torch.manual_seed(0)
    module = NextTokenLMModule(Llama(9, hidden_size=16, depth=1, num_heads=2))
    metrics = LMGenerationMetrics(judge=str(write_judge(tmp_path / "judge")), num_prompts=6, prompt_length=3,
                                  continuation_length=4, continuations_per_prompt=2, seeds=[0], generation_batch_size=8,
                                  every_n_validations=1, sampler={"temperature": 1.0})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, limit_test_batches=1, default_root_dir=tmp_path, callbacks=[metrics])
    for stage, run in (("val", trainer.validate), ("test", trainer.test)):
        logged = run(module, datamodule=dm)[0]
        got = metrics.last_metrics
        assert math.isfinite(got["gen_ppl"]) and got["gen_ppl"] > 1 and math.isfinite(got["human_gen_ppl"])
        assert logged[f"{stage}/gen_ppl"] == pytest.approx(got["gen_ppl"]) and 0 < logged[f"{stage}/mauve"] <= 1
        records = [json.loads(line) for line in (tmp_path / f"{stage}_step0000000_generations.jsonl").read_text().splitlines()]
        assert len(records) == 6 * 2
        # each prompt is its document's first 3 tokens: <s> and two words, shown without the <s>
        documents = [rotations[i] for i in dm.documents["validation"]] if stage == "val" else rotations[::-1][:6]
        assert [r["prompt"] for r in records[::2]] == [" ".join(d.split()[:2]) for d in documents]
        assert [r["human_continuation"] for r in records[::2]] == [" ".join(d.split()[2:6]) for d in documents]


def test_cli_predict_writes_continuations_of_the_predict_file(tmp_path, tok_dir, capsys, one_thread):
    from dbl.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a b\nc\n d e \n")
    out = tmp_path / "continuations.jsonl"
    main(["predict", "--seed_everything", "0",
          "--model", "dbl.training.autoregressive.NextTokenLMModule", "--model.generate_tokens", "3",
          "--model.network", "dbl.models.llama.Llama", "--model.network.vocab_size", "9",
          "--model.network.hidden_size", "16", "--model.network.depth", "1", "--model.network.num_heads", "2",
          "--data", "dbl.data.TextDataModule", "--data.source", str(write_docs(tmp_path / "docs")),
          "--data.tokenizer", str(tok_dir), "--data.seq_len", "5", "--data.val_documents", "1",
          "--data.cache_dir", str(tmp_path / "cache"), "--data.predict_file", str(prompts),
          "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path),
          "--trainer.callbacks+=dbl.callbacks.ContinuationWriter", f"--trainer.callbacks.output={out}"])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in written] == ["a b", "c", " d e "]  # input order, though batched by length
    assert all(set(r["continuation"].split()) <= set(WORDS) for r in written) and any(r["continuation"] for r in written)
    assert "a b =>" in capsys.readouterr().out


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
