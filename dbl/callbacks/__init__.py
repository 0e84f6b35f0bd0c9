"""Callbacks: extension points around training (sample grids, ...)."""

from dbl.callbacks.samples import SampleGrid
from dbl.callbacks.text import ContinuationWriter, GenerationMetrics

__all__ = ["ContinuationWriter", "GenerationMetrics", "SampleGrid"]
