"""Print the last value (and a smoothed mean) of TensorBoard scalars of a run: for notes and comparisons.

    python tools/read_scalars.py lightning_logs/version_0 [--tags val/loss train_loss/block0 ...]
"""

from __future__ import annotations

import argparse

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdir")
    parser.add_argument("--tags", nargs="*", help="scalar tags (default: all)")
    parser.add_argument("--window", type=int, default=10, help="number of last points averaged")
    args = parser.parse_args()
    acc = EventAccumulator(args.logdir, size_guidance={"scalars": 0})
    acc.Reload()
    available = set(acc.Tags()["scalars"])
    tags = args.tags or sorted(available)
    print(f"{'tag':40s} {'step':>7s} {'last':>10s} {'mean(last ' + str(args.window) + ')':>14s}")
    for tag in tags:
        if tag not in available:
            print(f"{tag:40s} (not logged in this run)")
            continue
        events = acc.Scalars(tag)
        tail = [e.value for e in events[-args.window:]]
        print(f"{tag:40s} {events[-1].step:7d} {events[-1].value:10.4f} {sum(tail) / len(tail):14.4f}")


if __name__ == "__main__":
    main()
