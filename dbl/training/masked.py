"""Masked (absorbing-state) diffusion language modelling, trained block-wise: the text8 task.

Each block owns one t-interval of equal training mass (``dbl.diffusion.masked``) and is trained
on MD4's continuous-time ELBO integrand with t drawn uniformly from its widened interval.
Evaluation estimates the whole negative ELBO with every t routed to the block whose nominal
interval holds it, and reports bits per character.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from dbl.denoisers import MaskedDenoiser
from dbl.diagnose import DiagnosticSpec, StepRecorder, Trajectory, mean_kl
from dbl.diffusion.masked import (
    MASKING_SCHEDULES,
    MaskingSchedule,
    TimePartition,
    estimate_nelbo,
    make_time_partition,
    mask_tokens,
    masked_cross_entropy,
    nelbo_integrand,
    sample_times,
)
from dbl.errors import UsageError
from dbl.training.checks import first_item
from dbl.training.engine import BlockLoss, BlockwiseLightningModule
from dbl.training.metrics import BitsPerCharacter, per_stage


class MaskedDiffusionModule(BlockwiseLightningModule):
    """MD4 masked diffusion over token ids, each block trained on its own slice of t.

    Batches are ``(ids [N, L],)`` (or a bare tensor) of token ids in [0, vocab_size); the network
    (``dbl.models.token_dit.TokenDiT``) takes ids with the mask token ``vocab_size`` and t, and
    returns logits over the vocabulary.

    Args:
        masking_schedule: alpha(t): ``linear`` (MD4's, the paper's) or ``cosine``.
        overlap: gamma, the widening of each block's t-interval for training (paper: 0.05).
        eval_times: t values per sequence in the validation/test ELBO estimate.
        eval_time_sampling: how they are drawn: ``stratified`` (one independent draw in each of
            K equal strata of [0, 1]), ``antithetic`` (MD4's shifted lattice: one shift per
            sequence), ``uniform`` (independent draws). All are unbiased; stratified showed the
            smallest spread in our checks.
        eval_seed: the t and masks of evaluation batch i come from a generator seeded by
            eval_seed and i, so every evaluation and every model sees the same ones.
        sample_steps: default number of ancestral sampling steps (changeable per call, not stored
            with the weights).
        sample_length: default length of generated sequences; None: the network's ``seq_len``.
        **kwargs: the engine's options (``num_blocks``, ``block_schedule``, ``optimizer``, ...),
            see ``BlockwiseLightningModule``.
    """

    def __init__(
        self,
        network: nn.Module,
        masking_schedule: Literal["linear", "cosine"] = "linear",
        overlap: float = 0.05,
        eval_times: int = 4,
        eval_time_sampling: Literal["stratified", "antithetic", "uniform"] = "stratified",
        eval_seed: int = 0,
        sample_steps: int = 256,
        sample_length: int | None = None,
        **kwargs,
    ):
        super().__init__(network, **kwargs)
        if masking_schedule not in MASKING_SCHEDULES:
            raise UsageError(f"unknown masking_schedule {masking_schedule!r}; choose one of {', '.join(MASKING_SCHEDULES)}")
        for attr in ("mask_id", "vocab_size", "seq_len"):
            if not hasattr(self.network.net, attr):
                raise UsageError(f"{type(self.network.net).__name__} is not a token denoiser: it has no `{attr}`")
        sample_times(1, eval_times, eval_time_sampling)  # validates both now, not at the first evaluation
        if sample_steps < 1:
            raise UsageError(f"sample_steps must be >= 1, got {sample_steps}")
        self.masking = MaskingSchedule(masking_schedule)
        partition = make_time_partition(self.masking, self.num_blocks, overlap)
        self.denoiser = MaskedDenoiser(self.network, partition, self.masking, self.network.net.mask_id)
        self.eval_times, self.eval_time_sampling, self.eval_seed = eval_times, eval_time_sampling, eval_seed
        self.sample_steps = sample_steps
        self.sample_length = sample_length or self.network.net.seq_len
        # "block_bpc": each block's share of the BPC (its t-interval's part of the integral); they sum to bpc
        self.eval_metrics = per_stage(lambda: {"bpc": BitsPerCharacter(), "block_bpc": BitsPerCharacter(self.num_blocks)})

    @property
    def partition(self) -> TimePartition:
        return self.denoiser.partition

    @property
    def mask_id(self) -> int:
        return self.denoiser.mask_id

    def check_data(self, datamodule, stage: str) -> None:
        """Vocabulary and sequence length of the data against the network's, before step 0."""
        net = self.network.net
        data_vocab = getattr(datamodule, "vocab_size", None)
        if data_vocab is not None and data_vocab != net.vocab_size:
            raise UsageError(f"the data has {data_vocab} symbols but model.init_args.network.init_args.vocab_size is {net.vocab_size}; "
                             f"set vocab_size: {data_vocab}")
        item = first_item(datamodule, stage)
        ids = item[0] if isinstance(item, (tuple, list)) else item
        if torch.is_tensor(ids) and ids.dim() >= 1 and ids.shape[-1] > net.seq_len:
            raise UsageError(f"the data's sequences have {ids.shape[-1]} tokens (data seq_len) but model.init_args.network.init_args.seq_len is "
                             f"{net.seq_len}; set the data's seq_len <= {net.seq_len} or the network's seq_len >= {ids.shape[-1]}")

    def example_batch(self, batch_size: int, seq_len: int | None = None):
        """Random ``(ids [N, seq_len],)``, default the network's length (for benchmarks)."""
        return (torch.randint(0, self.network.net.vocab_size, (batch_size, seq_len or self.network.net.seq_len)),)

    @staticmethod
    def _ids(batch) -> torch.Tensor:
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def block_loss(self, batch, block: int) -> BlockLoss:
        x = self._ids(batch)
        t = self.denoiser.training_time(block, x.shape[0], x.device)
        z = mask_tokens(x, t, self.masking, self.mask_id)
        ce = masked_cross_entropy(self.denoiser(z, t, block), x, z, self.mask_id)
        integrand = nelbo_integrand(ce, t, x.shape[1], self.masking)
        ce_per_masked = ce.sum() / (z == self.mask_id).sum().clamp(min=1)
        return BlockLoss(integrand.float().mean(), ce_per_masked.detach(), t)

    # -- evaluation ------------------------------------------------------------------------
    def nelbo_terms(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ELBO integrand (nats per character, [N, K] float64) at K = ``eval_times`` values of t per
        sequence, and those t ([N, K]). The mean over K estimates -ELBO(x) / L without bias."""
        times = sample_times(x.shape[0], self.eval_times, self.eval_time_sampling, generator)
        return estimate_nelbo(self.denoiser, x, times, self.masking, self.mask_id, generator), times

    def _eval_generator(self, batch_idx: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.eval_seed * 1_000_003 + batch_idx)

    def evaluation_step(self, batch, batch_idx: int, stage: str) -> None:
        """``<stage>/bpc``: the negative ELBO of every character, in bits per character, and each block's
        share of it; t and masks seeded by the batch's index in the split."""
        x = self._ids(batch)
        with torch.no_grad():
            terms, times = self.nelbo_terms(x, self._eval_generator(batch_idx))
        length = x.shape[1]
        metrics = self.eval_metrics[stage]
        metrics["bpc"].update(terms.mean(1) * length, x.numel())
        # each block's part of each sequence's nats: [N, K] terms spread over [N, B] by owner
        per_block = torch.zeros(*terms.shape[:1], self.num_blocks, dtype=terms.dtype, device=terms.device)
        per_block.scatter_add_(1, self.denoiser.owner(times).to(terms.device), terms)
        metrics["block_bpc"].update(per_block / terms.shape[1] * length, x.numel())
        self.log(f"{stage}/bpc", metrics["bpc"], prog_bar=True, batch_size=x.shape[0])

    def evaluation_epoch_end(self, stage: str) -> None:
        self.log_per_block(f"{stage}_bpc", self.eval_metrics[stage]["block_bpc"])

    # -- diagnostics (dbl.diagnose) --------------------------------------------------------
    def diagnostic_spec(self) -> DiagnosticSpec:
        return DiagnosticSpec("t", False, "CE per masked token (nats)", "ELBO integrand w(t) x CE / L (bits per character)",
                              "KL(earlier block || later block) per masked token (nats)",
                              "KL between consecutive steps' predictions per still-masked token (nats)", kind="tokens")

    def diagnostic_levels(self, n: int) -> torch.Tensor:
        """[n] t at the centres of n equal cells of [0, 1], from t near 1 down (noisiest first): the owner
        curve of ``diagnostic_loss``'s weighted loss then averages to the model's bits per character."""
        return 1 - (torch.arange(n, dtype=torch.float64) + 0.5) / n

    def _diagnostic_masked(self, batch, level: float, generator: torch.Generator):
        x = self._ids(batch)
        t = torch.full((x.shape[0],), float(level), device=x.device)
        return x, t, mask_tokens(x, t, self.masking, self.mask_id, generator)

    def diagnostic_loss(self, batch, level: float, block: int, generator: torch.Generator):
        """[N] CE per masked token (nats) and the ELBO integrand at t = ``level`` in bits per character, by
        ``block``; the mask drawn from ``generator``."""
        x, t, z = self._diagnostic_masked(batch, level, generator)
        ce = masked_cross_entropy(self.denoiser(z, t, block), x, z, self.mask_id)
        per_token = ce / (z == self.mask_id).sum(1).clamp(min=1)
        return per_token, nelbo_integrand(ce, t, x.shape[1], self.masking) / math.log(2)

    def diagnostic_prediction(self, batch, level: float, block: int, generator: torch.Generator) -> torch.Tensor:
        """``block``'s log-probabilities [N, L, V] of the masked positions at t = ``level`` (the mask of
        ``diagnostic_loss``); NaN at the positions left unmasked, where nothing is predicted."""
        _, t, z = self._diagnostic_masked(batch, level, generator)
        logp = self.denoiser(z, t, block).float().log_softmax(-1)
        return logp.masked_fill((z != self.mask_id).unsqueeze(-1), float("nan"))

    @staticmethod
    def diagnostic_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[N] KL(a || b) in nats, mean over the positions both predict (log-probabilities, NaN elsewhere)."""
        return mean_kl(a, b)

    def diagnostic_trajectory(self, batch, num_samples: int, generator: torch.Generator) -> Trajectory:
        """``sample`` (ancestral, the module's steps) recording each call; per block, the estimate of its last
        call (masked positions filled with the most likely token) and the state its last step left."""
        recorder = StepRecorder(self.denoiser)
        final = self.sample(num_samples, generator=generator, denoiser_hook=recorder)
        logp = [out.float().log_softmax(-1) for out in recorder.outputs]
        updates = [float("nan")]
        for i in range(1, len(logp)):
            masked = recorder.states[i] == self.mask_id
            prev, cur = (p.masked_fill(~masked.unsqueeze(-1), float("nan")) for p in (logp[i - 1], logp[i]))
            updates.append(float(self.diagnostic_divergence(cur, prev).mean()))
        snapshots, notes = {}, {}
        for b, i in recorder.last_calls().items():
            state = recorder.states[i]
            snapshots[b] = torch.where(state == self.mask_id, recorder.outputs[i].argmax(-1), state).cpu()
            notes[b] = recorder.state_after(i, final).cpu()
        return Trajectory(recorder.levels, recorder.blocks, updates, snapshots, final.cpu(), notes)

    # -- sampling --------------------------------------------------------------------------
    def sample(
        self,
        num_samples: int,
        length: int | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        denoiser_hook=None,
    ) -> torch.Tensor:
        """Generate [num_samples, length] token ids by chaining the blocks from t = 1 down to 0.

        Each step calls only the block that owns the current t; ``num_steps`` does not depend on B.
        ``denoiser_hook``: wraps the logits function the sampler calls (``dbl diagnose`` records the steps).
        """
        with self.sampling_mode():
            return self.denoiser.sample(num_samples, length or self.sample_length, num_steps or self.sample_steps,
                                        generator, self.device, denoiser_hook)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """``batch``: any tensor whose length is the number of samples; returns token ids [N, L]."""
        n = len(self._ids(batch))
        return self.sample(n, generator=self._eval_generator(batch_idx))
