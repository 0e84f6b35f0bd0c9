"""Keep only the training block on the accelerator: the rest waits in (pinned) host memory.

Block-wise training saves activations and gradients by itself; the B-fold saving of the whole
training state also needs the inactive blocks' weights and optimizer state off the device (the
method spec, section 6, "Memory accounting"). ``BlockOffloader`` moves a block's parameters and its
optimizer's state tensors in and out, keeping the same ``nn.Parameter`` objects (so optimizers,
checkpoints and the module keep working) and the exact values (copies are bit-exact).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn


class BlockOffloader:
    """Moves block ``b``'s parameters and ``optimizers[b]``'s state between ``device`` and ``storage``.

    ``storage`` defaults to the CPU, pinned when CUDA is available so copies run at full bandwidth.
    The shared input/output parameters are never moved. ``moves`` counts blocks moved either way.
    """

    def __init__(self, block_params: Sequence[Sequence[nn.Parameter]], optimizers: Sequence[torch.optim.Optimizer],
                 device: torch.device, storage: torch.device | str = "cpu"):
        self.block_params = [list(ps) for ps in block_params]
        self.optimizers = list(optimizers)
        self.device = torch.device(device)
        self.storage = torch.device(storage)
        self.pin = self.storage.type == "cpu" and torch.cuda.is_available()
        self.active: int | None = None  # None: placement unknown, the next activate() places every block
        # Where each block is, by role rather than by device: with device == storage (CPU tests)
        # a move is still a real copy into new memory, so tests can watch it happen.
        self.location = ["device"] * len(self.block_params)
        self.moves = 0
        self.bytes_moved = 0
        self.seconds = 0.0  # wall time spent moving, for the cost of offloading

    def _move(self, block: int, where: str) -> None:
        if self.location[block] == where:
            return
        device = self.device if where == "device" else self.storage
        pin = self.pin and where == "storage"

        def to(t: torch.Tensor) -> torch.Tensor:
            self.bytes_moved += t.numel() * t.element_size()
            out = t.to(device, copy=True)
            return out.pin_memory() if pin else out

        for p in self.block_params[block]:
            p.data = to(p.data)
            p.grad = None  # a block leaves the device without gradients (they are zeroed before use anyway)
            state = self.optimizers[block].state.get(p)
            for key, value in (state or {}).items():
                # Adam's 'step' is a 0-dim host tensor by design; only per-element state moves
                if torch.is_tensor(value) and value.dim() > 0:
                    state[key] = to(value)
        self.location[block] = where
        self.moves += 1

    def activate(self, block: int) -> None:
        """Make ``block`` resident on the device and every other block resident in storage."""
        if block == self.active:
            return
        start = time.perf_counter()
        for b in range(len(self.block_params)):
            if b != block:
                self._move(b, "storage")
        self._move(block, "device")
        self.active = block
        self._account(start)

    def load_all(self) -> None:
        """Every block on the device (for evaluation and sampling, which visit all blocks)."""
        start = time.perf_counter()
        for b in range(len(self.block_params)):
            self._move(b, "device")
        self.active = None
        self._account(start)

    def _account(self, start: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - start
