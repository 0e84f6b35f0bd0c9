"""Training memory of one step, end-to-end vs block-wise, for an experiment's model and batch.

    python tools/bench_memory.py --config experiments/quickstart.yaml --blocks 2 3 4 6 [--batch-size 64]
    python tools/bench_memory.py --config experiments/lm1b_ar_e2e.yaml --blocks   # end-to-end rows only

For each variant (end-to-end, block-wise B, each with activation checkpointing, block-wise with
offloading) it trains a few steps on random data of the right shape and measures, per step, with
``dbl.callbacks.MemoryMonitor``:

- activation bytes saved for backward (``saved_tensors_hooks``; weights excluded), largest block;
- weights, gradients and optimizer state resident on the device (offloaded blocks excluded);
- on CUDA, ``torch.cuda.max_memory_allocated`` of the step, after warm-up.

On a CPU-only machine the last column is absent: the first two are measured from the tensors
themselves and hold on any device. A second table compares ``dbl info``'s estimate with the
measurement.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from dbl.benchmark import (
    default_accelerator,
    measure_memory,
    mib,
    network_depth,
    run_isolated,
    standard_variants,
    table,
)
from dbl.info import PROFILE_BATCH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--blocks", type=int, nargs="*", default=[3],
                        help="block counts to compare with end-to-end; none: end-to-end only (e.g. a next-token baseline)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch of the measured steps (default 8)")
    parser.add_argument("--no-offload", action="store_true", help="skip the offloaded variants")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every variant in this process (faster to start; by default each variant runs in "
                             "a fresh process, so nothing an earlier one left behind counts in its memory)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    accelerator = default_accelerator()
    depth = network_depth(args.config)
    results = {}
    for variant in standard_variants(args.blocks, offload=not args.no_offload):
        task = (args.config, variant, depth, args.batch_size, accelerator)
        results[variant.name] = measure_memory(*task) if args.in_process else run_isolated(measure_memory, *task)
        print(f"measured {variant.name}", flush=True)

    e2e = results["end-to-end"]
    cuda = accelerator == "gpu"
    head = ["variant", "weights", "grads", "optimizer", "activations", "state+act"] + (["peak"] if cuda else [])
    head += ["act e2e/x", "state+act e2e/x"] + (["peak e2e/x"] if cuda else [])
    rows = [head]
    for name, r in results.items():
        total = r["state"] + r["activations"]
        row = [name, mib(r["weights"]), mib(r["grads"]), mib(r["optimizer"]), mib(r["activations"]), mib(total)]
        row += [mib(r["peak"])] if cuda else []
        row += [f"{e2e['activations'] / r['activations']:.2f}", f"{(e2e['state'] + e2e['activations']) / total:.2f}"]
        row += [f"{e2e['peak'] / r['peak']:.2f}"] if cuda else []
        rows.append(row)
    device = torch.cuda.get_device_name() if cuda else "CPU (no CUDA: peak allocator memory not measured)"
    print(f"\nTraining memory per step (MiB), {args.config}, batch {args.batch_size}, fp32, Adam, {device}")
    print(table(rows))

    rows = [["variant", "act. measured", "act. dbl info", "diff", "state measured", "state dbl info", "diff"]]
    for name, r in results.items():
        est = r["estimate"]
        est_state = est.weights + est.grads + est.optimizer
        rows.append([name, mib(r["activations"]), mib(est.activations), f"{est.activations / r['activations'] - 1:+.1%}",
                     mib(r["state"]), mib(est_state), f"{est_state / r['state'] - 1:+.1%}"])
    print(f"\n`dbl info` estimate (activations measured on {min(PROFILE_BATCH, args.batch_size)} samples, scaled) "
          "vs this measurement")
    print(table(rows))


if __name__ == "__main__":
    main()
