"""Every random stream a training step draws from, collected and restored as one state.

Lightning checkpoints the weights, optimizers, loop counters and (with a ``StatefulDataLoader``)
the data position, but not the random streams: torch's (CPU and each CUDA device), NumPy's and
Python's. With these saved too, a resumed run draws exactly what the uninterrupted run would have.
dbl's own generators (the block schedule, samplers' seeds) are functions of a seed and the step,
so they need no state.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def collect() -> dict:
    """This process's random state (plain tensors, tuples and ints: loadable with ``weights_only``)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def collect_all_ranks(trainer) -> list[dict | None]:
    """Every rank's state, in rank order (rank 0 writes the checkpoint; each rank reads back its own).

    A checkpoint written after an exception holds only the writing rank's state: the other ranks
    may not reach a collective then. The others fall back to their seeds (``None``).
    """
    state = collect()
    world_size = trainer.world_size
    if world_size == 1:
        return [state]
    if trainer.interrupted:
        return [state if rank == trainer.global_rank else None for rank in range(world_size)]
    gathered: list = [None] * world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered
