"""Image (and latent) diffusion with EDM, trained block-wise: the task of the DiT runs."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchmetrics import MeanMetric

from dbl.diffusion.partition import make_partition
from dbl.diffusion.preconditioning import check_loss_weighting, edm_scalings, loss_weight, weighted_loss
from dbl.diffusion.samplers import cfg_denoiser, sample, sigma_grid
from dbl.diffusion.sigma import LogNormal
from dbl.training.engine import BlockLoss, BlockwiseLightningModule


class ImageDiffusionModule(BlockwiseLightningModule):
    """EDM denoising of images, each block trained on its slice of the noise range.

    Batches are ``(images, labels)`` with images scaled to [-1, 1] (or latents scaled to unit-ish
    variance) and labels in [0, num_classes); ``labels`` may be None for unconditional data.

    Args:
        partition: how the noise range is split: ``equiprobable`` (the paper's), ``uniform_log``,
            ``uniform_linear``.
        overlap: gamma, the widening of each block's training range (paper: 0.05 for images).
        loss_weighting: ``edm`` (per-sample lambda(sigma), default), ``edm_clamped`` (lambda capped
            at ``max_loss_weight``), ``batch_mean`` (the official code's effective objective), ``none``.
        sigma_min, sigma_max, p_mean, p_std, sigma_data: EDM's constants.
        sample_steps, sample_solver, sample_grid, cfg_scale: defaults for ``sample``; each can be
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
        cfg_scale: float = 2.0,
        **kwargs,
    ):
        super().__init__(network, **kwargs)
        check_loss_weighting(loss_weighting)  # the partition's name is checked by make_partition
        self.density = LogNormal(p_mean, p_std)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.partition = make_partition(partition, self.num_blocks, overlap, sigma_min, sigma_max, self.density)
        self.loss_weighting, self.max_loss_weight = loss_weighting, max_loss_weight
        self.sample_defaults = dict(num_steps=sample_steps, solver=sample_solver, grid=sample_grid, cfg_scale=cfg_scale)
        self.val_loss, self.val_mse = MeanMetric(), MeanMetric()
        self.test_loss, self.test_mse = MeanMetric(), MeanMetric()
        self.val_block_loss = nn.ModuleList(MeanMetric() for _ in range(self.num_blocks))

    # -- the denoiser ----------------------------------------------------------------------
    def denoise(self, z: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None, block: int | None) -> torch.Tensor:
        """D(z, sigma) with EDM preconditioning, computed by ``block`` (None: all layers)."""
        sigma = sigma.to(z.dtype).expand(z.shape[0]) if sigma.dim() == 0 else sigma.to(z.dtype)
        c = edm_scalings(sigma.view(-1, *[1] * (z.dim() - 1)), self.sigma_data)
        raw = self.network(c.c_in * z, c.c_noise.flatten(), labels, block=block)
        return c.c_skip * z + c.c_out * raw

    def per_sample_loss(self, x, labels, sigma, noise, block) -> torch.Tensor:
        d = self.denoise(x + sigma.view(-1, *[1] * (x.dim() - 1)) * noise, sigma, labels, block)
        return (d.float() - x.float()).pow(2).flatten(1).mean(1)

    def block_loss(self, batch, block: int) -> BlockLoss:
        x, labels = batch
        lo, hi = self.partition.widened_range(block)
        sigma = self.density.sample(x.shape[0], lo, hi, device=x.device)
        mse = self.per_sample_loss(x, labels, sigma, torch.randn_like(x), block)
        loss = weighted_loss(mse, sigma, self.loss_weighting, self.sigma_data, self.max_loss_weight)
        return BlockLoss(loss, mse.mean(), sigma)

    # -- evaluation ------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        """Loss over the full EDM noise distribution, each sigma handled by the block that owns it.

        ``val/loss`` is the per-sample EDM-weighted loss (the paper's objective) whatever
        ``loss_weighting`` trains with, so every run is scored the same way; ``val/mse`` is
        unweighted. Noise is seeded by the batch index, so every evaluation and every model
        (block-wise or end-to-end) sees the same sigmas and noise.
        """
        owner, mse, weighted = self._routed_loss(batch, batch_idx)
        x = batch[0]
        for block in owner.unique().tolist():
            self.val_block_loss[block].update(weighted[owner == block])
        self.val_loss.update(weighted)
        self.val_mse.update(mse)
        self.log("val/loss", self.val_loss, prog_bar=True, batch_size=x.shape[0])
        self.log("val/mse", self.val_mse, batch_size=x.shape[0])

    def _routed_loss(self, batch, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(owning block, unweighted mse, EDM-weighted loss) per sample, noise seeded by ``batch_idx``."""
        x, labels = batch
        gen = torch.Generator().manual_seed(batch_idx)
        sigma = self.density.sample(x.shape[0], self.sigma_min, self.sigma_max, generator=gen, device=x.device)
        noise = torch.randn(x.shape, generator=gen).to(x)
        owner = self.partition.block_of(sigma.cpu()).to(x.device)
        mse = torch.empty_like(sigma)
        for block in owner.unique().tolist():
            idx = owner == block
            mse[idx] = self.per_sample_loss(x[idx], None if labels is None else labels[idx], sigma[idx], noise[idx], block)
        return owner, mse, loss_weight(sigma, self.sigma_data) * mse

    def test_step(self, batch, batch_idx: int) -> None:
        """The validation loss on the test loader, as ``test/loss`` and ``test/mse`` (FID: ``dbl.callbacks.FID``)."""
        _, mse, weighted = self._routed_loss(batch, batch_idx)
        self.test_loss.update(weighted)
        self.test_mse.update(mse)
        self.log("test/loss", self.test_loss, batch_size=mse.shape[0])
        self.log("test/mse", self.test_mse, batch_size=mse.shape[0])

    def on_validation_epoch_end(self) -> None:
        for block, metric in enumerate(self.val_block_loss):
            if metric.update_count:
                self.log(f"val_loss/block{block}", metric.compute())
            metric.reset()

    # -- sampling --------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        net = self.network.net
        return (net.in_channels, net.input_size, net.input_size)

    def example_batch(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Random data of the right shape (for benchmarks that measure memory and speed, not quality)."""
        x = torch.rand(batch_size, *self.image_shape, device=device) * 2 - 1
        num_classes = getattr(self.network.net, "num_classes", 0)
        return x, (torch.randint(0, num_classes, (batch_size,), device=device) if num_classes else None)

    def sample(
        self,
        labels: torch.Tensor | None = None,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
        solver: str | None = None,
        grid: str | None = None,
        cfg_scale: float | None = None,
    ) -> torch.Tensor:
        """Generate images by chaining the blocks from sigma_max down to 0; [N, C, H, W], data scale.

        Each solver step calls only the block whose nominal range holds the current sigma.
        ``num_steps`` and the rest default to the module's ``sample_*`` settings.
        """
        opts = {**self.sample_defaults, **{k: v for k, v in dict(num_steps=num_steps, solver=solver, grid=grid, cfg_scale=cfg_scale).items() if v is not None}}
        n = labels.shape[0] if labels is not None else num_samples
        if n is None:
            raise ValueError("sample() needs labels or num_samples")
        noise = torch.randn((n, *self.image_shape), generator=generator).to(self.device)
        sigmas = sigma_grid(opts["num_steps"], opts["grid"], self.sigma_min, self.sigma_max, self.density)

        def conditional(z, sigma, y):
            return self.denoise(z, sigma, y, block=int(self.partition.block_of(sigma.cpu())))

        if labels is None:
            denoiser = lambda z, sigma: conditional(z, sigma, labels)  # noqa: E731
        else:
            labels = labels.to(self.device)
            null = torch.full_like(labels, self.network.net.null_label)
            denoiser = cfg_denoiser(conditional, labels, null, opts["cfg_scale"])
        with self.sampling_mode():
            return sample(denoiser, noise, sigmas, opts["solver"])

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """``batch``: labels (a tensor, or a tuple whose last item is labels); returns images in [-1, 1]."""
        labels = batch[-1] if isinstance(batch, (tuple, list)) else batch
        gen = torch.Generator().manual_seed(batch_idx)
        return self.sample(labels=labels, generator=gen).clamp(-1, 1)
