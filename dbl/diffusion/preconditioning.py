"""EDM preconditioning and loss weighting (Karras et al. 2022; method spec, sections 2 and 4).

The denoiser is D(z, s) = c_skip(s) z + c_out(s) F(c_in(s) z, c_noise(s), condition) for a raw
network F. The training loss of a sample is lambda(s) * ||D - y||^2 with
lambda(s) = (s^2 + sd^2) / (s sd)^2, which makes the effective target of F unit-variance.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from dbl.errors import UsageError

LossWeighting = Literal["edm", "edm_clamped", "batch_mean", "none"]
LOSS_WEIGHTINGS: tuple[str, ...] = ("edm", "edm_clamped", "batch_mean", "none")


class Scalings(NamedTuple):
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def edm_scalings(sigma: torch.Tensor, sigma_data: float = 0.5) -> Scalings:
    """c_skip, c_out, c_in, c_noise for each sigma (same shape as ``sigma``)."""
    s2, sd2 = sigma**2, sigma_data**2
    return Scalings(
        c_skip=sd2 / (s2 + sd2),
        c_out=sigma * sigma_data / (s2 + sd2).sqrt(),
        c_in=1 / (s2 + sd2).sqrt(),
        c_noise=sigma.log() / 4,
    )


def loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def check_loss_weighting(weighting: str) -> str:
    """``weighting`` if it is one of ``LOSS_WEIGHTINGS``, else a ValueError naming the choices."""
    if weighting not in LOSS_WEIGHTINGS:
        raise UsageError(f"unknown loss_weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    return weighting


def weighted_loss(
    per_sample_loss: torch.Tensor,
    sigma: torch.Tensor,
    weighting: str = "edm",
    sigma_data: float = 0.5,
    max_weight: float = 1000.0,
) -> torch.Tensor:
    """Reduce a [N] per-sample loss to a scalar under one of the weightings.

    - ``edm``: mean_i lambda(s_i) * l_i, the paper's stated objective (default).
    - ``edm_clamped``: the same with lambda clamped at ``max_weight``, so a single sample near
      sigma_min (lambda ~ 2.5e5) cannot dominate the batch.
    - ``batch_mean``: mean(lambda) * mean(l). The official code multiplies a [N] loss by a [N, 1]
      weight, which broadcasts to N x N and computes exactly this; offered to reproduce it.
    - ``none``: mean_i l_i.
    """
    if per_sample_loss.shape != sigma.shape or per_sample_loss.dim() != 1:
        raise UsageError(
            f"per_sample_loss and sigma must both be [N]; got {tuple(per_sample_loss.shape)} and {tuple(sigma.shape)}"
        )
    check_loss_weighting(weighting)
    if weighting == "none":
        return per_sample_loss.mean()
    weight = loss_weight(sigma, sigma_data)
    if weighting == "edm":
        return (weight * per_sample_loss).mean()
    if weighting == "edm_clamped":
        return (weight.clamp(max=max_weight) * per_sample_loss).mean()
    return weight.mean() * per_sample_loss.mean()  # batch_mean
