"""A ViT image classifier (Dosovitskiy et al. 2021) that can also denoise a label: the official
DiffusionBlocks code's task (method spec, section 8).

One network, two ways to train it (``dbl.training.classification``):

- **block-wise label diffusion**: the target is a learnable label embedding (its L2-normalised row
  of the true class). Its noisy, c_in-scaled version enters as one extra token at position 0, in
  place of [CLS]; every layer is adaLN-Zero modulated by the noise level. ``head`` reads token 0
  after the final norm: the raw output F, in the label-embedding space. The task forms
  D = c_skip z + c_out F and turns D into class logits with ``label_logits(D, c_noise)`` (an
  output adaLN, then a linear classifier).
- **end to end** (the baseline): a [CLS] token at position 0, no noise and no modulation (build
  with ``noise_conditioning: false``), ``label_logits(head(...))`` on the [CLS] token: Hugging
  Face's ``ViTForImageClassification``.

Block-wise interface (``dbl.models.blockwise``): ``layers``, ``embed(x, c_noise, images) -> (h, c)``
and ``head(h, c)``. The model knows nothing of sigma, partitions or samplers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dbl.errors import UsageError
from dbl.models.layers import AdaLNZeroLayer, NoiseEmbedder


class ViT(nn.Module):
    """ViT with a label token and adaLN noise conditioning.

    Args:
        num_classes: number of classes (rows of the label table, outputs of the classifier).
        image_size: side of the (square) input images.
        in_channels: image channels.
        patch_size: side of a patch (the paper's CIFAR-100 ViT: 4, so 64 patches of a 32x32 image).
        hidden_size, depth, num_heads: width, layers, attention heads (CIFAR-100: 128, 12, 4;
            Tiny-ImageNet: 768, 12, 12).
        mlp_hidden: MLP width. The official code never sets it, so it is Hugging Face's ViT
            default, 3,072, whatever the width (about 90% of the CIFAR-100 model's parameters).
        dropout: on the embeddings, attention probabilities and the attention and MLP outputs (0.1).
        norm_eps: LayerNorm epsilon (Hugging Face's ViT: 1e-12).
        noise_conditioning: build the noise embedder and the layers' adaLN modulation (the
            diffusion task); false builds the plain ViT of the end-to-end baseline.
        noise_mlp_hidden: width of the noise embedder's MLP; default ``hidden_size // 6``, the
            official code's.
        init_std: standard deviation of the truncated-normal initialisation of every linear map,
            the patch embedding, the position embedding and [CLS] (Hugging Face's ViT: 0.02).
    """

    def __init__(
        self,
        num_classes: int = 100,
        image_size: int = 32,
        in_channels: int = 3,
        patch_size: int = 4,
        hidden_size: int = 128,
        depth: int = 12,
        num_heads: int = 4,
        mlp_hidden: int = 3072,
        dropout: float = 0.1,
        norm_eps: float = 1e-12,
        noise_conditioning: bool = True,
        noise_mlp_hidden: int | None = None,
        init_std: float = 0.02,
    ):
        super().__init__()
        if num_classes < 2:
            raise UsageError(f"num_classes must be >= 2, got {num_classes}")
        if image_size % patch_size:
            raise UsageError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if not 0 <= dropout < 1:
            raise UsageError(f"dropout must be in [0, 1), got {dropout}")
        self.num_classes, self.image_size, self.in_channels = num_classes, image_size, in_channels
        self.hidden_size = hidden_size
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, hidden_size))
        self.embed_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            AdaLNZeroLayer(hidden_size, num_heads, mlp_hidden=mlp_hidden, dropout=dropout, norm_eps=norm_eps, norm_affine=True,
                           gelu="none", conditioned=noise_conditioning)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.classifier = nn.Linear(hidden_size, num_classes)
        self.noise_embed = self.label_table = self.out_norm = self.out_modulation = None
        if noise_conditioning:
            self.noise_embed = NoiseEmbedder(hidden_size, mlp_hidden=noise_mlp_hidden or max(hidden_size // 6, 1))
            self.label_table = nn.Embedding(num_classes, hidden_size)
            self.out_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self._init_weights(init_std)

    def _init_weights(self, std: float) -> None:
        """Hugging Face's ViT initialisation, with adaLN-Zero's zeros where the modulation and the
        classifier start (so every layer starts as the identity and every logit at 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=std)
        nn.init.trunc_normal_(self.cls_token, std=std)
        zeroed = [self.classifier] + [layer.modulation[1] for layer in self.layers if layer.modulation is not None]
        if self.out_modulation is not None:
            zeroed.append(self.out_modulation[1])
        for m in zeroed:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def noise_conditioned(self) -> bool:
        return self.noise_embed is not None

    # -- the label table -----------------------------------------------------------------------
    def label_vectors(self, labels: torch.Tensor) -> torch.Tensor:
        """[N, D] the L2-normalised label-table rows of ``labels``: the diffusion's clean targets."""
        return F.normalize(self.label_table(labels), dim=-1)

    def label_matrix(self, normalized: bool = True) -> torch.Tensor:
        """[classes, D] the table whose softmax-weighted mean is a denoised estimate at sampling time:
        the normalised rows the model was trained on, or (``normalized=False``) the raw rows the
        official code uses there (a train/test mismatch kept for reproduction)."""
        table = self.label_table.weight
        return F.normalize(table, dim=-1) if normalized else table

    def label_logits(self, features: torch.Tensor, c_noise: torch.Tensor | None = None) -> torch.Tensor:
        """[N, classes] logits. With ``c_noise`` [N], ``features`` is the denoised label estimate D
        [N, D]: output adaLN (norm, shift and scale from the noise level), then the classifier.
        Without it, ``features`` is the [CLS] token of the baseline: the classifier alone."""
        if c_noise is None:
            return self.classifier(features)
        shift, scale = self.out_modulation(self.noise_embed(c_noise).to(features.dtype)).chunk(2, dim=-1)
        return self.classifier(self.out_norm(features) * (1 + scale) + shift)

    # -- block-wise interface ------------------------------------------------------------------
    def embed(self, x: torch.Tensor | None, c_noise: torch.Tensor | None, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h = [token 0 ; patches] + position embedding, and the conditioning c (None without noise).

        ``x``: [N, D] the noisy label embedding scaled by c_in, or None for [CLS]; ``c_noise``: [N].
        """
        if images is None or images.dim() != 4:
            raise ValueError(f"ViT needs images [N, C, H, W], got {None if images is None else tuple(images.shape)}")
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)
        if x is None:
            first, c = self.cls_token.expand(patches.shape[0], -1, -1), None
        else:
            if not self.noise_conditioned:
                raise ValueError("this ViT was built with noise_conditioning: false; it has no label token")
            first, c = x[:, None].to(patches.dtype), self.noise_embed(c_noise).to(patches.dtype)
        return self.embed_drop(torch.cat([first, patches], dim=1) + self.pos_embed), c

    def head(self, h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """[N, D] token 0 after the final norm."""
        return self.norm(h[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The end-to-end classifier: logits of the [CLS] token."""
        h, c = self.embed(None, None, images)
        for layer in self.layers:
            h = layer(h, c)
        return self.label_logits(self.head(h, c))
