"""How the task modules wire the method's math together: the image task and the engine.

The pure functions of ``dbl.diffusion`` have their own tests. These pin what the LightningModules
do with them, on tiny fixed cases whose expected values are computed here by hand from the method
spec (docs/diffusionblocks.md, sections 2-5), never with dbl's own helpers: the training loss of
one block (lambda(sigma), the EDM preconditioning, the WIDENED training range), gradient clipping,
which block each denoiser call reaches in validation and sampling, and the logged metrics.

Noise is drawn by the modules from the global torch RNG (training) or from generators seeded by the
batch index (evaluation); the tests reseed and redraw in the same order. Which block a call reached
is recorded by wrapping ``BlockwiseNetwork.forward`` (the seam every task goes through).
The AR-text, next-token, text8 and LM1B cases are in test_wiring_text.py.
"""

import math
from statistics import NormalDist
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import tiny_dit
from test_engine import fit
from test_lm1b import randomize
from torch.utils.data import DataLoader, TensorDataset

from dbl.models.blockwise import BlockwiseNetwork
from dbl.training import ImageDiffusionModule

# -- the spec's constants and formulas, written out -------------------------------------------
SIGMA_MIN, SIGMA_MAX, P_MEAN, P_STD, SIGMA_DATA = 0.002, 80.0, -1.2, 1.2, 0.5
PHI = NormalDist()
TRAINER = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False)


def lognormal_cdf(sigma: float) -> float:
    return PHI.cdf((math.log(sigma) - P_MEAN) / P_STD)


def lognormal_icdf(q):
    return torch.exp(P_MEAN + P_STD * torch.special.ndtri(torch.as_tensor(q, dtype=torch.float64)))


def edm_boundaries(num_blocks: int) -> list[float]:
    """Ascending equi-probability boundaries: every block the same mass of the truncated log-normal."""
    q_min, q_max = lognormal_cdf(SIGMA_MIN), lognormal_cdf(SIGMA_MAX)
    inner = [math.exp(P_MEAN + P_STD * PHI.inv_cdf(q_min + (q_max - q_min) * i / num_blocks)) for i in range(1, num_blocks)]
    return [SIGMA_MIN, *inner, SIGMA_MAX]


def nominal(bounds: list[float], block: int) -> tuple[float, float]:
    """Block 0 owns the highest noise; ``bounds`` ascend."""
    b = len(bounds) - 1
    return bounds[b - 1 - block], bounds[b - block]


def widened(bounds: list[float], block: int, gamma: float) -> tuple[float, float]:
    """Both ends pushed out by gamma times the log-width, clipped to the full range."""
    lo, hi = nominal(bounds, block)
    pad = gamma * math.log(hi / lo)
    return max(bounds[0], lo * math.exp(-pad)), min(bounds[-1], hi * math.exp(pad))


def owner(bounds: list[float], value: float) -> int:
    """The block whose nominal range holds ``value``; on a boundary, the lower-noise block."""
    return len(bounds) - 2 - sum(value > b for b in bounds[1:-1])


def draw_sigma(n: int, lo: float, hi: float, generator=None) -> torch.Tensor:
    """n sigmas from the log-normal restricted to [lo, hi] by inverse CDF: one torch.rand(n, float64)."""
    q_lo, q_hi = lognormal_cdf(lo), lognormal_cdf(hi)
    u = torch.rand(n, dtype=torch.float64, generator=generator)
    return lognormal_icdf(q_lo + (q_hi - q_lo) * u).float()


def edm(sigma: torch.Tensor) -> SimpleNamespace:
    """EDM preconditioning and loss weight (spec section 2)."""
    s2, sd2 = sigma**2, SIGMA_DATA**2
    return SimpleNamespace(
        c_skip=sd2 / (s2 + sd2),
        c_out=sigma * SIGMA_DATA / (s2 + sd2).sqrt(),
        c_in=1 / (s2 + sd2).sqrt(),
        c_noise=sigma.log() / 4,
        weight=(s2 + sd2) / (sigma * SIGMA_DATA) ** 2,
    )


