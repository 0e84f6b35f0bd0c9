"""Callbacks: extension points around training (sample grids, FID, memory monitoring)."""

from dbl.callbacks.fid import FID
from dbl.callbacks.memory import MemoryMonitor
from dbl.callbacks.samples import SampleGrid

__all__ = ["FID", "MemoryMonitor", "SampleGrid"]
