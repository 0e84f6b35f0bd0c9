"""Masked (absorbing-state) diffusion over tokens, MD4 style (Shi et al. 2024): pure math, no Lightning.

Forward process: each token of a clean sequence x is independently kept with probability
alpha(t) and replaced by the mask token otherwise, t in [0, 1], alpha(0) = 1 (clean), alpha(1) = 0
(all masked). The continuous-time negative ELBO (MD4, eq. 5) is

    -ELBO(x) = int_0^1 w(t) E_{z_t ~ q(z_t | x)} [ sum_{n : z_t^n = mask} -log p_theta(x^n | z_t, t) ] dt,
    w(t) = -alpha'(t) / (1 - alpha(t)),

exactly, because alpha(0) = 1 and alpha(1) = 0 make the reconstruction and prior terms vanish.
w(t) = 1/t for the linear schedule. Dividing by the sequence length gives nats per character.

Block-wise training (method spec, section 3): the t-range is split into B intervals of equal
training mass, i.e. equal decrements of alpha: t_b = alpha^-1(1 - b/B). Convention, the same as
for images (``dbl.diffusion.partition``): block 0 holds the input-side layers and owns the
NOISIEST interval (t near 1, almost everything masked); block B-1 owns t near 0. Sampling runs
from t = 1 down to 0 and visits blocks 0, 1, ..., B-1 in the order of the network's layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from dbl.diffusion.partition import NoisePartition
from dbl.errors import UsageError

MASKING_SCHEDULES: tuple[str, ...] = ("linear", "cosine")
TIME_SAMPLINGS: tuple[str, ...] = ("antithetic", "stratified", "uniform")

# logits_fn(z [N, L] token ids with masks, t [N]) -> logits [N, L, V] over the V real tokens
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MaskingSchedule:
    """Keep-probability alpha(t) of MD4: ``linear`` 1 - t, or ``cosine`` 1 - cos(pi/2 (1 - t))."""

    kind: Literal["linear", "cosine"] = "linear"

    def __post_init__(self):
        if self.kind not in MASKING_SCHEDULES:
            raise UsageError(f"unknown masking schedule {self.kind!r}; choose one of {', '.join(MASKING_SCHEDULES)}")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return 1 - t
        return 1 - torch.cos(math.pi / 2 * (1 - t))

    def time_at_mask_rate(self, rate: torch.Tensor) -> torch.Tensor:
        """t such that 1 - alpha(t) = ``rate``, i.e. alpha^-1(1 - rate) (exact for the linear schedule)."""
        if self.kind == "linear":
            return rate
        return 1 - 2 / math.pi * torch.arccos(rate)

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) = -alpha'(t) / (1 - alpha(t)); 1/t for the linear schedule (computed that way, exactly)."""
        if self.kind == "linear":
            return 1 / t
        half = math.pi / 2 * t  # 1 - alpha = sin(pi t / 2), -alpha' = pi/2 cos(pi t / 2)
        return math.pi / 2 * torch.cos(half) / torch.sin(half)


@dataclass(frozen=True)
class TimePartition(NoisePartition):
    """B blocks' nominal (inference) and widened (training) t-intervals.

    ``boundaries`` ascend from 0 to 1, so block b's nominal interval is
    [boundaries[B-1-b], boundaries[B-b]] (block 0: the noisiest, t near 1). Overlap widens an
    interval at both ends by ``overlap`` times its width (linearly in t, not in log space as for
    sigma), clipped to [0, 1]. A t on a boundary belongs to the less noisy block, the one that takes
    over as sampling passes the boundary going down (``NoisePartition.block_of``).
    """

    def widened_range(self, block: int) -> tuple[float, float]:
        lo, hi = self.nominal_range(block)
        pad = self.overlap * (hi - lo)
        return max(0.0, lo - pad), min(1.0, hi + pad)


def make_time_partition(schedule: MaskingSchedule, num_blocks: int, overlap: float = 0.0) -> TimePartition:
    """t_b = alpha^-1(1 - b/B), b = 0..B: every block gets the same decrement of alpha."""
    if num_blocks < 1:
        raise UsageError(f"num_blocks must be >= 1, got {num_blocks}")
    if overlap < 0:
        raise UsageError(f"overlap must be >= 0, got {overlap}")
    if overlap >= 1:
        raise UsageError(f"overlap must be < 1 (a fraction of each block's range; the paper uses 0.05-0.1), got {overlap}")
    bounds = schedule.time_at_mask_rate(torch.arange(num_blocks + 1, dtype=torch.float64) / num_blocks).tolist()
    bounds[0], bounds[-1] = 0.0, 1.0  # exact ends despite rounding in arccos
    return TimePartition(tuple(bounds), overlap)


