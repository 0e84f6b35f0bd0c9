"""Gradient bytes all-reduced per training step on two processes (gloo, CPU), end to end vs block-wise.

    python tools/bench_traffic.py --config experiments/cifar10_dit_s2_b3.yaml --blocks 3 [--batch-size 2]

Each variant trains a few steps on random data of the experiment's shape with two CPU processes:
end to end under DDP, block-wise under DDP (which all-reduces every bucket, trained or not), and
block-wise under ``dbl.training.BlockwiseDDPStrategy`` (only the trained block's and the shared
parameters' gradients). Bytes are counted where they are sent: in a DDP communication hook, and by
the strategy. The schedule is phased with phases of one step, so every block is measured in turn.
"""

from __future__ import annotations

import argparse
import warnings

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader

from dbl.benchmark import RepeatBatch, Variant, _unbatch, build, example_batch, mib, network_depth, table
from dbl.training import BlockwiseDDPStrategy


class SentBytes:
    """A DDP communication hook's state: the bytes of every bucket it all-reduced."""

    def __init__(self):
        self.bytes = 0


def counting_allreduce(state: SentBytes, bucket):
    state.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(None, bucket)


class LogTraffic(L.Callback):
    """Logs the mean bytes all-reduced per step so far (``traffic/bytes_per_step``). Under DDP it
    registers the counting hook itself (Lightning's ``ddp_comm_hook`` option applies on CUDA only)."""

    def __init__(self, read, sent: SentBytes | None = None):
        self.read, self.sent, self.steps, self.total = read, sent, 0, 0

    def on_train_start(self, trainer, pl_module):
        if self.sent is not None:
            trainer.strategy.model.register_comm_hook(self.sent, counting_allreduce)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = self.read(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        self.total += self.read(trainer) - self._before
        pl_module.log("traffic/bytes_per_step", float(self.total / self.steps), on_step=True, on_epoch=False)


def measure(config: str, name: str, blocks: int, kind: str, depth: int, batch_size: int, steps: int) -> tuple[float, float]:
    """(bytes all-reduced per step, averaged over the steps; bytes of the shared input/output parameters)."""
    module, datamodule = build(config, Variant(name, blocks), depth)
    shared = sum(p.numel() * p.element_size() for p in module.network.shared_parameters()) if blocks > 1 else 0
    batch = example_batch(module, datamodule, batch_size)
    if kind == "ddp":
        sent = SentBytes()
        strategy, read = DDPStrategy(start_method="fork"), lambda trainer: sent.bytes  # noqa: E731
    else:
        sent = None
        strategy, read = BlockwiseDDPStrategy(start_method="fork"), lambda trainer: trainer.strategy.bytes_reduced  # noqa: E731
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[LogTraffic(read, sent)])
    trainer.fit(module, DataLoader(RepeatBatch(batch, 2 * steps), batch_size=1, collate_fn=_unbatch))
    return float(trainer.callback_metrics["traffic/bytes_per_step"]), shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--steps", type=int, default=0, help="measured steps per variant (default: 2 x blocks)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    depth = network_depth(args.config)
    steps = args.steps or 2 * args.blocks
    variants = [("end-to-end, DDP", 1, "ddp"), (f"block-wise B={args.blocks}, DDP", args.blocks, "ddp"),
                (f"block-wise B={args.blocks}, BlockwiseDDPStrategy", args.blocks, "blockwise")]
    results = {name: measure(args.config, name, b, kind, depth, args.batch_size, steps) for name, b, kind in variants}
    whole = results["end-to-end, DDP"][0]
    rows = [["variant", "MiB all-reduced per step", "vs end to end", "target: 1/B + shared"]]
    for (name, blocks, _), (sent, shared) in zip(variants, results.values()):
        target = f"{(whole / blocks + shared) / whole:.3f}" if blocks > 1 else ""
        rows.append([name, mib(sent), f"{sent / whole:.3f}", target])
    print(table(rows))


if __name__ == "__main__":
    main()
