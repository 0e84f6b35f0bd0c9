"""Fine-tuning a pretrained causal LM: the chained clean stream, the next-token anchor, LoRA per block,
and generation that listens to temperature and top-p (issue: your model, your data).

Tiny random Llama and GPT-2 models are built and saved in the test (``save_tiny``); no downloads.
"""

from functools import partial

import lightning as L
import pytest
import torch
from test_pretrained import VOCAB, perturb_new_parameters, reference, save_tiny
from torch.utils.data import DataLoader, TensorDataset

from dbl.denoisers.text import pick_token
from dbl.errors import UsageError
from dbl.models.llama import ARInput
from dbl.models.pretrained import PretrainedCausalLM
from dbl.training.autoregressive import ARDiffusionLMModule, NextTokenLMModule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param))


def tokens_and_mask(n=3, t=10, seed=0):
    tokens = torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(n, t)
    mask[1, 7:] = 0
    return tokens, mask


def reference_next_token_ce(model_dir, tokens, mask):
    """The untouched Hugging Face model's next-token CE over the masked positions, computed directly."""
    with torch.no_grad():
        logp = reference(model_dir)(tokens[:, :-1]).logits.log_softmax(-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()


# -- the chained clean stream -------------------------------------------------------------------
def test_a_later_block_reads_the_pretrained_hidden_states(model_dir):
    net = PretrainedCausalLM(str(model_dir)).eval()
    module = ARDiffusionLMModule(net, num_blocks=2)
    tokens, _ = tokens_and_mask()
    with torch.no_grad():
        states = reference(model_dir)(tokens, output_hidden_states=True).hidden_states
        entering = module.network.clean_rows_entering(1, ARInput(tokens))
    half = len(net.layers) // 2
    assert (entering - states[half]).abs().max() <= 1e-5  # after layers 0..half-1, as the original computes them

    unchained = ARDiffusionLMModule(PretrainedCausalLM(str(model_dir), chain_clean_stream=False).eval(), num_blocks=2)
    assert not unchained.network.chains_clean_stream(ARInput(tokens))


@pytest.mark.parametrize("block", [0, 1])
def test_the_anchor_is_the_pretrained_models_next_token_loss(model_dir, block):
    """At the start (noise conditioning zero or not: clean rows never see noisy ones) the anchor of any block is
    the original model's next-token CE, and the loss is the diffusion loss plus exactly w times it."""
    torch.manual_seed(0)
    net = PretrainedCausalLM(str(model_dir)).eval()
    perturb_new_parameters(net)
    tokens, mask = tokens_and_mask()
    expected = reference_next_token_ce(model_dir, tokens, mask)
    plain, anchored = (ARDiffusionLMModule(net, num_blocks=2, anchor_weight=w) for w in (0.0, 0.5))
    with torch.no_grad():
        torch.manual_seed(1)
        hidden = []
        sigma = anchored.denoiser.training_sigma(block, 3, "cpu")
        noise = torch.randn(3, 10, net.hidden_size)
        anchored.per_sample_ce(tokens, mask, sigma, noise, block, hidden)
        anchor = anchored.anchor_ce(tokens, mask, block, hidden[0])
        torch.manual_seed(2)
        without = plain.block_loss((tokens, mask), block).loss
        torch.manual_seed(2)
        with_anchor = anchored.block_loss((tokens, mask), block).loss
    assert torch.allclose(anchor, expected, atol=1e-5)
    assert torch.allclose(with_anchor - without, 0.5 * expected, atol=1e-5)


def test_the_anchor_trains_the_active_block_and_the_shared_head_only(model_dir):
    torch.manual_seed(0)
    net = PretrainedCausalLM(str(model_dir))
    perturb_new_parameters(net)
    module = ARDiffusionLMModule(net, num_blocks=2, anchor_weight=1.0)
    tokens, mask = tokens_and_mask()
    module.block_loss((tokens, mask), 0).loss.backward()
    blocks = module.network
    assert all(p.grad is None for p in blocks.block_parameters(1))  # the later block: only run, never trained
    assert all(p.requires_grad for p in blocks.block_parameters(1))  # and unfrozen again afterwards
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks.block_parameters(0))
    assert net.lm_head.weight.grad is not None


def test_the_anchor_is_logged_in_training_and_profiled_outside_it(model_dir, tmp_path):
    """``dbl info`` and the benchmarks run ``block_loss`` outside the training loop (after a fit, too)."""
    from dbl.memory import profile_activations

    torch.manual_seed(0)
    module = ARDiffusionLMModule(PretrainedCausalLM(str(model_dir)), num_blocks=2, anchor_weight=1.0)
    tokens, mask = tokens_and_mask(n=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TensorDataset(tokens, mask), batch_size=4))
    assert torch.isfinite(trainer.callback_metrics["train/anchor_ce"])
    profile = profile_activations(module, (tokens, mask), 4)
    assert profile is not None


def test_validation_reports_the_clean_paths_next_token_ce(model_dir, tmp_path):
    tokens, mask = tokens_and_mask(n=4)
    module = ARDiffusionLMModule(PretrainedCausalLM(str(model_dir)), num_blocks=2)
    assert module.next_token_metrics  # on by default for a chained pretrained network
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.validate(module, DataLoader(TensorDataset(tokens, mask), batch_size=2))
    expected = reference_next_token_ce(model_dir, tokens, mask)
    assert torch.allclose(trainer.callback_metrics["val/next_token_ce"], expected, rtol=1e-5)
    assert torch.allclose(trainer.callback_metrics["val/next_token_ppl"], expected.exp(), rtol=1e-5)


