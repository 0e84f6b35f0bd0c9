"""Shared machinery of ``tools/bench_memory.py`` and ``tools/bench_speed.py``.

A *variant* is the experiment's model rebuilt with overrides (number of blocks, activation
checkpointing, offloading), trained for a few steps on random data of the right shape by a plain
Lightning Trainer, with callbacks that measure each step.
"""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import time
from dataclasses import dataclass, field

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from dbl.cli import load_experiment


@dataclass
class Variant:
    name: str
    num_blocks: int
    activation_checkpointing: bool = False
    offload: bool = False
    overrides: list[str] = field(default_factory=list)

    def cli_overrides(self, depth: int) -> list[str]:
        base, extra = divmod(depth, self.num_blocks)
        split = [base + (i < extra) for i in range(self.num_blocks)]
        return [
            "--model.init_args.num_blocks", str(self.num_blocks),
            "--model.init_args.layers_per_block", str(split),
            "--model.init_args.activation_checkpointing", str(self.activation_checkpointing).lower(),
            "--model.init_args.offload_inactive", str(self.offload).lower(),
            # phase of one step: each block trains once per B steps, so every block's optimizer
            # state exists after B warm-up steps and every block is measured
            "--model.init_args.block_schedule", "phased",
            "--model.init_args.phase_steps", "1",
            *self.overrides,
        ]


def standard_variants(blocks: list[int], offload: bool = True) -> list[Variant]:
    out = [Variant("end-to-end", 1), Variant("end-to-end + act. ckpt", 1, activation_checkpointing=True)]
    for b in blocks:
        out.append(Variant(f"block-wise B={b}", b))
        out.append(Variant(f"block-wise B={b} + act. ckpt", b, activation_checkpointing=True))
        if offload:
            out.append(Variant(f"block-wise B={b} + offload", b, offload=True))
    return out


def free_memory() -> None:
    """Free what earlier variants left behind. Lightning's trainer and module refer to each other,
    so only the cycle collector frees them; until it runs, their weights and optimizer state would
    count in the next variant's peak memory (and a large model's variants would pile up)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build(config: str, variant: Variant, depth: int):
    free_memory()
    # the experiment's own Trainer is not used (run_steps makes a bare one)
    cli = load_experiment(config, variant.cli_overrides(depth), portable_trainer=True)
    model, datamodule = cli.model, cli.datamodule
    # jsonargparse keeps the latest CLI reachable (through its instantiators), and with it every
    # object the CLI built: cut those links so this variant is freed when the benchmark drops it
    cli.model = cli.datamodule = cli.trainer = cli.config_init = None
    return model, datamodule


def example_batch(module, datamodule, batch_size: int):
    """Random data of the experiment's shape: the task's ``example_batch``, at the data's sequence
    length for text (``data.init_args.seq_len``)."""
    seq_len = getattr(datamodule, "hparams", {}).get("seq_len") if datamodule is not None else None
    return module.example_batch(batch_size, seq_len)


def network_depth(config: str, overrides: list[str] = ()) -> int:
    # built end to end: any depth divides into one block
    cli = load_experiment(config, [*overrides, "--model.init_args.num_blocks", "1"], portable_trainer=True)
    return cli.model.depth


def set_overrides(pairs: list[str]) -> list[str]:
    """``KEY=VALUE`` pairs (``--set model.init_args.network=...``) as CLI overrides ``--KEY VALUE``."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes KEY=VALUE (e.g. data.init_args.seq_len=256), got {pair!r}")
        out += [f"--{key.removeprefix('--')}", value]
    return out


class RepeatBatch(Dataset):
    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.batch


def _unbatch(items):
    return items[0]


def run_steps(module, batch, steps: int, callbacks, accelerator: str) -> L.Trainer:
    """Train ``module`` for ``steps`` steps on ``batch`` repeated, with a bare Trainer."""
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    loader = DataLoader(RepeatBatch(batch, steps), batch_size=1, collate_fn=_unbatch)
    trainer.fit(module, loader)
    return trainer


class StepTimer(L.Callback):
    """Wall time of each training step (CUDA-synchronised)."""

    def __init__(self):
        self.times: list[float] = []
        self.blocks: list[int] = []

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)
        self.blocks.append(pl_module.last_trained_block)


def measure_memory(config: str, variant: Variant, depth: int, batch_size: int, accelerator: str) -> dict:
    """Train ``variant`` a few steps and return its worst per-step memory (after every block's
    optimizer state exists) and ``dbl info``'s estimate for the same mode."""
    from dbl.callbacks import MemoryMonitor
    from dbl.info import PROFILE_BATCH
    from dbl.memory import estimate_training_memory, profile_activations

    module, datamodule = build(config, variant, depth)
    batch = example_batch(module, datamodule, batch_size)
    b = variant.num_blocks
    monitor = MemoryMonitor(every_n_steps=1, log=False)
    run_steps(module, batch, 2 * b + 1, [monitor], accelerator)
    measured = [r for r in monitor.records if r["step"] >= b]  # after every block's optimizer state exists
    worst = lambda key: max(r.get(key, 0) for r in measured)  # noqa: E731
    out = {key: worst(key) for key in ("activations", "weights", "grads", "optimizer", "state", "peak")}
    module.cpu()
    small = tuple(t[:PROFILE_BATCH].cpu() if torch.is_tensor(t) else t for t in batch)
    profiled = min(PROFILE_BATCH, batch_size)  # as `dbl info` does: a batch smaller than 4 is profiled whole
    est = estimate_training_memory(module, profile_activations(module, small, profiled), batch_size)
    mode = "end-to-end" if b == 1 else ("block-wise, offloaded" if variant.offload else "block-wise")
    out["estimate"] = est[mode]
    return out


def run_isolated(fn, *args):
    """``fn(*args)`` in a fresh (spawned) process: its memory is measured with nothing left over from
    earlier variants, which Lightning and jsonargparse otherwise keep partly alive in one process."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def default_accelerator() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"
