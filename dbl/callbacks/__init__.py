"""Callbacks: extension points around training and evaluation."""

from dbl.callbacks.ema import EMA
from dbl.callbacks.fid import FID
from dbl.callbacks.generation import ContinuationWriter, GenerationMetrics
from dbl.callbacks.memory import MemoryMonitor
from dbl.callbacks.on_exception import OnExceptionCheckpoint
from dbl.callbacks.samples import ImagePredictionWriter, SampleGrid
from dbl.callbacks.text import TextPredictionWriter, TextSamples

__all__ = [
    "EMA", "FID", "ContinuationWriter", "GenerationMetrics", "ImagePredictionWriter", "MemoryMonitor",
    "OnExceptionCheckpoint", "SampleGrid", "TextPredictionWriter", "TextSamples",
]
