"""The training density of noise levels: ln(sigma) ~ Normal(p_mean, p_std), truncated to a range.

Everything is computed in float64: the inverse CDF is evaluated near 0 and 1 where float32 loses
the tails (q_min is about 1.5e-5 for EDM's constants).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dbl.errors import UsageError


@dataclass(frozen=True)
class LogNormal:
    """ln(sigma) ~ Normal(p_mean, p_std); EDM's defaults (Karras et al. 2022)."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def cdf(self, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.special.ndtr((sigma.log() - self.p_mean) / self.p_std)

    def icdf(self, q: torch.Tensor | float) -> torch.Tensor:
        q = torch.as_tensor(q, dtype=torch.float64)
        return torch.exp(self.p_mean + self.p_std * torch.special.ndtri(q))

    def sample(
        self,
        n: int,
        lo: float,
        hi: float,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``n`` draws restricted to [lo, hi] by inverse-CDF sampling; float32 on ``device``."""
        if not 0 < lo < hi:
            raise UsageError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
        q_lo, q_hi = self.cdf(lo).item(), self.cdf(hi).item()
        u = torch.rand(n, dtype=torch.float64, generator=generator)
        sigma = self.icdf(q_lo + (q_hi - q_lo) * u).clamp(lo, hi)
        return sigma.to(device=device, dtype=torch.float32)

    def mass(self, lo: float, hi: float) -> float:
        """Probability of [lo, hi] under the untruncated density."""
        return (self.cdf(hi) - self.cdf(lo)).item()

    def log_pdf(self, sigma: torch.Tensor) -> torch.Tensor:
        """Log density of sigma (not of ln sigma), untruncated; used by distribution tests."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        z = (sigma.log() - self.p_mean) / self.p_std
        return -0.5 * z**2 - math.log(self.p_std * math.sqrt(2 * math.pi)) - sigma.log()
