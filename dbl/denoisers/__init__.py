"""The denoiser chain: the one place where a noise level meets the block that owns it.

Between the networks (``dbl.models``: plain layered ``nn.Module``s that know nothing of
diffusion) and the tasks (``dbl.training``: losses and metrics), a chain wraps a
``BlockwiseNetwork`` and a partition of the noise range once, as EDM's ``EDMPrecond`` and
k-diffusion's ``Denoiser`` wrap a raw network, and answers both directions of the method's
central idea (method spec, sections 3-5):

- which noise levels block b trains on (``training_sigma`` / ``training_time``: its widened range);
- which block answers a noise level (``owner``, ``block_at``; a batch of mixed levels goes
  through ``route``), with EDM's preconditioning applied in one place (``EDMDenoiser.__call__``);
- classifier-free guidance and sampling by chaining the blocks from high to low noise
  (``EDMDenoiser.sample``, ``MaskedDenoiser.sample``, ``generate_ar_diffusion``).

Losses and samplers call ``D(z, sigma, cond)``; nothing else in dbl computes c_skip, c_out,
c_in or c_noise, or decides which block a sigma (or a masking time t) belongs to.
"""

from dbl.denoisers.chain import BlockChain
from dbl.denoisers.edm import EDMDenoiser
from dbl.denoisers.masked import MaskedDenoiser
from dbl.denoisers.text import generate_ar_diffusion, generate_next_token, pick_token

__all__ = ["BlockChain", "EDMDenoiser", "MaskedDenoiser", "generate_ar_diffusion", "generate_next_token", "pick_token"]
