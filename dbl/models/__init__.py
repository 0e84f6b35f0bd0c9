"""Networks (no Lightning): DiT, ViT and the wrapper that splits a network into blocks."""

from dbl.models.blockwise import BlockwiseNetwork, split_layers
from dbl.models.dit import DiT
from dbl.models.vit import ViT

__all__ = ["BlockwiseNetwork", "DiT", "split_layers", "ViT"]
