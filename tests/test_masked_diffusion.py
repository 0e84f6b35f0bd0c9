import itertools
import math

import pytest
import torch

from dbl.diffusion.masked import MaskingSchedule, ancestral_sample, make_time_partition, sample_times
from dbl.models.token_dit import TokenDiT
from dbl.training import BitsPerCharacter, MaskedDiffusionModule


def tiny_token_dit(**kw) -> TokenDiT:
    args = dict(vocab_size=27, seq_len=32, hidden_size=32, depth=6, num_heads=2)
    return TokenDiT(**{**args, **kw})


def make_module(num_blocks=3, net=None, **kw) -> MaskedDiffusionModule:
    torch.manual_seed(0)
    return MaskedDiffusionModule(net or tiny_token_dit(), num_blocks=num_blocks, **kw)


# -- partition of t -----------------------------------------------------------------------
@pytest.mark.parametrize("num_blocks", [2, 3, 4])
def test_time_partition_golden_values(num_blocks):
    # t_b = alpha^-1(1 - b/B). linear alpha = 1 - t: t_b = b/B.
    # cosine alpha = 1 - cos(pi/2 (1 - t)): cos(pi/2 (1 - t_b)) = b/B, so t_b = 1 - (2/pi) acos(b/B).
    expected = {
        "linear": [b / num_blocks for b in range(num_blocks + 1)],
        "cosine": [1 - 2 / math.pi * math.acos(b / num_blocks) for b in range(num_blocks + 1)],
    }
    for kind, bounds in expected.items():
        schedule = MaskingSchedule(kind)
        part = make_time_partition(schedule, num_blocks)
        assert part.boundaries == pytest.approx(bounds, abs=1e-12)
        keep = schedule.alpha(torch.tensor(part.boundaries, dtype=torch.float64))
        assert keep.tolist() == pytest.approx([1 - b / num_blocks for b in range(num_blocks + 1)], abs=1e-12)
        # block 0 is the noisiest interval (t near 1), block B-1 starts at t = 0
        assert part.nominal_range(0)[1] == 1.0 and part.nominal_range(num_blocks - 1)[0] == 0.0


def test_time_partition_literal_values():
    assert make_time_partition(MaskingSchedule("cosine"), 2).boundaries == pytest.approx((0, 1 / 3, 1))
    assert make_time_partition(MaskingSchedule("cosine"), 3).boundaries == pytest.approx((0, 0.21635, 0.46456, 1), abs=1e-5)
    assert make_time_partition(MaskingSchedule("cosine"), 4).boundaries == pytest.approx(
        (0, 0.16086, 1 / 3, 0.53990, 1), abs=1e-5)


def test_time_partition_overlap_and_routing():
    part = make_time_partition(MaskingSchedule("linear"), 3, overlap=0.05)
    # widened by 0.05 * 1/3 at both ends, clipped to [0, 1]
    assert part.widened_range(0) == pytest.approx((2 / 3 - 1 / 60, 1.0))
    assert part.widened_range(1) == pytest.approx((1 / 3 - 1 / 60, 2 / 3 + 1 / 60))
    assert part.widened_range(2) == pytest.approx((0.0, 1 / 3 + 1 / 60))
    t = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.0, 1 / 3 + 1e-9, 1 / 3 - 1e-9], dtype=torch.float64)
    assert part.boundaries == (0.0, 1 / 3, 2 / 3, 1.0)
    assert part.block_of(t).tolist() == [0, 0, 1, 2, 2, 1, 2]
    one = make_time_partition(MaskingSchedule("linear"), 1, overlap=0.05)
    assert one.widened_range(0) == (0.0, 1.0) and one.block_of(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="unknown masking schedule"):
        MaskingSchedule("sqrt")


@pytest.mark.parametrize("method", ["stratified", "antithetic", "uniform"])
def test_sample_times_cover_the_unit_interval(method):
    t = sample_times(2000, 4, method, torch.Generator().manual_seed(0))
    assert t.shape == (2000, 4) and t.min() > 0 and t.max() <= 1
    if method != "uniform":  # one t in each quarter, per sequence
        assert torch.equal(torch.sort((t * 4).ceil(), dim=1).values, torch.arange(1.0, 5.0).expand(2000, 4).double())
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)


# -- training loss and isolation ----------------------------------------------------------
def test_block_loss_draws_t_from_its_widened_interval():
    m = make_module(overlap=0.05)
    x = torch.randint(0, 27, (64, 32), generator=torch.Generator().manual_seed(0))
    for block in range(3):
        out = m.block_loss((x,), block)
        lo, hi = m.partition.widened_range(block)
        assert lo < out.noise_level.min() and out.noise_level.max() <= hi + 1e-6
        # a fresh model predicts uniform: every masked character costs ln 27
        assert out.unweighted.item() == pytest.approx(math.log(27), rel=1e-5)
        assert torch.isfinite(out.loss)


def test_text_blocks_are_isolated():
    m = make_module()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randint(0, 27, (8, 32), generator=torch.Generator().manual_seed(0))

    def loss(block):
        torch.manual_seed(3)
        return m.block_loss((x,), block).loss

    ref = loss(0)
    with torch.no_grad():
        for p in m.network.block_parameters(1):
            p.add_(1.0)
    assert torch.equal(loss(0), ref)
    with torch.no_grad():  # and the check can fail: block 0's own weights do change its loss
        for p in m.network.block_parameters(0):
            p.add_(0.1)
    assert not torch.equal(loss(0), ref)
    m.zero_grad()
    m.block_loss((x,), 2).loss.backward()
    assert all(p.grad is None for b in (0, 1) for p in m.network.block_parameters(b))
    assert all(p.grad is not None for p in m.network.block_parameters(2))


