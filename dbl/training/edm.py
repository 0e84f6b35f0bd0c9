"""What the EDM tasks (images, autoregressive text) share: one place for the noise options.

``EDMDiffusionModule`` turns the flat YAML options (partition, overlap, loss weighting, EDM's
constants, solver defaults) into the pure pieces of ``dbl.diffusion`` and offers the three things
a task needs from them: a training sigma for a block, the weighted training loss, and an
evaluation over the whole noise distribution with every sigma routed to the block that owns it.
A task subclass adds only its denoiser and its per-sample loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from dbl.diffusion.partition import make_partition
from dbl.diffusion.preconditioning import check_loss_weighting, loss_weight, weighted_loss
from dbl.diffusion.samplers import sigma_grid
from dbl.diffusion.sigma import LogNormal
from dbl.training.engine import BlockwiseLightningModule

# per-sample loss of the samples selected by a boolean index, at their sigmas and noise, by one block
RoutedLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


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
            overridden per call, and none is stored with the model's weights.
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
        sample_solver: Literal["euler", "heun"] = "euler",
        sample_grid: Literal["cdf", "karras"] = "cdf",
        **kwargs,
    ):
        super().__init__(network, **kwargs)
        check_loss_weighting(loss_weighting)  # the partition's name is checked by make_partition
        self.density = LogNormal(p_mean, p_std)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.partition = make_partition(partition, self.num_blocks, overlap, sigma_min, sigma_max, self.density)
        self.loss_weighting, self.max_loss_weight = loss_weighting, max_loss_weight
        self.sample_defaults = dict(num_steps=sample_steps, solver=sample_solver, grid=sample_grid)

    def training_sigma(self, block: int, n: int, device: torch.device) -> torch.Tensor:
        """[n] sigma drawn from the EDM density restricted to ``block``'s widened range."""
        lo, hi = self.partition.widened_range(block)
        return self.density.sample(n, lo, hi, device=device)

    def training_loss(self, per_sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The scalar to back-propagate: per-sample losses reduced as ``loss_weighting`` says."""
        return weighted_loss(per_sample, sigma, self.loss_weighting, self.sigma_data, self.max_loss_weight)

    def routed_loss(self, per_sample_loss: RoutedLoss, noise_shape: tuple[int, ...], batch_idx: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Evaluate over the full EDM noise distribution, each sigma handled by the block that owns it.

        Sigma and noise come from a generator seeded by ``batch_idx``, so every evaluation and every
        model (block-wise or end-to-end) sees the same ones. Returns, per sample: the owning block,
        the unweighted loss and the lambda(sigma)-weighted loss (the paper's objective, whatever
        ``loss_weighting`` trains with, so every run is scored the same way).
        """
        gen = torch.Generator().manual_seed(batch_idx)
        sigma = self.density.sample(noise_shape[0], self.sigma_min, self.sigma_max, generator=gen, device=device)
        noise = torch.randn(noise_shape, generator=gen).to(device)
        owner = self.partition.block_of(sigma.cpu()).to(device)
        loss = torch.empty_like(sigma)
        for block in owner.unique().tolist():
            idx = owner == block
            loss[idx] = per_sample_loss(idx, sigma[idx], noise[idx], block)
        return owner, loss, loss_weight(sigma, self.sigma_data) * loss

    def sampler_options(self, **overrides) -> dict:
        """The module's solver defaults with every override that is not None applied."""
        return {**self.sample_defaults, **{k: v for k, v in overrides.items() if v is not None}}

    def sigma_schedule(self, num_steps: int, grid: str) -> torch.Tensor:
        """Descending sigma grid for an N-step solve over the module's noise range."""
        return sigma_grid(num_steps, grid, self.sigma_min, self.sigma_max, self.density)
