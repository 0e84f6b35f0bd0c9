"""A Llama-style decoder (RoPE, RMSNorm, SwiGLU) with adaLN noise conditioning, for text.

One network, two ways to train it (``dbl.training.autoregressive``):

- **block-wise autoregressive diffusion** (DiffusionBlocks' LM1B model). Token i's embedding is
  diffused and denoised conditioned on the clean tokens < i. All positions train at once on the
  sequence ``[noisy rows ; clean rows]`` of length 2T; noisy row i and clean row i share position
  id i. Noisy row i attends to clean rows < i and to itself; clean rows are causal among
  themselves and never see a noisy row. ``head`` returns the raw output F (in the embedding
  space) of the noisy rows; the task turns it into the EDM denoised estimate
  D = c_skip z + c_out F and then into logits with ``denoised_logits(D)``.
- **next-token prediction** (the baseline): clean rows only, ``head`` returns next-token logits.

Conditioning: every layer is adaLN-Zero (shift, scale, gate for attention and MLP, zero-initialised
so a layer starts as the identity). Noisy rows are modulated by the noise embedding of their sigma;
clean rows by a learned vector that does not depend on sigma. That independence is what makes the
clean stream's keys/values reusable across solver steps and tokens (``KVCache``).

Block-wise interface (``dbl.models.blockwise``): ``layers``, ``embed(x, c_noise, cond) -> (h, c)``
and ``head(h, c)``, where ``cond`` is an ``ARInput`` and ``c`` a ``TextContext``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dbl.errors import UsageError
from dbl.models.layers import NoiseEmbedder, modulate, sinusoidal_embedding


def ar_diffusion_mask(q_pos: torch.Tensor, q_noisy: torch.Tensor, k_pos: torch.Tensor, k_noisy: torch.Tensor) -> torch.Tensor:
    """[Sq, Sk] boolean attention mask (True: may attend) of the [noisy ; clean] sequence.

    A noisy query at position p sees clean keys at positions < p and its own row; a clean query
    at p sees clean keys at positions <= p; no query sees another noisy row. ``*_pos`` are
    position ids, ``*_noisy`` booleans saying which rows are noisy.
    """
    qp, kp = q_pos[:, None], k_pos[None, :]
    qn, kn = q_noisy[:, None], k_noisy[None, :]
    clean_key = ~kn & ((kp < qp) | (~qn & (kp == qp)))
    own_noisy_row = qn & kn & (kp == qp)
    return clean_key | own_noisy_row


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


@dataclass
class KVCache:
    """Per layer, keys and values (after RoPE) of the clean rows at positions 0..length-1.

    Noisy rows are never stored: they change at every solver step, the clean prefix does not.
    """

    keys: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    values: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    length: int = 0

    def get(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.keys[layer], self.values[layer]) if layer in self.keys else None

    def append(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> None:
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v


@dataclass
class ARInput:
    """What ``embed`` needs besides the noisy rows.

    tokens: [N, m] clean tokens at positions ``cache.length`` .. (0 without a cache), or None.
    noisy_start: position id of the first noisy row (noisy rows are consecutive).
    cache: keys/values of earlier clean positions; read by every layer when given.
    store: append this call's clean rows to ``cache`` (extending the prefix by ``tokens``).
    """

    tokens: torch.Tensor | None
    noisy_start: int = 0
    cache: KVCache | None = None
    store: bool = False
    clean_hidden: list | None = None  # given a list, ``head`` appends the clean rows' final hidden states [N, m, D]


@dataclass
class TextContext:
    """What the layers read: conditioning of both kinds of rows, RoPE tables, mask, cache.

    Rows ``[0, num_noisy)`` of h are noisy, the rest are clean.
    """

    noisy_cond: torch.Tensor | None  # [N, D] noise embedding, None when there are no noisy rows
    clean_cond: torch.Tensor  # [1, D]
    num_noisy: int
    cos: torch.Tensor  # [S, head_dim]
    sin: torch.Tensor  # [S, head_dim]
    mask: torch.Tensor  # [S, P + S] bool, P = cached positions
    cache: KVCache | None = None
    store: bool = False
    clean_hidden: list | None = None


def _per_rows(c: TextContext, fn, noisy_params, clean_params, x: torch.Tensor) -> torch.Tensor:
    """Apply ``fn(rows, *params)`` with the noisy rows' params to rows < num_noisy, clean ones to the rest."""
    n = c.num_noisy
    if n == 0:
        return fn(x, *clean_params)
    if n == x.shape[1]:
        return fn(x, *noisy_params)
    return torch.cat([fn(x[:, :n], *noisy_params), fn(x[:, n:], *clean_params)], dim=1)


