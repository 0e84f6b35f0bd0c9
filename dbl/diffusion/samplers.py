"""Sampling: sigma grids and probability-flow ODE solvers as plain functions of a denoiser.

A denoiser is any callable ``D(z, sigma) -> estimate of the clean sample``, where ``sigma`` is a
0-dim tensor shared by the batch. dbl's models build one that routes each call to the block owning
sigma, so the number of steps is free (it never depends on B) and can change at evaluation time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from dbl.diffusion.sigma import LogNormal

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GridKind = Literal["cdf", "karras"]
Solver = Literal["euler", "heun"]


def sigma_grid(
    num_steps: int,
    kind: str = "cdf",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    density: LogNormal = LogNormal(),
    rho: float = 7.0,
) -> torch.Tensor:
    """Descending grid s_0 = sigma_max > ... > s_{N-1} = sigma_min, then s_N = 0 (N + 1 values, float64).

    ``cdf``: equal steps of the truncated log-normal's CDF mass (the official code's grid), so
    every block gets a share of the steps proportional to its training mass.
    ``karras``: EDM's rho-schedule, (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    frac = torch.linspace(0, 1, num_steps, dtype=torch.float64) if num_steps > 1 else torch.zeros(1, dtype=torch.float64)
    if kind == "cdf":
        q_hi, q_lo = density.cdf(sigma_max), density.cdf(sigma_min)
        sigmas = density.icdf(q_hi + (q_lo - q_hi) * frac)
        sigmas[0], sigmas[-1] = sigma_max, sigma_min if num_steps > 1 else sigma_max
    elif kind == "karras":
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        sigmas = (a + frac * (b - a)) ** rho
    else:
        raise ValueError(f"unknown sigma grid {kind!r}; choose 'cdf' or 'karras'")
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


SOLVERS = {"euler": euler_step, "heun": heun_step}


def sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    solver: str = "euler",
) -> torch.Tensor:
    """Integrate the probability-flow ODE from z = noise * sigmas[0] down the grid ``sigmas``."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    step = SOLVERS[solver]
    sigmas = sigmas.to(device=noise.device, dtype=torch.float32)
    z = noise * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        z = step(denoiser, z, s, s_next)
    return z


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
