"""Training-memory accounting: bytes of weights, gradients, optimizer state and activations.

Activations are measured, not modelled: one training step of each block runs on a small batch
under ``torch.autograd.graph.saved_tensors_hooks``, every tensor saved for backward is attributed
to the layer that saved it (or to the input/output part), and the bytes are scaled linearly to the
real batch size. Weights saved for backward are not activations and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class SavedTensorCounter:
    """Context manager: bytes of distinct tensors saved for backward, parameters excluded.

    ``key()`` is asked at each new tensor; ``by_key`` sums the bytes per answer (used to attribute
    activations to the layer that saved them).
    """

    def __init__(self, parameters, key=lambda: None):
        self.parameters = list(parameters)
        self.param_ptrs: set[int] | None = None  # read at the first saved tensor: offloading may move weights before
        self.key = key
        self.seen: set[int] = set()
        self.bytes = 0
        self.by_key: dict = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.param_ptrs is None:
            self.param_ptrs = {p.untyped_storage().data_ptr() for p in self.parameters}
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.seen and ptr not in self.param_ptrs:
            self.seen.add(ptr)
            n = t.untyped_storage().nbytes()
            self.bytes += n
            k = self.key()
            self.by_key[k] = self.by_key.get(k, 0) + n
        return t

    def __enter__(self) -> SavedTensorCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def resident_state_bytes(module, optimizers) -> dict[str, int]:
    """Bytes of weights, gradients and optimizer state that sit on the accelerator now, by kind.

    A block offloaded by ``module.offloader`` does not count (on a CPU-only run, where "device"
    and "storage" are both host memory, this follows the offloader's bookkeeping).
    """
    offloader = getattr(module, "offloader", None)
    offloaded = set()
    if offloader is not None:
        for b, where in enumerate(offloader.location):
            if where == "storage":
                offloaded |= {id(p) for p in module.network.block_parameters(b)}
    out = {"weights": 0, "grads": 0, "optimizer": 0}
    for p in module.parameters():
        if id(p) in offloaded:
            continue
        out["weights"] += _tensor_bytes(p.data)
        out["grads"] += _tensor_bytes(p.grad)
        for opt in optimizers:
            for value in opt.state.get(p, {}).values():
                if torch.is_tensor(value):
                    out["optimizer"] += _tensor_bytes(value)
    return out


@dataclass
class ActivationProfile:
    io_bytes: int  # per sample, input/output part (embedding, head, loss), max over blocks
    layer_bytes: list[int]  # per sample, one entry per layer

    def block_bytes(self, layers: range) -> int:
        return self.io_bytes + sum(self.layer_bytes[i] for i in layers)

    @property
    def end_to_end_bytes(self) -> int:
        return self.io_bytes + sum(self.layer_bytes)


def profile_activations(module, batch, batch_size: int) -> ActivationProfile:
    """Per-sample activation bytes of ``module.block_loss`` for each block, split by layer."""
    layers = list(module.network.net.layers)
    current: list[int | None] = [None]  # index of the layer running now, None: input/output part

    def enter(i):
        def hook(*_):
            current[0] = i
        return hook

    def leave(*_):
        current[0] = None

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(i)))
        handles.append(layer.register_forward_hook(leave))
    io_bytes, per_layer = 0, [0] * len(layers)
    try:
        for block in range(module.num_blocks):
            with SavedTensorCounter(module.parameters(), key=lambda: current[0]) as counter:
                module.block_loss(batch, block)
            counts = counter.by_key
            io_bytes = max(io_bytes, counts.get(None, 0))
            for i in range(*module.network.bounds[block]):
                per_layer[i] = counts.get(i, 0)
    finally:
        for h in handles:
            h.remove()
    return ActivationProfile(io_bytes // batch_size, [b // batch_size for b in per_layer])


def count(params) -> int:
    return sum(p.numel() for p in params)


@dataclass
class MemoryEstimate:
    """Bytes on the device for one training step, by kind."""

    weights: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations


def estimate_training_memory(
    module, profile: ActivationProfile, batch_size: int, bytes_per_param: int = 4, optimizer_slots: int = 2
) -> dict[str, MemoryEstimate]:
    """End-to-end vs block-wise memory of a training step (Adam: ``optimizer_slots`` = 2).

    ``block-wise`` keeps every block's weights and optimizer state on the device (as the official
    code); ``block-wise, offloaded`` holds only the largest block and the shared part (the paper's
    accounting, which needs inactive blocks moved off the device).
    """
    net: nn.Module = module.network
    p_all = count(module.parameters())
    p_shared = count(net.shared_parameters())
    p_block = max(count(net.block_parameters(b)) for b in range(net.num_blocks))
    a_block = max(profile.block_bytes(range(*net.bounds[b])) for b in range(net.num_blocks)) * batch_size
    a_e2e = profile.end_to_end_bytes * batch_size
    bp, slots = bytes_per_param, optimizer_slots
    trained = p_block + p_shared
    return {
        "end-to-end": MemoryEstimate(p_all * bp, p_all * bp, p_all * bp * slots, a_e2e),
        "block-wise": MemoryEstimate(p_all * bp, trained * bp, p_all * bp * slots, a_block),
        "block-wise, offloaded": MemoryEstimate(trained * bp, trained * bp, trained * bp * slots, a_block),
    }
