"""How the text task modules wire the method's math together (see test_wiring.py for the approach).

AR diffusion and next-token LMs (LM1B), masked diffusion (text8) and the LM1B evaluation loaders:
each block's training loss computed by hand, the block every denoiser call reaches in validation
and generation, the token generation emits, and the logged metrics against values worked out here.
"""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from test_lm1b import SENTENCES, WORDS, randomize, tiny_llama, write_archive
from test_masked_diffusion import tiny_token_dit
from test_wiring import (
    SIGMA_MAX,
    SIGMA_MIN,
    TRAINER,
    cdf_grid,
    denoiser_calls,  # noqa: F401 (fixture)
    draw_sigma,
    edm,
    edm_boundaries,
    owner,
    widened,
)
from torch.utils.data import DataLoader, TensorDataset

from dbl.data.lm1b import LM1BDataModule, detokenizer
from dbl.models.llama import ARInput, Llama
from dbl.training import ARDiffusionLMModule, MaskedDiffusionModule, NextTokenLMModule

pytestmark = pytest.mark.usefixtures("one_thread")


# -- autoregressive diffusion and next-token (LM1B) ------------------------------------------
def ar_module(**kw) -> ARDiffusionLMModule:
    torch.manual_seed(0)
    module = ARDiffusionLMModule(tiny_llama(depth=3), num_blocks=3, **kw)
    randomize(module, std=0.5)  # non-zero adaLN gates and output layer
    return module