def _gated(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return x * gate.unsqueeze(1)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaLayer(nn.Module):
    """Pre-norm (RMSNorm) attention with RoPE and a SwiGLU MLP, both adaLN-Zero modulated."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise UsageError(f"hidden_size {dim} must split into num_heads {num_heads} heads of even size")
        self.num_heads = num_heads
        self.norm1 = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def attention(self, x: torch.Tensor, c: TextContext) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = q * c.cos + rotate_half(q) * c.sin, k * c.cos + rotate_half(k) * c.sin
        if c.cache is not None:
            past = c.cache.get(self)
            if c.store:
                c.cache.append(self, k[:, :, c.num_noisy:], v[:, :, c.num_noisy:])
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=c.mask)
        return self.proj(out.transpose(1, 2).reshape(n, s, d))

    def forward(self, x: torch.Tensor, c: TextContext) -> torch.Tensor:
        clean = self.modulation(c.clean_cond).chunk(6, dim=-1)
        noisy = self.modulation(c.noisy_cond).chunk(6, dim=-1) if c.noisy_cond is not None else clean
        attn_in = _per_rows(c, modulate, noisy[0:2], clean[0:2], self.norm1(x))
        x = x + _per_rows(c, _gated, noisy[2:3], clean[2:3], self.attention(attn_in, c))
        mlp_in = _per_rows(c, modulate, noisy[3:5], clean[3:5], self.norm2(x))
        return x + _per_rows(c, _gated, noisy[5:6], clean[5:6], self.mlp(mlp_in))


class Llama(nn.Module):
    """Llama-style decoder for autoregressive diffusion (block-wise) or next-token prediction.

    Args:
        vocab_size: size of the token table (the tokenizer's ``len(tokenizer)``).
        hidden_size, depth, num_heads: width, number of layers, attention heads.
        mlp_hidden: SwiGLU width; default Llama's 8/3 * hidden_size rounded up to a multiple of 64.
        rope_theta: RoPE base.
        frequency_dim: sinusoidal features of the noise embedder.

    The token table's rows are L2-normalised before any use (``token_vectors``): they are the
    clean targets of the diffusion and the clean-stream inputs, so a table that grew its norms
    could not make the denoising task trivially easy.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_hidden: int | None = None,
        rope_theta: float = 10000.0,
        frequency_dim: int = 256,
    ):
        super().__init__()
        if vocab_size < 2:
            raise UsageError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size, self.hidden_size, self.num_heads = vocab_size, hidden_size, num_heads
        mlp_hidden = mlp_hidden or 64 * -(-int(8 * hidden_size / 3) // 64)
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        nn.init.normal_(self.embedding.weight)
        self.noisy_in = nn.Linear(hidden_size, hidden_size)
        self.clean_in = nn.Linear(hidden_size, hidden_size)
        self.noise_embedder = NoiseEmbedder(hidden_size, frequency_dim)
        self.clean_embedding = nn.Parameter(torch.zeros(1, hidden_size))
        self.layers = nn.ModuleList(LlamaLayer(hidden_size, num_heads, mlp_hidden) for _ in range(depth))
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        head_dim = hidden_size // num_heads
        self.register_buffer("inv_freq", rope_theta ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    # -- the token table ---------------------------------------------------------------------
    def token_table(self) -> torch.Tensor:
        """[V, D] the L2-normalised rows: clean targets of the diffusion."""
        return F.normalize(self.embedding.weight, dim=-1)

    def token_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., D] the normalised rows of ``tokens``."""
        return F.normalize(self.embedding(tokens), dim=-1)

    def denoised_logits(self, denoised: torch.Tensor) -> torch.Tensor:
        """Logits from a denoised estimate D in the table's space (rows of norm 1).

        D is scaled by sqrt(hidden_size) so that its entries have the unit scale the head sees
        from the final RMSNorm in next-token mode.
        """
        weight, bias, scale = self.denoised_head()
        return F.linear(denoised * scale, weight, bias)

    def denoised_head(self) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """(weight, bias, scale) of ``denoised_logits``: logits = F.linear(D * scale, weight, bias)."""
        return self.lm_head.weight, self.lm_head.bias, self.hidden_size**0.5

    # -- block-wise interface ----------------------------------------------------------------
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq[None]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def embed(self, x: torch.Tensor | None, c_noise: torch.Tensor | None, cond: ARInput) -> tuple[torch.Tensor, TextContext]:
        """h = [noisy rows ; clean rows] and the context the layers need.

        ``x``: [N, n, D] the noisy rows already scaled by c_in (None: no noisy rows); ``c_noise``:
        [N]; ``cond``: the clean tokens, noisy rows' position, cache (``ARInput``).
        """
        rows, positions, noisy = [], [], []
        past = cond.cache.length if cond.cache is not None else 0
        device = self.inv_freq.device
        if x is not None:
            if c_noise is None:
                raise ValueError("noisy rows need c_noise")
            rows.append(self.noisy_in(x))
            positions.append(torch.arange(x.shape[1], device=device) + cond.noisy_start)
            noisy.append(torch.ones(x.shape[1], dtype=torch.bool, device=device))
        if cond.tokens is not None and cond.tokens.shape[1]:
            m = cond.tokens.shape[1]
            rows.append(self.clean_in(self.token_vectors(cond.tokens) * self.hidden_size**0.5))
            positions.append(torch.arange(m, device=device) + past)
            noisy.append(torch.zeros(m, dtype=torch.bool, device=device))
        if not rows:
            raise ValueError("embed needs noisy rows or clean tokens")
        h, q_pos, q_noisy = torch.cat(rows, dim=1), torch.cat(positions), torch.cat(noisy)
        k_pos = torch.cat([torch.arange(past, device=device), q_pos])
        k_noisy = torch.cat([torch.zeros(past, dtype=torch.bool, device=device), q_noisy])
        cos, sin = self.rope(q_pos)
        if cond.store and x is not None:
            raise ValueError("only clean rows can be stored in the cache; call with x=None to extend the prefix")
        if cond.store and cond.cache is not None:
            cond.cache.length += h.shape[1]
        noisy_cond = None
        if x is not None:  # NoiseEmbedder's sinusoidal features are float32; match the model's dtype (e.g. float64)
            features = sinusoidal_embedding(c_noise, self.noise_embedder.frequency_dim).to(h.dtype)
            noisy_cond = self.noise_embedder.mlp(features)
        context = TextContext(
            noisy_cond=noisy_cond,
            clean_cond=self.clean_embedding,
            num_noisy=x.shape[1] if x is not None else 0,
            cos=cos.to(h.dtype),
            sin=sin.to(h.dtype),
            mask=ar_diffusion_mask(q_pos, q_noisy, k_pos, k_noisy),
            cache=cond.cache,
            store=cond.store,
            clean_hidden=cond.clean_hidden,
        )
        return h, context

    def head(self, h: torch.Tensor, c: TextContext) -> torch.Tensor:
        """Noisy rows present: the raw output F [N, n, D] of the noisy rows (embedding space).
        Otherwise: next-token logits [N, m, V] of the clean rows."""
        if c.clean_hidden is not None:
            c.clean_hidden.append(h[:, c.num_noisy:])
        if c.num_noisy:
            return self.out(self.norm(h[:, : c.num_noisy]))
        return self.lm_head(self.norm(h))
