"""Autoregressive language modelling with the ``Llama`` decoder: block-wise AR diffusion and its baseline
(the LM1B task).

- ``ARDiffusionLMModule``: DiffusionBlocks' autoregressive text model. Token i's normalised
  embedding is noised with a per-sample sigma from the active block's widened range and denoised
  conditioned on the clean tokens < i; loss = lambda(sigma) * cross-entropy (``loss_weighting``).
- ``NextTokenLMModule``: the same decoder trained end to end with ordinary next-token
  cross-entropy; it reports exact perplexity.

Both are the block-wise engine (``BlockwiseLightningModule``): the baseline is the engine with one
block, so both runs share the optimizer and LR-scheduler code, gradient clipping, logging and
checkpoint format, and "equal layer-updates" is read off the same ``block_updates`` counter.

Batches are ``(tokens [N, T] long, loss_mask [N, T])`` from ``dbl.data.LM1BDataModule``.
Free-running generation is in ``dbl.denoisers.text``; ``dbl.callbacks.LMGenerationMetrics`` scores it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, SumMetric

from dbl.denoisers.text import generate_ar_diffusion, generate_next_token
from dbl.diagnose import DiagnosticSpec, StepRecorder, Trajectory, mean_kl
from dbl.diffusion.draws import Generators
from dbl.errors import UsageError
from dbl.models.llama import ARInput
from dbl.training.edm import EDMDiffusionModule
from dbl.training.engine import BlockLoss, BlockwiseLightningModule
from dbl.training.losses import linear_cross_entropy
from dbl.training.metrics import PerBlockMean, per_stage


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, T] -> [N] mean over the positions where ``mask`` is set."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


class _LanguageModel:
    """What both LM1B tasks share, placed before the engine in their bases: the decoder and vocabulary
    checks, the generation defaults, ``example_batch`` and ``predict_step``."""

    def __init__(self, network: nn.Module, generate_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 **kwargs):
        super().__init__(network, **kwargs)
        for attr in ("token_vectors", "token_table", "denoised_logits", "denoised_head"):
            if not hasattr(self.network.net, attr):
                raise UsageError(f"{type(self.network.net).__name__} is not a text decoder like dbl.models.Llama: no `{attr}`")
        if generate_tokens < 1:
            raise UsageError(f"generate_tokens must be >= 1, got {generate_tokens}")
        if temperature < 0:
            raise UsageError(f"temperature must be >= 0 (0 = argmax), got {temperature}")
        if not 0 < top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1] (1 = no nucleus cut), got {top_p}")
        self.generate_tokens, self.temperature, self.top_p = generate_tokens, temperature, top_p

    def token_nll(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, T-1] next-token NLL of tokens 1..T-1 through the clean path of all layers, and the mask of
        positions that count."""
        tokens, loss_mask = batch
        logits = self.network(None, None, ARInput(tokens[:, :-1]), block=None if self.num_blocks > 1 else 0)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
        return nll.view(tokens.shape[0], -1), loss_mask[:, 1:].to(logits.dtype)

    def update_next_token_metrics(self, batch, stage: str) -> None:
        nll, mask = self.token_nll(batch)
        metrics = self.eval_metrics[stage]
        metrics["nll"].update((nll * mask).sum())
        metrics["tokens"].update(mask.sum())

    def log_next_token_metrics(self, stage: str, prefix: str) -> None:
        """``<stage>/<prefix>ce`` and ``ppl``: exact, the summed NLL over the summed predicted tokens."""
        metrics = self.eval_metrics[stage]
        ce = metrics["nll"].compute() / metrics["tokens"].compute().clamp(min=1)
        self.log(f"{stage}/{prefix}ce", ce, prog_bar=True)
        self.log(f"{stage}/{prefix}ppl", ce.exp(), prog_bar=not prefix)
        metrics["nll"].reset()
        metrics["tokens"].reset()

    def check_data(self, datamodule, stage: str) -> None:
        """The tokenizer's vocabulary against the network's, before step 0."""
        vocab = getattr(datamodule, "vocab_size", None)
        if vocab is not None and vocab > self.network.net.vocab_size:
            raise UsageError(f"the tokenizer has {vocab} tokens but model.init_args.network.init_args.vocab_size is "
                             f"{self.network.net.vocab_size}; set network vocab_size >= {vocab}")

    def example_batch(self, batch_size: int, seq_len: int | None = None):
        """Random ``(tokens [N, seq_len], loss_mask)``, default 256 tokens (for benchmarks)."""
        tokens = torch.randint(0, self.network.net.vocab_size, (batch_size, seq_len or 256))
        return tokens, torch.ones(tokens.shape)

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """``batch``: prompts [N, p] of equal length (or a tuple whose first item is that)."""
        prompt = batch[0] if isinstance(batch, (tuple, list)) else batch
        gen = torch.Generator().manual_seed(batch_idx)
        return {"prompt": prompt, "continuation": self.generate(prompt, generator=gen)}


