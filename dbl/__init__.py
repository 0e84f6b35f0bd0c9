"""dbl: DiffusionBlocks in PyTorch Lightning. Block-wise training of transformers as diffusion denoisers."""

from dbl.export import load_exported
from dbl.training import BlockwiseLightningModule, ImageDiffusionModule

__version__ = "0.1.0"
__all__ = ["BlockwiseLightningModule", "ImageDiffusionModule", "load_exported"]