def token_batch(n: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, len(WORDS) + 5, (n, t), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(n, t)
    mask[1, 4:] = 0  # padding at the end of one row
    mask[-1, :2] = 0
    return tokens, mask


def hand_ar_ce(module, tokens, mask, sigma, eps, block) -> torch.Tensor:
    """[N] masked-mean CE of logits(c_skip z + c_out F(c_in z)), z = normalised embedding + sigma eps."""
    net = module.network.net
    s = edm(sigma.view(-1, 1, 1))
    z = net.token_table()[tokens] + sigma.view(-1, 1, 1) * eps
    with torch.no_grad():
        raw = module.network(s.c_in * z, s.c_noise.flatten(), ARInput(tokens), block=block)
        logits = net.denoised_logits(s.c_skip * z + s.c_out * raw)
    ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    return (ce * mask).sum(1) / mask.sum(1)


def test_ar_block_loss_by_hand():
    """lambda(sigma) * CE, sigma from the widened range (gamma 0.1), then eps [N, T, D]."""
    module = ar_module()
    tokens, mask = token_batch(3, 6)
    bounds = edm_boundaries(3)
    for block in range(3):
        torch.manual_seed(200 + block)
        out = module.block_loss((tokens, mask), block)
        torch.manual_seed(200 + block)
        sigma = draw_sigma(3, *widened(bounds, block, 0.1))
        eps = torch.randn(3, 6, module.network.net.hidden_size)
        ce = hand_ar_ce(module, tokens, mask, sigma, eps, block)
        assert torch.allclose(out.noise_level, sigma, rtol=1e-6, atol=0)
        assert out.unweighted.item() == pytest.approx(ce.mean().item(), rel=1e-6)
        assert out.loss.item() == pytest.approx((edm(sigma).weight * ce).mean().item(), rel=1e-6)
        assert abs(out.loss.item() - out.unweighted.item()) > 1e-3 * out.loss.item()


def test_next_token_block_loss_by_hand():
    torch.manual_seed(0)
    module = NextTokenLMModule(tiny_llama(depth=2))
    randomize(module)
    tokens, mask = token_batch(3, 6)
    out = module.block_loss((tokens, mask), 0)
    with torch.no_grad():
        logits = module.network(None, None, ARInput(tokens[:, :-1]), block=0)
    nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    assert out.loss.item() == pytest.approx(((nll * mask[:, 1:]).sum() / mask[:, 1:].sum()).item(), rel=1e-6)


def test_ar_validation_routes_every_sigma_and_logs_hand_ce(denoiser_calls):  # noqa: F811
    module = ar_module()
    tokens, mask = token_batch(8, 6, seed=1)
    rows = [tuple(r) for r in tokens.tolist()]
    assert len(set(rows)) == 8  # each call's clean tokens say which samples it had
    trainer = L.Trainer(**TRAINER)
    trainer.validate(module, DataLoader(TensorDataset(tokens, mask), batch_size=4), verbose=False)
    routed = {}
    for call in denoiser_calls:
        for row in call.cond.tokens.tolist():
            assert rows.index(tuple(row)) not in routed
            routed[rows.index(tuple(row))] = call.block

    bounds, expected, ce, weighted = edm_boundaries(3), {}, [], []
    for batch_idx in range(2):
        gen = torch.Generator().manual_seed(batch_idx)
        sigma = draw_sigma(4, SIGMA_MIN, SIGMA_MAX, gen)
        eps = torch.randn((4, 6, module.network.net.hidden_size), generator=gen)
        for j in range(4):
            n, block = 4 * batch_idx + j, owner(bounds, sigma[j].item())
            expected[n] = block
            c = hand_ar_ce(module, tokens[n : n + 1], mask[n : n + 1], sigma[j : j + 1], eps[j : j + 1], block)
            ce.append(c.item())
            weighted.append((edm(sigma[j : j + 1]).weight * c).item())
    assert set(expected.values()) == {0, 1, 2}
    assert routed == expected
    assert trainer.callback_metrics["val/ce"].item() == pytest.approx(sum(ce) / 8, rel=1e-5)
    assert trainer.callback_metrics["val/loss"].item() == pytest.approx(sum(weighted) / 8, rel=1e-5)


def test_ar_generation_chains_the_blocks_and_emits_the_last_calls_argmax(denoiser_calls, monkeypatch):  # noqa: F811
    module = ar_module()
    logits_seen = []
    denoised_logits = Llama.denoised_logits

    def recording(self, denoised):
        logits = denoised_logits(self, denoised)
        logits_seen.append(logits.detach().clone())
        return logits

    monkeypatch.setattr(Llama, "denoised_logits", recording)
    prompt = torch.randint(0, len(WORDS) + 5, (2, 3), generator=torch.Generator().manual_seed(2))
    steps, num_tokens = 6, 3
    out = module.generate(prompt, num_tokens, num_steps=steps, solver="euler", grid="cdf", temperature=0.0,
                          generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, num_tokens)
    noisy = [c for c in denoiser_calls if c.x is not None]  # solver steps (not prefix extensions)
    assert len(noisy) == len(logits_seen) == steps * num_tokens
    grid, bounds = cdf_grid(steps), edm_boundaries(3)
    first_differs = False
    for j in range(num_tokens):
        calls = noisy[j * steps : (j + 1) * steps]
        assert [c.block for c in calls] == [owner(bounds, s) for s in grid] == [0, 0, 1, 1, 2, 2]
        for call, sigma in zip(calls, grid):
            assert call.c_noise.tolist() == pytest.approx([math.log(sigma) / 4] * 2, abs=1e-6)
        first, last = logits_seen[j * steps][:, -1], logits_seen[(j + 1) * steps - 1][:, -1]
        assert torch.equal(out[:, j], last.argmax(-1))
        first_differs |= not torch.equal(first.argmax(-1), last.argmax(-1))
    assert first_differs  # so taking the token from the first (noisiest) call would show


def test_next_token_validation_perplexity_is_exact():
    torch.manual_seed(0)
    module = NextTokenLMModule(tiny_llama(depth=2))
    randomize(module)
    tokens, mask = token_batch(6, 7, seed=3)
    trainer = L.Trainer(**TRAINER)
    trainer.validate(module, DataLoader(TensorDataset(tokens, mask), batch_size=4), verbose=False)  # batches of 4 and 2
    with torch.no_grad():
        logits = module.network(None, None, ARInput(tokens[:, :-1]), block=0)
    nll = F.cross_entropy(logits.double().transpose(1, 2), tokens[:, 1:], reduction="none")
    ce = ((nll * mask[:, 1:]).sum() / mask[:, 1:].sum()).item()  # summed NLL over summed tokens, not a mean of batch means
    assert trainer.callback_metrics["val/ce"].item() == pytest.approx(ce, rel=1e-6)
    assert trainer.callback_metrics["val/ppl"].item() == pytest.approx(math.exp(ce), rel=1e-6)


# -- masked diffusion (text8) -----------------------------------------------------------------
MASK = 27  # the mask token's id is the vocabulary size


def masked_module(**kw) -> MaskedDiffusionModule:
    torch.manual_seed(0)
    return MaskedDiffusionModule(tiny_token_dit(depth=3, seq_len=16), num_blocks=3, **kw)


def t_owner(t: float) -> int:
    """Linear schedule, B = 3: block 0 owns (2/3, 1], block 1 (1/3, 2/3], block 2 [0, 1/3]."""
    return 2 - (t > 1 / 3) - (t > 2 / 3)


def t_nominal(block: int) -> tuple[float, float]:
    return (2 - block) / 3, (3 - block) / 3


def t_widened(block: int, gamma: float) -> tuple[float, float]:
    lo, hi = t_nominal(block)
    return max(0.0, lo - gamma * (hi - lo)), min(1.0, hi + gamma * (hi - lo))


def test_masked_block_loss_by_hand():
    """w(t) * (sum of the masked positions' CE) / L with w = 1/t, t uniform on the widened interval, then masks."""
    module = masked_module()
    randomize(module)  # the output layer starts at zero (uniform predictions)
    x = torch.randint(0, 27, (4, 16), generator=torch.Generator().manual_seed(0))
    for block in range(3):
        torch.manual_seed(300 + block)
        out = module.block_loss((x,), block)
        torch.manual_seed(300 + block)
        lo, hi = t_widened(block, 0.05)
        t = (hi - (hi - lo) * torch.rand(4, dtype=torch.float64)).float()  # uniform on (lo, hi]
        masked = torch.rand(x.shape) < (1 - (1 - t.double()))[:, None]  # masked with probability 1 - alpha(t)
        assert masked.any()
        with torch.no_grad():
            logits = module.network(torch.where(masked, MASK, x), t, None, block=block)
        ce = (F.cross_entropy(logits.transpose(1, 2), x, reduction="none") * masked).sum(1)
        assert torch.equal(out.noise_level, t)
        assert out.loss.item() == pytest.approx((ce.double() / t.double() / 16).mean().item(), rel=1e-6)


def test_masked_training_t_spans_the_widened_interval():
    module = masked_module()
    x = torch.randint(0, 27, (600, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(8)
    for block in range(3):
        with torch.no_grad():
            t = module.block_loss((x,), block).noise_level.double()
        (lo, hi), (wlo, whi) = t_nominal(block), t_widened(block, 0.05)
        assert wlo - 1e-6 <= t.min() and t.max() <= whi + 1e-6
        below, above = (t < lo).sum().item(), (t > hi).sum().item()
        assert below > 10 if block < 2 else below == 0  # ~4.5% of the draws on each widened side
        assert above > 10 if block > 0 else above == 0


def hand_bpc(batches, eval_times: int) -> float:
    """BPC of a model that is uniform over the 27 characters: every masked position costs ln 27 nats.

    Batch i's t and masks come from a generator seeded by i (eval_seed 0): t stratified, [N, K],
    then one mask per column. A sequence's nats = mean over its K times of w(t) * (masked count) * ln 27.
    """
    nats = chars = 0.0
    for i, x in enumerate(batches):
        gen = torch.Generator().manual_seed(i)
        u = torch.rand(x.shape[0], eval_times, generator=gen, dtype=torch.float64)
        times = (torch.arange(eval_times, dtype=torch.float64) + 1 - u) / eval_times
        per_time = []
        for k in range(eval_times):
            masked = torch.rand(x.shape, generator=gen) < (1 - (1 - times[:, k]))[:, None]
            per_time.append(masked.sum(1) * math.log(27) / times[:, k])
        nats += torch.stack(per_time, 1).mean(1).sum().item()
        chars += x.numel()
    return nats / chars / math.log(2)


def test_masked_validation_and_test_bpc_by_hand(denoiser_calls):  # noqa: F811
    module = masked_module(eval_times=3)
    x = torch.randint(0, 27, (9, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # a fresh model's output layer is zero: uniform over the 27 characters
        assert not module.network(x[:2], torch.tensor([0.3, 0.9]), None, block=1).any()
    denoiser_calls.clear()
    val_batches, test_batches = [x[:4], x[4:8]], [x[:4], x[4:8], x[8:, :10]]  # test ends in a short chunk
    trainer = L.Trainer(**TRAINER)
    trainer.validate(module, DataLoader([(b,) for b in val_batches], batch_size=None), verbose=False)
    assert trainer.callback_metrics["val/bpc"].item() == pytest.approx(hand_bpc(val_batches, 3), rel=1e-6)

    # each t reached the block that owns it, and every drawn t was used once
    routed_t = []
    for call in denoiser_calls:
        assert {t_owner(t) for t in call.c_noise.double().tolist()} == {call.block}
        routed_t += call.c_noise.tolist()
    assert {call.block for call in denoiser_calls} == {0, 1, 2}
    drawn = []
    for i in range(2):
        u = torch.rand(4, 3, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        drawn += ((torch.arange(3) + 1 - u) / 3).float().flatten().tolist()
    assert sorted(routed_t) == sorted(drawn)

    trainer.test(module, DataLoader([(b,) for b in test_batches], batch_size=None), verbose=False)
    assert trainer.callback_metrics["test/bpc"].item() == pytest.approx(hand_bpc(test_batches, 3), rel=1e-6)


def test_masked_sampling_routes_each_t_to_its_block(denoiser_calls):  # noqa: F811
    module = masked_module()
    ids = module.sample(2, length=8, num_steps=5, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 8) and (ids < 27).all()
    grid = [1.0, 0.8, 0.6, 0.4, 0.2]  # from t = 1 down, one call per step
    assert [c.c_noise.tolist() for c in denoiser_calls] == [pytest.approx([t, t]) for t in grid]
    assert [c.block for c in denoiser_calls] == [t_owner(t) for t in grid] == [0, 0, 1, 1, 2]


# -- LM1B evaluation loaders ------------------------------------------------------------------
def batch_sizes(rows: int, batch_size: int) -> list[int]:
    """Full batches, then the partial last one."""
    return [batch_size] * (rows // batch_size) + ([rows % batch_size] if rows % batch_size else [])


@pytest.mark.parametrize("packing", [False, True])
def test_lm1b_eval_loaders_keep_every_row(packing, tmp_path):
    write_archive(tmp_path / "lm1b")  # 24 held-out sentences: SENTENCES three times
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    dm = LM1BDataModule(root=str(tmp_path / "lm1b"), download=False, tokenizer=str(vocab), seq_len=16, packing=packing,
                        batch_size=4, eval_batch_size=7, val_sentences=10)
    dm.setup("fit")
    val, test = list(dm.val_dataloader()), list(dm.test_dataloader())
    held_out = [dm.tokenizer(detokenizer()(s))["input_ids"] for s in SENTENCES * 3]  # [CLS] ... [SEP]
    validation = dm.splits["validation_sentences"]["input_ids"]  # 10 training sentences held out
    assert len(validation) == 10

    def packed(sentences):  # concatenated, cut into rows of 16; the incomplete tail padded with [PAD] = 0
        flat = sum(sentences, [])
        return torch.tensor(flat + [0] * (-len(flat) % 16)).view(-1, 16)

    if packing:
        val_rows, test_rows = packed(validation), packed(held_out)
    else:  # one sentence per row, truncated to 16
        val_rows = [len(s[:16]) for s in validation]
        test_rows = [len(s[:16]) for s in held_out]
    assert len(val_rows) % 7  # ends in a partial batch
    assert [len(b[0]) for b in val] == batch_sizes(len(val_rows), 7)
    assert [len(b[0]) for b in test] == batch_sizes(len(test_rows), 7)
    if packing:
        assert torch.equal(torch.cat([b[0] for b in val]), val_rows)
        assert torch.equal(torch.cat([b[0] for b in test]), test_rows)
        assert torch.cat([b[1] for b in test]).sum().item() == sum(map(len, held_out))  # every token scored
    else:
        assert torch.cat([b[1] for b in val]).sum(1).long().tolist() == val_rows
        assert torch.cat([b[1] for b in test]).sum(1).long().tolist() == test_rows
