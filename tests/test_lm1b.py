"""LM1B: data module, the autoregressive-diffusion decoder, generation, metrics and the CLI.

Everything is built inside the tests: an archive in the release layout, a BERT vocab.txt, a tiny
random GPT-2 judge with a word-level tokenizer. No network access.
"""

import io
import json
import math
import tarfile

import lightning as L
import pytest
import torch

from dbl.callbacks.lm_generation import (
    LMGenerationMetrics,
    continuation_texts,
    distinct_n,
    generative_perplexity,
    load_causal_lm,
    repetition_rate,
)
from dbl.data.lm1b import ARCHIVE, TOP_DIR, LM1BDataModule, detokenizer
from dbl.models.llama import ARInput, Llama, ar_diffusion_mask
from dbl.training.autoregressive import ARDiffusionLMModule, NextTokenLMModule

SENTENCES = [
    "the market rose 3 % on monday , analysts said .",
    "it 's a \" good \" day for the city 's workers .",
    "officials don 't expect the vote before friday .",
    "the company said profits fell in the third quarter .",
    "shares of the bank were up 2 % in early trading .",
    "he said the plan would cut costs by $ 100 million .",
    "the team won its third game in a row on sunday .",
    "rain is expected across the region later this week .",
]
WORDS = sorted({w for s in SENTENCES for w in s.replace("'", " ' ").split()} | {"'", "$", "%", '"', ",", "."})