def cdf_grid(num_steps: int) -> list[float]:
    """Descending sampling grid, equally spaced in CDF mass from sigma_max to sigma_min (without the final 0)."""
    q_max, q_min = lognormal_cdf(SIGMA_MAX), lognormal_cdf(SIGMA_MIN)
    inner = [float(lognormal_icdf(q_max + (q_min - q_max) * i / (num_steps - 1))) for i in range(1, num_steps - 1)]
    return [SIGMA_MAX, *inner, SIGMA_MIN]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def denoiser_calls(monkeypatch):
    """Every call of ``BlockwiseNetwork.forward``: which block, with what c_noise and condition."""
    calls = []
    forward = BlockwiseNetwork.forward

    def recording(self, x, c_noise, cond=None, block=None):
        calls.append(SimpleNamespace(block=block, x=x, c_noise=None if c_noise is None else c_noise.detach().clone(),
                                     cond=cond.detach().clone() if isinstance(cond, torch.Tensor) else cond))
        return forward(self, x, c_noise, cond, block=block)

    monkeypatch.setattr(BlockwiseNetwork, "forward", recording)
    return calls


def test_hand_partition_matches_the_spec_tables():
    assert edm_boundaries(3) == pytest.approx([0.002, 0.1796, 0.5050, 80], abs=5e-5)
    assert edm_boundaries(4) == pytest.approx([0.002, 0.1341, 0.3012, 0.6766, 80], abs=5e-5)
    bounds = edm_boundaries(3)
    assert [widened(bounds, b, 0.05) for b in (2, 1, 0)] == [
        pytest.approx(r, abs=5e-5) for r in [(0.002, 0.2249), (0.1706, 0.5318), (0.3920, 80)]]
    s = edm(torch.tensor(0.5, dtype=torch.float64))
    assert (s.c_skip.item(), s.c_in.item(), s.c_out.item(), s.weight.item()) == pytest.approx(
        (0.5, math.sqrt(2), math.sqrt(0.125), 8.0))


# -- the image task ---------------------------------------------------------------------------
def image_module(num_blocks=3, **kw) -> ImageDiffusionModule:
    """A 3-layer DiT with random non-zero weights everywhere (its output layer starts at zero) and no label dropout."""
    torch.manual_seed(0)
    module = ImageDiffusionModule(tiny_dit(depth=3, num_classes=12, class_dropout_prob=0.0), num_blocks=num_blocks, **kw)
    randomize(module)
    return module


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def hand_image_loss(module, x, labels, sigma, eps, block):
    """Per-sample unweighted MSE of D = c_skip z + c_out F(c_in z, c_noise, labels) and the lambda weights."""
    s = edm(sigma.view(-1, 1, 1, 1))
    z = x + sigma.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        raw = module.network(s.c_in * z, s.c_noise.flatten(), labels, block=block)
    d = s.c_skip * z + s.c_out * raw
    return (d - x).pow(2).flatten(1).mean(1), s.weight.flatten()


def test_image_block_loss_by_hand():
    """lambda(sigma) * ||c_skip z + c_out F - x||^2, sigma from the block's widened range, then eps."""
    module = image_module()
    x, labels = images(4), torch.tensor([1, 5, 5, 11])
    bounds = edm_boundaries(3)
    for block in range(3):
        torch.manual_seed(100 + block)
        out = module.block_loss((x, labels), block)
        torch.manual_seed(100 + block)
        sigma = draw_sigma(4, *widened(bounds, block, 0.05))
        eps = torch.randn_like(x)
        mse, weight = hand_image_loss(module, x, labels, sigma, eps, block)
        assert torch.allclose(out.noise_level, sigma, rtol=1e-6, atol=0)
        assert out.unweighted.item() == pytest.approx(mse.mean().item(), rel=1e-6)
        assert out.loss.item() == pytest.approx((weight * mse).mean().item(), rel=1e-6)
        assert abs(out.loss.item() - out.unweighted.item()) > 1e-3 * out.loss.item()  # lambda is not ~1 here


