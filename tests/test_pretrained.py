"""PretrainedCausalLM: a Hugging Face causal LM as dbl's text network (dbl.models.pretrained).

Tiny random Llama (untied, grouped-query attention), Llama with tied embeddings (SmolLM2's
layout) and GPT-2 models are built and saved here; no network access.
"""

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dbl.errors import UsageError
from dbl.models.blockwise import BlockwiseNetwork
from dbl.models.llama import ARInput, KVCache
from dbl.models.pretrained import PretrainedCausalLM
from dbl.training.autoregressive import ARDiffusionLMModule, NextTokenLMModule

VOCAB = 80  # >= the LM1B test vocabulary (tests/test_lm1b.py), for the CLI test
pytestmark = pytest.mark.usefixtures("one_thread")


def save_tiny(kind, d):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind in ("qwen2", "mistral"):  # the other layer-list families: attention biases (Qwen2), a sliding window
        from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

        config, cls = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (MistralConfig, MistralForCausalLM)
        model = cls(config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           sliding_window=12 if kind == "mistral" else None))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1 if kind == "llama" else 2, max_position_embeddings=64,
            tie_word_embeddings=kind == "llama_tied", bos_token_id=0, eos_token_id=0, pad_token_id=None,
        ))
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module", params=["llama", "llama_tied", "gpt2"])
def model_dir(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param))


def reference(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d).eval()


