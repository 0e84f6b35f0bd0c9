"""Sampling: sigma grids and probability-flow ODE solvers as plain functions of a denoiser.

A denoiser is any callable ``D(z, sigma) -> estimate of the clean sample``, where ``sigma`` is a
0-dim tensor shared by the batch. dbl's chains (``dbl.denoisers``) route each call to the block
owning sigma, so the number of steps is free (it never depends on B) and can change at evaluation
time.

Solvers: ``euler`` (the paper's) and ``heun`` (EDM's) are the two short steps below; the others
come from k-diffusion's ``sampling`` module (Karras et al.'s reference code), called with the same
``D`` and grid: ``dpmpp_2m`` (DPM-Solver++ 2M), ``euler_ancestral``, ``lms`` (4th-order linear
multistep), ``dpmpp_2s_ancestral``. The two built-in steps are tested against k-diffusion's
``sample_euler`` / ``sample_heun``; they stay here because those draw (and discard) a normal sample
from the global generator at every step, which would shift the training noise of any run that
samples mid-training.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Literal, get_args

import torch

from dbl.diffusion.draws import Generators, randn
from dbl.diffusion.sigma import LogNormal
from dbl.errors import UsageError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GridKind = Literal["cdf", "cdf_midpoint", "karras"]
Solver = Literal["euler", "heun", "dpmpp_2m", "euler_ancestral", "lms", "dpmpp_2s_ancestral"]  # = SOLVERS
# dbl's name -> k-diffusion's sampling function
K_DIFFUSION_SOLVERS = {
    "dpmpp_2m": "sample_dpmpp_2m",
    "euler_ancestral": "sample_euler_ancestral",
    "lms": "sample_lms",
    "dpmpp_2s_ancestral": "sample_dpmpp_2s_ancestral",
}
STOCHASTIC_SOLVERS = ("euler_ancestral", "dpmpp_2s_ancestral")
K_DIFFUSION_INSTALL = "pip install --no-deps k-diffusion==0.1.1.post1 && pip install 'dbl[solvers]'"


def sigma_grid(
    num_steps: int,
    kind: str = "cdf",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    density: LogNormal = LogNormal(),
    rho: float = 7.0,
) -> torch.Tensor:
    """Descending grid s_0 > ... > s_{N-1}, then s_N = 0 (N + 1 values, float64); ``cdf`` and ``karras``
    run from s_0 = sigma_max to s_{N-1} = sigma_min.

    ``cdf``: equal steps of the truncated log-normal's CDF mass (the official code's grid), so
    every block gets a share of the steps proportional to its training mass.
    ``cdf_midpoint``: the range cut into N cells of equal CDF mass, one point at the middle (in mass)
    of each; with N = B under the equi-probability partition, one point at the centre of each block's
    training mass. It starts below sigma_max (then z = s_0 * noise), where the top block has trained.
    ``karras``: EDM's rho-schedule, (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    frac = torch.linspace(0, 1, num_steps, dtype=torch.float64) if num_steps > 1 else torch.zeros(1, dtype=torch.float64)
    if kind == "cdf":
        q_hi, q_lo = density.cdf(sigma_max), density.cdf(sigma_min)
        sigmas = density.icdf(q_hi + (q_lo - q_hi) * frac)
        sigmas[0], sigmas[-1] = sigma_max, sigma_min if num_steps > 1 else sigma_max
    elif kind == "cdf_midpoint":
        q_hi, q_lo = density.cdf(sigma_max), density.cdf(sigma_min)
        sigmas = density.icdf(q_hi + (q_lo - q_hi) * (torch.arange(num_steps, dtype=torch.float64) + 0.5) / num_steps)
    elif kind == "karras":
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        sigmas = (a + frac * (b - a)) ** rho
    else:
        raise UsageError(f"unknown sigma grid {kind!r}; choose 'cdf', 'cdf_midpoint' or 'karras'")
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def euler_step(denoiser: Denoiser, z: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
    """z <- z + (s_next - s) (z - D(z, s)) / s: with a perfect denoiser, noise level s becomes s_next.

    The sign is the official code's; the paper's equations (3)-(4) have it backwards.
    """
    return z + (s_next - s) * (z - denoiser(z, s)) / s


def heun_step(denoiser: Denoiser, z: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
    """EDM's second-order step: Euler, then average the slopes at both ends (Euler when s_next = 0)."""
    slope = (z - denoiser(z, s)) / s
    z_next = z + (s_next - s) * slope
    if s_next == 0:
        return z_next
    slope_next = (z_next - denoiser(z_next, s_next)) / s_next
    return z + (s_next - s) * (slope + slope_next) / 2


STEPS = {"euler": euler_step, "heun": heun_step}
SOLVERS: tuple[str, ...] = get_args(Solver)
assert SOLVERS == (*STEPS, *K_DIFFUSION_SOLVERS), "Solver must list the built-in steps, then k-diffusion's"


def check_solver(solver: str) -> str:
    """``solver`` if it is one of ``SOLVERS`` and can run here, else a one-line error saying what to do."""
    if solver not in SOLVERS:
        raise UsageError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if solver in K_DIFFUSION_SOLVERS:
        k_diffusion_sampling()
    return solver


def k_diffusion_sampling() -> types.ModuleType:
    """k-diffusion's ``sampling`` module, imported without the package's ``__init__``.

    The published wheel (0.1.1.post1) declares CLIP, clean-fid, kornia, wandb and a numpy<2 pin
    (through dctorch) as dependencies, and its ``__init__`` imports all of them; numpy<2 breaks
    pyarrow and so ``datasets``. The sampling module itself needs only scipy, torchdiffeq, torchsde
    and tqdm (``dbl[solvers]``), so dbl installs the wheel with ``--no-deps`` and imports just that
    module. A later ``import k_diffusion`` (with its full dependencies) still works.
    """
    name = "k_diffusion.sampling"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        raise UsageError(f"solvers {', '.join(K_DIFFUSION_SOLVERS)} come from k-diffusion, which is not installed: "
                         f"{K_DIFFUSION_INSTALL}")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = package
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise UsageError(f"k-diffusion's sampling module needs {err.name}, which is not installed: "
                         "pip install 'dbl[solvers]'") from None
    finally:
        del sys.modules["k_diffusion"]  # the real package (if ever imported) must run its own __init__


def sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    solver: str = "euler",
    generator: Generators = None,
) -> torch.Tensor:
    """Integrate from z = noise * sigmas[0] down the grid ``sigmas`` (descending, ending in 0).

    ``generator`` draws the fresh noise of the stochastic solvers (``euler_ancestral``,
    ``dpmpp_2s_ancestral``): one generator, or one per sample (``dbl.diffusion.draws``).
    """
    check_solver(solver)
    sigmas = sigmas.to(device=noise.device, dtype=torch.float32)
    z = noise * sigmas[0]
    if solver in STEPS:
        step = STEPS[solver]
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            z = step(denoiser, z, s, s_next)
        return z
    solve = getattr(k_diffusion_sampling(), K_DIFFUSION_SOLVERS[solver])
    kwargs = {}
    if solver in STOCHASTIC_SOLVERS:
        kwargs["noise_sampler"] = lambda sigma, sigma_next: randn(z.shape, generator).to(z)
    # k-diffusion passes sigma * ones(N); every sample of a solver step shares one sigma
    return solve(lambda x, sigma: denoiser(x, sigma[0]), z, sigmas, disable=True, **kwargs)


def cfg_denoiser(
    conditional: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    null_labels: torch.Tensor,
    scale: float,
) -> Denoiser:
    """Classifier-free guidance: D = D_uncond + scale * (D_cond - D_uncond).

    ``conditional(z, sigma, labels)`` is the label-conditioned denoiser; ``null_labels`` the
    labels meaning "no condition". Scale 1 is plain conditional sampling (one call per step).
    """
    if scale == 1.0:
        return lambda z, sigma: conditional(z, sigma, labels)

    def guided(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        both = conditional(torch.cat([z, z]), sigma, torch.cat([labels, null_labels]))
        d_cond, d_uncond = both.chunk(2)
        return d_uncond + scale * (d_cond - d_uncond)

    return guided
