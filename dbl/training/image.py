"""Image (and latent) diffusion with EDM, trained block-wise: the task of the DiT runs."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric

from dbl.diffusion.preconditioning import edm_scalings
from dbl.diffusion.samplers import cfg_denoiser, sample
from dbl.training.edm import EDMDiffusionModule
from dbl.training.engine import BlockLoss
from dbl.training.metrics import PerBlockMean


class ImageDiffusionModule(EDMDiffusionModule):
    """EDM denoising of images, each block trained on its slice of the noise range.

    Batches are ``(images, labels)`` with images scaled to [-1, 1] (or latents scaled to unit-ish
    variance) and labels in [0, num_classes); ``labels`` may be None for unconditional data.

    Args:
        overlap: gamma, the widening of each block's training range (paper: 0.05 for images).
        sample_steps: default number of solver steps of ``sample`` (paper: 50).
        cfg_scale: default classifier-free guidance scale of ``sample`` (paper: 2.0); per call
            overridable, like the other ``sample_*`` defaults.
        **kwargs: the noise options (``partition``, ``loss_weighting``, EDM's constants,
            ``sample_solver``, ``sample_grid``; see ``EDMDiffusionModule``) and the engine's
            (``num_blocks``, ``block_schedule``, ``optimizer``, ...; see ``BlockwiseLightningModule``).
    """

    def __init__(self, network: nn.Module, overlap: float = 0.05, sample_steps: int = 50, cfg_scale: float = 2.0, **kwargs):
        super().__init__(network, overlap=overlap, sample_steps=sample_steps, **kwargs)
        self.sample_defaults["cfg_scale"] = cfg_scale
        self.val_loss, self.val_mse = MeanMetric(), MeanMetric()
        self.test_loss, self.test_mse = MeanMetric(), MeanMetric()
        self.val_block_loss = PerBlockMean(self.num_blocks)

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
        sigma = self.training_sigma(block, x.shape[0], x.device)
        mse = self.per_sample_loss(x, labels, sigma, torch.randn_like(x), block)
        return BlockLoss(self.training_loss(mse, sigma), mse.mean(), sigma)

    # -- evaluation ------------------------------------------------------------------------
    def _routed_loss(self, batch, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(owning block, unweighted mse, EDM-weighted loss) per sample; see ``routed_loss``."""
        x, labels = batch

        def mse(idx, sigma, noise, block):
            return self.per_sample_loss(x[idx], None if labels is None else labels[idx], sigma, noise.to(x), block)

        return self.routed_loss(mse, x.shape, batch_idx, x.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        """``val/loss`` (lambda(sigma)-weighted, the paper's objective), ``val/mse`` (unweighted) and
        each block's share, over the full noise distribution (``routed_loss``)."""
        owner, mse, weighted = self._routed_loss(batch, batch_idx)
        self.val_block_loss.update(weighted, owner)
        self.val_loss.update(weighted)
        self.val_mse.update(mse)
        self.log("val/loss", self.val_loss, prog_bar=True, batch_size=mse.shape[0])
        self.log("val/mse", self.val_mse, batch_size=mse.shape[0])

    def on_validation_epoch_end(self) -> None:
        self.log_per_block("val_loss", self.val_block_loss)

    def test_step(self, batch, batch_idx: int) -> None:
        """The validation loss on the test loader, as ``test/loss`` and ``test/mse`` (FID: ``dbl.callbacks.FID``)."""
        _, mse, weighted = self._routed_loss(batch, batch_idx)
        self.test_loss.update(weighted)
        self.test_mse.update(mse)
        self.log("test/loss", self.test_loss, batch_size=mse.shape[0])
        self.log("test/mse", self.test_mse, batch_size=mse.shape[0])

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
        opts = self.sampler_options(num_steps=num_steps, solver=solver, grid=grid, cfg_scale=cfg_scale)
        n = labels.shape[0] if labels is not None else num_samples
        if n is None:
            raise ValueError("sample() needs labels or num_samples")
        noise = torch.randn((n, *self.image_shape), generator=generator).to(self.device)
        sigmas = self.sigma_schedule(opts["num_steps"], opts["grid"])

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
