"""LightningDataModules."""

from dbl.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
