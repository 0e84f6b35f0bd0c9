"""The recurrent-depth baseline (Huginn): a stochastic number of core iterations, truncated back-propagation.

Method spec, section 8 ("Recurrent depth"), the paper's Table 5 baseline; the recipe is Geiping et al.
2025, "Scaling up Test-Time Compute with Latent Reasoning: A Recurrent Depth Approach": per training
step draw tau ~ N(ln(mean_iterations) - sigma^2 / 2, sigma) and r = Poisson(e^tau) + 1 (so E[r] =
mean_iterations + 1), run the core r times and back-propagate through the last ``backprop_iterations``
only. The DiffusionBlocks side of the comparison needs no module of its own: it is
``ARDiffusionLMModule`` with ``num_blocks: 1`` on the same ``RecurrentDepthLlama``.

``RecurrentDepthLMModule`` is the block-wise engine with one block (like ``NextTokenLMModule``), so
optimizer, scheduler, clipping, logging and checkpoints are those of every other run.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import SumMetric

from dbl.denoisers.text import _check_prompt, pick_token
from dbl.diffusion.draws import Generators
from dbl.errors import UsageError
from dbl.models.recurrent import RecurrentCache
from dbl.training.autoregressive import _LanguageModel
from dbl.training.engine import BlockLoss, BlockwiseLightningModule
from dbl.training.metrics import per_stage


def draw_iterations(mean: float, sigma: float, seed: int, step: int) -> int:
    """Huginn's r for training step ``step``: Poisson(e^tau) + 1, tau ~ N(ln(mean) - sigma^2/2, sigma).

    Drawn from a generator seeded by (seed, step) alone (NumPy's SeedSequence), never the global RNG:
    every process draws the same r at a step, and a resumed run draws what the uninterrupted one did.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, step]))
    tau = rng.normal(np.log(mean) - sigma**2 / 2, sigma) if sigma > 0 else np.log(mean)
    return int(rng.poisson(np.exp(tau))) + 1


