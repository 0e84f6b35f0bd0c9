"""Training-step and sampling speed, end-to-end vs block-wise, for an experiment's model.

    python tools/bench_speed.py --config experiments/quickstart.yaml --blocks 3 [--batch-size 64]

Prints the median training-step time of each variant, the cost of B block-wise steps relative to
one end-to-end step (equal layer-updates; the paper measured 1.07x), the time to sample with N
solver steps (each step runs one block, so block-wise should be about B times faster), and the
share of a phase spent moving blocks when inactive blocks are offloaded, and the step time when
the block changes at every step with offloading on (the random schedule's worst case).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from dbl.benchmark import StepTimer, Variant, build, default_accelerator, example_batch, network_depth, run_steps, table


def median_step(config, variant, depth, batch_size, steps, accelerator):
    module, datamodule = build(config, variant, depth)
    timer = StepTimer()
    warmup = 2 * variant.num_blocks
    run_steps(module, example_batch(module, datamodule, batch_size), warmup + steps, [timer], accelerator)
    return statistics.median(timer.times[warmup:]), module


def sampling_time(module, num_samples, num_steps, repeats=3):
    """Median seconds of ``module.sample``; None for a task without one (autoregressive text)."""
    if not hasattr(module, "sample"):
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        module.sample(num_samples=num_samples, num_steps=num_steps, generator=torch.Generator().manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seconds(t: float | None) -> str:
    return "-" if t is None else f"{t:.3f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def offload_share(config, num_blocks, depth, batch_size, phase_steps, accelerator):
    """Fraction of a phased run's time spent moving blocks, with one full cycle of phases."""
    variant = Variant("offload", num_blocks, offload=True,
                      overrides=["--model.init_args.phase_steps", str(phase_steps)])
    module, datamodule = build(config, variant, depth)
    timer = StepTimer()
    run_steps(module, example_batch(module, datamodule, batch_size), num_blocks * phase_steps, [timer], accelerator)
    return module.offloader.seconds / sum(timer.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--blocks", type=int, nargs="*", default=[3],
                        help="block counts to compare with end-to-end; none: end-to-end only (e.g. a next-token baseline)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="measured training steps per variant")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--phase-steps", type=int, default=20, help="phase length for the offload measurement")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    accelerator = default_accelerator()
    depth = network_depth(args.config)

    e2e_step, e2e_module = median_step(args.config, Variant("end-to-end", 1), depth, args.batch_size, args.steps, accelerator)
    e2e_sample = sampling_time(e2e_module, args.num_samples, args.sample_steps)
    rows = [["variant", "step (ms)", "B steps / e2e step", "sampling (s)", "sampling e2e/x", "offload share of phase"]]
    rows.append(["end-to-end", f"{e2e_step * 1e3:.1f}", "1.00", seconds(e2e_sample), ratio(e2e_sample, e2e_sample), "-"])
    for b in args.blocks:
        step, module = median_step(args.config, Variant(f"B={b}", b), depth, args.batch_size, args.steps, accelerator)
        sample = sampling_time(module, args.num_samples, args.sample_steps)
        share = offload_share(args.config, b, depth, args.batch_size, args.phase_steps, accelerator)
        rows.append([f"block-wise B={b}", f"{step * 1e3:.1f}", f"{b * step / e2e_step:.2f}", seconds(sample),
                     ratio(e2e_sample, sample), f"{share:.2%}"])
        # offloading when the block changes at every step: the worst case of the random schedule
        moving, _ = median_step(args.config, Variant(f"B={b} offload", b, offload=True), depth, args.batch_size,
                                args.steps, accelerator)
        rows.append([f"block-wise B={b} + offload, new block every step", f"{moving * 1e3:.1f}",
                     f"{b * moving / e2e_step:.2f}", "-", "-", "-"])
    device = torch.cuda.get_device_name() if accelerator == "gpu" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nSpeed, {args.config}, batch {args.batch_size}, median of {args.steps} steps after warm-up, "
          f"sampling {args.num_samples} samples x {args.sample_steps} steps, phases of {args.phase_steps} steps, {device}")
    print(table(rows))


if __name__ == "__main__":
    main()
