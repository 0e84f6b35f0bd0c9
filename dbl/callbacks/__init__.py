"""Callbacks: extension points around training (sample grids, FID, text samples, memory monitoring)."""

from dbl.callbacks.fid import FID
from dbl.callbacks.memory import MemoryMonitor
from dbl.callbacks.samples import SampleGrid
from dbl.callbacks.text import TextPredictionWriter, TextSamples

__all__ = ["FID", "MemoryMonitor", "SampleGrid", "TextPredictionWriter", "TextSamples"]
