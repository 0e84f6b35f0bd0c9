"""Callbacks: extension points around training (sample grids, memory monitoring)."""

from dbl.callbacks.memory import MemoryMonitor
from dbl.callbacks.samples import SampleGrid

__all__ = ["MemoryMonitor", "SampleGrid"]
