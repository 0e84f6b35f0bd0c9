"""Diffusion math for DiffusionBlocks: pure functions of tensors, no Lightning, no models.

- ``sigma``: the truncated log-normal density of noise levels (EDM's training density).
- ``partition``: how the noise range is split among blocks, and which block owns a sigma.
- ``preconditioning``: EDM's c_skip/c_out/c_in/c_noise and the loss weightings.
- ``samplers``: sigma grids, Euler and Heun steps, k-diffusion's solvers, classifier-free guidance.
- ``masked``: masked (absorbing-state) diffusion over tokens.

Spec: ``diffusionblocks.md`` in the project's shared docs; each module names the sections it implements.
The block chain that applies these to a network is ``dbl.denoisers``.
"""

from dbl.diffusion.partition import NoisePartition, make_partition
from dbl.diffusion.preconditioning import edm_scalings, loss_weight, weighted_loss
from dbl.diffusion.samplers import cfg_denoiser, sample, sigma_grid
from dbl.diffusion.sigma import LogNormal

__all__ = [
    "LogNormal",
    "NoisePartition",
    "cfg_denoiser",
    "edm_scalings",
    "loss_weight",
    "make_partition",
    "sample",
    "sigma_grid",
    "weighted_loss",
]
