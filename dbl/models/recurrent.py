"""A recurrent-depth decoder (Huginn-style): prelude, a weight-tied recurrent core, coda (no Lightning here).

Method spec, section 8 ("Recurrent depth"); Geiping et al. 2025, "Scaling up Test-Time Compute with Latent
Reasoning: A Recurrent Depth Approach" (Huginn). The paper's sizes: 2 prelude + 4 core + 2 coda layers,
width 512, 8 heads. Every layer is ``dbl.models.llama.LlamaLayer`` and the token table, input projections,
RoPE, mask, ``KVCache`` and ``TextContext`` are ``Llama``'s: this class only rearranges them.

One network, two ways to train it:

- **DiffusionBlocks, B = 1 over the recurrence** (``dbl.training.autoregressive.ARDiffusionLMModule`` with
  ``num_blocks: 1``). The block-wise protocol's ``layers`` are the core's layers, so the one block IS the
  core. ``embed`` is ``Llama.embed`` followed by the prelude on the CLEAN rows only (the prelude encodes
  the context, the condition x); the noisy rows (noisy_in(c_in z), z the noised next-token embedding)
  enter the core as they are: the recurrent state starts at the noisy target. The core runs once per
  training step (no unrolling), conditioned on sigma by adaLN; ``head`` is the coda over
  [noisy ; clean] with the same context, then ``Llama.head``. At inference each of K solver steps calls
  the core once: K iterations of the recurrence, each one Euler step from sigma_max towards sigma_min.
- **the Huginn baseline** (``dbl.training.recurrent.RecurrentDepthLMModule``): ``recurrent_logits``.
  e = prelude(clean rows); s_0 ~ N(0, state_init_std^2); s_i = core(adapter([s_{i-1} ; e])) for
  i = 1..r; logits = lm_head(norm(coda(s_r))), next-token. Truncated back-propagation: the first r - k
  iterations run under ``torch.no_grad()``, the last k with gradients. The core layers run in clean
  (next-token) mode: modulated by the clean conditioning vector, no noise.

The adapter is used by the baseline only, and the noise embedder / ``noisy_in`` / ``out`` by the
diffusion only: each training leaves the other's parameters without gradients, so both modules turn
on DDP's ``find_unused_parameters`` (``diffusion_leaves_parameters_unused`` tells ``ARDiffusionLMModule``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from dbl.diffusion.draws import Generators, randn
from dbl.errors import UsageError
from dbl.models.llama import ARInput, KVCache, Llama, LlamaLayer, TextContext


@dataclass
class RecurrentCache:
    """Keys/values of the baseline's clean prefix: the prelude's and the coda's in ``io``, and one
    ``KVCache`` per iteration for the core (its keys differ at every iteration)."""

    io: KVCache = field(default_factory=KVCache)
    iterations: list[KVCache] = field(default_factory=list)

    def iteration(self, i: int) -> KVCache:
        while len(self.iterations) <= i:
            self.iterations.append(KVCache())
        return self.iterations[i]


def clean_rows(c: TextContext) -> TextContext:
    """The context of ``c``'s clean rows alone: their RoPE rows, and the mask without the noisy rows'
    queries and keys (clean queries never attend to a noisy key, so nothing they saw is removed)."""
    n = c.num_noisy
    if n == 0:
        return c
    past = c.mask.shape[1] - c.mask.shape[0]
    mask = torch.cat([c.mask[n:, :past], c.mask[n:, past + n:]], dim=1)
    return replace(c, noisy_cond=None, num_noisy=0, cos=c.cos[n:], sin=c.sin[n:], mask=mask, clean_hidden=None)


@dataclass
class _StoredContext(TextContext):
    """A prefix extension whose coda output was computed (and its keys stored) in ``embed``."""

    coda_clean: torch.Tensor | None = None


class RecurrentDepthLlama(Llama):
    """Prelude + weight-tied recurrent core + coda, on ``Llama``'s parts.

    Args:
        vocab_size, hidden_size, num_heads, mlp_hidden, rope_theta, frequency_dim: as ``Llama``.
        prelude_depth, core_depth, coda_depth: layers of each part (paper: 2 + 4 + 2).
        state_init_std: std of the baseline's initial state s_0 ~ N(0, std^2). Huginn draws s_0 at the
            scale of its input embeddings (its ``initialize_state``: the init std sqrt(2 / (5 h)) times
            the embedding scale, which its embeddings also carry; truncated at 3 std). Here the rows
            entering the layers are ``clean_in`` of unit-scale token vectors (entries of std ~0.6 at
            init) and the noisy state of the diffusion run is unit-scale too, so the default 1.0 puts
            s_0 at the inputs' scale, as Huginn does (plain normal: the truncation touches 0.3% of draws).
    """

    diffusion_leaves_parameters_unused = True  # the adapter: only the baseline's recurrence uses it

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 512,
        num_heads: int = 8,
        prelude_depth: int = 2,
        core_depth: int = 4,
        coda_depth: int = 2,
        mlp_hidden: int | None = None,
        rope_theta: float = 10000.0,
        frequency_dim: int = 256,
        state_init_std: float = 1.0,
    ):
        for name, value, least in (("prelude_depth", prelude_depth, 0), ("core_depth", core_depth, 1),
                                   ("coda_depth", coda_depth, 0)):
            if value < least:
                raise UsageError(f"{name} must be >= {least}, got {value}")
        if state_init_std < 0:
            raise UsageError(f"state_init_std must be >= 0, got {state_init_std}")
        super().__init__(vocab_size, hidden_size, core_depth, num_heads, mlp_hidden, rope_theta, frequency_dim)
        width = mlp_hidden or 64 * -(-int(8 * hidden_size / 3) // 64)  # Llama's default, as its core layers
        self.prelude = nn.ModuleList(LlamaLayer(hidden_size, num_heads, width) for _ in range(prelude_depth))
        self.coda = nn.ModuleList(LlamaLayer(hidden_size, num_heads, width) for _ in range(coda_depth))
        self.adapter = nn.Linear(2 * hidden_size, hidden_size)  # Huginn's: [s ; e] -> the core's input
        self.state_init_std = state_init_std

    # -- shared by both trainings ------------------------------------------------------------------
    def encode(self, x: torch.Tensor | None, c_noise: torch.Tensor | None, cond: ARInput) -> tuple[torch.Tensor, TextContext]:
        """``Llama.embed``, then the prelude on the clean rows only (storing their keys when ``cond.store``)."""
        h, c = super().embed(x, c_noise, cond)
        n = c.num_noisy
        if h.shape[1] == n or not len(self.prelude):
            return h, c
        clean_c, e = clean_rows(c), h[:, n:]
        for layer in self.prelude:
            e = layer(e, clean_c)
        return (torch.cat([h[:, :n], e], dim=1) if n else e), c

    # -- DiffusionBlocks (block-wise protocol; the one block is the core) ---------------------------
    def embed(self, x: torch.Tensor | None, c_noise: torch.Tensor | None, cond: ARInput) -> tuple[torch.Tensor, TextContext]:
        """[noisy rows as they are ; prelude(clean rows)] and the context.

        Extending a cached prefix (``cond.store``, clean rows only): ``dbl.denoisers.text`` then runs the
        block's layers (the core) and never ``head``, so the coda's keys for these rows are stored here:
        the rows go through the core (reading, not storing, its cache) and the coda (storing). ``head``
        of such a call reuses that coda output instead of storing twice.
        """
        h, c = self.encode(x, c_noise, cond)
        if not (c.store and c.cache is not None and len(self.coda)):
            return h, c
        g = h
        for layer in self.layers:
            g = layer(g, replace(c, store=False))
        for layer in self.coda:
            g = layer(g, c)
        return h, _StoredContext(**vars(c), coda_clean=g)

    def head(self, h: torch.Tensor, c: TextContext) -> torch.Tensor:
        """The coda over all rows, then ``Llama.head`` (F of the noisy rows, or next-token logits)."""
        stored = getattr(c, "coda_clean", None)
        if stored is not None:
            h = stored
        else:
            for layer in self.coda:
                h = layer(h, c)
        return super().head(h, c)

    # -- the Huginn baseline ----------------------------------------------------------------------
    def initial_state(self, shape, generator: Generators, like: torch.Tensor) -> torch.Tensor:
        """s_0 ~ N(0, state_init_std^2) [shape], drawn on the CPU (one generator, one per sample, or the global RNG);
        std 0: zeros, drawing nothing."""
        if self.state_init_std == 0:
            return like.new_zeros(shape)
        return (randn(shape, generator) * self.state_init_std).to(device=like.device, dtype=like.dtype)

    def core_step(self, s: torch.Tensor, e: torch.Tensor, c: TextContext) -> torch.Tensor:
        """One iteration of the recurrence: the core's layers on adapter([s ; e])."""
        x = self.adapter(torch.cat([s, e], dim=-1))
        for layer in self.layers:
            x = layer(x, c)
        return x

    def recurrent_logits(
        self,
        tokens: torch.Tensor,
        num_iterations: int,
        backprop_iterations: int | None = None,
        generator: Generators = None,
        cache: RecurrentCache | None = None,
    ) -> torch.Tensor:
        """[N, m, V] next-token logits of ``tokens`` [N, m] after ``num_iterations`` iterations of the core.

        ``backprop_iterations`` k: only the last k iterations record gradients (truncated
        back-propagation; None: all). ``cache``: continue a cached prefix (``tokens`` are the new
        positions; their keys are stored for every layer and iteration).
        """
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        k = num_iterations if backprop_iterations is None else min(backprop_iterations, num_iterations)
        cond = ARInput(tokens, cache=cache.io if cache is not None else None, store=cache is not None)
        e, c = self.encode(None, None, cond)
        s = self.initial_state(e.shape, generator, e)

        def context(i: int) -> TextContext:
            return c if cache is None else replace(c, cache=cache.iteration(i))

        with torch.no_grad():
            for i in range(num_iterations - k):
                s = self.core_step(s, e, context(i))
        for i in range(num_iterations - k, num_iterations):
            s = self.core_step(s, e, context(i))
        for layer in self.coda:
            s = layer(s, c)
        return self.lm_head(self.norm(s))