def perturb_new_parameters(net, std=0.2):
    """The noise conditioning starts at zero; give every new path a signal so the tests can see it."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("noise_embedder.", "noisy_in.", "out.")) or ".modulation." in name:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def layer_count(net):
    return len(net.layers)


# -- 1. the pretrained function is intact --------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_next_token_logits_equal_the_original(model_dir, attn):
    ref = reference(model_dir)
    net = PretrainedCausalLM(str(model_dir), attn_implementation=attn).eval()
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
        whole = BlockwiseNetwork(net, num_blocks=2)(None, None, ARInput(ids))
        h, c = net.embed(None, None, ARInput(ids))
        for layer in net.layers:
            h = layer(h, c)
        direct = net.head(h, c)
    assert (whole - expected).abs().max() <= 1e-5
    assert (direct - expected).abs().max() <= 1e-5
    assert net.vocab_size == VOCAB and net.hidden_size == 32
    if ref.config.tie_word_embeddings:  # tied heads stay tied, and a clean table row decodes to its token
        assert net.lm_head.weight is net.embedding.weight
        assert torch.equal(net.denoised_logits(net.token_table()).argmax(-1), torch.arange(VOCAB))


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_other_families_logits_and_sliding_window(kind, tmp_path):
    d = save_tiny(kind, tmp_path)
    net = PretrainedCausalLM(str(d)).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (BlockwiseNetwork(net, 2)(None, None, ARInput(ids)) - reference(d)(ids).logits).abs().max() <= 1e-5
    if kind == "mistral":  # window 12: positions 0..11 are exact, position 12 would need the window
        with pytest.raises(UsageError, match="sliding window"):
            net.embed(None, None, ARInput(torch.cat([ids, ids[:, :1]], dim=1)))


def test_noise_parameters_are_new_and_layers_are_only_in_blocks(model_dir):
    net = PretrainedCausalLM(str(model_dir))
    io_names = [n for n, _ in net.named_parameters() if not n.startswith("layers.")]
    assert not any(".layer." in n or n.startswith(("model.", "transformer.")) for n in io_names)
    blocks = BlockwiseNetwork(net, num_blocks=2)
    counted = sum(p.numel() for b in range(2) for p in blocks.block_parameters(b)) + sum(
        p.numel() for p in blocks.shared_parameters())
    assert counted == sum(p.numel() for p in net.parameters())  # every parameter exactly once


# -- 2. the mask --------------------------------------------------------------------------------
def test_clean_rows_ignore_noisy_rows_and_noisy_rows_ignore_later_tokens(model_dir):
    torch.manual_seed(0)
    net = PretrainedCausalLM(str(model_dir)).eval()
    perturb_new_parameters(net)
    n, t, j = 2, 8, 5
    tokens = torch.randint(0, VOCAB, (n, t))
    x = torch.randn(n, t, net.hidden_size)
    c_noise = torch.tensor([-0.5, 0.3])
    last = []
    hook = net.layers[-1].register_forward_hook(lambda m, i, out: last.append(out.detach()))

    def run(x, tokens):
        last.clear()
        with torch.no_grad():
            out = BlockwiseNetwork(net, num_blocks=1)(x, c_noise, ARInput(tokens))
        return out, last[0]

    out, h = run(x, tokens)
    _, h_other_noise = run(x + 1.0, tokens)
    assert torch.equal(h[:, t:], h_other_noise[:, t:])  # clean rows never see a noisy row
    assert not torch.allclose(h[:, :t], h_other_noise[:, :t])
    _, h_clean_only = run(None, tokens)
    assert torch.allclose(h[:, t:], h_clean_only, atol=1e-5)

    changed = tokens.clone()
    changed[:, j] = (changed[:, j] + 1) % VOCAB  # clean token j only; the noisy rows stay
    out2, _ = run(x, changed)
    assert torch.equal(out2[:, : j + 1], out[:, : j + 1])  # noisy rows i <= j see clean tokens < i only
    assert not torch.allclose(out2[:, j + 1 :], out[:, j + 1 :])
    hook.remove()


def test_noise_modulation_starts_as_identity_and_then_acts(model_dir):
    net = PretrainedCausalLM(str(model_dir)).eval()
    n, t, d = 2, 6, net.hidden_size
    tokens = torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, t, d, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h, c = net.embed(x, torch.tensor([-0.5, 0.3]), ARInput(tokens))
        layer = net.layers[0]
        plain = layer.layer(h, **c.layer_kwargs)  # the pretrained layer alone, same rows and mask
        assert torch.allclose(layer(h, c), plain, atol=1e-6)
        layer.modulation[1].weight[: 2 * d].normal_(generator=torch.Generator().manual_seed(2))  # shift, scale
        out = layer(h, c)
    assert torch.equal(out[:, t:], plain[:, t:])
    assert not torch.allclose(out[:, :t], plain[:, :t], atol=1e-3)


# -- 3. block-wise AR diffusion ---------------------------------------------------------------
def snapshot(params):
    return [p.detach().clone() for p in params]


def test_block_step_and_generation(model_dir, tmp_path):
    torch.manual_seed(0)
    net = PretrainedCausalLM(str(model_dir))
    perturb_new_parameters(net)
    module = ARDiffusionLMModule(net, num_blocks=2, train_blocks=[1], optimizer=partial(torch.optim.AdamW, lr=1e-2))
    tokens = torch.randint(0, VOCAB, (4, 8))
    batch = (tokens, torch.ones(4, 8))
    assert torch.isfinite(module.block_loss(batch, 1).loss)
    blocks = module.network
    before = {b: snapshot(blocks.block_parameters(b)) for b in range(2)}
    shared = snapshot(blocks.shared_parameters())
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TensorDataset(*batch), batch_size=4))
    assert all(torch.equal(p, q) for p, q in zip(blocks.block_parameters(0), before[0]))
    assert any(not torch.equal(p, q) for p, q in zip(blocks.block_parameters(1), before[1]))
    assert any(not torch.equal(p, q) for p, q in zip(blocks.shared_parameters(), shared))

    module = module.double()
    prompt = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(2))
    for temperature in (0.0, 1.0):
        runs = [module.generate(prompt, 5, generator=torch.Generator().manual_seed(5), num_steps=4, solver="heun",
                                temperature=temperature, use_cache=use_cache) for use_cache in (True, False)]
        assert runs[0].shape == (3, 5)
        assert torch.equal(runs[0], runs[1])
        assert len(set(runs[0].flatten().tolist())) > 1


def test_cached_prefix_equals_recomputing_it(model_dir):
    """The clean prefix stored in two pieces, then a noisy row (and a next token) read against it."""
    net = PretrainedCausalLM(str(model_dir)).double().eval()
    perturb_new_parameters(net)
    blocks = BlockwiseNetwork(net, num_blocks=1)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, VOCAB, (2, 7), generator=gen)
    x = torch.randn(2, 1, net.hidden_size, generator=gen, dtype=torch.float64)
    c_noise = torch.tensor([-0.5, 0.3], dtype=torch.float64)
    cache = KVCache()
    with torch.no_grad():
        blocks(None, None, ARInput(tokens[:, :4], cache=cache, store=True))
        next_cached = blocks(None, None, ARInput(tokens[:, 4:6], cache=cache, store=True))
        noisy_cached = blocks(x, c_noise, ARInput(None, noisy_start=6, cache=cache))
        next_full = blocks(None, None, ARInput(tokens[:, :6]))
        noisy_full = blocks(x, c_noise, ARInput(tokens[:, :6], noisy_start=6))
    assert cache.length == 6
    assert torch.allclose(next_cached, next_full[:, 4:], atol=1e-10)
    assert torch.allclose(noisy_cached, noisy_full, atol=1e-10)


# -- 4. next-token baseline -------------------------------------------------------------------
def test_next_token_perplexity_and_greedy_decoding_match_the_original(model_dir, tmp_path):
    ref = reference(model_dir)
    module = NextTokenLMModule(network=PretrainedCausalLM(str(model_dir)))
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (4, 10), generator=gen)
    mask = torch.ones(4, 10)
    mask[1, 6:] = 0
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.validate(module, DataLoader(TensorDataset(tokens, mask), batch_size=2))
    with torch.no_grad():
        logp = ref(tokens[:, :-1]).logits.log_softmax(-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    expected = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
    assert torch.allclose(trainer.callback_metrics["val/ppl"], expected.exp(), rtol=1e-5)

    prompt = tokens[:, :3]
    greedy = prompt
    with torch.no_grad():
        for _ in range(4):
            greedy = torch.cat([greedy, ref(greedy).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for use_cache in (True, False):
        assert torch.equal(module.generate(prompt, 4, temperature=0.0, use_cache=use_cache), greedy[:, 3:])


def test_bfloat16_weights(model_dir):
    """dtype: bfloat16 loads the weights in bfloat16; logits still equal the original's (loaded likewise), and the
    diffusion task (float32 noise) trains and generates."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    net = PretrainedCausalLM(str(model_dir), dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(BlockwiseNetwork(net.eval(), 2)(None, None, ARInput(ids)), ref(ids).logits)
    module = ARDiffusionLMModule(net.train(), num_blocks=2)
    assert torch.isfinite(module.block_loss((ids, torch.ones(2, 8)), 0).loss)
    assert module.generate(ids[:, :3], 2, num_steps=2).shape == (2, 2)


