"""LightningDataModules."""

from dbl.data.digits import DigitsDataModule
from dbl.data.text8 import Text8DataModule

__all__ = ["DigitsDataModule"]
__all__ += ["Text8DataModule"]
