"""What the EDM tasks (images, autoregressive text) share: one place for the noise options.

``EDMDiffusionModule`` turns the flat YAML options (partition, overlap, loss weighting, EDM's
constants, solver defaults) into the block chain ``self.denoiser`` (``dbl.denoisers.EDMDenoiser``:
preconditioning, routing, guidance, sampling) and offers what a task needs besides: the weighted
training loss and an evaluation over the whole noise distribution with every sigma routed to the
block that owns it. A task subclass adds only its per-sample loss and its metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from dbl.denoisers import EDMDenoiser
from dbl.diffusion.partition import NoisePartition, make_partition
from dbl.diffusion.preconditioning import check_loss_weighting, loss_weight, weighted_loss
from dbl.diffusion.samplers import GridKind, Solver, check_solver
from dbl.diffusion.sigma import LogNormal
from dbl.errors import UsageError
from dbl.training.engine import BlockwiseLightningModule

# per-sample loss of the samples selected by ``index`` (``BlockChain.route``), at their sigmas and noise, by one block
RoutedLoss = Callable[[torch.Tensor | slice, torch.Tensor, torch.Tensor, int], torch.Tensor]


class EDMDiffusionModule(BlockwiseLightningModule):
    """EDM diffusion with a partitioned noise range; the base of the image and AR-text tasks.

    Args:
        partition: how the noise range is split: ``equiprobable`` (the paper's), ``uniform_log``,
            ``uniform_linear``.
        overlap: gamma, the widening of each block's training range.
        loss_weighting: ``edm`` (per-sample lambda(sigma), default), ``edm_clamped`` (lambda capped
            at ``max_loss_weight``), ``batch_mean`` (the official code's effective objective), ``none``.
        sigma_min, sigma_max, p_mean, p_std, sigma_data: EDM's constants.
        sample_steps, sample_solver, sample_grid: solver defaults for sampling; each can be
            overridden per call, and none is stored with the model's weights. Solvers other than
            ``euler`` and ``heun`` come from k-diffusion (``dbl.diffusion.samplers``).
        **kwargs: the engine's options (``num_blocks``, ``block_schedule``, ``optimizer``, ...),
            see ``BlockwiseLightningModule``.
    """

    def __init__(
        self,
        network: nn.Module,
        partition: Literal["equiprobable", "uniform_log", "uniform_linear"] = "equiprobable",
        overlap: float = 0.05,
        loss_weighting: Literal["edm", "edm_clamped", "batch_mean", "none"] = "edm",
        max_loss_weight: float = 1000.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_data: float = 0.5,
        sample_steps: int = 50,
        sample_solver: Solver = "euler",
        sample_grid: GridKind = "cdf",
        **kwargs,
    ):
        super().__init__(network, **kwargs)
        check_loss_weighting(loss_weighting)  # the partition's name is checked by make_partition
        if sample_steps < 1:
            raise UsageError(f"sample_steps must be >= 1, got {sample_steps}")
        check_solver(sample_solver)
        density = LogNormal(p_mean, p_std)
        self.denoiser = EDMDenoiser(
            self.network, make_partition(partition, self.num_blocks, overlap, sigma_min, sigma_max, density), density, sigma_data
        )
        self.loss_weighting, self.max_loss_weight = loss_weighting, max_loss_weight
        self.sample_defaults = dict(num_steps=sample_steps, solver=sample_solver, grid=sample_grid)

    @property
    def partition(self) -> NoisePartition:
        return self.denoiser.partition

    def training_loss(self, per_sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The scalar to back-propagate: per-sample losses reduced as ``loss_weighting`` says."""
        return weighted_loss(per_sample, sigma, self.loss_weighting, self.denoiser.sigma_data, self.max_loss_weight)

    def routed_loss(self, per_sample_loss: RoutedLoss, noise_shape: tuple[int, ...], batch_idx: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Evaluate over the full EDM noise distribution, each sigma handled by the block that owns it.

        Sigma and noise come from a generator seeded by ``batch_idx``, so every evaluation and every
        model (block-wise or end-to-end) sees the same ones. Returns, per sample: the owning block,
        the unweighted loss and the lambda(sigma)-weighted loss (the paper's objective, whatever
        ``loss_weighting`` trains with, so every run is scored the same way).
        """
        chain = self.denoiser
        gen = torch.Generator().manual_seed(batch_idx)
        sigma = chain.density.sample(noise_shape[0], chain.sigma_min, chain.sigma_max, generator=gen, device=device)
        noise = torch.randn(noise_shape, generator=gen).to(device)
        loss = chain.route(sigma, lambda index, block: per_sample_loss(index, sigma[index], noise[index], block))
        return chain.owner(sigma), loss, loss_weight(sigma, chain.sigma_data) * loss

    # -- diagnostics (dbl.diagnose): what every EDM task shares ---------------------------
    def diagnostic_levels(self, n: int) -> torch.Tensor:
        """[n] sigma evenly spaced in log from sigma_max down to sigma_min (noisiest first), float64."""
        chain = self.denoiser
        return torch.logspace(math.log10(chain.sigma_max), math.log10(chain.sigma_min), n, dtype=torch.float64)

    def diagnostic_draws(self, n: int, level: float, noise_shape: tuple[int, ...], generator: torch.Generator,
                         device) -> tuple[torch.Tensor, torch.Tensor]:
        """sigma [n] all at ``level`` and the noise, drawn from ``generator`` (the same for every block)."""
        sigma = torch.full((n,), float(level), device=device)
        return sigma, torch.randn(noise_shape, generator=generator).to(device)

    def diagnostic_weighted(self, loss: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) x the per-sample loss: the paper's objective, whatever ``loss_weighting`` trains with."""
        return loss_weight(sigma, self.denoiser.sigma_data) * loss

    def sampler_options(self, **overrides) -> dict:
        """The module's solver defaults with every override that is not None applied."""
        return {**self.sample_defaults, **{k: v for k, v in overrides.items() if v is not None}}
