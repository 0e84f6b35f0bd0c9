import pytest
import torch

from dbl.diffusion.samplers import cfg_denoiser, euler_step, heun_step, sample, sigma_grid


@pytest.mark.parametrize("kind", ["cdf", "karras"])
def test_grid_shape_and_ends(kind):
    g = sigma_grid(10, kind)
    assert g.shape == (11,)
    assert g[0].item() == pytest.approx(80.0) and g[-2].item() == pytest.approx(0.002) and g[-1] == 0
    assert (g[1:] < g[:-1]).all()


def test_cdf_grid_has_equal_mass_steps():
    from dbl.diffusion.sigma import LogNormal

    d = LogNormal()
    q = d.cdf(sigma_grid(9, "cdf")[:-1])
    steps = q[:-1] - q[1:]
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-6)


def test_euler_step_with_perfect_denoiser_lands_on_next_level():
    """Data is one point y; the perfect denoiser returns y, so z = y + s_i eps -> y + s_{i+1} eps."""
    y = torch.tensor([[0.3, -0.7]])
    eps = torch.tensor([[1.5, 0.25]])
    s, s_next = torch.tensor(5.0), torch.tensor(1.0)
    out = euler_step(lambda z, s: y.expand_as(z), y + s * eps, s, s_next)
    assert torch.allclose(out, y + s_next * eps, atol=1e-6)
    assert torch.allclose(heun_step(lambda z, s: y.expand_as(z), y + s * eps, s, s_next), y + s_next * eps, atol=1e-6)
    # the paper's equation sign (z - (s_{i+1}-s_i)(z-D)/s_i) would move away: guard against it
    wrong = y + 5.0 * eps - (1.0 - 5.0) * (5.0 * eps) / 5.0
    assert not torch.allclose(out, wrong)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_full_chain_reaches_data(solver):
    y = torch.randn(4, 3)
    out = sample(lambda z, s: y, torch.randn(4, 3), sigma_grid(7), solver)
    assert torch.allclose(out, y, atol=1e-5)


def test_cfg_combines_conditional_and_unconditional():
    def cond(z, s, labels):
        return z * 0 + labels[:, None].float()

    labels, null = torch.tensor([2, 3]), torch.tensor([10, 10])
    d = cfg_denoiser(cond, labels, null, scale=2.0)(torch.zeros(2, 1), torch.tensor(1.0))
    assert d.flatten().tolist() == [10 + 2 * (2 - 10), 10 + 2 * (3 - 10)]
    d1 = cfg_denoiser(cond, labels, null, scale=1.0)(torch.zeros(2, 1), torch.tensor(1.0))
    assert d1.flatten().tolist() == [2, 3]