# -- 5. errors ----------------------------------------------------------------------------------
def test_a_directory_without_a_model_is_a_one_line_error(tmp_path):
    with pytest.raises(UsageError) as err:
        PretrainedCausalLM(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError, match="does not exist"):
        PretrainedCausalLM(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="dtype"):
        PretrainedCausalLM(str(tmp_path), dtype="float33")


@pytest.mark.parametrize("kind", ["opt", "phi"])
def test_a_model_of_another_layout_is_named(kind, tmp_path):
    """OPT: no model.model.layers at all; Phi: layers, but its final norm has another name."""
    from transformers import OPTConfig, OPTForCausalLM, PhiConfig, PhiForCausalLM

    if kind == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                         num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32))
    else:
        model = PhiForCausalLM(PhiConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32))
    model.save_pretrained(tmp_path)
    with pytest.raises(UsageError, match=type(model).__name__) as err:
        PretrainedCausalLM(str(tmp_path))
    assert "\n" not in str(err.value)


def test_logit_soft_capping_is_refused(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8)).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="soft-caps its logits"):
        PretrainedCausalLM(str(tmp_path), attn_implementation="eager")


# -- the command line -------------------------------------------------------------------------
def test_cli_builds_fits_and_reloads_a_pretrained_network(tmp_path):
    """Built from typed arguments (jsonargparse), trained two block steps, tested from its checkpoint."""
    from test_lm1b import WORDS, write_archive

    from dbl.cli import main

    model_dir = save_tiny("llama_tied", tmp_path / "model")
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    write_archive(tmp_path / "lm1b")
    common = [
        "--seed_everything", "0",
        "--model", "dbl.training.autoregressive.ARDiffusionLMModule",
        "--model.network", "dbl.models.pretrained.PretrainedCausalLM", "--model.network.name_or_path", str(model_dir),
        "--model.network.frequency_dim", "64", "--model.num_blocks", "2", "--model.sample_steps", "2",
        "--data", "dbl.data.LM1BDataModule", "--data.root", str(tmp_path / "lm1b"), "--data.download", "false",
        "--data.tokenizer", str(vocab), "--data.seq_len", "16", "--data.batch_size", "4", "--data.val_sentences", "8",
        "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
    ]
    main(["fit", *common, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    main(["test", *common, "--ckpt_path", str(ckpt), "--trainer.limit_test_batches", "1"])
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(state["network.net.embedding.weight"], state["network.net.lm_head.weight"])