class RecurrentDepthLMModule(_LanguageModel, BlockwiseLightningModule):
    """Huginn's training of a ``dbl.models.recurrent.RecurrentDepthLlama``: next-token cross-entropy after a
    random number of core iterations, truncated back-propagation.

    Args:
        network: ``dbl.models.recurrent.RecurrentDepthLlama``.
        mean_iterations: Huginn's mean recurrence r-bar (paper: 32); a step runs Poisson(e^tau) + 1
            iterations, mean r-bar + 1.
        backprop_iterations: k, the iterations that record gradients (the last k; paper: 8).
        iteration_sigma: sigma of the log-normal rate (Huginn: 0.5; 0 = Poisson(r-bar) + 1).
        iteration_seed: the draw of r at step t depends only on (iteration_seed, t).
        eval_iterations: fixed iterations at validation, test and generation.
        temperature, top_p, generate_tokens: decoding, as ``NextTokenLMModule``.
        num_blocks: always 1.
        **kwargs: the engine's options (``optimizer``, ``lr_scheduler``, ``gradient_clip_val``, ...).

    ``val/ce`` and ``val/ppl`` (and ``test/*``) are exact next-token CE and perplexity at
    ``eval_iterations``; the initial state is drawn from a generator seeded by the batch index.
    """

    def __init__(
        self,
        network: nn.Module,
        mean_iterations: float = 32,
        backprop_iterations: int = 8,
        iteration_sigma: float = 0.5,
        iteration_seed: int = 0,
        eval_iterations: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generate_tokens: int = 64,
        num_blocks: int = 1,
        **kwargs,
    ):
        if num_blocks != 1:
            raise UsageError(f"RecurrentDepthLMModule trains end to end: num_blocks must be 1, got {num_blocks}")
        if mean_iterations < 1:
            raise UsageError(f"mean_iterations must be >= 1, got {mean_iterations}")
        if backprop_iterations < 1:
            raise UsageError(f"backprop_iterations must be >= 1, got {backprop_iterations}")
        if iteration_sigma < 0:
            raise UsageError(f"iteration_sigma must be >= 0, got {iteration_sigma}")
        if eval_iterations < 1:
            raise UsageError(f"eval_iterations must be >= 1, got {eval_iterations}")
        super().__init__(network, temperature=temperature, top_p=top_p, generate_tokens=generate_tokens, num_blocks=1,
                         **kwargs)
        if not hasattr(self.network.net, "recurrent_logits"):
            raise UsageError(f"{type(self.network.net).__name__} has no recurrent core: use "
                             "dbl.models.recurrent.RecurrentDepthLlama")
        self.mean_iterations, self.backprop_iterations = mean_iterations, backprop_iterations
        self.iteration_sigma, self.iteration_seed = iteration_sigma, iteration_seed
        self.eval_iterations = eval_iterations
        self.eval_metrics = per_stage(lambda: {"nll": SumMetric(), "tokens": SumMetric()})

    @property
    def leaves_parameters_unused(self) -> bool:
        return True  # the decoder's noise conditioning and noisy-row projections: no noisy rows here

    def iterations_at(self, step: int) -> int:
        """The number of core iterations of training step ``step`` (the same on every process and on resume)."""
        return draw_iterations(self.mean_iterations, self.iteration_sigma, self.iteration_seed, step)

    def nll(self, tokens: torch.Tensor, loss_mask: torch.Tensor, num_iterations: int, backprop_iterations: int | None,
            generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, T-1] next-token NLL of tokens 1..T-1 and the mask of positions that count."""
        logits = self.network.net.recurrent_logits(tokens[:, :-1], num_iterations, backprop_iterations, generator)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
        return nll.view(tokens.shape[0], -1), loss_mask[:, 1:].to(nll.dtype)

    def block_loss(self, batch, block: int) -> BlockLoss:
        tokens, loss_mask = batch
        r = self.iterations_at(self.global_step)
        nll, mask = self.nll(tokens, loss_mask, r, self.backprop_iterations)
        loss = (nll * mask).sum() / mask.sum().clamp(min=1)
        if self._trainer is not None and self.trainer.training:  # not when profiled (dbl info, benchmarks)
            self.log("train/iterations", float(r), batch_size=tokens.shape[0])
        return BlockLoss(loss, loss.detach(), torch.zeros(tokens.shape[0], device=tokens.device))  # no noise level

    # -- evaluation ------------------------------------------------------------------------
    def evaluation_step(self, batch, batch_idx: int, stage: str) -> None:
        tokens, loss_mask = batch
        generator = torch.Generator().manual_seed(batch_idx)
        nll, mask = self.nll(tokens, loss_mask, self.eval_iterations, None, generator)
        metrics = self.eval_metrics[stage]
        metrics["nll"].update((nll * mask).sum())
        metrics["tokens"].update(mask.sum())

    def evaluation_epoch_end(self, stage: str) -> None:
        self.log_next_token_metrics(stage, "")

    # -- generation ------------------------------------------------------------------------
    def generate(
        self,
        prompt: torch.Tensor,
        num_tokens: int | None = None,
        generator: Generators = None,
        temperature: float | None = None,
        use_cache: bool = True,
        top_p: float | None = None,
        num_iterations: int | None = None,
    ) -> torch.Tensor:
        """Continue ``prompt`` [N, p]; [N, num_tokens], ``num_iterations`` (default ``eval_iterations``)
        iterations per token. With ``use_cache`` every layer and iteration keeps its keys/values of the
        prefix and a new token is one row through all iterations; without, each token recomputes the
        prefix (with a new initial state for it, so only with ``state_init_std: 0`` are the two equal)."""
        _check_prompt(prompt)
        r = num_iterations or self.eval_iterations
        temperature = self.temperature if temperature is None else temperature
        top_p = self.top_p if top_p is None else top_p
        net = self.network.net
        with self.sampling_mode():
            tokens = prompt.to(self.device)
            cache = RecurrentCache() if use_cache else None
            step_input = tokens
            for _ in range(num_tokens or self.generate_tokens):
                logits = net.recurrent_logits(step_input if use_cache else tokens, r, None, generator, cache)
                new = pick_token(logits[:, -1], temperature, generator, top_p)
                tokens = torch.cat([tokens, new[:, None]], dim=1)
                step_input = new[:, None]
            return tokens[:, prompt.shape[1]:]
