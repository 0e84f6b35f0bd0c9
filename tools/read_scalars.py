"""Print TensorBoard scalars of one run, or compare several runs side by side at their last values.

    python tools/read_scalars.py lightning_logs/quickstart/version_0 [--tags val/loss train_loss/block0 ...]
    python tools/read_scalars.py runs/cifar10_dit_s2_b3/version_0 runs/cifar10_dit_s2_e2e/version_0

One run: every scalar's last step, last value and the mean of its last ``--window`` points.
Several runs: one column per run, one row per evaluation scalar (``val*``, ``test*``, ``fid*``
unless ``--tags`` says otherwise), headed by the number of updates each layer received (from
``updates/block<b>``), so that a block-wise and an end-to-end run are compared at equal
layer-updates, as the method spec asks (section 4, "Budget").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dbl.scalars import load

EVALUATION_PREFIXES = ("val", "test", "fid")


def layer_updates(scalars: dict[str, list[tuple[int, float]]]) -> str:
    """Updates per layer: each block's last ``updates/block<b>``, as a range when blocks differ."""
    counts = [int(points[-1][1]) for tag, points in scalars.items() if tag.startswith("updates/block")]
    if not counts:
        return "-"
    return f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def print_run(scalars: dict, tags: list[str] | None, window: int) -> None:
    print(f"{'tag':40s} {'step':>7s} {'last':>10s} {'mean(last ' + str(window) + ')':>14s}")
    for tag in tags or sorted(scalars):
        if tag not in scalars:
            print(f"{tag:40s} (not logged in this run)")
            continue
        tail = [v for _, v in scalars[tag][-window:]]
        print(f"{tag:40s} {scalars[tag][-1][0]:7d} {scalars[tag][-1][1]:10.4f} {sum(tail) / len(tail):14.4f}")


def print_comparison(runs: dict[str, dict], tags: list[str] | None) -> None:
    if tags is None:
        tags = sorted({t for s in runs.values() for t in s if t.startswith(EVALUATION_PREFIXES)})
    names = list(runs)
    width = max(12, *(len(n) for n in names))
    print(f"{'':32s} " + " ".join(f"{n:>{width}s}" for n in names))
    print(f"{'updates per layer':32s} " + " ".join(f"{layer_updates(runs[n]):>{width}s}" for n in names))
    for tag in tags:
        cells = [f"{runs[n][tag][-1][1]:.4f}" if tag in runs[n] else "-" for n in names]
        print(f"{tag:32s} " + " ".join(f"{c:>{width}s}" for c in cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdirs", nargs="+", metavar="logdir", help="run folders holding TensorBoard event files")
    parser.add_argument("--tags", nargs="*", help="scalar tags (default: all for one run, evaluation tags for several)")
    parser.add_argument("--window", type=int, default=10, help="one run: number of last points averaged")
    args = parser.parse_args(argv)
    runs = {logdir: load(logdir) if Path(logdir).is_dir() else {} for logdir in args.logdirs}
    empty = [logdir for logdir, scalars in runs.items() if not scalars]
    if empty:
        sys.exit(f"read_scalars: no TensorBoard scalars under {', '.join(empty)}; give a run's version_<n> folder")
    if len(runs) == 1:
        print_run(next(iter(runs.values())), args.tags, args.window)
    else:
        print_comparison(runs, args.tags)


if __name__ == "__main__":
    main()
