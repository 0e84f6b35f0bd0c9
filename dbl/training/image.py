"""Image (and latent) diffusion with EDM, trained block-wise: the task of the DiT runs."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric

from dbl.diagnose import DiagnosticSpec, StepRecorder, Trajectory
from dbl.diffusion.draws import Generators, randn
from dbl.errors import UsageError
from dbl.training.checks import first_item
from dbl.training.edm import EDMDiffusionModule
from dbl.training.engine import BlockLoss
from dbl.training.metrics import PerBlockMean, per_stage


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
        self.eval_metrics = per_stage(lambda: {"loss": MeanMetric(), "mse": MeanMetric(), "block_loss": PerBlockMean(self.num_blocks)})

    def check_data(self, datamodule, stage: str) -> None:
        """Classes, channels and image size of the data against the network's, before step 0."""
        net = self.network.net
        classes, net_classes = getattr(datamodule, "num_classes", None), getattr(net, "num_classes", None)
        if classes and net_classes and classes > net_classes:
            raise UsageError(f"the data has {classes} classes (labels 0..{classes - 1}) but model.init_args.network.init_args.num_classes is "
                             f"{net_classes}; set num_classes: {classes}")
        item = first_item(datamodule, stage)
        if item is None or not isinstance(item, (tuple, list)) or not torch.is_tensor(item[0]):
            return
        image = item[0][0] if item[0].dim() == 4 else item[0]  # training latents come with all their views
        if image.dim() != 3:
            return
        (channels, height, width), in_channels, size = image.shape, getattr(net, "in_channels", None), getattr(net, "input_size", None)
        if in_channels is not None and channels != in_channels:
            raise UsageError(f"the data's images have {channels} channels but model.init_args.network.init_args.in_channels is {in_channels}; "
                             f"set in_channels: {channels}")
        if size is not None and (height, width) != (size, size):
            raise UsageError(f"the data's images are {height}x{width} but model.init_args.network.init_args.input_size is {size}; set input_size: "
                             f"{height} (or the data's image size to {size})")

    # -- the objective ---------------------------------------------------------------------
    def per_sample_loss(self, x, labels, sigma, noise, block: int) -> torch.Tensor:
        """[N] squared error of ``block``'s denoised estimate of ``x`` noised at ``sigma`` with ``noise``."""
        d = self.denoiser(self.denoiser.noised(x, sigma, noise), sigma, labels, block=block)
        return (d.float() - x.float()).pow(2).flatten(1).mean(1)

    def block_loss(self, batch, block: int) -> BlockLoss:
        x, labels = batch
        sigma = self.denoiser.training_sigma(block, x.shape[0], x.device)
        mse = self.per_sample_loss(x, labels, sigma, torch.randn_like(x), block)
        return BlockLoss(self.training_loss(mse, sigma), mse.mean(), sigma)

    # -- evaluation ------------------------------------------------------------------------
    def evaluation_step(self, batch, batch_idx: int, stage: str) -> None:
        """``<stage>/loss`` (lambda(sigma)-weighted, the paper's objective), ``<stage>/mse`` (unweighted)
        and each block's share, over the full noise distribution (``routed_loss``). FID: ``dbl.callbacks.FID``."""
        x, labels = batch

        def per_sample(index, sigma, noise, block):
            return self.per_sample_loss(x[index], None if labels is None else labels[index], sigma, noise.to(x), block)

        owner, mse, weighted = self.routed_loss(per_sample, x.shape, batch_idx, x.device)
        metrics = self.eval_metrics[stage]
        metrics["block_loss"].update(weighted, owner)
        metrics["loss"].update(weighted)
        metrics["mse"].update(mse)
        self.log(f"{stage}/loss", metrics["loss"], prog_bar=True, batch_size=mse.shape[0])
        self.log(f"{stage}/mse", metrics["mse"], batch_size=mse.shape[0])

    def evaluation_epoch_end(self, stage: str) -> None:
        self.log_per_block(f"{stage}_loss", self.eval_metrics[stage]["block_loss"])

    # -- diagnostics (dbl.diagnose) --------------------------------------------------------
    def diagnostic_spec(self) -> DiagnosticSpec:
        return DiagnosticSpec("sigma", True, "mse (per pixel)", "lambda(sigma) x mse",
                              "RMS distance between the two blocks' denoised images",
                              "RMS of the solver's update z_next - z", kind="images")

    def diagnostic_loss(self, batch, level: float, block: int, generator: torch.Generator):
        """[N] mse and lambda(sigma) x mse of ``block`` at sigma = ``level``; noise from ``generator``."""
        x, labels = batch
        sigma, noise = self.diagnostic_draws(x.shape[0], level, x.shape, generator, x.device)
        mse = self.per_sample_loss(x, labels, sigma, noise.to(x), block)
        return mse, self.diagnostic_weighted(mse, sigma)

    def diagnostic_prediction(self, batch, level: float, block: int, generator: torch.Generator) -> torch.Tensor:
        """``block``'s denoised images [N, C, H, W] at sigma = ``level`` (the draws of ``diagnostic_loss``)."""
        x, labels = batch
        sigma, noise = self.diagnostic_draws(x.shape[0], level, x.shape, generator, x.device)
        return self.denoiser(self.denoiser.noised(x, sigma, noise.to(x)), sigma, labels, block=block)

    @staticmethod
    def diagnostic_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[N] RMS distance per sample."""
        return (a.float() - b.float()).pow(2).flatten(1).mean(1).sqrt()

    def diagnostic_trajectory(self, batch, num_samples: int, generator: torch.Generator) -> Trajectory:
        """``sample`` (the module's solver, grid and guidance) for the first ``num_samples`` labels of ``batch``,
        recording each denoiser call; per block, the denoised estimate of its last call."""
        labels = batch[1][:num_samples] if batch[1] is not None and self.num_classes else None
        recorder = StepRecorder(self.denoiser)
        final = self.sample(labels=labels, num_samples=num_samples, generator=generator, denoiser_hook=recorder)
        states = recorder.states
        updates = [float(self.diagnostic_divergence(recorder.state_after(i, final), states[i]).mean()) for i in range(len(states))]
        snapshots = {b: recorder.outputs[i] for b, i in recorder.last_calls().items()}
        return Trajectory(recorder.levels, recorder.blocks, updates, snapshots, final)

    # -- sampling --------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        net = self.network.net
        return (net.in_channels, net.input_size, net.input_size)

    @property
    def num_classes(self) -> int:
        """Class labels the network is conditioned on (0: unconditional)."""
        return getattr(self.network.net, "num_classes", 0)

    def example_batch(self, batch_size: int, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Random images of the right shape and labels (``seq_len`` does not apply to images)."""
        x = torch.rand(batch_size, *self.image_shape) * 2 - 1
        return x, (torch.randint(0, self.num_classes, (batch_size,)) if self.num_classes else None)

    def sample(
        self,
        labels: torch.Tensor | None = None,
        num_samples: int | None = None,
        generator: Generators = None,
        num_steps: int | None = None,
        solver: str | None = None,
        grid: str | None = None,
        cfg_scale: float | None = None,
        denoiser_hook=None,
    ) -> torch.Tensor:
        """Generate images by chaining the blocks from sigma_max down to 0; [N, C, H, W], data scale.

        Each solver step calls only the block whose nominal range holds the current sigma.
        ``generator``: one CPU generator, or one per sample (``dbl.diffusion.draws``). ``num_steps`` and the rest default to the module's ``sample_*`` settings.
        ``denoiser_hook``: wraps the denoiser the solver calls (``EDMDenoiser.sample``; ``dbl diagnose`` records the steps).
        """
        opts = self.sampler_options(num_steps=num_steps, solver=solver, grid=grid, cfg_scale=cfg_scale)
        n = labels.shape[0] if labels is not None else num_samples
        if n is None:
            raise ValueError("sample() needs labels or num_samples")
        noise = randn((n, *self.image_shape), generator).to(self.device)
        sigmas = self.denoiser.sigmas(opts["num_steps"], opts["grid"])
        null = None
        if labels is not None:
            labels = labels.to(self.device)
            null = torch.full_like(labels, self.network.net.null_label)
        with self.sampling_mode():
            return self.denoiser.sample(noise, sigmas, opts["solver"], labels, null, opts["cfg_scale"], generator,
                                        denoiser_hook)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """``batch``: labels (a tensor, or a tuple whose last item is labels); returns images in [-1, 1]."""
        labels = batch[-1] if isinstance(batch, (tuple, list)) else batch
        gen = torch.Generator().manual_seed(batch_idx)
        return self.sample(labels=labels, generator=gen).clamp(-1, 1)
