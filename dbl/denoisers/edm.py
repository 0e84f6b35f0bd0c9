"""The EDM denoiser of a block chain: D(z, sigma, cond) with preconditioning, routing and guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dbl.denoisers.chain import BlockChain
from dbl.diffusion.draws import Generators
from dbl.diffusion.partition import NoisePartition
from dbl.diffusion.preconditioning import edm_scalings
from dbl.diffusion.samplers import Denoiser, cfg_denoiser, sample, sigma_grid
from dbl.diffusion.sigma import LogNormal
from dbl.models.blockwise import BlockwiseNetwork


class EDMDenoiser(BlockChain):
    """D(z, sigma, cond) = c_skip z + c_out F_b(c_in z, c_noise, cond), b the block that owns sigma.

    Args:
        network: the blocks; ``network(x, c_noise, cond, block=b)`` is the raw output F of block b.
        partition: the blocks' sigma ranges (``dbl.diffusion.partition``).
        density: EDM's training density of sigma (truncated log-normal).
        sigma_data: EDM's sigma_data.
    """

    def __init__(self, network: BlockwiseNetwork, partition: NoisePartition, density: LogNormal, sigma_data: float = 0.5):
        super().__init__(network, partition)
        self.density, self.sigma_data = density, sigma_data

    @property
    def sigma_min(self) -> float:
        return self.partition.boundaries[0]

    @property
    def sigma_max(self) -> float:
        return self.partition.boundaries[-1]

    def training_sigma(self, block: int, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """[n] sigma from the EDM density restricted to ``block``'s WIDENED range."""
        lo, hi = self.partition.widened_range(block)
        return self.density.sample(n, lo, hi, generator=generator, device=device)

    @staticmethod
    def noised(y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z = y + sigma * noise, with sigma [N] broadcast over the rest of ``y`` [N, ...]."""
        return y + sigma.view(-1, *[1] * (y.dim() - 1)).to(noise.dtype) * noise

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, cond=None, block: int | None = None) -> torch.Tensor:
        """The denoised estimate of ``z`` [N, ...] at ``sigma`` (0-dim, or [N]).

        ``block`` None: the block that owns sigma (every sample must share one; mixed noise levels
        go through ``route``). Otherwise that block, whatever sigma is (training on the widened
        range, and per-block diagnostics).
        """
        if block is None:
            block = self.block_at(sigma)
        sigma = sigma.to(torch.promote_types(z.dtype, torch.float32))  # the scalings at least in float32
        if sigma.dim() == 0:
            sigma = sigma.expand(z.shape[0])
        c = edm_scalings(sigma.view(-1, *[1] * (z.dim() - 1)), self.sigma_data)
        raw = self.network(c.c_in * z, c.c_noise.flatten(), cond, block=block)
        return c.c_skip * z + c.c_out * raw

    def guided(self, cond: torch.Tensor, null_cond: torch.Tensor, scale: float) -> Denoiser:
        """D(z, sigma) with classifier-free guidance: D_null + scale (D_cond - D_null)."""
        return cfg_denoiser(self, cond, null_cond, scale)

    def sigmas(self, num_steps: int, grid: str = "cdf") -> torch.Tensor:
        """Descending grid from sigma_max to sigma_min, then 0 (``dbl.diffusion.samplers.sigma_grid``)."""
        return sigma_grid(num_steps, grid, self.sigma_min, self.sigma_max, self.density)

    def sample(
        self,
        noise: torch.Tensor,
        sigmas: torch.Tensor,
        solver: str = "euler",
        cond=None,
        null_cond=None,
        cfg_scale: float = 1.0,
        generator: Generators = None,
        hook: Callable[[Denoiser], Denoiser] | None = None,
    ) -> torch.Tensor:
        """Integrate from z = noise * sigmas[0] down ``sigmas``; every step calls the block that owns
        its sigma, so the number of steps never depends on B. With ``null_cond``, guidance at ``cfg_scale``.
        ``hook``: wraps the denoiser the solver calls (``dbl.diagnose.StepRecorder`` records each call)."""
        if null_cond is None:
            denoiser = lambda z, sigma: self(z, sigma, cond)  # noqa: E731
        else:
            denoiser = self.guided(cond, null_cond, cfg_scale)
        return sample(denoiser if hook is None else hook(denoiser), noise, sigmas, solver, generator)
