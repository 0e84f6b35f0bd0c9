"""The masked-diffusion denoiser of a block chain: logits of masked tokens, each t routed to its block."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dbl.denoisers.chain import BlockChain
from dbl.diffusion.masked import LogitsFn, MaskingSchedule, TimePartition, ancestral_sample, uniform_in
from dbl.models.blockwise import BlockwiseNetwork


class MaskedDenoiser(BlockChain):
    """Logits over the real tokens of each position of ``z`` (ids with masks) at masking times t.

    Args:
        network: the blocks; ``network(z, t, None, block=b)`` returns block b's logits.
        partition: the blocks' t-intervals (``dbl.diffusion.masked.TimePartition``).
        schedule: the masking schedule alpha(t).
        mask_id: the id of the mask token.
    """

    def __init__(self, network: BlockwiseNetwork, partition: TimePartition, schedule: MaskingSchedule, mask_id: int):
        super().__init__(network, partition)
        self.schedule, self.mask_id = schedule, mask_id

    def training_time(self, block: int, n: int, device=None) -> torch.Tensor:
        """[n] t uniform on ``block``'s WIDENED interval (never its lower end, where w(t) may be infinite)."""
        return uniform_in(*self.partition.widened_range(block), n, device=device)

    def __call__(self, z: torch.Tensor, t: torch.Tensor, block: int | None = None) -> torch.Tensor:
        """Logits [N, L, V] for ``z`` [N, L] at times ``t`` [N]; ``block`` None: each t to its owner."""
        if block is not None:
            return self.network(z, t.to(z.device, torch.float32), None, block=block)
        return self.route(t, lambda index, owner: self(z[index], t[index], owner))

    def sample(self, num_samples: int, length: int, num_steps: int, generator: torch.Generator | None = None,
               device=None, hook: Callable[[LogitsFn], LogitsFn] | None = None) -> torch.Tensor:
        """[num_samples, length] token ids by ancestral sampling from t = 1 (all masked) down to 0;
        each step calls the block that owns its t. ``hook``: wraps the logits function the sampler calls
        (``dbl.diagnose.StepRecorder`` records each call)."""
        return ancestral_sample(self if hook is None else hook(self), num_samples, length, self.schedule, self.mask_id,
                                num_steps, generator, device)
