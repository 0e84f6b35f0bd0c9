"""Data parallelism whose gradient traffic shrinks with B.

PyTorch's DDP all-reduces every gradient bucket at every step, including the buckets of blocks that
did not train (their gradients are zeros; pytorch/pytorch issue 42183), so a block-wise step moves
the whole model's gradients. ``BlockwiseDDPStrategy`` is Lightning's ``DDPStrategy`` without the DDP
wrapper: after each backward it averages, in one flat all-reduce, exactly the gradients that exist,
which in a block-wise step are the training block's and the shared input/output parameters' (the
engine frees every gradient after its step). A step then moves about 1/B of the model's gradients
plus the shared part. Everything else (launch, process group, samplers, metric sync) is DDP's.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy


class BlockwiseDDPStrategy(DDPStrategy):
    """``trainer.strategy: {class_path: dbl.training.BlockwiseDDPStrategy}`` (same options as ``ddp``).

    ``bytes_reduced``: gradient bytes this process has all-reduced so far (for benchmarks and tests).
    """

    strategy_name = "ddp_blockwise"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bytes_reduced = 0
        self._reduce_after_backward = True

    def configure_ddp(self) -> None:
        # no DistributedDataParallel wrapper; start every process from rank 0's weights, as DDP does
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            dist.broadcast(tensor.data, src=0)

    @contextmanager
    def block_backward_sync(self) -> Generator:
        """Accumulating: keep the gradients local until the window's last backward."""
        self._reduce_after_backward = False
        try:
            yield
        finally:
            self._reduce_after_backward = True

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        if not self._reduce_after_backward or self.world_size == 1:
            return
        grads = [p.grad for p in self.lightning_module.parameters() if p.grad is not None]
        for dtype in sorted({g.dtype for g in grads}, key=str):  # one flat buffer per dtype
            group = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            flat /= self.world_size
            for g, averaged in zip(group, flat.split([g.numel() for g in group])):
                g.copy_(averaged.view_as(g))
            self.bytes_reduced += flat.numel() * flat.element_size()