# -- BPC -------------------------------------------------------------------------------------
def test_bits_per_character_weights_by_characters():
    metric = BitsPerCharacter()
    metric.update(torch.tensor([10.0, 20.0]), 10)  # two sequences of 5
    metric.update(torch.tensor([3.0]), 2)  # a short last chunk
    assert metric.compute().item() == pytest.approx(33 / 12 / math.log(2))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_uniform_model_scores_log2_27(schedule):
    net = tiny_token_dit(depth=3)
    torch.nn.init.zeros_(net.final.linear.weight)  # logits = bias = 0: uniform over the 27 characters
    torch.nn.init.zeros_(net.final.linear.bias)
    m = make_module(net=net, masking_schedule=schedule, eval_times=8)
    x = torch.randint(0, 27, (2048, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        terms, times = m.nelbo_terms(x, torch.Generator().manual_seed(1))
    assert set(m.partition.block_of(times).unique().tolist()) == {0, 1, 2}  # every block was asked
    per_seq = terms.mean(1) / math.log(2)
    se = per_seq.std().item() / math.sqrt(len(per_seq))
    assert se < 0.03  # the integrand's variance grows like 1/t near t = 0, hence many samples
    assert abs(per_seq.mean().item() - math.log2(27)) < 4 * se, (per_seq.mean().item(), se)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_bpc_estimator_matches_brute_force_integration(schedule):
    """The Monte-Carlo estimate of -ELBO vs the same integral computed by enumeration: every mask
    of a 4-character sequence weighted by its probability, on a fine t-grid, t routed to blocks."""
    length = 4
    torch.manual_seed(0)
    net = TokenDiT(vocab_size=27, seq_len=length, hidden_size=16, depth=2, num_heads=2)
    for p in net.parameters():  # a model whose predictions depend on t and on the context
        torch.nn.init.normal_(p, std=0.3)
    m = MaskedDiffusionModule(net, num_blocks=2, masking_schedule=schedule, eval_times=4)
    x = torch.randint(0, 27, (2, length), generator=torch.Generator().manual_seed(1))
    masks = torch.tensor(list(itertools.product([False, True], repeat=length)))  # [16, L]
    k = masks.sum(1)

    def integrand(t: torch.Tensor) -> torch.Tensor:  # [T] -> [T, 2], nats per character
        keep = m.masking.alpha(t)[:, None]
        prob = (1 - keep) ** k * keep ** (length - k)  # [T, 16]
        out = []
        for seq in x:
            z = torch.where(masks, m.mask_id, seq).repeat(len(t), 1)
            with torch.no_grad():
                logits = m.denoiser(z, t.repeat_interleave(len(masks)).float())
            ce = torch.nn.functional.cross_entropy(logits.double().transpose(1, 2), seq.expand(len(z), -1), reduction="none")
            ce = (ce * masks.repeat(len(t), 1)).sum(1).view(len(t), len(masks))
            out.append(m.masking.elbo_weight(t) * (prob * ce).sum(1) / length)
        return torch.stack(out, 1)

    exact = torch.zeros(2, dtype=torch.float64)
    bounds, n = m.partition.boundaries, 1000
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # midpoint rule inside each block's interval
        exact += integrand(lo + (hi - lo) * (torch.arange(n, dtype=torch.float64) + 0.5) / n).sum(0) * (hi - lo) / n

    repeats = 3000
    with torch.no_grad():
        terms, _ = m.nelbo_terms(x.repeat(repeats, 1), torch.Generator().manual_seed(0))
    per_seq = terms.mean(1).view(repeats, 2)
    estimate, se = per_seq.mean(0), per_seq.std(0) / math.sqrt(repeats)
    assert (se < 0.03 * exact).all()
    assert ((estimate - exact).abs() < 4 * se).all(), (estimate, exact, se)
    assert not torch.allclose(exact[0], exact[1], rtol=0.05)  # the two sequences are told apart


# -- sampler ---------------------------------------------------------------------------------
def test_ancestral_sampler_reveals_everything_and_routes_by_t():
    calls = []

    def always_seven(z, t):
        calls.append((float(t[0]), int((z == 27).sum())))
        logits = torch.full((*z.shape, 27), -1e9)
        logits[..., 7] = 0.0
        return logits

    out = ancestral_sample(always_seven, 3, 20, MaskingSchedule("linear"), 27, num_steps=10,
                           generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 20) and (out == 7).all()
    times = [c[0] for c in calls]
    assert times == pytest.approx([1 - i / 10 for i in range(10)])  # from t = 1 down, one call per step
    assert calls[0][1] == 60 and [c[1] for c in calls] == sorted((c[1] for c in calls), reverse=True)


def test_module_sample_uses_every_block_in_order():
    m = make_module()
    seen = []
    for b in range(3):
        for layer in m.network.block_layers(b):
            layer.register_forward_hook(lambda *_, b=b: seen.append(b))
    ids = m.sample(2, length=16, num_steps=6, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 16) and ids.max() < 27 and ids.min() >= 0
    order = [b for i, b in enumerate(seen) if i == 0 or seen[i - 1] != b]
    assert order == [0, 1, 2]
    assert len(seen) == 6 * 2  # six steps, each through one block's two layers
