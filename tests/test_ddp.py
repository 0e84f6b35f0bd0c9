"""Data-parallel block-wise training with two CPU processes (gloo), launched as a user would: `dbl fit`."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from dbl.training.schedules import make_schedule

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_trains_the_same_block_with_different_noise(tmp_path):
    config = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    model = config["model"]["init_args"]
    model["network"]["init_args"].update(hidden_size=32, num_heads=2)
    model["offload_inactive"] = True  # the random schedule moves blocks on most steps: the hardest case
    config["data"]["init_args"]["batch_size"] = 32
    config["trainer"] = {
        "accelerator": "cpu", "devices": 2, "strategy": "ddp",  # find_unused_parameters: dbl turns it on
        "max_steps": 8, "val_check_interval": 4, "check_val_every_n_epoch": None, "limit_val_batches": 2,
        "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "callbacks": [{"class_path": "ddp_probe.RecordRanks", "init_args": {"out_dir": str(tmp_path / "ranks")}}],
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dbl", "fit", "--config", str(tmp_path / "run.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt") for r in (0, 1)]

    expected = [make_schedule("random", 3, None, 1000, 0).block_at(step) for step in range(8)]
    assert ranks[0]["blocks"] == ranks[1]["blocks"] == expected
    # each process draws its own sigmas and noise (seed offset by rank), for every step
    assert all(a != b for a, b in zip(ranks[0]["rng"], ranks[1]["rng"]))
    # gradients were averaged: the replicas stayed identical, and every block trained
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    assert ranks[0]["state"]["block_updates"].tolist() == [expected.count(b) for b in range(3)]
    # per-block validation metrics are synced across processes and logged on both
    assert len(ranks[0]["val"]) == 2
    assert ranks[0]["val"] == ranks[1]["val"]
    assert {f"val_loss/block{b}" for b in range(3)} <= set(ranks[0]["val"][0])