class ARDiffusionLMModule(_LanguageModel, EDMDiffusionModule):
    """Autoregressive diffusion in embedding space, each block trained on its slice of the noise range.

    Args:
        network: ``dbl.models.Llama``.
        overlap: gamma, the widening of each block's training range (paper: 0.1 for AR text).
        sample_steps: default solver steps per generated token (per call overridable).
        temperature: 0 takes the argmax of the last step's logits; > 0 samples at that temperature.
        top_p: nucleus sampling: sample among the most likely tokens whose probability adds up to top_p.
        generate_tokens: continuation length of ``dbl predict``.
        anchor_weight: w > 0 adds w x the next-token cross-entropy of the clean path (the active
            block's clean rows, then the later blocks' layers, frozen for the step, then the head):
            the model's ordinary next-token path, kept from drifting while only the active block
            trains. With a pretrained network (chained clean stream) it is that model's own loss.
        next_token_metrics: also report ``<stage>/next_token_ce`` and ``next_token_ppl`` (exact) of the
            clean path through all layers; default on for networks whose blocks chain their clean
            stream (a pretrained model keeps a next-token path), off otherwise.
        recompute_head: the head's cross-entropy recomputes each chunk's logits in backward (memory:
            one chunk of logits, one more [N T, D] x [D, V] product) instead of keeping the [N T, V]
            float32 exponentials from the forward (``dbl.training.losses.linear_cross_entropy``).
        **kwargs: the noise options (``partition``, ``loss_weighting``: ``edm`` is per-sample
            lambda(sigma) * CE, the paper's stated objective; EDM's constants, ``sample_solver``,
            ``sample_grid``; see ``EDMDiffusionModule``) and the engine's (``num_blocks``,
            ``optimizer``, ...). ``shared_io`` must stay true: the diffusion runs on the rows of the
            token table, which every block must share.
    """

    def __init__(
        self,
        network: nn.Module,
        overlap: float = 0.1,
        sample_steps: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generate_tokens: int = 64,
        anchor_weight: float = 0.0,
        next_token_metrics: bool | None = None,
        recompute_head: bool = False,
        **kwargs,
    ):
        if not kwargs.get("shared_io", True):
            raise UsageError("ARDiffusionLMModule needs shared_io: true (the diffusion targets are the shared token table's rows)")
        if anchor_weight < 0:
            raise UsageError(f"anchor_weight must be >= 0 (0 = no next-token anchor), got {anchor_weight}")
        super().__init__(network, overlap=overlap, sample_steps=sample_steps, temperature=temperature, top_p=top_p,
                         generate_tokens=generate_tokens, **kwargs)
        self.anchor_weight = anchor_weight
        self.recompute_head = recompute_head
        if next_token_metrics is None:
            next_token_metrics = bool(getattr(self.network.net, "chained_clean_stream", False))
        self.next_token_metrics = next_token_metrics
        self.eval_metrics = per_stage(lambda: {"loss": MeanMetric(), "ce": MeanMetric(), "block_ce": PerBlockMean(self.num_blocks),
                                               "nll": SumMetric(), "tokens": SumMetric()})

    @property
    def leaves_parameters_unused(self) -> bool:
        # besides other blocks' layers: parts of the network that only another training uses
        # (``RecurrentDepthLlama``'s adapter belongs to its truncated back-propagation baseline)
        return super().leaves_parameters_unused or getattr(self.network.net, "diffusion_leaves_parameters_unused", False)

    # -- the objective ---------------------------------------------------------------------
    def logits(self, tokens: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, block: int,
               clean_hidden: list | None = None) -> torch.Tensor:
        """[N, T, V] logits of every token from ``block``'s denoised estimate of its embedding, noised at
        sigma [N] with ``noise``, given the clean tokens before it. ``clean_hidden``: see ``ARInput``."""
        net = self.network.net
        z = self.denoiser.noised(net.token_vectors(tokens), sigma, noise)
        return net.denoised_logits(self.denoiser(z, sigma, ARInput(tokens, clean_hidden=clean_hidden), block=block))

    def per_sample_ce(self, tokens, loss_mask, sigma, noise, block, clean_hidden: list | None = None) -> torch.Tensor:
        """[N] cross-entropy of ``logits`` against the tokens, mean over ``loss_mask``. The head runs a
        chunk of rows at a time on the positions the mask counts (``dbl.training.losses``): the same
        value as the full logits' cross-entropy without holding all [N T, V] of them."""
        net = self.network.net
        z = self.denoiser.noised(net.token_vectors(tokens), sigma, noise)
        denoised = self.denoiser(z, sigma, ARInput(tokens, clean_hidden=clean_hidden), block=block)
        weight, bias, scale = net.denoised_head()
        ce = linear_cross_entropy(denoised, weight, tokens, scale=scale, bias=bias, mask=loss_mask,
                                  recompute=self.recompute_head)
        return _masked_mean(ce, loss_mask)

    def anchor_ce(self, tokens: torch.Tensor, loss_mask: torch.Tensor, block: int, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of the clean rows that left ``block`` as ``hidden`` [N, T, d]: the later
        blocks' layers (their weights frozen here: this step trains ``block`` only), then the head."""
        network = self.network
        _, c = network.io(block).embed(None, None, ARInput(tokens))  # the clean rows' mask and positions
        later = network.net.layers[network.bounds[block][1]:]
        frozen = [p for p in later.parameters() if p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(False)
            for layer in later:
                hidden = layer(hidden, c)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        logits = network.io(block).head(hidden, c)[:, :-1]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
        mask = loss_mask[:, 1:].to(nll.dtype).flatten()
        return (nll * mask).sum() / mask.sum().clamp(min=1)

    def block_loss(self, batch, block: int) -> BlockLoss:
        tokens, loss_mask = batch
        sigma = self.denoiser.training_sigma(block, tokens.shape[0], tokens.device)
        noise = torch.randn((*tokens.shape, self.network.net.hidden_size), device=tokens.device)
        hidden = [] if self.anchor_weight else None
        ce = self.per_sample_ce(tokens, loss_mask, sigma, noise, block, hidden)
        loss = self.training_loss(ce, sigma)
        if self.anchor_weight:
            anchor = self.anchor_ce(tokens, loss_mask, block, hidden[0])
            if self._trainer is not None and self.trainer.training:  # not when profiled (dbl info, benchmarks)
                self.log("train/anchor_ce", anchor.detach(), batch_size=tokens.shape[0])
            loss = loss + self.anchor_weight * anchor
        return BlockLoss(loss, ce.mean(), sigma)

    # -- evaluation ------------------------------------------------------------------------
    def evaluation_step(self, batch, batch_idx: int, stage: str) -> None:
        """``<stage>/loss`` (lambda(sigma)-weighted), ``<stage>/ce`` (unweighted) and each block's CE,
        over the full noise distribution (``routed_loss``). Neither is a likelihood: score
        generations with ``dbl.callbacks.LMGenerationMetrics``.
        """
        tokens, loss_mask = batch

        def per_sample(index, sigma, noise, block):
            return self.per_sample_ce(tokens[index], loss_mask[index], sigma, noise, block)

        noise_shape = (*tokens.shape, self.network.net.hidden_size)
        owner, ce, weighted = self.routed_loss(per_sample, noise_shape, batch_idx, tokens.device)
        metrics = self.eval_metrics[stage]
        metrics["block_ce"].update(ce, owner)
        metrics["loss"].update(weighted)
        metrics["ce"].update(ce)
        self.log(f"{stage}/loss", metrics["loss"], prog_bar=True, batch_size=tokens.shape[0])
        self.log(f"{stage}/ce", metrics["ce"], batch_size=tokens.shape[0])
        if self.next_token_metrics:
            self.update_next_token_metrics(batch, stage)

    def evaluation_epoch_end(self, stage: str) -> None:
        self.log_per_block(f"{stage}_ce", self.eval_metrics[stage]["block_ce"])
        if self.next_token_metrics:
            self.log_next_token_metrics(stage, "next_token_")

    # -- generation ------------------------------------------------------------------------
    def generate(
        self,
        prompt: torch.Tensor,
        num_tokens: int | None = None,
        generator: Generators = None,
        num_steps: int | None = None,
        solver: str | None = None,
        grid: str | None = None,
        temperature: float | None = None,
        use_cache: bool = True,
        top_p: float | None = None,
        denoiser_hook=None,
    ) -> torch.Tensor:
        """Continue ``prompt`` [N, p]; [N, num_tokens]. Unset options take the module's defaults.
        ``denoiser_hook``: wraps the denoiser each token's solver calls (``dbl diagnose`` records the steps)."""
        opts = self.sampler_options(num_steps=num_steps, solver=solver, grid=grid)
        sigmas = self.denoiser.sigmas(opts["num_steps"], opts["grid"])
        with self.sampling_mode():
            return generate_ar_diffusion(
                self.denoiser, prompt.to(self.device), num_tokens or self.generate_tokens, sigmas, opts["solver"],
                self.temperature if temperature is None else temperature, generator, use_cache,
                self.top_p if top_p is None else top_p, denoiser_hook,
            )

    # -- diagnostics (dbl.diagnose) --------------------------------------------------------
    diagnostic_prompt_tokens = 8  # the trajectory continues the first tokens of each sequence
    diagnostic_new_tokens = 8

    def diagnostic_spec(self) -> DiagnosticSpec:
        return DiagnosticSpec("sigma", True, "CE of the denoised token embeddings (nats)", "lambda(sigma) x CE",
                              "KL(earlier block || later block) per token (nats)",
                              "RMS of the solver's update of the new token's embedding (first generated token)",
                              kind="tokens")

    def _diagnostic_noisy(self, batch, level: float, generator: torch.Generator):
        tokens, loss_mask = batch
        sigma, noise = self.diagnostic_draws(tokens.shape[0], level, (*tokens.shape, self.network.net.hidden_size),
                                             generator, tokens.device)
        return tokens, loss_mask, sigma, noise

    def diagnostic_loss(self, batch, level: float, block: int, generator: torch.Generator):
        """[N] the task's cross-entropy (``per_sample_ce``) of ``block`` at sigma = ``level``, and lambda(sigma) x it."""
        tokens, loss_mask, sigma, noise = self._diagnostic_noisy(batch, level, generator)
        ce = self.per_sample_ce(tokens, loss_mask, sigma, noise, block)
        return ce, self.diagnostic_weighted(ce, sigma)

    def diagnostic_prediction(self, batch, level: float, block: int, generator: torch.Generator) -> torch.Tensor:
        """``block``'s log-probabilities [N, T, V] of every token at sigma = ``level``; NaN where ``loss_mask`` is 0."""
        tokens, loss_mask, sigma, noise = self._diagnostic_noisy(batch, level, generator)
        logp = self.logits(tokens, sigma, noise, block).float().log_softmax(-1)
        return logp.masked_fill(~loss_mask.bool().unsqueeze(-1), float("nan"))

    @staticmethod
    def diagnostic_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return mean_kl(a, b)

    def diagnostic_trajectory(self, batch, num_samples: int, generator: torch.Generator) -> Trajectory:
        """``generate`` (the chain per token) continuing the first ``diagnostic_prompt_tokens`` of ``num_samples``
        sequences by ``diagnostic_new_tokens``; levels, blocks and updates of the first new token's solver run; per
        block, every new token as decoded from that block's last estimate (the token whose row is nearest)."""
        prompt = batch[0][:num_samples, : self.diagnostic_prompt_tokens]
        recorder = StepRecorder(self.denoiser)
        new = self.generate(prompt, self.diagnostic_new_tokens, generator, denoiser_hook=recorder)
        steps = len(recorder.states) // self.diagnostic_new_tokens  # calls per token (one solver run each)
        updates = [float((recorder.states[i + 1] - recorder.states[i]).float().pow(2).flatten(1).mean(1).sqrt().mean())
                   for i in range(steps - 1)] + [float("nan")]
        table = self.network.net.token_table().float()
        snapshots = {}
        for b in dict.fromkeys(recorder.blocks[:steps]):
            last = [k * steps + max(i for i in range(steps) if recorder.blocks[i] == b) for k in range(self.diagnostic_new_tokens)]
            snapshots[b] = torch.cat([(recorder.outputs[i][:, -1].float() @ table.T).argmax(-1, keepdim=True) for i in last], 1).cpu()
        return Trajectory(recorder.levels[:steps], recorder.blocks[:steps], updates, snapshots, new.cpu(),
                          context=prompt.cpu())


class NextTokenLMModule(_LanguageModel, BlockwiseLightningModule):
    """The same decoder trained end to end with next-token cross-entropy: the paper's baseline.

    It is the engine with ``num_blocks: 1`` (set here; any other value is an error), so optimizer,
    scheduler, clipping and logging are those of the block-wise run. ``val/ppl`` and ``test/ppl``
    are exact: exp of the summed NLL over the summed number of predicted tokens.

    Args:
        network: ``dbl.models.Llama``.
        temperature: decoding temperature; 0 = greedy.
        top_p: nucleus sampling: sample among the most likely tokens whose probability adds up to top_p.
        generate_tokens: continuation length of ``dbl predict``.
        num_blocks: always 1 (stated here so that the CLI's default is 1, not the engine's).
        **kwargs: the engine's options (``optimizer``, ``lr_scheduler``, ``gradient_clip_val``, ...).
    """

    def __init__(self, network: nn.Module, temperature: float = 0.0, top_p: float = 1.0, generate_tokens: int = 64,
                 num_blocks: int = 1, **kwargs):
        if num_blocks != 1:
            raise UsageError(f"NextTokenLMModule trains end to end: num_blocks must be 1, got {num_blocks}")
        super().__init__(network, temperature=temperature, top_p=top_p, generate_tokens=generate_tokens, num_blocks=1,
                         **kwargs)
        self.eval_metrics = per_stage(lambda: {"nll": SumMetric(), "tokens": SumMetric()})

    @property
    def leaves_parameters_unused(self) -> bool:
        return True  # the decoder's noise conditioning: next-token prediction has no noisy rows

    def block_loss(self, batch, block: int) -> BlockLoss:
        nll, mask = self.token_nll(batch)
        loss = (nll * mask).sum() / mask.sum().clamp(min=1)
        return BlockLoss(loss, loss, torch.zeros(nll.shape[0], device=nll.device))  # noise level 0: no diffusion

    def evaluation_step(self, batch, batch_idx: int, stage: str) -> None:
        self.update_next_token_metrics(batch, stage)

    def evaluation_epoch_end(self, stage: str) -> None:
        self.log_next_token_metrics(stage, "")

    def generate(
        self,
        prompt: torch.Tensor,
        num_tokens: int | None = None,
        generator: Generators = None,
        temperature: float | None = None,
        use_cache: bool = True,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """Continue ``prompt`` [N, p]; [N, num_tokens]."""
        with self.sampling_mode():
            return generate_next_token(
                self.network, prompt.to(self.device), num_tokens or self.generate_tokens,
                self.temperature if temperature is None else temperature, generator, use_cache,
                self.top_p if top_p is None else top_p,
            )
