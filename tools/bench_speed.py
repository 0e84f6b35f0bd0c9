"""Training-step and sampling speed, end-to-end vs block-wise, for an experiment's model.

    python tools/bench_speed.py --config experiments/quickstart.yaml --blocks 3 [--batch-size 64]
    python tools/bench_speed.py --config experiments/lm1b_standin_ar_b4.yaml --blocks 3 --no-offload \
        --set 'model.init_args.network={"class_path": "dbl.models.pretrained.PretrainedCausalLM",
               "init_args": {"name_or_path": "<HF folder>"}}' --set data.init_args.seq_len=256

Prints the median training-step time of each variant, the cost of B block-wise steps relative to
one end-to-end step (equal layer-updates; the paper measured 1.07x), the time to sample with N
solver steps (each step runs one block, so block-wise should be about B times faster), and the
share of a phase spent moving blocks when inactive blocks are offloaded, and the step time when
the block changes at every step with offloading on (the random schedule's worst case). The last
lines state the step ratio of each B on its own ("B block steps / 1 end-to-end step").
``--set KEY=VALUE`` overrides the experiment for every variant (another network, sequence length).

On a shared machine the speed drifts between variants measured one after the other, so the
variants run in turn for ``--rounds`` rounds (A B C A B C ...; each turn a short run with its own
warm-up), and each ratio is the median over rounds with its range.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from dbl.benchmark import (
    StepTimer,
    Variant,
    build,
    default_accelerator,
    example_batch,
    network_depth,
    run_steps,
    set_overrides,
    table,
)


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


def offload_share(config, num_blocks, depth, batch_size, phase_steps, accelerator, overrides=()):
    """Fraction of a phased run's time spent moving blocks, with one full cycle of phases."""
    variant = Variant("offload", num_blocks, offload=True,
                      overrides=[*overrides, "--model.init_args.phase_steps", str(phase_steps)])
    module, datamodule = build(config, variant, depth)
    timer = StepTimer()
    run_steps(module, example_batch(module, datamodule, batch_size), num_blocks * phase_steps, [timer], accelerator)
    return module.offloader.seconds / sum(timer.times)


def spread(values: list[float]) -> str:
    """``median (min-max)`` of per-round values."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--blocks", type=int, nargs="*", default=[3],
                        help="block counts to compare with end-to-end; none: end-to-end only (e.g. a next-token baseline)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="measured training steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of all variants in turn (A B A B ...): a shared machine's slow spells fall on "
                             "both sides of each ratio, and the per-round ratios give its spread")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--phase-steps", type=int, default=20, help="phase length for the offload measurement")
    parser.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure offloading (--no-offload: only the step and sampling times)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the experiment for every variant, e.g. data.init_args.seq_len=256 (repeatable)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    accelerator = default_accelerator()
    overrides = set_overrides(args.set)
    depth = network_depth(args.config, overrides)

    variants = [("end-to-end", Variant("end-to-end", 1, overrides=overrides))]
    for b in args.blocks:
        variants.append((f"block-wise B={b}", Variant(f"B={b}", b, overrides=overrides)))
        if args.offload:  # offloading when the block changes at every step: the worst case of the random schedule
            variants.append((f"block-wise B={b} + offload, new block every step",
                             Variant(f"B={b} offload", b, offload=True, overrides=overrides)))
    step = {name: [] for name, _ in variants}
    sample = {name: [] for name, _ in variants}
    for _ in range(args.rounds):
        for name, variant in variants:
            seconds_per_step, module = median_step(args.config, variant, depth, args.batch_size, args.steps, accelerator)
            step[name].append(seconds_per_step)
            if not variant.offload:
                sample[name].append(sampling_time(module, args.num_samples, args.sample_steps))

    rows = [["variant", "step (ms)", "B steps / e2e step", "sampling (s)", "sampling e2e/x", "offload share of phase"]]
    e2e = "end-to-end"
    for name, variant in variants:
        b = variant.num_blocks
        step_ratio = spread([b * s / e for s, e in zip(step[name], step[e2e])])
        has_sampling = sample[name] and sample[name][0] is not None
        sample_ratio = spread([e / s for s, e in zip(sample[name], sample[e2e])]) if has_sampling else "-"
        sample_s = seconds(statistics.median(sample[name])) if has_sampling else "-"
        share = "-"
        if b > 1 and not variant.offload and args.offload:
            share = offload_share(args.config, b, depth, args.batch_size, args.phase_steps, accelerator, overrides)
            share = f"{share:.2%}"
        rows.append([name, f"{statistics.median(step[name]) * 1e3:.1f}", step_ratio, sample_s, sample_ratio, share])
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name() if accelerator == "gpu" else f"CPU, {threads} thread{'s' * (threads != 1)}"
    print(f"\nSpeed, {args.config}, batch {args.batch_size}, {args.rounds} rounds of all variants in turn, each the "
          f"median of {args.steps} steps after warm-up; ratios: median (min-max) over rounds; sampling "
          f"{args.num_samples} samples x {args.sample_steps} steps, phases of {args.phase_steps} steps, {device}")
    print(table(rows))
    for name, variant in variants:
        b = variant.num_blocks
        if b > 1 and not variant.offload:
            ratios = [b * s / e for s, e in zip(step[name], step[e2e])]
            print(f"B={b}: {b} block steps / 1 end-to-end step = {spread(ratios)}"
                  f"{' (median (min-max) over rounds)' if len(ratios) > 1 else ''}; "
                  f"{statistics.median(step[name]) * 1e3:.1f} ms per block step, "
                  f"{statistics.median(step[e2e]) * 1e3:.1f} ms per end-to-end step")


if __name__ == "__main__":
    main()
