"""Callbacks: extension points around training (sample grids, ...)."""

from dbl.callbacks.samples import SampleGrid
from dbl.callbacks.text import TextPredictionWriter, TextSamples

__all__ = ["SampleGrid"]
__all__ += ["TextPredictionWriter", "TextSamples"]
