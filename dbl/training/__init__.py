"""Lightning modules: the block-wise engine and the tasks built on it."""

from dbl.training.autoregressive import ARDiffusionLMModule, NextTokenLMModule
from dbl.training.classification import LabelDiffusionModule, ViTClassifierModule
from dbl.training.edm import EDMDiffusionModule
from dbl.training.engine import BlockLoss, BlockwiseLightningModule
from dbl.training.image import ImageDiffusionModule
from dbl.training.masked import MaskedDiffusionModule
from dbl.training.metrics import BitsPerCharacter, PerBlockMean
from dbl.training.schedules import BlockSchedule, make_schedule
from dbl.training.strategies import BlockParallelStrategy, BlockwiseDDPStrategy

__all__ = [
    "ARDiffusionLMModule", "BitsPerCharacter", "BlockLoss", "BlockParallelStrategy", "BlockSchedule", "BlockwiseDDPStrategy", "BlockwiseLightningModule",
    "EDMDiffusionModule", "ImageDiffusionModule", "LabelDiffusionModule", "MaskedDiffusionModule", "NextTokenLMModule", "PerBlockMean", "ViTClassifierModule",
    "make_schedule",
]
