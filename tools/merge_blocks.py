"""Merge the checkpoints of block-parallel jobs into one model to evaluate and sample from.

    # one job per block, no communication (shared_io: false), e.g. for B = 3:
    dbl fit --config experiments/X.yaml --model.init_args.shared_io false --model.init_args.train_blocks [0]
    ... [1], [2] (each job in its own run folder)
    python tools/merge_blocks.py --config experiments/X.yaml job0.ckpt job1.ckpt job2.ckpt --out merged.ckpt
    dbl test --config experiments/X.yaml --ckpt_path merged.ckpt

The model is built from the YAML with the structure the jobs recorded in their checkpoints (network,
num_blocks, layers_per_block, shared_io), so command-line overrides given to the jobs carry over.
Each block comes from the checkpoint whose per-block update counts say it trained that block
(``dbl.training.checkpoints.merge_block_checkpoints``); the tool refuses overlaps, gaps and
checkpoints of another model. The result has no optimizer state: it is for evaluation, not for
resuming training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dbl.cli import load_experiment
from dbl.errors import UsageError
from dbl.training.checkpoints import merge_block_checkpoints

# the hyperparameters that decide which weights exist and which block owns them
STRUCTURE = ("network", "num_blocks", "layers_per_block", "shared_io")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="one checkpoint per job")
    parser.add_argument("--config", required=True, help="the experiment YAML the jobs were trained with")
    parser.add_argument("--out", type=Path, required=True, help="where to write the merged checkpoint")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.checkpoints if not p.is_file()]
    if missing:
        sys.exit(f"merge_blocks: no such checkpoint: {', '.join(missing)}")
    checkpoints = []
    for path in args.checkpoints:
        try:  # checkpoints are data, never code: weights_only
            checkpoints.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:
            sys.exit(f"merge_blocks: {path} cannot be read as a checkpoint ({str(err).strip().splitlines()[0][:160]})")
    recorded = checkpoints[0].get("hyper_parameters", {})
    overrides = ["--model.init_args.train_blocks", "null"]
    for key in STRUCTURE:
        if key in recorded:
            overrides += [f"--model.init_args.{key}", json.dumps(recorded[key])]
    module = load_experiment(args.config, overrides, portable_trainer=True).model
    try:
        merged = merge_block_checkpoints(module, checkpoints, [str(p) for p in args.checkpoints])
    except UsageError as err:
        sys.exit(f"merge_blocks: {err}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(merged, args.out)
    for block, source in merged["merged_from"].items():
        print(f"{block}: {source} ({int(merged['state_dict']['block_updates'][int(block[5:])])} updates)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
