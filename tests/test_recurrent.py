"""Recurrent depth (method spec, section 8): RecurrentDepthLlama, the Huginn baseline (stochastic depth,
truncated back-propagation) and DiffusionBlocks with B = 1 over the recurrence, on tiny models.

Layer calls are recorded with forward hooks, so each test pins what runs, how often and under which grad mode.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from dbl.cli import main
from dbl.diffusion.preconditioning import edm_scalings
from dbl.models.llama import ARInput, Llama
from dbl.models.recurrent import RecurrentDepthLlama
from dbl.training.autoregressive import ARDiffusionLMModule
from dbl.training.recurrent import RecurrentDepthLMModule, draw_iterations

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50


def tiny_net(**kw):
    torch.manual_seed(0)
    return RecurrentDepthLlama(VOCAB, hidden_size=32, num_heads=2, prelude_depth=2, core_depth=3, coda_depth=2, **kw)


def randomize(module, std=0.2):
    """Non-zero adaLN gates etc., so that every path carries signal (a fresh adaLN-Zero layer is the identity)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def batch(n=3, t=10):
    tokens = torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(2))
    return tokens, torch.ones(n, t)


class Calls:
    """Records every call of the given layers: the layer's index, the input, the grad mode, the context."""

    def __init__(self, layers):
        self.records = []
        self.handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, i):
        def hook(_, args):
            self.records.append({"layer": i, "x": args[0].detach().clone(), "grad": torch.is_grad_enabled(), "c": args[1]})
        return hook

    def count(self, layer=0, **where):
        return sum(r["layer"] == layer and all(r["c"].__dict__[k] == v for k, v in where.items()) for r in self.records)

    def remove(self):
        for h in self.handles:
            h.remove()


def tbptt(mean=4, k=2, **kw):
    return randomize(RecurrentDepthLMModule(tiny_net(**kw), mean_iterations=mean, backprop_iterations=k, eval_iterations=3))


def db():
    return randomize(ARDiffusionLMModule(tiny_net(), num_blocks=1))


# -- the draw of r ---------------------------------------------------------------------------------
def test_iterations_depend_only_on_seed_and_step():
    assert [draw_iterations(32, 0.5, 0, t) for t in range(8)] == [27, 32, 21, 32, 26, 29, 19, 21]
    torch.manual_seed(123)
    np.random.seed(123)
    a = [draw_iterations(32, 0.5, 0, t) for t in range(50)]
    torch.manual_seed(7)
    np.random.seed(7)
    assert a == [draw_iterations(32, 0.5, 0, t) for t in range(50)]  # the global RNGs play no part
    assert a != [draw_iterations(32, 0.5, 1, t) for t in range(50)]
    m1, m2 = tbptt(mean=32), tbptt(mean=32)
    assert [m1.iterations_at(t) for t in range(20)] == [m2.iterations_at(t) for t in range(20)]


def test_iterations_have_huginns_mean():
    """r = Poisson(e^tau) + 1 with E[e^tau] = 32: E[r] = 33. Over 20,000 draws the sample mean's standard
    error is 18.1 / sqrt(20000) = 0.128 (sd of r measured: 18.1); the tolerance is 4 standard errors."""
    draws = np.array([draw_iterations(32, 0.5, 0, t) for t in range(20000)])
    assert draws.min() >= 1
    assert abs(draws.mean() - 33) < 4 * 0.128
    assert abs(np.array([draw_iterations(32, 0.0, 0, t) for t in range(20000)]).mean() - 33) < 4 * np.sqrt(32 / 20000)


# -- the baseline: stochastic depth, truncated back-propagation ---------------------------------------
def test_tbptt_step_runs_the_core_r_times_and_only_the_last_k_with_gradients():
    module = tbptt(mean=6, k=2)
    net = module.network.net
    r = module.iterations_at(0)
    assert r > 2
    core, prelude, coda = Calls(net.layers), Calls(net.prelude), Calls(net.coda)
    module.block_loss(batch(), 0).loss.backward()
    for i in range(len(net.layers)):
        grads = [rec["grad"] for rec in core.records if rec["layer"] == i]
        assert grads == [False] * (r - 2) + [True] * 2
    assert [rec["layer"] for rec in prelude.records] == [0, 1]
    assert [rec["layer"] for rec in coda.records] == [0, 1]
    assert all(rec["c"].num_noisy == 0 for rec in core.records)  # clean (next-token) mode: no noisy rows
    assert all(p.grad is None for p in net.noise_embedder.parameters())


