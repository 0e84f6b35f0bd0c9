"""Partitioning the noise range [sigma_min, sigma_max] among B blocks (method spec, section 3).

Convention used everywhere in dbl: block 0 holds the input-side layers and owns the HIGHEST noise
range; block B-1 holds the output-side layers and owns the lowest. Sampling runs from high to low
noise, so the chain visits blocks 0, 1, ..., B-1 in the order of the layers of the original network.

``boundaries`` are stored ascending (sigma_0 = sigma_min < ... < sigma_B = sigma_max), as in the
spec's tables; block b's nominal range is therefore [boundaries[B-1-b], boundaries[B-b]].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from dbl.diffusion.sigma import LogNormal
from dbl.errors import UsageError

PartitionKind = Literal["equiprobable", "uniform_log", "uniform_linear"]
PARTITION_KINDS: tuple[str, ...] = ("equiprobable", "uniform_log", "uniform_linear")


def equiprobable_boundaries(num_blocks: int, sigma_min: float, sigma_max: float, density: LogNormal) -> list[float]:
    """Boundaries giving every block the same mass under the truncated log-normal."""
    q_min, q_max = density.cdf(sigma_min), density.cdf(sigma_max)
    q = q_min + (q_max - q_min) * torch.arange(num_blocks + 1, dtype=torch.float64) / num_blocks
    bounds = density.icdf(q).tolist()
    bounds[0], bounds[-1] = sigma_min, sigma_max  # exact ends despite rounding in icdf(cdf(x))
    return bounds


def uniform_log_boundaries(num_blocks: int, sigma_min: float, sigma_max: float) -> list[float]:
    """Equal widths in ln(sigma): the paper's ablation baseline."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return [sigma_min] + [math.exp(lo + (hi - lo) * i / num_blocks) for i in range(1, num_blocks)] + [sigma_max]


def uniform_linear_boundaries(num_blocks: int, sigma_min: float, sigma_max: float) -> list[float]:
    """Equal widths in sigma: what one passage of the paper writes."""
    inner = [sigma_min + (sigma_max - sigma_min) * i / num_blocks for i in range(1, num_blocks)]
    return [sigma_min, *inner, sigma_max]  # exact ends: the chain reads its noise range from them


def widen(lo: float, hi: float, overlap: float, floor: float, ceiling: float) -> tuple[float, float]:
    """Extend [lo, hi] at both ends by ``overlap`` times its width in log space, clipped to [floor, ceiling]."""
    pad = overlap * (math.log(hi) - math.log(lo))
    return max(floor, lo * math.exp(-pad)), min(ceiling, hi * math.exp(pad))


@dataclass(frozen=True)
class NoisePartition:
    """B blocks' nominal (inference) and widened (training) noise ranges."""

    boundaries: tuple[float, ...]  # ascending, length B + 1
    overlap: float = 0.0

    @property
    def num_blocks(self) -> int:
        return len(self.boundaries) - 1

    def nominal_range(self, block: int) -> tuple[float, float]:
        """(lo, hi) that ``block`` owns at inference."""
        i = self.num_blocks - 1 - block
        return self.boundaries[i], self.boundaries[i + 1]

    def widened_range(self, block: int) -> tuple[float, float]:
        """(lo, hi) that ``block`` trains on: nominal widened by ``overlap``, clipped to the full range."""
        lo, hi = self.nominal_range(block)
        return widen(lo, hi, self.overlap, self.boundaries[0], self.boundaries[-1])

    def block_of(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Index of the block whose nominal range holds each sigma (values outside clamp to the ends).

        A sigma exactly on a boundary belongs to the lower-noise block (the one that takes over as
        sampling passes the boundary going down).
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        inner = torch.tensor(self.boundaries[1:-1], dtype=torch.float64, device=sigma.device)
        # number of inner boundaries strictly below sigma = index in ascending order
        ascending_index = torch.searchsorted(inner, sigma, right=False)
        return (self.num_blocks - 1 - ascending_index).long()


def make_partition(
    kind: str,
    num_blocks: int,
    overlap: float = 0.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    density: LogNormal = LogNormal(),
) -> NoisePartition:
    """Build a partition by name: ``equiprobable`` (default, the paper's), ``uniform_log``, ``uniform_linear``."""
    if kind not in PARTITION_KINDS:
        raise UsageError(f"unknown partition {kind!r}; choose one of {', '.join(PARTITION_KINDS)}")
    if num_blocks < 1:
        raise UsageError(f"num_blocks must be >= 1, got {num_blocks}")
    if overlap < 0:
        raise UsageError(f"overlap must be >= 0, got {overlap}")
    if overlap >= 1:
        raise UsageError(f"overlap must be < 1 (a fraction of each block's range; the paper uses 0.05-0.1), got {overlap}")
    if not 0 < sigma_min < sigma_max:
        raise UsageError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if kind == "equiprobable":
        bounds = equiprobable_boundaries(num_blocks, sigma_min, sigma_max, density)
    elif kind == "uniform_log":
        bounds = uniform_log_boundaries(num_blocks, sigma_min, sigma_max)
    else:
        bounds = uniform_linear_boundaries(num_blocks, sigma_min, sigma_max)
    return NoisePartition(tuple(bounds), overlap)