def uniform_in(lo: float, hi: float, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """t uniform on (lo, hi]: never exactly ``lo``, so t = 0 (where w(t) is infinite) is never drawn."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return (hi - (hi - lo) * u).to(device=device, dtype=torch.float32)


def sample_times(num_sequences: int, num_times: int, method: str = "antithetic", generator: torch.Generator | None = None) -> torch.Tensor:
    """[num_sequences, num_times] values of t in (0, 1] for the ELBO estimate, float64.

    ``antithetic``: one shift u per sequence, t_k = (k + 1 - u) / K (MD4's low-discrepancy
    "antithetic" times: a shifted lattice). ``stratified``: one independent draw in each
    ((k/K, (k+1)/K]). ``uniform``: K independent draws. All three are unbiased for the integral.
    """
    if method not in TIME_SAMPLINGS:
        raise UsageError(f"unknown time sampling {method!r}; choose one of {', '.join(TIME_SAMPLINGS)}")
    if num_times < 1:
        raise UsageError(f"need at least one t per sequence, got {num_times}")
    k = torch.arange(num_times, dtype=torch.float64)
    if method == "antithetic":
        u = torch.rand(num_sequences, 1, generator=generator, dtype=torch.float64)
        return (k + 1 - u) / num_times
    if method == "stratified":
        u = torch.rand(num_sequences, num_times, generator=generator, dtype=torch.float64)
        return (k + 1 - u) / num_times
    return 1 - torch.rand(num_sequences, num_times, generator=generator, dtype=torch.float64)


def mask_tokens(x: torch.Tensor, t: torch.Tensor, schedule: MaskingSchedule, mask_id: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """z_t ~ q(z_t | x): each token masked independently with probability 1 - alpha(t); t is [N]."""
    u = torch.rand(x.shape, generator=generator).to(x.device)
    masked = u < (1 - schedule.alpha(t.to(x.device, torch.float64))).unsqueeze(1)
    return torch.where(masked, torch.full_like(x, mask_id), x)


def masked_cross_entropy(logits: torch.Tensor, x: torch.Tensor, z: torch.Tensor, mask_id: int) -> torch.Tensor:
    """[N]: sum over the masked positions of z of -log p(x^n), in nats (float32 or better)."""
    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), x, reduction="none")
    return (ce * (z == mask_id)).sum(1)


def nelbo_integrand(masked_ce: torch.Tensor, t: torch.Tensor, length: int, schedule: MaskingSchedule) -> torch.Tensor:
    """[N] one-sample estimate of the ELBO integrand at t in nats per character, float64:
    w(t) * (sum of the cross-entropies of the masked positions) / L."""
    return schedule.elbo_weight(t.to(masked_ce.device, torch.float64)) * masked_ce.double() / length


def estimate_nelbo(
    logits_fn: LogitsFn,
    x: torch.Tensor,
    times: torch.Tensor,
    schedule: MaskingSchedule,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[N, K] ELBO integrand at ``times`` [N, K] (one fresh mask each), nats per character, float64.

    The mean over K is an unbiased estimate of -ELBO(x) / L for each sequence. Column k runs as one
    batch of N sequences, so memory does not grow with K.
    """
    out = torch.empty(times.shape, dtype=torch.float64, device=x.device)
    for k in range(times.shape[1]):
        t = times[:, k].to(x.device)
        z = mask_tokens(x, t, schedule, mask_id, generator)
        ce = masked_cross_entropy(logits_fn(z, t.float()), x, z, mask_id)
        out[:, k] = nelbo_integrand(ce, t, x.shape[1], schedule)
    return out


def gumbel_argmax(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A draw from softmax(logits) over the last axis, reproducible with a CPU generator."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).clamp_(min=1e-20)
    gumbel = -torch.log(-torch.log(u)).to(logits.device)
    return (logits.double() + gumbel).argmax(-1)


def ancestral_sample(
    logits_fn: LogitsFn,
    num_samples: int,
    length: int,
    schedule: MaskingSchedule,
    mask_id: int,
    num_steps: int,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Generate [num_samples, length] token ids by ancestral sampling of the reverse process.

    Starts all-masked at t = 1 and steps down a uniform t-grid to 0. From s to t < s each still
    masked position is revealed with probability (alpha(t) - alpha(s)) / (1 - alpha(s)), its token
    drawn from the model's prediction at (z_s, s); revealed tokens never change. The last step
    reaches alpha(0) = 1, so nothing stays masked. ``logits_fn`` is called with the current s, so
    a block-wise model routes each step to the block that owns s.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    z = torch.full((num_samples, length), mask_id, dtype=torch.long, device=device)
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    for s, t in zip(grid[:-1], grid[1:]):
        a_s, a_t = schedule.alpha(s), schedule.alpha(t)
        reveal_prob = float((a_t - a_s) / (1 - a_s))
        logits = logits_fn(z, torch.full((num_samples,), float(s), device=device))
        proposal = gumbel_argmax(logits, generator)
        reveal = torch.rand(z.shape, generator=generator).to(z.device) < reveal_prob
        z = torch.where((z == mask_id) & reveal, proposal, z)
    return z