def test_tbptt_gradient_equals_a_reference_loop_that_detaches_the_state():
    module = tbptt(mean=6, k=2)
    net = module.network.net
    tokens, mask = batch()
    r, k = 5, 2
    loss = module.nll(tokens, mask, r, k, torch.Generator().manual_seed(0))[0].mean()
    got = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)

    # reference: Llama's embedding, the prelude, then r iterations with full autograd, the state detached
    # before the last k; coda, norm, head
    h, c = Llama.embed(net, None, None, ARInput(tokens[:, :-1]))
    for layer in net.prelude:
        h = layer(h, c)
    s = torch.randn(h.shape, generator=torch.Generator().manual_seed(0)) * net.state_init_std
    for i in range(r):
        if i == r - k:
            s = s.detach()
        x = net.adapter(torch.cat([s, h], dim=-1))
        for layer in net.layers:
            x = layer(x, c)
        s = x
    for layer in net.coda:
        s = layer(s, c)
    logits = net.lm_head(net.norm(s))
    ref = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").mean()
    want = torch.autograd.grad(ref, list(net.parameters()), allow_unused=True)
    assert torch.allclose(loss, ref, atol=1e-6)
    for (name, _), g, w in zip(net.named_parameters(), got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            assert torch.allclose(g, w, atol=1e-6, rtol=1e-4), name
    assert got[[n for n, _ in net.named_parameters()].index("adapter.weight")].abs().sum() > 0


def test_tbptt_evaluation_is_exact_next_token_ce_at_eval_iterations():
    module = tbptt()
    tokens, mask = batch()
    calls = Calls(module.network.net.layers)
    with torch.no_grad():
        module.evaluation_step((tokens, mask), 0, "val")
    assert calls.count(0) == 3
    nll, m = module.nll(tokens, mask, 3, None, torch.Generator().manual_seed(0))
    metrics = module.eval_metrics["val"]
    assert torch.allclose(metrics["nll"].compute() / metrics["tokens"].compute(), (nll * m).sum() / m.sum())


def test_tbptt_cached_generation_equals_uncached():
    """The uncached path redraws the whole prefix's initial state at every token, the cached one keeps the
    prefix's states: with a zero initial state the two are the same computation."""
    module = tbptt(state_init_std=0.0)
    prompt = batch()[0][:, :4]
    for temperature in (0.0, 1.0):
        a = module.generate(prompt, 6, torch.Generator().manual_seed(0), temperature=temperature, use_cache=True)
        b = module.generate(prompt, 6, torch.Generator().manual_seed(0), temperature=temperature, use_cache=False)
        assert a.tolist() == b.tolist()
    calls = Calls(module.network.net.layers)
    module.generate(prompt, 5, use_cache=True, num_iterations=7)
    assert calls.count(0) == 7 * 5


# -- DiffusionBlocks, B = 1 over the recurrence -------------------------------------------------------
def test_db_training_step_runs_each_core_layer_once():
    module = db()
    net = module.network.net
    core, prelude, coda = Calls(net.layers), Calls(net.prelude), Calls(net.coda)
    module.block_loss(batch(), 0).loss.backward()
    assert [rec["layer"] for rec in core.records] == list(range(len(net.layers)))
    assert [rec["layer"] for rec in prelude.records] == [0, 1]
    assert [rec["layer"] for rec in coda.records] == [0, 1]
    assert all(rec["grad"] for rec in core.records)
    assert all(p.grad is not None for p in net.layers.parameters())
    assert net.adapter.weight.grad is None  # the baseline's input injection is not part of the diffusion


def test_db_prelude_sees_only_clean_rows_and_the_core_starts_at_the_noisy_target():
    module = db()
    net = module.network.net
    tokens, _ = batch()
    n, t = tokens.shape
    sigma = torch.tensor([0.1, 1.0, 10.0])
    z = module.denoiser.noised(net.token_vectors(tokens), sigma, torch.randn(n, t, net.hidden_size))
    prelude, core = Calls(net.prelude), Calls(net.layers)
    with torch.no_grad():
        module.denoiser(z, sigma, ARInput(tokens), block=0)
        c_in = edm_scalings(sigma.view(-1, 1, 1)).c_in
        assert [rec["x"].shape[1] for rec in prelude.records] == [t, t]  # clean rows only
        assert all(rec["c"].num_noisy == 0 for rec in prelude.records)
        first = core.records[0]
        assert first["x"].shape[1] == 2 * t and first["c"].num_noisy == t
        assert torch.allclose(first["x"][:, :t], net.noisy_in(c_in * z), atol=1e-6)
        clean, c = Llama.embed(net, None, None, ARInput(tokens))
        for layer in net.prelude:
            clean = layer(clean, c)
        assert torch.allclose(first["x"][:, t:], clean, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_db_cached_generation_equals_uncached(temperature):
    module = db()
    prompt = batch()[0][:, :4]
    kw = dict(num_steps=5, temperature=temperature)
    a = module.generate(prompt, 6, torch.Generator().manual_seed(0), use_cache=True, **kw)
    b = module.generate(prompt, 6, torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert a.tolist() == b.tolist()


def test_db_generation_with_k_steps_applies_the_core_k_times_per_token():
    module = db()
    prompt = batch()[0][:, :4]
    calls = Calls(module.network.net.layers)
    module.generate(prompt, 3, num_steps=7, use_cache=False)
    assert calls.count(0) == 7 * 3
    for i in range(len(module.network.net.layers)):
        assert all(rec["c"].num_noisy == 1 for rec in calls.records if rec["layer"] == i)
    calls.records.clear()
    module.generate(prompt, 3, num_steps=7, use_cache=True)
    assert calls.count(0, num_noisy=1) == 7 * 3  # the denoising steps; the rest extends the clean prefix


# -- configuration --------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arm", ["tbptt", "db"])
def test_dbl_info_on_a_tiny_config(arm, tmp_path, monkeypatch, capsys):
    config = yaml.safe_load((ROOT / "experiments" / f"lm1b_standin_recurrent_{arm}.yaml").read_text())
    config["model"]["init_args"]["network"]["init_args"].update(vocab_size=VOCAB, hidden_size=16, num_heads=2)
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    config["data"]["init_args"].update(root=str(tmp_path / "data"), archive=None, tokenizer=str(tmp_path / "vocab"),
                                       seq_len=8, batch_size=4)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    main(["info", "--config", str(path)])
    out = capsys.readouterr().out
    module = "RecurrentDepthLMModule" if arm == "tbptt" else "ARDiffusionLMModule"
    assert f"{module}: RecurrentDepthLlama, 4 layers in 1 blocks" in out
    assert "Estimated memory of one training step, batch 4" in out
    assert list(work.iterdir()) == []
