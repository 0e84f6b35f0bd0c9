import math

import pytest
import torch

from dbl.diffusion.preconditioning import edm_scalings, loss_weight, weighted_loss


def test_scalings_at_half():
    c = edm_scalings(torch.tensor(0.5))
    assert c.c_skip.item() == pytest.approx(0.5)
    assert c.c_in.item() == pytest.approx(math.sqrt(2))
    assert c.c_out.item() == pytest.approx(math.sqrt(0.125))
    assert c.c_noise.item() == pytest.approx(math.log(0.5) / 4)
    assert loss_weight(torch.tensor(0.5)).item() == pytest.approx(8.0)


def test_weightings():
    loss = torch.tensor([1.0, 2.0, 3.0])
    sigma = torch.tensor([0.002, 0.5, 10.0])
    lam = loss_weight(sigma)
    assert weighted_loss(loss, sigma, "edm") == pytest.approx((lam * loss).mean().item())
    assert weighted_loss(loss, sigma, "none") == pytest.approx(2.0)
    clamped = weighted_loss(loss, sigma, "edm_clamped", max_weight=100.0)
    assert clamped == pytest.approx((lam.clamp(max=100) * loss).mean().item())
    assert clamped < weighted_loss(loss, sigma, "edm")


def test_batch_mean_reproduces_official_broadcast():
    """The official code: [N] loss times [N, 1] weight, then .mean() -> mean(loss) * mean(weight)."""
    gen = torch.Generator().manual_seed(0)
    loss, sigma = torch.rand(7, generator=gen), torch.rand(7, generator=gen) + 0.01
    official = (loss * loss_weight(sigma)[:, None]).mean()
    assert weighted_loss(loss, sigma, "batch_mean").item() == pytest.approx(official.item(), rel=1e-6)
    assert weighted_loss(loss, sigma, "edm").item() != pytest.approx(official.item(), rel=1e-3)


def test_weighting_rejects_wrong_shapes_and_names():
    with pytest.raises(ValueError, match=r"\[N\]"):
        weighted_loss(torch.ones(3), torch.ones(3, 1))
    with pytest.raises(ValueError, match="unknown loss_weighting"):
        weighted_loss(torch.ones(3), torch.ones(3), "bogus")
