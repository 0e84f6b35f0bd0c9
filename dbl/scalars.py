"""A run's TensorBoard scalars, read back from its event files (``tools/read_scalars.py``, ``dbl diagnose``)."""

from __future__ import annotations

from pathlib import Path


def load(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in a run's event files ({} when it has none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
