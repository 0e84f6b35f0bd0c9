"""A bidirectional DiT-style transformer over tokens: the denoiser of masked (absorbing) diffusion.

Same layer as the image DiT (adaLN-Zero, time conditioning through a sinusoidal embedding and an
MLP) on a sequence of token embeddings instead of image patches; attention is full
(bidirectional). The three parts ``dbl.models.blockwise`` needs:

- ``embed(tokens, t, cond=None) -> (h, c)``: token embedding (the vocabulary plus the mask token,
  id ``vocab_size``) + position embedding, and c = embedding of the diffusion time t;
- ``layers``: ``depth`` adaLN-Zero layers;
- ``head(h, c)``: adaLN final layer to logits over the ``vocab_size`` real tokens (never the mask:
  the model only ever predicts what a masked position holds).

The final layer is zero-initialised, so a fresh model predicts the uniform distribution.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from dbl.errors import UsageError
from dbl.models.dit import FinalLayer
from dbl.models.layers import AdaLNZeroLayer, NoiseEmbedder


def sincos_pos_embed_1d(dim: int, length: int) -> torch.Tensor:
    """[length, dim] fixed sine-cosine position embedding (Vaswani et al.)."""
    if dim % 2:
        raise UsageError(f"hidden size must be even for the sinusoidal position embedding, got {dim}")
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    args = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1).float()


class TokenDiT(nn.Module):
    """Masked-diffusion denoiser over sequences of up to ``seq_len`` tokens.

    Args:
        vocab_size: number of real tokens (27 for text8); the mask token gets id ``vocab_size``.
        seq_len: longest sequence the position embedding covers.
        hidden_size, depth, num_heads, mlp_ratio: transformer size (paper text8 run: 768, 12, 12, 4).
        position_embedding: ``learned`` (a table, initialised N(0, 0.02)) or ``sinusoidal`` (fixed).
        time_scale: t in [0, 1] is multiplied by this before the sinusoidal time embedding, whose
            frequencies are made for inputs of order 1000 (DiT's timestep convention).
    """

    def __init__(
        self,
        vocab_size: int = 27,
        seq_len: int = 256,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        position_embedding: Literal["learned", "sinusoidal"] = "learned",
        time_scale: float = 1000.0,
    ):
        super().__init__()
        if vocab_size < 1 or seq_len < 1:
            raise UsageError(f"vocab_size and seq_len must be positive, got {vocab_size}, {seq_len}")
        self.vocab_size, self.seq_len, self.time_scale = vocab_size, seq_len, time_scale
        self.token_embed = nn.Embedding(vocab_size + 1, hidden_size)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if position_embedding == "learned":
            self.pos_embed = nn.Parameter(torch.randn(seq_len, hidden_size) * 0.02)
        elif position_embedding == "sinusoidal":
            self.register_buffer("pos_embed", sincos_pos_embed_1d(hidden_size, seq_len), persistent=False)
        else:
            raise UsageError(f"unknown position_embedding {position_embedding!r}; choose 'learned' or 'sinusoidal'")
        self.time_embed = NoiseEmbedder(hidden_size)
        self.layers = nn.ModuleList([AdaLNZeroLayer(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final = FinalLayer(hidden_size, vocab_size)

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def embed(self, tokens: torch.Tensor, t: torch.Tensor, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``cond`` is unused (unconditional text); it exists for the block-wise network's signature."""
        length = tokens.shape[1]
        if length > self.seq_len:
            raise ValueError(f"sequence of {length} tokens is longer than the model's seq_len {self.seq_len}")
        h = self.token_embed(tokens) + self.pos_embed[:length]
        return h, self.time_embed(t * self.time_scale)

    def head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.final(h, c)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        h, c = self.embed(tokens, t, cond)
        for layer in self.layers:
            h = layer(h, c)
        return self.head(h, c)
