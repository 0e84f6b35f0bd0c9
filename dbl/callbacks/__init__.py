"""Callbacks: extension points around training and evaluation."""

from dbl.callbacks.checkpoints import ModelCheckpoint, OnExceptionCheckpoint
from dbl.callbacks.classification import ClassPredictionWriter
from dbl.callbacks.ema import EMA
from dbl.callbacks.fid import FID
from dbl.callbacks.lm_generation import ContinuationWriter, LMGenerationMetrics
from dbl.callbacks.masked_text import MaskedTextPredictionWriter, MaskedTextSamples
from dbl.callbacks.memory import MemoryMonitor
from dbl.callbacks.samples import ImagePredictionWriter, SampleGrid

__all__ = [
    "ClassPredictionWriter", "EMA", "FID", "ContinuationWriter", "LMGenerationMetrics", "ImagePredictionWriter", "MemoryMonitor", "ModelCheckpoint",
    "OnExceptionCheckpoint", "SampleGrid", "MaskedTextPredictionWriter", "MaskedTextSamples",
]
