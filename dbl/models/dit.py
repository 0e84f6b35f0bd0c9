"""DiT (Peebles & Xie 2023) as the raw network F of an EDM denoiser, split for block-wise training.

The network exposes three parts so that a wrapper (``dbl.models.blockwise``) can run any
contiguous range of layers on its own:

- ``embed(x, c_noise, labels) -> (h, c)``: patchify + positional embedding, and the conditioning
  vector c = noise embedding + label embedding;
- ``layers``: the ``depth`` adaLN-Zero transformer layers, each ``h = layer(h, c)``;
- ``head(h, c)``: adaLN final layer and unpatchify.

Everything outside ``layers`` is the "input/output" part that blocks share (or copy).
"""

from __future__ import annotations

import torch
from torch import nn

from dbl.errors import UsageError
from dbl.models.layers import AdaLNZeroLayer, NoiseEmbedder, modulate

# name -> (hidden_size, depth, num_heads, patch_size), as in the DiT paper
PRESETS: dict[str, tuple[int, int, int, int]] = {
    f"{size}/{patch}": (hidden, depth, heads, patch)
    for size, (hidden, depth, heads) in {
        "S": (384, 12, 6),
        "B": (768, 12, 12),
        "L": (1024, 24, 16),
        "XL": (1152, 28, 16),
    }.items()
    for patch in (2, 4, 8)
}


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid*grid, dim] fixed 2-D sine-cosine position embedding (MAE / DiT)."""
    if dim % 4:
        raise UsageError(f"hidden size must be divisible by 4 for the 2-D position embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(ys), embed(xs)], dim=1).float()


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with one extra "null" row for classifier-free guidance.

    During training each label is replaced by the null class with probability ``dropout_prob``
    (the paper: 10%), which teaches the unconditional denoiser that guidance needs.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.table = nn.Embedding(num_classes + 1, hidden_size)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.table(labels)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        for m in (self.linear, self.modulation[1]):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(h), shift, scale))


class DiT(nn.Module):
    """Class-conditional DiT with adaLN-Zero layers.

    Args:
        preset: ``"S/2"``, ``"B/2"``, ``"L/2"``, ``"XL/2"`` (also ``/4``, ``/8``) fill
            hidden_size, depth, num_heads and patch_size; any of those given explicitly wins.
        input_size: image (or latent) side length in pixels.
        in_channels: channels of the image or latent.
        num_classes: number of labels; 0 builds an unconditional model.
        class_dropout_prob: probability of replacing a label by the null class while training.
    """

    def __init__(
        self,
        preset: str | None = None,
        input_size: int = 32,
        in_channels: int = 3,
        hidden_size: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        patch_size: int | None = None,
        mlp_ratio: float = 4.0,
        num_classes: int = 10,
        class_dropout_prob: float = 0.1,
    ):
        super().__init__()
        if preset is not None:
            if preset not in PRESETS:
                raise UsageError(f"unknown DiT preset {preset!r}; choose one of {', '.join(PRESETS)}")
            p_hidden, p_depth, p_heads, p_patch = PRESETS[preset]
            hidden_size = hidden_size or p_hidden
            depth = depth or p_depth
            num_heads = num_heads or p_heads
            patch_size = patch_size or p_patch
        missing = [n for n, v in [("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads), ("patch_size", patch_size)] if v is None]
        if missing:
            raise UsageError(f"DiT needs a preset or explicit {', '.join(missing)}")
        if input_size % patch_size:
            raise UsageError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size, self.in_channels, self.patch_size = input_size, in_channels, patch_size
        self.num_classes = num_classes
        self.grid = input_size // patch_size

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(hidden_size, -1))
        nn.init.zeros_(self.patch_embed.bias)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.noise_embed = NoiseEmbedder(hidden_size)
        self.label_embed = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.layers = nn.ModuleList([AdaLNZeroLayer(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final = FinalLayer(hidden_size, patch_size * patch_size * in_channels)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def embed(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.noise_embed(c_noise)
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.null_label, device=x.device, dtype=torch.long)
            c = c + self.label_embed(labels)
        return h, c

    def head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = self.final(h, c)  # [N, T, p*p*C]
        n, p, g, ch = out.shape[0], self.patch_size, self.grid, self.in_channels
        out = out.view(n, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(n, ch, g * p, g * p)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h, c = self.embed(x, c_noise, labels)
        for layer in self.layers:
            h = layer(h, c)
        return self.head(h, c)
