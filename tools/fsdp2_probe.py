"""Does FSDP2 (``torch.distributed.fsdp.fully_shard``) shard a block-wise model, one unit per block?
Two gloo processes on the CPU; a probe for docs/multi_gpu.md, not a training path of ``dbl``.

    python tools/fsdp2_probe.py              # torch level: training steps and evaluation calls
    python tools/fsdp2_probe.py --lightning  # Lightning's ModelParallelStrategy vs plain ddp, dbl's loop

Torch level: a tiny DiT split into 3 blocks, each block's layers one ``fully_shard`` unit, the root
(the shared input/output) another; one AdamW or SGD per block over the DTensor parameters. Each
step trains one block on each rank's half of a batch; printed: which blocks got gradients, the
gradient norm against a one-process reference that sees the whole batch, and the largest weight
difference at the end. Then evaluation as ``dbl`` routes it (each rank calls the block that owns
its own samples' noise level): once with both ranks calling the same block, once with different
blocks, each compared with the unsharded network.

``--lightning``: ``dbl.ImageDiffusionModule`` with a ``configure_model`` hook that shards the
same way, trained 6 steps (SGD, phased schedule) under ``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)`` and under ``strategy="ddp"``, then the two full checkpoints compared.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
from functools import partial

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import tiny_dit  # noqa: E402

from dbl.models.blockwise import BlockwiseNetwork  # noqa: E402

BLOCKS = 3
SCHEDULE = [1, 0, 1, 2, 2, 0]


def torch_level(rank: int, world: int, port: int, optimizer: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    say = lambda *a: print(f"[rank {rank}]", *a, flush=True)  # noqa: E731
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    ref = BlockwiseNetwork(tiny_dit(class_dropout_prob=0.0), BLOCKS)  # no random label dropout: same draws
    for p in ref.parameters():  # adaLN-zero starts every layer as the identity: make the blocks matter
        torch.nn.init.normal_(p, std=0.05)
    net = copy.deepcopy(ref)
    for b in range(BLOCKS):
        fully_shard(list(net.block_layers(b)), mesh=mesh)  # one unit per block
    fully_shard(net, mesh=mesh)  # root unit: the shared input/output layers
    if rank == 0:
        say(f"parameters: {sorted({type(p).__name__ for p in net.parameters()})}, "
            f"{sum(p.to_local().numel() for p in net.parameters())} of {sum(p.numel() for p in ref.parameters())} held here")
    make = partial(torch.optim.SGD, lr=0.1) if optimizer == "sgd" else partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    opts = [make(net.block_parameters(b)) for b in range(BLOCKS)] + [make(net.shared_parameters())]
    ref_opts = [make(ref.block_parameters(b)) for b in range(BLOCKS)] + [make(ref.shared_parameters())]

    def evaluate(when: str) -> None:
        g = torch.Generator().manual_seed(99)
        x, c, y = torch.randn(2, 1, 8, 8, generator=g), torch.rand(2, generator=g), torch.randint(0, 10, (2,), generator=g)
        with torch.no_grad():
            for blocks in ([0, 0], [0, 2]):
                b = blocks[rank]
                err = (net(x, c, y, block=b) - ref(x, c, y, block=b)).abs().max().item()
                say(f"eval {when}, ranks call blocks {blocks}: this rank's block {b}, max |sharded - unsharded| {err:.3g}")

    evaluate("before training")
    for step, b in enumerate(SCHEDULE):
        g = torch.Generator().manual_seed(step)
        n = 2 * world
        x, c, y = torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g), torch.randint(0, 10, (n,), generator=g)
        mine = slice(2 * rank, 2 * rank + 2)
        loss = (net(x[mine], c[mine], y[mine], block=b) - x[mine]).pow(2).mean()
        loss.backward()
        with_grad = [i for i in range(BLOCKS) if any(p.grad is not None for p in net.block_parameters(i))]
        norm = torch.nn.utils.clip_grad_norm_(net.block_parameters(b) + net.shared_parameters(), 1.0)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        opts[b].step()
        opts[BLOCKS].step()
        for o in opts:
            o.zero_grad(set_to_none=True)
        # the reference: one process, the whole batch, the mean of the ranks' losses
        parts = [slice(2 * r, 2 * r + 2) for r in range(world)]
        torch.stack([(ref(x[s], c[s], y[s], block=b) - x[s]).pow(2).mean() for s in parts]).mean().backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.block_parameters(b) + ref.shared_parameters(), 1.0)
        ref_opts[b].step()
        ref_opts[BLOCKS].step()
        for o in ref_opts:
            o.zero_grad(set_to_none=True)
        if rank == 0:
            say(f"step {step} block {b}: blocks with a gradient {with_grad}, "
                f"gradient norm {norm.item():.5f} (one process: {ref_norm.item():.5f})")
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in net.state_dict().items()}
    diff = max((full[k] - v).abs().max().item() for k, v in ref.state_dict().items())
    if rank == 0:
        say(f"after {len(SCHEDULE)} steps ({optimizer}): max |weight - one-process weight| {diff:.3g}")
    evaluate("after training")
    dist.destroy_process_group()


def lightning_fit(kind: str, out: str) -> None:
    """One 2-process fit (Lightning launches the second process by running this script again)."""
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from dbl import ImageDiffusionModule

    class Sharded(ImageDiffusionModule):
        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            for b in range(self.num_blocks):
                fully_shard(list(self.network.block_layers(b)), mesh=mesh)
            fully_shard(self.network, mesh=mesh)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cls = Sharded if kind == "fsdp2" else ImageDiffusionModule
    module = cls(tiny_dit(), num_blocks=BLOCKS, block_schedule="phased", phase_steps=1,
                 optimizer=partial(torch.optim.SGD, lr=0.1))
    strategy = (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
                if kind == "fsdp2" else "ddp")
    x, y = torch.rand(64, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (64,))
    trainer = L.Trainer(max_steps=len(SCHEDULE), accelerator="cpu", devices=2, strategy=strategy, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=os.path.dirname(out))
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    kinds = sorted({type(p).__name__ for p in module.parameters()})
    print(f"[{kind} rank {trainer.global_rank}] {trainer.global_step} steps, block updates "
          f"{module.block_updates.tolist()}, parameters {kinds}, backend {dist.get_backend()}", flush=True)
    trainer.save_checkpoint(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lightning", action="store_true", help="ModelParallelStrategy vs ddp through dbl's loop")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="torch level only")
    parser.add_argument("--_fit", nargs=2, metavar=("KIND", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._fit:
        return lightning_fit(*args._fit)
    if not args.lightning:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as sock:  # a free port for the two processes to meet on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return mp.spawn(torch_level, args=(2, port, args.optimizer), nprocs=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for kind in ("fsdp2", "ddp"):
            paths[kind] = os.path.join(tmp, f"{kind}.ckpt")
            subprocess.run([sys.executable, __file__, "--_fit", kind, paths[kind]], check=True, env=env)
        a, b = (torch.load(paths[k], weights_only=True)["state_dict"] for k in ("fsdp2", "ddp"))
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in b)
        print(f"same keys: {a.keys() == b.keys()}; max |FSDP2 weight - DDP weight| after {len(SCHEDULE)} steps: {diff:.3g}")


if __name__ == "__main__":
    main()
