"""Callbacks: extension points around training (sample grids, ...)."""

from dbl.callbacks.samples import SampleGrid

__all__ = ["SampleGrid"]
