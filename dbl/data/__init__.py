"""LightningDataModules."""

from dbl.data.digits import DigitsDataModule
from dbl.data.lm1b import LM1BDataModule

__all__ = ["DigitsDataModule", "LM1BDataModule"]
