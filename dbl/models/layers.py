"""Transformer pieces shared by dbl's models: noise-level embedding and the adaLN-Zero layer (DiT)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dbl.errors import UsageError


def sinusoidal_embedding(x: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[N] -> [N, dim] cos/sin features at geometrically spaced frequencies (DiT / EDM positional)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class NoiseEmbedder(nn.Module):
    """c_noise -> conditioning vector: sinusoidal features (256 frequencies) then an MLP.

    c_noise = ln(sigma) / 4 is fed unscaled, as EDM does with its positional embedding.
    """

    def __init__(self, hidden_size: int, frequency_dim: int = 256, mlp_hidden: int | None = None):
        super().__init__()
        self.frequency_dim = frequency_dim
        mlp_hidden = mlp_hidden or hidden_size
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, mlp_hidden), nn.SiLU(), nn.Linear(mlp_hidden, hidden_size))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(c_noise, self.frequency_dim))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention; ``dropout`` drops attention probabilities while training (ViT's)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise UsageError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class AdaLNZeroLayer(nn.Module):
    """DiT block: attention and MLP, each modulated by (shift, scale, gate) from the conditioning.

    The modulation is zero-initialised, so every gate starts at 0 and the layer is the identity:
    a freshly built block is a no-op residual update, which is also what makes block-wise training
    start from a sensible chain.

    The defaults are DiT's; a ViT sets the rest: ``mlp_hidden`` (an absolute width), ``dropout``
    (attention probabilities, and the attention and MLP outputs), ``norm_eps``, ``norm_affine``
    (learned LayerNorm scale and bias), ``gelu`` (``"tanh"`` or ``"none"``: exact). A layer built
    with ``conditioned=False`` has no modulation and is a plain pre-norm transformer layer; so is a
    conditioned one called with ``c=None``.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, mlp_hidden: int | None = None,
                 dropout: float = 0.0, norm_eps: float = 1e-6, norm_affine: bool = False, gelu: str = "tanh",
                 conditioned: bool = True):
        super().__init__()
        hidden_mlp = mlp_hidden or int(hidden_size * mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=norm_affine, eps=norm_eps)
        self.attn = Attention(hidden_size, num_heads, dropout)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=norm_affine, eps=norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_mlp), nn.GELU(approximate=gelu), nn.Linear(hidden_mlp, hidden_size)
        )
        self.drop = nn.Dropout(dropout)  # on the attention and MLP outputs, where Hugging Face's ViT drops
        for m in (self.attn.qkv, self.attn.proj, self.mlp[0], self.mlp[2]):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        self.modulation = None
        if conditioned:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
            nn.init.zeros_(self.modulation[1].weight)
            nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if c is None or self.modulation is None:
            x = x + self.drop(self.attn(self.norm1(x)))
            return x + self.drop(self.mlp(self.norm2(x)))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.drop(self.attn(modulate(self.norm1(x), shift1, scale1)))
        return x + gate2.unsqueeze(1) * self.drop(self.mlp(modulate(self.norm2(x), shift2, scale2)))
