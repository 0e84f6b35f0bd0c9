"""Callbacks: extension points around training (sample grids, FID, ...)."""

from dbl.callbacks.fid import FID
from dbl.callbacks.samples import SampleGrid

__all__ = ["FID", "SampleGrid"]
