"""Block-parallel training in one job (dbl.training.BlockParallelStrategy), with CPU processes (gloo)
launched as a user would: `dbl fit`. Its checkpoint must equal the per-block jobs merged."""

import csv
import runpy
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import yaml
from faults import run_dbl

from dbl.cli import load_experiment
from dbl.training.checkpoints import block_state_keys

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
BLOCK_PARALLEL = {"class_path": "dbl.training.BlockParallelStrategy"}


def write_config(tmp_path: Path, name: str, devices: int, strategy, ckpt_dir: Path | None, shared_io: bool = False,
                 callbacks: list | None = None, **trainer) -> Path:
    config = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    model = config["model"]["init_args"]
    model["network"]["init_args"].update(hidden_size=32, num_heads=2)
    model["shared_io"] = shared_io
    config["data"]["init_args"]["batch_size"] = 32
    callbacks = list(callbacks or [])
    if ckpt_dir is not None:  # every STEPS steps, all of them kept
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": STEPS, "save_top_k": -1}})
    config["trainer"] = {
        "accelerator": "cpu", "devices": devices, "strategy": strategy, "max_steps": STEPS,
        "limit_val_batches": 1, "num_sanity_val_steps": 0, "logger": False, "enable_progress_bar": False,
        "callbacks": callbacks, **trainer,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, cwd: Path, *overrides: str) -> None:
    proc = run_dbl(["fit", "--config", str(config), *overrides], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_equal_to_merged(parallel_ckpt: Path, config: Path, jobs: list[Path], merged_path: Path, blocks: int) -> None:
    tool = str(ROOT / "tools" / "merge_blocks.py")
    with patch.object(sys, "argv", [tool]):  # as run from the shell (not with pytest's arguments)
        runpy.run_path(tool)["main"](["--config", str(config), *map(str, jobs), "--out", str(merged_path)])
    state = torch.load(parallel_ckpt, weights_only=True)["state_dict"]
    merged = torch.load(merged_path, weights_only=True)["state_dict"]
    assert state["block_updates"].tolist() == [STEPS] * blocks
    assert set(state) == set(merged)
    different = [key for key in merged if not torch.equal(state[key], merged[key])]
    assert not different, f"{len(different)} of {len(merged)} entries differ, e.g. {different[:3]}"


def test_block_parallel_job_equals_merged_per_block_jobs(tmp_path):
    # with an EMA: the checkpoint's weights are the averages, the raw weights are its current_model_state
    ema = [{"class_path": "dbl.callbacks.EMA", "init_args": {"decay": 0.5}}]
    parallel = write_config(tmp_path, "parallel", 3, BLOCK_PARALLEL, tmp_path / "parallel", callbacks=ema)
    fit(parallel, tmp_path)
    (parallel_ckpt,) = (tmp_path / "parallel").glob("*.ckpt")

    jobs = []
    for b in range(3):  # the same experiment, one block per one-process job
        single = write_config(tmp_path, f"job{b}", 1, "auto", tmp_path / f"job{b}", callbacks=ema)
        fit(single, tmp_path, "--model.init_args.train_blocks", f"[{b}]")
        jobs.extend((tmp_path / f"job{b}").glob("*.ckpt"))
    assert len(jobs) == 3
    assert_equal_to_merged(parallel_ckpt, single, jobs, tmp_path / "merged.ckpt", 3)  # the averages
    # and the raw weights, block b from job b (merge_blocks keeps only the averages)
    with patch.object(sys, "argv", ["dbl"]):
        module = load_experiment(str(single), ["--model.init_args.train_blocks", "null"], portable_trainer=True).model
    raw = torch.load(parallel_ckpt, weights_only=True)["current_model_state"]
    for b, keys in enumerate(block_state_keys(module)):
        job = torch.load(jobs[b], weights_only=True)["current_model_state"]
        different = [key for key in keys if not torch.equal(raw[key], job[key])]
        assert not different, f"block {b}: {len(different)} of {len(keys)} raw weights differ, e.g. {different[:3]}"

    # the block-parallel checkpoint is a whole model: one process validates it, every block
    proc = run_dbl(["validate", "--config", str(single), "--ckpt_path", str(parallel_ckpt),
                    "--trainer.callbacks", "null"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f"val_loss/block{b}" in proc.stdout for b in range(3)), proc.stdout[-3000:]


@pytest.mark.parametrize("devices, overrides, message", [
    (2, [], "needs a multiple of num_blocks (3) processes"),
    (3, ["--model.init_args.train_blocks", "[1]"], "train_blocks [1] and BlockParallelStrategy both choose"),
])
def test_block_parallel_configuration_errors_are_one_line(tmp_path, devices, overrides, message):
    config = write_config(tmp_path, "bad", devices, BLOCK_PARALLEL, None)
    proc = run_dbl(["fit", "--config", str(config), *overrides], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dbl:")]
    assert lines and message in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]



def test_block_parallel_groups_of_two_equal_two_process_per_block_jobs(tmp_path):
    """B = 2 groups of D = 2 processes: group b computes what a two-process job of block b computes
    (the data split in two, the seed offset by the rank in the group, gradients averaged in the group)."""
    two_blocks = ["--model.init_args.num_blocks", "2"]
    parallel = write_config(tmp_path, "parallel", 4, BLOCK_PARALLEL, tmp_path / "parallel")
    fit(parallel, tmp_path, *two_blocks)
    (parallel_ckpt,) = (tmp_path / "parallel").glob("*.ckpt")
    jobs = []
    for b in range(2):  # the per-block jobs: data parallel on two processes, no DDP wrapper (same averaging)
        job = write_config(tmp_path, f"job{b}", 2, {"class_path": "dbl.training.BlockwiseDDPStrategy"}, tmp_path / f"job{b}")
        fit(job, tmp_path, *two_blocks, "--model.init_args.train_blocks", f"[{b}]")
        jobs.extend((tmp_path / f"job{b}").glob("*.ckpt"))
    assert len(jobs) == 2
    assert_equal_to_merged(parallel_ckpt, job, jobs, tmp_path / "merged.ckpt", 2)


def test_block_parallel_job_resumes_as_if_uninterrupted(tmp_path):
    """Every block's optimizer and scheduler state reach the checkpoint, so a block-parallel fit resumed
    at step STEPS ends where the whole run ends."""
    whole = write_config(tmp_path, "whole", 3, BLOCK_PARALLEL, tmp_path / "whole", max_steps=2 * STEPS)
    fit(whole, tmp_path)
    half = tmp_path / "whole" / f"epoch=0-step={STEPS}.ckpt"
    resumed = write_config(tmp_path, "resumed", 3, BLOCK_PARALLEL, tmp_path / "resumed", max_steps=2 * STEPS)
    fit(resumed, tmp_path, "--ckpt_path", str(half))
    assert not (tmp_path / "resumed" / half.name).exists()  # it resumed at step STEPS, not from scratch
    name = f"epoch=0-step={2 * STEPS}.ckpt"
    a = torch.load(tmp_path / "whole" / name, weights_only=True)
    b = torch.load(tmp_path / "resumed" / name, weights_only=True)
    assert a["state_dict"]["block_updates"].tolist() == [2 * STEPS] * 3
    different = [key for key in a["state_dict"] if not torch.equal(a["state_dict"][key], b["state_dict"][key])]
    assert not different, f"{len(different)} of {len(a['state_dict'])} entries differ, e.g. {different[:3]}"
    # and the optimizer state of every block (Adam's moments), not only rank 0's block
    assert all(len(state["state"]) > 0 for state in a["optimizer_states"])


def test_block_parallel_shared_io_keeps_every_process_identical(tmp_path):
    """shared_io: true: the shared input/output layers get the gradients of all processes and one clipping
    coefficient, so they stay identical everywhere; validation gives every process every block."""
    config = write_config(tmp_path, "shared", 3, BLOCK_PARALLEL, tmp_path / "shared", shared_io=True,
                          val_check_interval=STEPS, check_val_every_n_epoch=None,  # validate after the last step
                          callbacks=[{"class_path": "ddp_probe.RecordState", "init_args": {"out_dir": str(tmp_path / "ranks")}}],
                          logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
                          log_every_n_steps=1)
    # every step clipped, and blocks that move fast enough for their gradients to weigh in the norm
    fit(config, tmp_path, "--model.init_args.gradient_clip_val", "0.001", "--model.init_args.optimizer.init_args.lr", "0.05",
        "--model.init_args.lr_scheduler", "null")
    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=True)["state"] for r in range(3)]
    (ckpt,) = (tmp_path / "shared").glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert saved["block_updates"].tolist() == [STEPS] * 3
    for r in range(3):
        assert ranks[r]["block_updates"].tolist() == [STEPS if b == r else 0 for b in range(3)]
    different = [(r, key) for r in (1, 2) for key in ranks[0]
                 if key != "block_updates" and not torch.equal(ranks[0][key], ranks[r][key])]
    assert not different, f"{len(different)} entries differ between processes, e.g. {different[:3]}"
    different = [key for key in saved if key != "block_updates" and not torch.equal(saved[key], ranks[0][key])]
    assert not different, f"the checkpoint differs from the processes' model, e.g. {different[:3]}"
    # rank 0 writes the logs, and they hold every group's training curves
    (metrics,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    for b in range(3):
        assert [float(r[f"updates/block{b}"]) for r in rows if r.get(f"updates/block{b}")] == [1.0, 2.0, 3.0]
        assert all(r[f"train_loss/block{b}"] for r in rows if r.get(f"updates/block{b}"))


def test_block_parallel_writes_no_checkpoint_after_an_interruption(tmp_path):
    """After an exception the other groups may not answer, so no checkpoint (and no older one of that
    name left to resume from in its place)."""
    from types import SimpleNamespace

    from dbl.training import BlockParallelStrategy

    strategy = BlockParallelStrategy()
    strategy.mesh = object()  # fitting: the groups are formed
    strategy._lightning_module = SimpleNamespace(trainer=SimpleNamespace(interrupted=True))
    stale = tmp_path / "on_exception.ckpt"
    stale.write_bytes(b"from an earlier interruption")
    with pytest.warns(Warning, match="does not write"):
        strategy.save_checkpoint({"state_dict": {}}, stale)
    assert not stale.exists()
