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
    param_ptrs = {p.untyped_storage().data_ptr() for p in module.parameters()}
    current: list[int | None] = [None]  # index of the layer running now, None: input/output part
    seen: set[int] = set()
    counts: dict[int | None, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in param_ptrs:
            seen.add(ptr)
            counts[current[0]] = counts.get(current[0], 0) + t.untyped_storage().nbytes()
        return t

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
            seen.clear()
            counts.clear()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                module.block_loss(batch, block)
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
