"""LightningDataModules."""

from dbl.data.cifar10 import CIFAR10DataModule
from dbl.data.classification import (
    CIFAR100DataModule,
    ClassificationImageDataModule,
    FashionMNISTClassificationDataModule,
    TinyImageNetDataModule,
)
from dbl.data.digits import DigitsDataModule
from dbl.data.fashion_mnist import FashionMNISTDataModule
from dbl.data.imagenet import ImageNetDataModule
from dbl.data.latents import LatentShardDataset
from dbl.data.lm1b import LM1BDataModule
from dbl.data.text import TextDataModule
from dbl.data.text8 import Text8DataModule
from dbl.errors import MissingDataError

__all__ = [
    "CIFAR10DataModule", "CIFAR100DataModule", "ClassificationImageDataModule", "DigitsDataModule",
    "FashionMNISTClassificationDataModule", "FashionMNISTDataModule", "ImageNetDataModule", "LM1BDataModule",
    "LatentShardDataset", "MissingDataError", "Text8DataModule", "TextDataModule",
    "TinyImageNetDataModule",
]
