"""Median training-step time of experiments exactly as configured (model, blocks, schedule, batch), side by side.

    OMP_NUM_THREADS=2 python tools/bench_steps.py experiments/smollm2_finetune_{full,lora,b3,b3_anchor,b3_lora}.yaml

Each experiment is built as its YAML says and trained for ``--warmup`` + ``--steps`` steps on random data
of its batch's shape (``dbl.benchmark``: the task's ``example_batch`` at the data's ``seq_len``), one
experiment after the other in this process. A block-wise run's steps visit its blocks in the YAML's schedule;
the median is over all measured steps. For equal layer-updates, compare the time per layer-update column.
Run it on a machine with nothing else running: the times are wall-clock.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

from dbl.benchmark import StepTimer, default_accelerator, example_batch, free_memory, run_steps, table
from dbl.cli import load_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per experiment")
    parser.add_argument("--warmup", type=int, default=3, help="steps before measuring (a block-wise run: >= B)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    accelerator = default_accelerator()
    rows = [["experiment", "blocks", "batch", "median step (s)", "min-max (s)", "layers/step", "s per 1k layer-updates"]]
    for config in args.configs:
        free_memory()
        cli = load_experiment(config, [], portable_trainer=True)
        module, datamodule = cli.model, cli.datamodule
        cli.model = cli.datamodule = cli.trainer = cli.config_init = None
        batch_size = datamodule.hparams["batch_size"]
        timer = StepTimer()
        run_steps(module, example_batch(module, datamodule, batch_size), args.warmup + args.steps, [timer], accelerator)
        times = timer.times[args.warmup:]
        layers = module.depth / module.num_blocks
        median = statistics.median(times)
        rows.append([config, str(module.num_blocks), str(batch_size), f"{median:.2f}",
                     f"{min(times):.2f}-{max(times):.2f}", f"{layers:g}", f"{1000 * median / layers:.0f}"])
        print(f"measured {config}", flush=True)
        del module, datamodule
    print(table(rows))


if __name__ == "__main__":
    main()
