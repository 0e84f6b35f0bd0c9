"""Random draws for generation, with one random stream per sample if asked.

An evaluation's sample set (FID's 50,000 images, the continuations that generative perplexity and
MAUVE score) should not depend on how it is cut into batches or shared among processes. So the
samplers take ``generator`` as one CPU generator for the whole batch, None (the global one), or a
list of CPU generators, one per sample: ``per_sample_generators(seed, indices)`` seeds sample i's
from (seed, i), and sample i then draws the same numbers in any batch, on any process. Draws are
made on the CPU, so a seed gives the same numbers on any device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def per_sample_generators(seed: int, indices: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per sample index, each seeded from (``seed``, index) by NumPy's SeedSequence
    (so nearby seeds and indices give unrelated streams)."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]))
            for index in indices]


def _rows(shape: Sequence[int], generator: Generators) -> list[torch.Generator] | None:
    if generator is None or isinstance(generator, torch.Generator):
        return None
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} samples; give one per sample")
    return list(generator)


def randn(shape: Sequence[int], generator: Generators = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal [shape] on the CPU; with a list of generators, row i from generator i."""
    rows = _rows(shape, generator)
    if rows is None:
        return torch.randn(tuple(shape), generator=generator, dtype=dtype)
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in rows])


def multinomial(probs: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """[N, V] CPU probabilities -> [N] one draw per row; with a list of generators, row i from generator i."""
    rows = _rows(probs.shape, generator)
    if rows is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return torch.cat([torch.multinomial(p[None], 1, generator=g).squeeze(1) for p, g in zip(probs, rows)])
