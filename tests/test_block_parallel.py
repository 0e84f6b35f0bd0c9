"""Block-parallel training in one job (dbl.training.BlockParallelStrategy), with CPU processes (gloo)
launched as a user would: `dbl fit`. Its checkpoint must equal the per-block jobs merged."""

import subprocess
import sys
from pathlib import Path

import torch
import yaml
from faults import run_dbl

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


def write_config(tmp_path: Path, name: str, devices: int, strategy, ckpt_dir: Path | None) -> Path:
    config = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    model = config["model"]["init_args"]
    model["network"]["init_args"].update(hidden_size=32, num_heads=2)
    model["shared_io"] = False
    config["data"]["init_args"]["batch_size"] = 32
    callbacks = [] if ckpt_dir is None else [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                              "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": STEPS}}]
    config["trainer"] = {
        "accelerator": "cpu", "devices": devices, "strategy": strategy, "max_steps": STEPS,
        "limit_val_batches": 1, "logger": False, "enable_progress_bar": False, "callbacks": callbacks,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, cwd: Path, *overrides: str) -> None:
    proc = run_dbl(["fit", "--config", str(config), *overrides], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_block_parallel_job_equals_merged_per_block_jobs(tmp_path):
    parallel = write_config(tmp_path, "parallel", 3, {"class_path": "dbl.training.BlockParallelStrategy"},
                            tmp_path / "parallel")
    fit(parallel, tmp_path)
    (parallel_ckpt,) = (tmp_path / "parallel").glob("*.ckpt")

    jobs = []
    for b in range(3):  # the same experiment, one block per one-process job
        single = write_config(tmp_path, f"job{b}", 1, "auto", tmp_path / f"job{b}")
        fit(single, tmp_path, "--model.init_args.train_blocks", f"[{b}]")
        jobs.extend((tmp_path / f"job{b}").glob("*.ckpt"))
    assert len(jobs) == 3
    merged_path = tmp_path / "merged.ckpt"
    merge = subprocess.run([sys.executable, str(ROOT / "tools" / "merge_blocks.py"), "--config", str(single),
                            *map(str, jobs), "--out", str(merged_path)], cwd=tmp_path, capture_output=True, text=True)
    assert merge.returncode == 0, merge.stderr[-3000:]

    state = torch.load(parallel_ckpt, weights_only=True)["state_dict"]
    merged = torch.load(merged_path, weights_only=True)["state_dict"]
    assert state["block_updates"].tolist() == [STEPS] * 3
    assert set(state) == set(merged)
    different = [key for key in merged if not torch.equal(state[key], merged[key])]
    assert not different, f"{len(different)} of {len(merged)} entries differ, e.g. {different[:3]}"

    # the block-parallel checkpoint is a whole model: one process validates it, every block
    proc = run_dbl(["validate", "--config", str(single), "--ckpt_path", str(parallel_ckpt),
                    "--trainer.callbacks", "null"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f"val_loss/block{b}" in proc.stdout for b in range(3)), proc.stdout[-3000:]


def test_block_parallel_needs_a_multiple_of_num_blocks_processes(tmp_path):
    config = write_config(tmp_path, "two", 2, {"class_path": "dbl.training.BlockParallelStrategy"}, None)
    proc = run_dbl(["fit", "--config", str(config)], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dbl:")]
    assert lines and "needs a multiple of num_blocks (3) processes" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
