"""Training compute of an experiment: FLOPs and CPU seconds of real training steps, and of the whole run.

    OMP_NUM_THREADS=1 python tools/bench_compute.py --config experiments/lm1b_standin_recurrent_tbptt.yaml --steps 8
    OMP_NUM_THREADS=1 python tools/bench_compute.py --config experiments/lm1b_standin_recurrent_db.yaml --steps 8

The experiment's model and optimizer are built from its YAML (``dbl.cli.load_experiment``) and trained for
``--steps`` steps (global steps 0 .. steps-1) by a bare Trainer on a random batch of the data's shape
(``dbl.benchmark``): FLOPs and time do not depend on the token values. Two passes over the same steps:

- time: process CPU seconds (all threads; with OMP_NUM_THREADS=1 this is one core's time) and wall seconds
  of each step (forward, backward, clipping, optimizer step);
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around each step, forward and backward (iterations run
  under ``torch.no_grad()`` count their forward), with PyTorch's math attention so that attention's
  matrix products are counted (CPU's fused kernel is not; the math kernel multiplies the whole masked
  score matrix, which is what dense attention computes). Element-wise work (norms, activations, the
  optimizer) is not counted, as usual for FLOP budgets.

A module with a random number of core iterations per step (``RecurrentDepthLMModule``) draws r at step t
from (seed, t) alone, so both passes see the same r. A step's FLOPs are affine in r (for r >= the
back-propagated iterations k); the tool fits that line to the measured steps and sums it over the r that
the run's ``max_steps`` steps draw: the whole run's FLOPs, not an extrapolation from one step. Otherwise
the run's FLOPs are the per-step mean x ``max_steps``. ``--json`` writes everything for the docs' table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import lightning as L
import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dbl.benchmark import example_batch, run_steps, set_overrides
from dbl.cli import load_experiment


class StepCompute(L.Callback):
    """Per training step: CPU and wall seconds, or (``count_flops``) the FLOPs; and the iterations drawn."""

    def __init__(self, count_flops: bool):
        self.count_flops = count_flops
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self.flops: list[int] = []
        self.iterations: list[int | None] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        draw = getattr(pl_module, "iterations_at", None)
        self.iterations.append(draw(trainer.global_step) if draw else None)
        if self.count_flops:
            self._kernel = sdpa_kernel(SDPBackend.MATH)
            self._kernel.__enter__()
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.cpu.append(time.process_time() - self._cpu)
        self.wall.append(time.perf_counter() - self._wall)
        if self.count_flops:
            self._counter.__exit__(None, None, None)
            self._kernel.__exit__(None, None, None)
            self.flops.append(self._counter.get_total_flops())


def measure(config: str, overrides: list[str], steps: int, count_flops: bool) -> tuple[StepCompute, object, object]:
    cli = load_experiment(config, overrides, portable_trainer=True)
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    batch = example_batch(module, datamodule, datamodule.hparams["batch_size"])
    probe = StepCompute(count_flops)
    run_steps(module, batch, steps, [probe], "cpu")
    return probe, module, trainer


def run_flops(module, probe: StepCompute, max_steps: int) -> dict:
    """The whole run's FLOPs: per-step mean x max_steps, or the line in r summed over the run's draws."""
    mean = statistics.mean(probe.flops)
    if probe.iterations[0] is None:
        return {"per_step_flops": mean, "run_flops": mean * max_steps}
    k = module.backprop_iterations
    pairs = [(r, f) for r, f in zip(probe.iterations, probe.flops) if r >= k]
    rs, fs = np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float)
    slope, intercept = np.polyfit(rs, fs, 1)
    residual = float(np.max(np.abs(fs - (slope * rs + intercept)) / fs))
    draws = np.array([module.iterations_at(t) for t in range(max_steps)], float)
    run = float(np.sum(slope * np.maximum(draws, k) + intercept))  # r < k (rare) costs at most the r = k step
    return {"per_step_flops": mean, "run_flops": run, "flops_per_iteration": slope, "flops_at_zero_iterations": intercept,
            "fit_max_relative_residual": residual, "run_mean_iterations": float(draws.mean()),
            "run_iterations_below_k": int((draws < k).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=8, help="training steps measured (global steps 0..steps-1)")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the time (allocation, first AdamW step)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the experiment")
    parser.add_argument("--max-steps", type=int, help="the run's steps, for a YAML with an epoch budget")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    overrides = set_overrides(args.set)
    timed, module, trainer = measure(args.config, overrides, args.steps, count_flops=False)
    counted, _, _ = measure(args.config, overrides, args.steps, count_flops=True)
    assert timed.iterations == counted.iterations
    max_steps = args.max_steps or trainer.max_steps
    if max_steps in (None, -1):
        raise SystemExit(f"{args.config} sets no trainer.max_steps (an epoch budget?): give --max-steps")
    cpu, wall = timed.cpu[args.warmup:], timed.wall[args.warmup:]
    out = {
        "config": args.config, "module": type(module).__name__, "steps": args.steps, "threads": torch.get_num_threads(),
        "iterations": timed.iterations, "step_flops": counted.flops,
        "cpu_s_per_step": statistics.mean(cpu), "wall_s_per_step": statistics.mean(wall), "max_steps": max_steps,
        **run_flops(module, counted, max_steps),
    }
    if out["iterations"][0] is None:
        out["run_cpu_s_estimate"] = out["cpu_s_per_step"] * max_steps
    else:  # time is affine in r as well: the line through the timed steps at the run's mean draw
        slope, intercept = np.polyfit(np.array(timed.iterations[args.warmup:], float), np.array(cpu), 1)
        out["run_cpu_s_estimate"] = (intercept + slope * out["run_mean_iterations"]) * max_steps
    print(f"{out['module']} ({args.config}), {args.steps} steps, {out['threads']} thread(s)")
    if out["iterations"][0] is not None:
        print(f"  iterations drawn: {out['iterations']} (run of {max_steps} steps: mean {out['run_mean_iterations']:.2f})")
        print(f"  FLOPs = {out['flops_at_zero_iterations']:.4g} + {out['flops_per_iteration']:.4g} x r "
              f"(max relative residual {out['fit_max_relative_residual']:.1e})")
    print(f"  FLOPs per step (mean of the measured steps): {out['per_step_flops']:.4g}")
    print(f"  FLOPs of the run ({max_steps} steps): {out['run_flops']:.4g}")
    print(f"  CPU s per step: {out['cpu_s_per_step']:.3f} (wall {out['wall_s_per_step']:.3f}); "
          f"run estimate {out['run_cpu_s_estimate']:.0f} CPU s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