def test_image_training_sigma_spans_the_widened_range():
    module = image_module()
    x, labels = images(600, seed=1), torch.zeros(600, dtype=torch.long)
    bounds = edm_boundaries(3)
    torch.manual_seed(7)
    for block in range(3):
        with torch.no_grad():
            sigma = module.block_loss((x, labels), block).noise_level.double()
        (lo, hi), (wlo, whi) = nominal(bounds, block), widened(bounds, block, 0.05)
        assert wlo * (1 - 1e-6) <= sigma.min() and sigma.max() <= whi * (1 + 1e-6)
        below, above = (sigma < lo).sum().item(), (sigma > hi).sum().item()
        # ~8% (block 0 / 2: ~19% / ~17%) of the draws fall in the overlap on each widened side
        assert below > 20 if block < 2 else below == 0
        assert above > 20 if block > 0 else above == 0


def test_gradient_clipping_bounds_the_whole_update(tmp_path):
    """One SGD(lr=1) step: the parameter change is minus the clipped gradient, so its norm is the clip value."""

    def update_norm(clip, path):
        module = image_module(train_blocks=[1], optimizer=lambda p: torch.optim.SGD(p, lr=1.0), gradient_clip_val=clip)
        before = [p.detach().clone() for p in module.parameters()]
        fit(module, (images(4, seed=2), torch.tensor([0, 1, 2, 3])), 1, path)
        assert module.block_updates.tolist() == [0, 1, 0]
        return math.sqrt(sum((p.detach().double() - q.double()).pow(2).sum().item() for p, q in zip(module.parameters(), before)))

    assert update_norm(0.05, tmp_path / "clipped") == pytest.approx(0.05, abs=1e-5)
    unclipped = update_norm(None, tmp_path / "free")
    assert unclipped > 1.0  # the raw gradient is far above the clip value: clipping was active above


def test_image_validation_routes_every_sigma_and_logs_hand_values(denoiser_calls):
    module = image_module()
    x, labels = images(12, seed=3), torch.arange(12)  # unique labels: each call's labels say which samples it had
    trainer = L.Trainer(**TRAINER)
    trainer.validate(module, DataLoader(TensorDataset(x, labels), batch_size=6), verbose=False)
    routed = {}
    for call in denoiser_calls:
        for label in call.cond.tolist():
            assert label not in routed  # every sample is denoised exactly once
            routed[label] = call.block

    bounds, expected, mse, weighted = edm_boundaries(3), {}, [], []
    for batch_idx in range(2):  # sigma over the full range, then eps, from a generator seeded by the batch index
        gen = torch.Generator().manual_seed(batch_idx)
        sigma = draw_sigma(6, SIGMA_MIN, SIGMA_MAX, gen)
        eps = torch.randn((6, 1, 8, 8), generator=gen)
        for j in range(6):
            n, block = 6 * batch_idx + j, owner(bounds, sigma[j].item())
            expected[n] = block
            m, w = hand_image_loss(module, x[n : n + 1], labels[n : n + 1], sigma[j : j + 1], eps[j : j + 1], block)
            mse.append(m.item())
            weighted.append((w * m).item())
    assert set(expected.values()) == {0, 1, 2}  # every block is asked, so routing all to one block shows
    assert routed == expected
    metrics = trainer.callback_metrics
    assert metrics["val/mse"].item() == pytest.approx(sum(mse) / 12, rel=1e-5)
    assert metrics["val/loss"].item() == pytest.approx(sum(weighted) / 12, rel=1e-5)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_image_sampling_routes_each_grid_sigma_and_passes_the_labels(cfg_scale, denoiser_calls):
    module = image_module()
    labels = torch.tensor([3, 7])
    out = module.sample(labels=labels, num_steps=6, solver="euler", grid="cdf", cfg_scale=cfg_scale,
                        generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 8, 8)
    grid, bounds = cdf_grid(6), edm_boundaries(3)
    # one denoiser call per Euler step, each by the block owning that step's sigma
    assert [c.block for c in denoiser_calls] == [owner(bounds, s) for s in grid] == [0, 0, 1, 1, 2, 2]
    null = torch.full((2,), 12)  # the null class is num_classes
    cond = labels if cfg_scale == 1.0 else torch.cat([labels, null])
    for call, sigma in zip(denoiser_calls, grid):
        assert call.c_noise.tolist() == pytest.approx([math.log(sigma) / 4] * len(cond), abs=1e-6)
        assert torch.equal(call.cond, cond)
