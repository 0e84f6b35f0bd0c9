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
    """This process's random state as plain bytes, ints and strings: loadable with ``weights_only`` and
    sent between processes as it is (``all_gather_object``)."""
    kind, keys, *rest = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "numpy": (kind, keys.astype(np.uint32).tobytes(), *(x.item() if hasattr(x, "item") else x for x in rest)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def restore(state: dict) -> None:
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.frombuffer(keys, dtype=np.uint32).copy(), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_tensor(s) for s in state["cuda"]])


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