# -- LoRA -----------------------------------------------------------------------------------------
def lora_parameters(net):
    return {n: p for n, p in net.named_parameters() if ".lora_" in n}


def test_lora_adapts_every_linear_map_and_freezes_the_pretrained_weights(tmp_path):
    d = save_tiny("llama", tmp_path)  # width 32, MLP 64, 2 heads of 16, 1 key/value head, 4 layers
    net = PretrainedCausalLM(str(d), lora_rank=4)
    # r (in + out) per map: q 32->32, k 32->16, v 32->16, o 32->32, gate 32->64, up 32->64, down 64->32
    per_layer = 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 3)
    assert sum(p.numel() for p in lora_parameters(net).values()) == 4 * per_layer
    pretrained = reference(d)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert sum(net.get_parameter(n).numel() for n in frozen) == sum(p.numel() for p in pretrained.parameters())
    assert all(p.requires_grad for p in lora_parameters(net).values())
    tokens, _ = tokens_and_mask()
    with torch.no_grad():  # lora_B starts at zero: the pretrained function is intact
        logits = NextTokenLMModule(net.eval()).network(None, None, ARInput(tokens))
        assert (logits - pretrained(tokens).logits).abs().max() <= 1e-5


def test_per_block_lora_trains_only_the_active_blocks_adapters(tmp_path):
    d = save_tiny("gpt2", tmp_path)  # GPT-2's Conv1D maps take LoRA too
    torch.manual_seed(0)
    net = PretrainedCausalLM(str(d), lora_rank=2)
    perturb_new_parameters(net)
    module = ARDiffusionLMModule(net, num_blocks=2, optimizer=partial(torch.optim.AdamW, lr=1e-2))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    tokens, mask = tokens_and_mask(n=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    block = module.schedule.block_at(0)
    trainer.fit(module, DataLoader(TensorDataset(tokens, mask), batch_size=4))
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    active = f"layers.{block}."  # one layer per block
    assert changed and all(not p.requires_grad or ".lora_" not in n or n.startswith(active) for n, p in
                           net.named_parameters() if n in changed)
    assert any(n.startswith(active) and ".lora_A" in n for n in changed)
    assert not any(".lora_" in n and not n.startswith(active) for n in changed)
    assert all(n.startswith(("noise_embedder.", "noisy_in.", "out.")) or ".modulation." in n or ".lora_" in n
               for n in changed)  # no pretrained weight moved


def test_lora_on_an_unknown_map_is_one_line(tmp_path):
    d = save_tiny("llama", tmp_path)
    with pytest.raises(UsageError, match=r"lora_target_modules \['qkv'\].*choose from \[.*'q_proj'"):
        PretrainedCausalLM(str(d), lora_rank=4, lora_target_modules=["qkv"])


# -- generation that listens ----------------------------------------------------------------------
def test_top_p_keeps_the_nucleus_and_renormalises():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    for top_p, nucleus in ((0.6, [0.625, 0.375, 0, 0]), (0.9, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
                           (0.5, [1.0, 0, 0, 0])):
        picked = pick_token(logits.expand(2000, 4), 1.0, torch.Generator().manual_seed(0), top_p)
        expected = torch.multinomial(torch.tensor([nucleus]).expand(2000, 4), 1,
                                     generator=torch.Generator().manual_seed(0))[:, 0]
        assert torch.equal(picked, expected)  # the same draws as from the renormalised nucleus itself
    # temperature reshapes the distribution: at 1/2 the probabilities are proportional to p^2
    picked = pick_token(logits.expand(2000, 4), 0.5, torch.Generator().manual_seed(0))
    squared = probs**2 / (probs**2).sum()
    assert torch.equal(picked, torch.multinomial(squared.expand(2000, 4), 1,
                                                 generator=torch.Generator().manual_seed(0))[:, 0])


@pytest.mark.parametrize("task", ["diffusion", "next_token"])
def test_generation_listens_to_temperature_and_top_p(model_dir, task, monkeypatch):
    torch.manual_seed(0)
    net = PretrainedCausalLM(str(model_dir))
    perturb_new_parameters(net)
    module = (ARDiffusionLMModule(net, num_blocks=2, sample_steps=4) if task == "diffusion"
              else NextTokenLMModule(net)).double()
    prompt = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(2))

    def run(temperature, top_p=1.0, use_cache=True):
        return module.generate(prompt, 6, generator=torch.Generator().manual_seed(5), temperature=temperature,
                               top_p=top_p, use_cache=use_cache)

    greedy = run(0.0)
    hot = run(2.0)
    assert not torch.equal(hot, greedy)
    # the nucleus of one token is the argmax: every pick (recorded) takes it
    picks = []

    def recording(logits, temperature, generator, top_p=1.0):
        token = pick_token(logits, temperature, generator, top_p)
        picks.append((logits.argmax(-1), token, top_p, temperature))
        return token

    monkeypatch.setattr("dbl.denoisers.text.pick_token", recording)
    nucleus = run(2.0, top_p=1e-6)
    assert len(picks) == 6 and all(t == 2.0 and p == 1e-6 and torch.equal(a, b) for a, b, p, t in picks)
    if task == "next_token":  # no noise shares the generator: the whole continuation is the greedy one
        assert torch.equal(nucleus, greedy)
    monkeypatch.undo()
    assert torch.equal(run(2.0, use_cache=False), hot)  # the cached prefix changes nothing
    assert torch.equal(run(2.0), hot)  # and the seed decides the draw
