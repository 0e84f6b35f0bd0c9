"""Image classification with a ``ViT``: block-wise label diffusion (the official DiffusionBlocks code's
task) and its end-to-end baseline (method spec, section 8).

- ``LabelDiffusionModule``: each block denoises the class's L2-normalised label embedding, noised
  with a sigma from the block's widened range, given the image; loss = cross-entropy of the logits
  the denoised estimate gives, times lambda(sigma) as ``loss_weighting`` says (``batch_mean``
  reproduces the official code). Prediction chains the blocks: ``sample_steps`` solver steps (one
  per block by default) from noise, each step's denoised estimate being softmax(logits) @ E; the
  last call's logits are the prediction.
- ``ViTClassifierModule``: the same ViT read out at [CLS], trained with plain cross-entropy.

Both are the block-wise engine, so optimizer, schedules, clipping, logging and checkpoints are the
same code and "equal layer-updates" is read off the same counter. Both report ``<stage>/acc``
(torchmetrics' accuracy) and ``<stage>/ce``, the cross-entropy of the logits they predict with.
Batches are ``(images [N, C, H, W] normalised, labels [N])`` (``dbl.data.classification``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from dbl.diagnose import DiagnosticSpec, StepRecorder, Trajectory
from dbl.diffusion.draws import Generators, randn
from dbl.diffusion.preconditioning import edm_scalings
from dbl.diffusion.samplers import sample
from dbl.errors import UsageError
from dbl.training.edm import EDMDiffusionModule
from dbl.training.engine import BlockLoss, BlockwiseLightningModule
from dbl.training.metrics import PerBlockMean, per_stage


class _ImageClassifier:
    """What both tasks share, placed before the engine in their bases: the data checks, the metrics,
    ``example_batch`` and ``predict_step``."""

    def __init__(self, network: nn.Module, **kwargs):
        super().__init__(network, **kwargs)
        for attr in ("label_logits", "num_classes", "image_size", "in_channels"):
            if not hasattr(self.network.net, attr):
                raise UsageError(f"{type(self.network.net).__name__} is not an image classifier like dbl.models.ViT: no `{attr}`")

    def classification_metrics(self) -> dict:
        return {"acc": MulticlassAccuracy(self.network.net.num_classes, average="micro"), "ce": MeanMetric()}

    def check_data(self, datamodule, stage: str) -> None:
        """Classes, channels and image size of the data against the network's, before step 0."""
        net, hp = self.network.net, getattr(datamodule, "hparams", {})
        expected = {"num_classes": net.num_classes, "channels": net.in_channels, "image_size": net.image_size}
        option = {"num_classes": "num_classes", "channels": "in_channels", "image_size": "image_size"}
        for name, value in expected.items():
            have = getattr(datamodule, name, None) or hp.get(name)
            if have is not None and have != value:
                raise UsageError(f"the data has {name} {have} but model.init_args.network.init_args.{option[name]} is {value}; "
                                 f"set {option[name]}: {have}")

    def update_classification_metrics(self, logits: torch.Tensor, labels: torch.Tensor, stage: str) -> None:
        metrics = self.eval_metrics[stage]
        metrics["acc"].update(logits, labels)
        metrics["ce"].update(F.cross_entropy(logits.float(), labels, reduction="none"))
        self.log(f"{stage}/acc", metrics["acc"], prog_bar=True, batch_size=labels.shape[0])
        self.log(f"{stage}/ce", metrics["ce"], batch_size=labels.shape[0])

    def example_batch(self, batch_size: int, seq_len: int | None = None):
        """Random ``(images, labels)`` of the network's shape (``seq_len`` does not apply)."""
        net = self.network.net
        images = torch.randn(batch_size, net.in_channels, net.image_size, net.image_size)
        return images, torch.randint(0, net.num_classes, (batch_size,))

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """``batch``: images, or ``(images, labels)``; returns the predicted class of each image."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.predict_logits(images, batch_idx).argmax(-1)


class LabelDiffusionModule(_ImageClassifier, EDMDiffusionModule):
    """Block-wise classification by label diffusion: each block denoises the label embedding for its
    slice of the noise range, conditioned on the image.

    Args:
        network: ``dbl.models.ViT`` (``noise_conditioning: true``).
        overlap: gamma, the widening of each block's training range (paper: 0.05).
        loss_weighting: ``batch_mean`` (default: the official code's objective, mean CE x mean
            lambda(sigma) over the batch) or the other weightings of ``EDMDiffusionModule``. With
            ``edm`` (per-sample lambda) the near-clean samples, whose label is all but given in
            the input, dominate the batch.
        sample_steps: solver steps of a prediction; default None = B, one step per block, as the
            official code (its grid is CDF-uniform: ``sample_grid: cdf``).
        inference_table: the table E of softmax(logits) @ E at sampling: ``normalized``, the rows
            the model was trained on, or ``raw``, the un-normalised rows the official code uses
            there (a train/test mismatch, kept to reproduce it).
        **kwargs: the noise options (``partition``, EDM's constants, ``sample_solver``,
            ``sample_grid``; see ``EDMDiffusionModule``) and the engine's (``num_blocks``,
            ``optimizer``, ``lr_scheduler``, ``shared_lr_scheduler``, ...). ``shared_io`` must stay
            true: the targets are the shared label table's rows.
    """

    def __init__(
        self,
        network: nn.Module,
        overlap: float = 0.05,
        loss_weighting: Literal["edm", "edm_clamped", "batch_mean", "none"] = "batch_mean",
        sample_steps: int | None = None,
        inference_table: Literal["normalized", "raw"] = "normalized",
        **kwargs,
    ):
        if not kwargs.get("shared_io", True):
            raise UsageError("LabelDiffusionModule needs shared_io: true (the diffusion targets are the shared label table's rows)")
        if inference_table not in ("normalized", "raw"):
            raise UsageError(f"inference_table must be 'normalized' or 'raw', got {inference_table!r}")
        super().__init__(network, overlap=overlap, loss_weighting=loss_weighting,
                         sample_steps=1 if sample_steps is None else sample_steps, **kwargs)
        if sample_steps is None:
            self.sample_defaults["num_steps"] = self.num_blocks
        if not getattr(self.network.net, "noise_conditioned", False):
            raise UsageError("LabelDiffusionModule needs a noise-conditioned network: set network noise_conditioning: true")
        self.inference_table = inference_table
        self.eval_metrics = per_stage(lambda: {**self.classification_metrics(), "loss": MeanMetric(), "denoising_ce": MeanMetric(),
                                               "block_ce": PerBlockMean(self.num_blocks)})

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return edm_scalings(sigma, self.denoiser.sigma_data).c_noise

    # -- the objective ---------------------------------------------------------------------
    def denoised_logits(self, images, labels, sigma, noise, block: int) -> torch.Tensor:
        """[N, classes] logits from ``block``'s denoised estimate of the label embedding, noised at ``sigma``
        with ``noise``."""
        net = self.network.net
        z = self.denoiser.noised(net.label_vectors(labels), sigma, noise)
        return net.label_logits(self.denoiser(z, sigma, images, block=block), self.c_noise(sigma))

    def per_sample_ce(self, images, labels, sigma, noise, block: int) -> torch.Tensor:
        """[N] cross-entropy of ``denoised_logits`` against the labels."""
        return F.cross_entropy(self.denoised_logits(images, labels, sigma, noise, block).float(), labels, reduction="none")

    def block_loss(self, batch, block: int) -> BlockLoss:
        images, labels = batch
        sigma = self.denoiser.training_sigma(block, labels.shape[0], labels.device)
        noise = torch.randn(labels.shape[0], self.network.net.hidden_size, device=labels.device)
        ce = self.per_sample_ce(images, labels, sigma, noise, block)
        return BlockLoss(self.training_loss(ce, sigma), ce.mean(), sigma)

    # -- prediction ------------------------------------------------------------------------
    def classify(self, images: torch.Tensor, generator: Generators = None, num_steps: int | None = None,
                 solver: str | None = None, grid: str | None = None, denoiser_hook=None) -> torch.Tensor:
        """[N, classes] logits of the last solver step, chaining the blocks from sigma_max down.

        Each step calls the block that owns its sigma; its denoised estimate for the solver is
        softmax(logits) @ E (``inference_table``). ``generator``: the starting noise. ``denoiser_hook``:
        wraps the denoiser the solver calls (``dbl diagnose`` records the steps).
        """
        opts = self.sampler_options(num_steps=num_steps, solver=solver, grid=grid)
        net = self.network.net
        images = images.to(self.device)
        last_logits: list[torch.Tensor] = []
        with self.sampling_mode():
            table = net.label_matrix(self.inference_table == "normalized")

            def estimate(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                logits = net.label_logits(self.denoiser(z, sigma, images), self.c_noise(sigma.expand(z.shape[0])))
                last_logits[:] = [logits]
                return logits.softmax(-1).to(table.dtype) @ table

            noise = randn((images.shape[0], net.hidden_size), generator).to(self.device, table.dtype)
            denoiser = estimate if denoiser_hook is None else denoiser_hook(estimate)
            sample(denoiser, noise, self.denoiser.sigmas(opts["num_steps"], opts["grid"]), opts["solver"], generator)
        return last_logits[0]

    def predict_logits(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """``classify`` with starting noise seeded by the batch index: every evaluation of a model is
        the same draw."""
        return self.classify(images, torch.Generator().manual_seed(batch_idx))

    # -- diagnostics (dbl.diagnose) --------------------------------------------------------
    def diagnostic_spec(self) -> DiagnosticSpec:
        return DiagnosticSpec("sigma", True, "CE of the denoised label (nats)", "lambda(sigma) x CE",
                              "KL(earlier block || later block) of the label distributions (nats)",
                              "RMS of the solver's update of the label embedding", kind="labels")

    def _diagnostic_noisy(self, batch, level: float, generator: torch.Generator):
        images, labels = batch
        sigma, noise = self.diagnostic_draws(labels.shape[0], level, (labels.shape[0], self.network.net.hidden_size),
                                             generator, labels.device)
        return images, labels, sigma, noise.to(images.dtype)

    def diagnostic_loss(self, batch, level: float, block: int, generator: torch.Generator):
        """[N] cross-entropy of ``block``'s denoised label at sigma = ``level``, and lambda(sigma) x it."""
        images, labels, sigma, noise = self._diagnostic_noisy(batch, level, generator)
        ce = self.per_sample_ce(images, labels, sigma, noise, block)
        return ce, self.diagnostic_weighted(ce, sigma)

    def diagnostic_prediction(self, batch, level: float, block: int, generator: torch.Generator) -> torch.Tensor:
        """``block``'s log-probabilities of the classes [N, classes] at sigma = ``level``."""
        images, labels, sigma, noise = self._diagnostic_noisy(batch, level, generator)
        return self.denoised_logits(images, labels, sigma, noise, block).float().log_softmax(-1)

    @staticmethod
    def diagnostic_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[N] KL(a || b) of log-probabilities over the classes."""
        return (a.exp() * (a - b)).sum(-1)

    def diagnostic_trajectory(self, batch, num_samples: int, generator: torch.Generator) -> Trajectory:
        """``classify`` (the chained prediction) of the first ``num_samples`` images, recording each step; per
        block, the class whose label embedding is nearest its last estimate, and the true label."""
        images, labels = batch[0][:num_samples], batch[1][:num_samples]
        recorder = StepRecorder(self.denoiser)
        logits = self.classify(images, generator, denoiser_hook=recorder)
        states = recorder.states  # the last step's update is not returned by classify (its logits are the prediction)
        updates = [float((states[i + 1] - states[i]).float().pow(2).mean(1).sqrt().mean()) for i in range(len(states) - 1)]
        updates.append(float("nan"))
        table = self.network.net.label_matrix(self.inference_table == "normalized").float()
        snapshots = {b: (recorder.outputs[i].float() @ table.T).argmax(-1, keepdim=True).cpu()
                     for b, i in recorder.last_calls().items()}
        notes = {b: labels.view(-1, 1).cpu() for b in snapshots}
        return Trajectory(recorder.levels, recorder.blocks, updates, snapshots, logits.argmax(-1, keepdim=True).cpu(), notes)

    # -- evaluation ------------------------------------------------------------------------
    def evaluation_step(self, batch, batch_idx: int, stage: str) -> None:
        """``<stage>/acc`` and ``<stage>/ce`` of the chained prediction; ``<stage>/loss`` (lambda-weighted)
        and ``<stage>/denoising_ce`` with each block's share, over the full noise distribution
        (``routed_loss``: every sigma handled by the block that owns it)."""
        images, labels = batch
        self.update_classification_metrics(self.predict_logits(images, batch_idx), labels, stage)

        def per_sample(index, sigma, noise, block):
            return self.per_sample_ce(images[index], labels[index], sigma, noise.to(images.dtype), block)

        owner, ce, weighted = self.routed_loss(per_sample, (labels.shape[0], self.network.net.hidden_size), batch_idx,
                                               labels.device)
        metrics = self.eval_metrics[stage]
        metrics["block_ce"].update(ce, owner)
        metrics["loss"].update(weighted)
        metrics["denoising_ce"].update(ce)
        self.log(f"{stage}/loss", metrics["loss"], batch_size=labels.shape[0])
        self.log(f"{stage}/denoising_ce", metrics["denoising_ce"], batch_size=labels.shape[0])

    def evaluation_epoch_end(self, stage: str) -> None:
        self.log_per_block(f"{stage}_denoising_ce", self.eval_metrics[stage]["block_ce"])


class ViTClassifierModule(_ImageClassifier, BlockwiseLightningModule):
    """The same ViT trained end to end with cross-entropy on its [CLS] token: the paper's baseline.

    The engine with ``num_blocks: 1`` (set here; any other value is an error).

    Args:
        network: ``dbl.models.ViT``, best built with ``noise_conditioning: false`` (then it is Hugging
            Face's ``ViTForImageClassification``; with it, the modulation is built and never used).
        num_blocks: always 1 (stated so that the CLI's default is 1, not the engine's).
        **kwargs: the engine's options (``optimizer``, ``lr_scheduler``, ``gradient_clip_val``, ...).
    """

    def __init__(self, network: nn.Module, num_blocks: int = 1, **kwargs):
        if num_blocks != 1:
            raise UsageError(f"ViTClassifierModule trains end to end: num_blocks must be 1, got {num_blocks}")
        super().__init__(network, num_blocks=1, **kwargs)
        self.eval_metrics = per_stage(self.classification_metrics)

    @property
    def leaves_parameters_unused(self) -> bool:
        return self.network.net.noise_conditioned  # the label table and modulation get no gradient

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.net.label_logits(self.network(None, None, images, block=0))

    def block_loss(self, batch, block: int) -> BlockLoss:
        images, labels = batch
        loss = F.cross_entropy(self.logits(images).float(), labels)
        return BlockLoss(loss, loss, torch.zeros(labels.shape[0], device=labels.device))  # no diffusion: noise level 0

    def predict_logits(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        with self.sampling_mode():
            return self.logits(images.to(self.device))

    def evaluation_step(self, batch, batch_idx: int, stage: str) -> None:
        images, labels = batch
        self.update_classification_metrics(self.logits(images), labels, stage)