def write_archive(root, train_copies=6, heldout_copies=3):
    """An archive in the LM1B release layout: two training shards, one held-out shard, a README."""
    root.mkdir(parents=True, exist_ok=True)
    members = {
        f"{TOP_DIR}/README": "test archive\n",
        f"{TOP_DIR}/training-monolingual.tokenized.shuffled/news.en-00001-of-00100": "\n".join(SENTENCES * train_copies) + "\n",
        f"{TOP_DIR}/training-monolingual.tokenized.shuffled/news.en-00002-of-00100": "\n".join(SENTENCES[::-1] * train_copies) + "\n",
        f"{TOP_DIR}/heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050": "\n".join(SENTENCES * heldout_copies) + "\n",
    }
    with tarfile.open(root / ARCHIVE, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root / ARCHIVE


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return d


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm1b")
    write_archive(root)
    return root


def make_data(root, vocab_dir, **kw):
    args = dict(root=str(root), download=False, tokenizer=str(vocab_dir), seq_len=16, batch_size=4, val_sentences=8, num_proc=None)
    return LM1BDataModule(**{**args, **kw})


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return write_judge(tmp_path_factory.mktemp("judge"))


def write_judge(d):
    """A tiny random GPT-2 with a word-level tokenizer, saved in ``d`` like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<eos>", eos_token="<eos>")
    tok.save_pretrained(d)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=16, n_layer=1, n_head=2)).save_pretrained(d)
    return d


def tiny_llama(vocab=len(WORDS) + 5, depth=4, **kw):
    return Llama(vocab, hidden_size=32, depth=depth, num_heads=2, **kw)


def randomize(module, std=0.2):
    """Non-zero adaLN gates etc., so that every path of the network actually carries signal."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


# -- data ------------------------------------------------------------------------------------
def test_detokenizer_undoes_moses_tokenisation():
    assert detokenizer()("it 's a \" good \" day , he said .") == 'it\'s a "good" day, he said.'


def test_data_module_packs_caches_and_prompts(data_root, vocab_dir, monkeypatch):
    dm = make_data(data_root, vocab_dir)
    dm.prepare_data()
    dm.setup("fit")
    tokens, mask = next(iter(dm.train_dataloader()))
    assert tokens.shape == mask.shape == (4, 16) and tokens.dtype == torch.long
    assert mask.eq(1).all()  # packed rows: every position is a real token
    assert (tokens == dm.tokenizer.unk_token_id).sum() == 0  # detokenised text still maps onto the vocab
    total = sum(len(dm.tokenizer(detokenizer()(s))["input_ids"]) for s in SENTENCES) * 12  # [CLS] ... [SEP]
    held_out = sum(len(ids) for ids in dm.splits["validation_sentences"]["input_ids"])  # validation's 8 sentences
    assert len(dm.splits["train"]) == (total - held_out) // 16
    assert len(dm.splits["heldout_sentences"]) == 3 * len(SENTENCES)
    prompts, refs = dm.generation_examples(3, 4, 8)
    assert prompts.shape == (3, 4) and refs.shape == (3, 8)
    assert prompts[:, 0].eq(dm.tokenizer.cls_token_id).all()  # every example starts a sentence
    # second run: loaded from the cache, no tokenising
    monkeypatch.setattr(LM1BDataModule, "_tokenize", lambda *a: (_ for _ in ()).throw(AssertionError("re-tokenised")))
    again = make_data(data_root, vocab_dir)
    again.setup("fit")
    assert torch.equal(again.splits["train"][:]["input_ids"], dm.splits["train"][:]["input_ids"])


def test_validation_is_held_out_of_training_and_every_token_is_scored(tmp_path, vocab_dir):
    """96 training sentences (SENTENCES x 6, then reversed x 6), 24 held-out; seed 0 holds out training
    sentences 25, 29, 48, 59, 78. Token counts ([CLS] ... [SEP]) per sentence: 13 17 12 12 14 14 14 12."""
    write_archive(tmp_path)
    dm = make_data(tmp_path, vocab_dir, val_sentences=5)
    dm.setup("fit")
    val_sentences = dm.splits["validation_sentences"]["input_ids"]
    expected = [SENTENCES[1], SENTENCES[5], SENTENCES[7], SENTENCES[4], SENTENCES[1]]
    assert [dm.decode(ids) for ids in val_sentences] == [dm.decode(dm.tokenizer(detokenizer()(s))["input_ids"]) for s in expected]
    # training: 12 x 108 tokens minus the validation's 17+14+12+14+17 = 74, packed: 1222 // 16 rows
    assert len(dm.splits["train"]) == 76
    # validation: 74 tokens = 4 full rows and a last row of 10 real tokens, padded and masked
    val_tokens, val_mask = (torch.cat(parts) for parts in zip(*dm.val_dataloader()))
    assert val_mask.sum(1).tolist() == [16, 16, 16, 16, 10]
    assert val_tokens[val_mask.bool()].tolist() == sum(val_sentences, [])
    assert val_tokens[-1, 10:].tolist() == [dm.tokenizer.pad_token_id] * 6
    # test: all 3 x 108 = 324 held-out tokens scored: 20 full rows and one of 4
    test_tokens, test_mask = (torch.cat(parts) for parts in zip(*dm.test_dataloader()))
    assert test_mask.sum(1).tolist() == [16] * 20 + [4]
    assert test_tokens[test_mask.bool()].tolist() == sum(dm.splits["heldout_sentences"]["input_ids"], [])
    # generation prompts: from the validation sentences at validation, the held-out ones at test
    prompts, refs = dm.generation_examples(1, 4, 8, split="validation")
    assert torch.cat([prompts, refs], 1)[0].tolist() == val_sentences[0][:12]
    prompts, refs = dm.generation_examples(1, 4, 8)
    assert torch.cat([prompts, refs], 1)[0].tolist() == dm.splits["heldout_sentences"]["input_ids"][0][:12]


def test_download_true_fetches_the_archive(tmp_path, vocab_dir, monkeypatch):
    """The default online path, with urlretrieve mocked: no network."""
    from dbl.data.lm1b import ARCHIVE_URL
    from dbl.errors import MissingDataError

    source = write_archive(tmp_path / "source").read_bytes()
    calls = []

    def fetch(url, path, reporthook=None, payload=source):
        calls.append(url)
        with open(path, "wb") as f:
            f.write(payload)
        return path, None

    # a download cut in half: a one-line error, and nothing left in root
    monkeypatch.setattr("urllib.request.urlretrieve", lambda url, path, reporthook=None: fetch(url, path, payload=source[: len(source) // 2]))
    root = tmp_path / "lm1b"
    with pytest.raises(MissingDataError, match=f"downloading {ARCHIVE_URL} failed .*; put {ARCHIVE} at"):
        make_data(root, vocab_dir, download=True).prepare_data()
    assert not root.exists()  # not even the folder made for it
    monkeypatch.setattr("urllib.request.urlretrieve", fetch)
    dm = make_data(root, vocab_dir, download=True)
    dm.prepare_data()
    dm.setup("fit")
    assert calls == [ARCHIVE_URL, ARCHIVE_URL]
    assert (root / ARCHIVE).read_bytes() == source
    assert sorted(p.name for p in root.iterdir()) == sorted([ARCHIVE, TOP_DIR, "hf_cache", "tokenized"])
    assert len(dm.splits["heldout_sentences"]) == 24 and len(dm.splits["test"]) == 21


def test_caches_follow_the_source_and_are_written_atomically(tmp_path, vocab_dir, monkeypatch):
    from datasets import DatasetDict

    write_archive(tmp_path)
    real_save = DatasetDict.save_to_disk

    def crash(self, path, **kw):
        real_save(self, path, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(DatasetDict, "save_to_disk", crash)
    with pytest.raises(OSError, match="disk full"):
        make_data(tmp_path, vocab_dir).setup("fit")
    assert not (tmp_path / "tokenized").exists()  # nothing half-written left behind
    monkeypatch.setattr(DatasetDict, "save_to_disk", real_save)
    first = make_data(tmp_path, vocab_dir)
    first.setup("fit")
    assert len(first.splits["test"]) == 21  # 3 x 108 held-out tokens
    # the archive replaced by one with 2 copies of the held-out sentences: extracted and tokenised afresh
    write_archive(tmp_path, heldout_copies=2)
    second = make_data(tmp_path, vocab_dir)
    second.setup("fit")
    assert len(second.splits["heldout_sentences"]) == 16
    assert second.splits["test"][:]["loss_mask"].sum().item() == 216  # 2 x 108: 13 full rows and one of 8
    assert len(second.splits["test"]) == 14
    assert len(list((tmp_path / "tokenized").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_data_module_padding_masks_padding(data_root, vocab_dir):
    dm = make_data(data_root, vocab_dir, packing=False)
    dm.setup("fit")
    tokens, mask = next(iter(dm.val_dataloader()))
    pad = dm.tokenizer.pad_token_id
    assert ((tokens == pad) == (mask == 0)).all()
    assert (mask == 0).any() and (mask == 1).any()
    lengths = mask.sum(1).long()
    short = lengths < 16  # the rest were truncated
    assert short.any() and (tokens[short, lengths[short] - 1] == dm.tokenizer.sep_token_id).all()


def test_missing_archive_is_a_one_line_error(tmp_path, vocab_dir, capsys):
    from dbl.cli import main

    dm = make_data(tmp_path / "empty", vocab_dir)
    with pytest.raises(FileNotFoundError, match=f"put {ARCHIVE} into .*empty"):
        dm.prepare_data()
    # found only when the run starts (prepare_data), and still one line from the CLI
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--model", "dbl.training.autoregressive.NextTokenLMModule", "--model.network", "dbl.models.llama.Llama",
              "--model.network.vocab_size", "64", "--model.network.hidden_size", "32", "--model.network.depth", "2",
              "--model.network.num_heads", "2", "--data", "dbl.data.LM1BDataModule", "--data.root", str(tmp_path),
              "--data.archive", str(tmp_path / "nowhere.tar.gz"), "--data.tokenizer", str(vocab_dir),
              "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("dbl:")] == [
        f"dbl: LM1B archive {tmp_path / 'nowhere.tar.gz'} does not exist; fix data.init_args.archive or leave it unset"]


def test_predict_prompts_grouped_by_length(data_root, vocab_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the market\nthe bank said\nthe city\n")
    dm = make_data(data_root, vocab_dir, predict_file=str(prompts))
    batches = list(dm.predict_dataloader())
    assert [b[1].tolist() for b in batches] == [[0, 2], [1]]
    assert all(b[0][:, 0].eq(dm.tokenizer.cls_token_id).all() for b in batches)


# -- model -----------------------------------------------------------------------------------
def test_mask_of_noisy_and_clean_rows():
    t = 3
    pos = torch.arange(t).repeat(2)
    noisy = torch.arange(2 * t) < t
    mask = ar_diffusion_mask(pos, noisy, pos, noisy).int()
    expected = torch.tensor([
        # noisy 0..2          clean 0..2
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ])
    assert torch.equal(mask, expected)


def test_no_leakage_from_later_tokens():
    torch.manual_seed(0)
    net = tiny_llama()
    randomize(net)
    module = ARDiffusionLMModule(net, num_blocks=1)
    module.eval()
    n, t, j = 2, 8, 5
    tokens = torch.randint(0, net.vocab_size, (n, t))
    sigma = torch.tensor([0.3, 2.0])
    noise = torch.randn(n, t, net.hidden_size)
    clean_states = []
    hooks = [layer.register_forward_hook(lambda m, i, out: clean_states.append(out[:, t:].detach())) for layer in net.layers]

    def run(tok, eps):
        clean_states.clear()
        return module.logits(tok, sigma, eps, block=0), list(clean_states)

    ref_logits, ref_clean = run(tokens, noise)
    changed, noise2 = tokens.clone(), noise.clone()
    changed[:, j] = (changed[:, j] + 1) % net.vocab_size  # token j: its clean copy and ...
    noise2[:, j] += 1.0  # ... its noisy copy both change
    logits, clean = run(changed, noise2)
    for h, ref in zip(clean, ref_clean):
        assert torch.equal(h[:, :j], ref[:, :j])
        assert not torch.allclose(h[:, j:], ref[:, j:])
    assert torch.equal(logits[:, :j], ref_logits[:, :j])
    assert not torch.allclose(logits[:, j], ref_logits[:, j])  # the test can fail: i = j and i > j do change
    assert not torch.allclose(logits[:, j + 1 :], ref_logits[:, j + 1 :])
    for h in hooks:
        h.remove()


def test_blockwise_gradients_stay_in_the_active_block():
    torch.manual_seed(0)
    module = ARDiffusionLMModule(tiny_llama(), num_blocks=2)
    randomize(module)
    batch = (torch.randint(0, module.network.net.vocab_size, (3, 8)), torch.ones(3, 8))

    def loss(block):
        torch.manual_seed(3)
        return module.block_loss(batch, block).loss

    ref = loss(1)
    with torch.no_grad():
        for p in module.network.block_parameters(0):
            p.add_(1.0)
    assert torch.equal(loss(1), ref)
    module.zero_grad()
    loss(1).backward()
    assert all(p.grad is None for p in module.network.block_parameters(0))
    assert all(p.grad is not None for p in module.network.block_parameters(1))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.network.shared_parameters())


def test_blockwise_text_needs_shared_io():
    with pytest.raises(ValueError, match="shared_io"):
        ARDiffusionLMModule(tiny_llama(), num_blocks=2, shared_io=False)
    with pytest.raises(ValueError, match="num_blocks must be 1"):
        NextTokenLMModule(tiny_llama(), num_blocks=2)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_equals_uncached(temperature):
    torch.manual_seed(0)
    diffusion = ARDiffusionLMModule(tiny_llama(), num_blocks=2).double()
    next_token = NextTokenLMModule(tiny_llama()).double()
    for m in (diffusion, next_token):
        randomize(m, std=0.5)
    prompt = torch.randint(0, diffusion.network.net.vocab_size, (3, 4))
    for module, opts in ((diffusion, dict(num_steps=6, solver="heun")), (next_token, {})):
        cached = module.generate(prompt, 7, generator=torch.Generator().manual_seed(5), temperature=temperature, **opts)
        uncached = module.generate(prompt, 7, generator=torch.Generator().manual_seed(5), temperature=temperature,
                                   use_cache=False, **opts)
        assert cached.shape == (3, 7)
        assert torch.equal(cached, uncached)
        assert len(set(cached.flatten().tolist())) > 1  # not a degenerate constant output


def test_next_token_perplexity_is_exact():
    torch.manual_seed(0)
    module = NextTokenLMModule(tiny_llama())
    tokens = torch.randint(0, module.network.net.vocab_size, (2, 6))
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2])
    module.evaluation_step((tokens, mask), 0, "test")
    logits = module.network(None, None, ARInput(tokens), block=0)
    logp = logits.log_softmax(-1)
    nll = [-logp[0, i, tokens[0, i + 1]] for i in range(5)] + [-logp[1, i, tokens[1, i + 1]] for i in range(3)]
    expected = torch.stack(nll).mean()
    metrics = module.eval_metrics["test"]
    assert torch.allclose(metrics["nll"].compute() / metrics["tokens"].compute(), expected, atol=1e-5)


# -- metrics ---------------------------------------------------------------------------------
def test_diversity_guards():
    assert distinct_n([[1, 2, 3, 4]], 1) == 1.0
    assert distinct_n([[1, 1, 1, 1]], 2) == 1 / 3
    assert repetition_rate([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(1 - 4 / 5)
    assert repetition_rate([[5, 5, 5, 5, 5, 5]]) == pytest.approx(1 - 1 / 3)
    assert repetition_rate([[1, 2, 3, 4, 5, 6]]) == 0.0


def test_continuation_text_does_not_split_words():
    class WordPieces:  # decode as a WordPiece tokenizer does: "##" pieces join the previous word
        pieces = {1: "the", 2: "market", 3: "##ing", 4: "rose"}

        def decode(self, ids):
            return " ".join(self.pieces[i] for i in ids).replace(" ##", "")

    assert continuation_texts(WordPieces(), [[1, 2], [1, 2]], [[3, 4], [4]]) == ["ing rose", " rose"]


def test_generative_perplexity_matches_the_judge_loss(judge_dir):
    model, tok = load_causal_lm(str(judge_dir), None, torch.device("cpu"))
    ppl = generative_perplexity(model, tok, ["the market rose"], [" on monday ."])
    ids = tok("<eos> the market rose on monday .", add_special_tokens=False, return_tensors="pt")["input_ids"]
    labels = ids.clone()
    labels[:, :4] = -100  # <eos> and the prompt are context, not scored
    assert ppl == pytest.approx(math.exp(model(input_ids=ids, labels=labels).loss.item()), rel=1e-5)


def test_generation_metrics_and_jsonl(data_root, vocab_dir, judge_dir, tmp_path):
    dm = make_data(data_root, vocab_dir)
    torch.manual_seed(0)
    module = ARDiffusionLMModule(tiny_llama(), num_blocks=2, sample_steps=4)
    metrics = LMGenerationMetrics(judge=str(judge_dir), num_prompts=12, prompt_length=4, continuation_length=6,
                                continuations_per_prompt=2, seeds=[0, 1], generation_batch_size=8)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_test_batches=1, default_root_dir=tmp_path, callbacks=[metrics])
    trainer.test(module, datamodule=dm)
    got = metrics.last_metrics
    assert 0 < got["mauve"] <= 1 and got["gen_ppl"] > 1 and math.isfinite(got["human_gen_ppl"])
    assert 0 < got["distinct_1"] <= 1 and 0 <= got["repetition_rate"] <= 1 and got["tokens_per_s"] > 0
    assert got["mauve"] == pytest.approx((got["mauve_seed0"] + got["mauve_seed1"]) / 2)
    lines = (tmp_path / "test_step0000000_generations.jsonl").read_text().splitlines()
    assert len(lines) == 12 * 2 * 2
    row = json.loads(lines[0])
    assert set(row) == {"seed", "prompt_index", "prompt", "continuation", "human_continuation"}
    saved = json.loads((tmp_path / "test_step0000000_generation_metrics.json").read_text())
    assert saved["metrics"]["mauve"] == got["mauve"]


# -- CLI -------------------------------------------------------------------------------------
def test_cli_fit_test_predict(data_root, vocab_dir, judge_dir, tmp_path, capsys):
    from dbl.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the market\nthe bank said\n")
    out = tmp_path / "continuations.jsonl"
    common = [
        "--seed_everything", "0",
        "--model", "dbl.training.autoregressive.ARDiffusionLMModule",
        "--model.network", "dbl.models.llama.Llama",
        "--model.network.vocab_size", str(len(WORDS) + 5), "--model.network.hidden_size", "32",
        "--model.network.depth", "2", "--model.network.num_heads", "2",
        "--model.num_blocks", "2", "--model.sample_steps", "4", "--model.generate_tokens", "5",
        "--data", "dbl.data.LM1BDataModule", "--data.root", str(data_root), "--data.download", "false",
        "--data.tokenizer", str(vocab_dir), "--data.seq_len", "16", "--data.batch_size", "4", "--data.val_sentences", "8",
        "--data.predict_file", str(prompts),
        "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
    ]
    main(["fit", *common, "--trainer.max_steps", "4", "--trainer.limit_val_batches", "1"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    main(["test", *common, "--ckpt_path", str(ckpt), "--trainer.limit_test_batches", "1",
          "--trainer.callbacks+=dbl.callbacks.LMGenerationMetrics", f"--trainer.callbacks.judge={judge_dir}",
          "--trainer.callbacks.num_prompts=4", "--trainer.callbacks.prompt_length=4", "--trainer.callbacks.continuation_length=4"])
    assert next(tmp_path.glob("*generation_metrics.json"))
    main(["predict", *common, "--ckpt_path", str(ckpt),
          "--trainer.callbacks+=dbl.callbacks.ContinuationWriter", f"--trainer.callbacks.output={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["the market", "the bank said"]
    assert all(len(r["continuation"].split()) >= 1 for r in rows)
    assert "the market =>" in capsys.readouterr().out


def test_checkpoint_saved_under_the_old_module_path_still_loads(data_root, vocab_dir, tmp_path):
    """Runs saved before the LM1B task moved to dbl.training.autoregressive carry the old class path."""
    from dbl.cli import main

    common = [
        "--model", "dbl.training.autoregressive.NextTokenLMModule", "--model.network", "dbl.models.llama.Llama",
        "--model.network.vocab_size", str(len(WORDS) + 5), "--model.network.hidden_size", "32",
        "--model.network.depth", "2", "--model.network.num_heads", "2",
        "--data", "dbl.data.LM1BDataModule", "--data.root", str(data_root), "--data.download", "false",
        "--data.tokenizer", str(vocab_dir), "--data.seq_len", "16", "--data.batch_size", "4", "--data.val_sentences", "8",
        "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.limit_val_batches", "1",
    ]
    main(["fit", *common, "--trainer.max_steps", "2"])
    state = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    assert state["hyper_parameters"]["_class_path"] == "dbl.training.autoregressive.NextTokenLMModule"
    state["hyper_parameters"]["_class_path"] = "dbl.training.text.NextTokenLMModule"
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    main(["validate", *common, "--ckpt_path", str(old)])
    assert type(NextTokenLMModule.load_from_checkpoint(old)).__name__ == "NextTokenLMModule"


def test_cli_reports_vocab_mismatch(data_root, vocab_dir, tmp_path, capsys):
    from dbl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--model", "dbl.training.autoregressive.NextTokenLMModule", "--model.network", "dbl.models.llama.Llama",
              "--model.network.vocab_size", "8", "--model.network.hidden_size", "32", "--model.network.depth", "2",
              "--model.network.num_heads", "2", "--data", "dbl.data.LM1BDataModule", "--data.root", str(data_root),
              "--data.download", "false", "--data.tokenizer", str(vocab_dir), "--data.seq_len", "16", "--data.val_sentences", "8",
              "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.max_steps", "1",
              "--trainer.default_root_dir", str(tmp_path)])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("dbl:")]
    assert len(err) == 1 and "set network vocab_size >=" in err[0] and "Traceback" not in stderr


def test_train_wordpiece_tool_makes_a_vocab_the_data_module_loads(data_root, tmp_path, capsys, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    from dbl.data.lm1b import load_tokenizer

    tool = Path(__file__).resolve().parents[1] / "tools" / "train_wordpiece.py"
    out = tmp_path / "wp"
    monkeypatch.setattr(sys, "argv", [str(tool), str(data_root / ARCHIVE), "--vocab-size", "120", "--out", str(out)])
    runpy.run_path(str(tool), run_name="__main__")
    assert f"wrote {out / 'vocab.txt'}" in capsys.readouterr().out
    vocab = (out / "vocab.txt").read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) <= 120
    tokenizer = load_tokenizer(str(out))
    ids = tokenizer("The market rose.", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids  # every piece of the training text is covered
    monkeypatch.setattr(sys, "argv", [str(tool), str(tmp_path / "missing.tar.gz"), "--out", str(out)])
    with pytest.raises(SystemExit, match="is not a file"):
        runpy.run_path(str(tool), run_name="__main__")


def test_a_local_model_path_that_does_not_exist_is_named(tmp_path):
    from dbl.callbacks.lm_generation import load_causal_lm
    from dbl.data.lm1b import load_tokenizer
    from dbl.errors import MissingDataError

    with pytest.raises(MissingDataError, match=f"tokenizer directory {tmp_path / 'nope'} does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(MissingDataError, match=f"causal LM directory {tmp_path / 'judge'} does not exist"):
        load_causal_lm(str(tmp_path / "judge"), None, torch.device("cpu"))
