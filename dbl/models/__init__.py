"""Networks (no Lightning): DiT and the wrapper that splits a network into blocks."""

from dbl.models.blockwise import BlockwiseNetwork, split_layers
from dbl.models.dit import DiT

__all__ = ["BlockwiseNetwork", "DiT", "split_layers"]
