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


def test_cdf_midpoint_grid_sits_at_the_middle_of_each_equal_mass_cell():
    """N = 2: the quartiles 3/4 and 1/4 of the mass, which are the spec's B = 4 boundaries 0.6766 and 0.1341;
    N = 3: one point inside each B = 3 block's nominal range, the middle one at the median 0.3012."""
    from dbl.diffusion.partition import make_partition
    from dbl.diffusion.sigma import LogNormal

    assert sigma_grid(2, "cdf_midpoint").tolist() == pytest.approx([0.6766, 0.1341, 0.0], abs=1e-4)
    g = sigma_grid(3, "cdf_midpoint")
    assert g[1].item() == pytest.approx(0.3012, abs=1e-4) and g[-1] == 0
    partition = make_partition("equiprobable", 3, 0.0, 0.002, 80.0, LogNormal())
    assert [partition.block_of(s).item() for s in g[:3]] == [0, 1, 2]


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


# -- solvers from k-diffusion ------------------------------------------------------------------
SIGMA_DATA = 0.5


def gaussian_denoiser(z, sigma):
    """The exact denoiser of data ~ N(0, SIGMA_DATA^2 I): E[y | z] = z sd^2 / (sigma^2 + sd^2)."""
    return z * SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)


def k_sampling():
    from dbl.diffusion.samplers import k_diffusion_sampling

    return k_diffusion_sampling()


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_builtin_steps_equal_k_diffusion(solver):
    """dbl keeps its own two steps (see samplers' docstring); they are k-diffusion's, number for number."""
    noise, sigmas = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), sigma_grid(9)
    ours = sample(gaussian_denoiser, noise, sigmas, solver)
    reference = getattr(k_sampling(), f"sample_{solver}")(
        lambda x, s: gaussian_denoiser(x, s[0]), noise * 80.0, sigmas.float(), disable=True
    )
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "lms"])
def test_k_diffusion_solver_is_called_with_dbl_grid_and_scaled_noise(solver):
    from dbl.diffusion.samplers import K_DIFFUSION_SOLVERS

    noise, sigmas = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), sigma_grid(9, "karras")
    seen = []

    def denoiser(z, sigma):
        seen.append(sigma)
        return gaussian_denoiser(z, sigma)

    ours = sample(denoiser, noise, sigmas, solver)
    reference = getattr(k_sampling(), K_DIFFUSION_SOLVERS[solver])(
        lambda x, s: gaussian_denoiser(x, s[0]), noise * sigmas[0].float(), sigmas.float(), disable=True
    )
    assert torch.equal(ours, reference)
    # one call per step, at the grid's sigmas from high to low, each a 0-dim sigma for the whole batch
    assert [s.dim() for s in seen] == [0] * 9
    assert torch.equal(torch.stack(seen), sigmas[:-1].float())


def test_second_order_solvers_solve_the_gaussian_ode_more_accurately_than_euler():
    """Exact solution of the probability-flow ODE for Gaussian data: z(0) = z(s_max) sd / sqrt(s_max^2 + sd^2).
    On 50 Karras steps Euler is off by 0.056, DPM-Solver++ 2M by 0.0064, Heun by 0.0061."""
    noise = torch.tensor([[1.0, -2.0]])
    exact = noise * 80.0 * SIGMA_DATA / (80.0**2 + SIGMA_DATA**2) ** 0.5
    grid = sigma_grid(50, "karras")
    err = {s: (sample(gaussian_denoiser, noise, grid, s) - exact).abs().max().item() for s in ("euler", "heun", "dpmpp_2m")}
    assert err["dpmpp_2m"] < err["euler"] / 5 and err["heun"] < err["euler"] / 5


@pytest.mark.parametrize("solver", ["euler_ancestral", "dpmpp_2s_ancestral"])
def test_stochastic_solvers_draw_from_the_given_generator_only(solver):
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))

    def run(seed):
        return sample(gaussian_denoiser, noise, sigma_grid(6), solver, torch.Generator().manual_seed(seed))

    state = torch.get_rng_state()
    first, again, other = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), state)  # the training noise of a run that samples is untouched
    assert torch.equal(first, again) and not torch.allclose(first, other)


def test_a_solver_that_is_not_installed_is_one_line_with_the_install_command(monkeypatch):
    import sys

    from dbl.diffusion import samplers
    from dbl.errors import UsageError

    monkeypatch.delitem(sys.modules, "k_diffusion.sampling", raising=False)
    monkeypatch.setattr(samplers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match=r"pip install --no-deps k-diffusion"):
        samplers.check_solver("dpmpp_2m")
    assert samplers.check_solver("euler") == "euler"  # the built-in steps need nothing
    with pytest.raises(ValueError, match="unknown solver 'rk4'; choose one of euler, heun, dpmpp_2m"):
        samplers.check_solver("rk4")
