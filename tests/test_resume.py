"""Runs you can leave alone: a run stopped by SIGTERM (a scheduler's preemption) or SIGKILL (OOM,
power loss) and started again with the same command ends bit-identical to a run never stopped."""

import json
import signal
from pathlib import Path

import pytest
import torch
from faults import run_dbl

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")
MAX_STEPS = 33  # not a multiple of the checkpoint interval: the final step must be saved too

# Each task, tiny: its experiment YAML, overrides, and the logger folder its checkpoints land in.
TASKS = {
    "image": ([QUICKSTART, "--model.init_args.network.init_args.hidden_size", "32",
               "--model.init_args.network.init_args.num_heads", "2"], "lightning_logs/quickstart"),
    # random crops, made in a loader worker (whose random streams are not checkpointed); masks and
    # times from the main process's streams
    "text8": ([str(ROOT / "experiments" / "text8_standin_b3.yaml"), "--data.init_args.root", "text8",
               "--data.init_args.num_workers", "1",
               "--data.init_args.train_chars", "18000", "--data.init_args.val_chars", "1000",
               "--data.init_args.test_chars", "1000", "--data.init_args.batch_size", "8",
               "--data.init_args.eval_batch_size", "8", "--model.init_args.network.init_args.hidden_size", "32",
               "--model.init_args.network.init_args.num_heads", "2", "--model.init_args.eval_times", "2"],
              "lightning_logs/text8_standin_b3"),
    # random flips, with a loader worker (flips drawn in the worker would not resume exactly)
    "fashion": ([str(ROOT / "experiments" / "fashion_mnist_dit_b3.yaml"), "--data.init_args.root", "fm",
                 "--data.init_args.num_workers", "1",
                 "--data.init_args.cache_dir", "fm_cache", "--data.init_args.batch_size", "8",
                 "--data.init_args.eval_batch_size", "8", "--data.init_args.val_fraction", "0.1",
                 "--model.init_args.network.init_args.hidden_size", "32",
                 "--model.init_args.network.init_args.num_heads", "2", "--model.init_args.network.init_args.patch_size", "8"],
                "runs/fashion_mnist_dit_b3"),
}


def _config(tmp_path: Path, fault: str = "", task: str = "image") -> list[str]:
    base, _ = TASKS[task]
    if task == "text8" and not (tmp_path / "text8").exists():
        from test_text8 import write_text8_zip

        write_text8_zip(tmp_path / "text8", 20_000)
    if task == "fashion" and not (tmp_path / "fm").exists():
        from test_image_data import write_idx_gz

        write_idx_gz(tmp_path / "fm" / "FashionMNIST" / "raw", n_train=200, n_test=8)
    (tmp_path / "run.yaml").write_text(
        "trainer:\n  callbacks:\n"
        "    - {class_path: dbl.callbacks.ModelCheckpoint, init_args: {save_last: true, every_n_train_steps: 10}}\n"
        "    - {class_path: dbl.callbacks.OnExceptionCheckpoint, init_args: {dirpath: checkpoints/run}}\n"
        "    - {class_path: faults.RecordSteps, init_args: {path: steps.jsonl}}\n"
        "    - faults.DrawInValidation\n" + fault
    )
    return ["fit", "--config", base[0], "--config", "run.yaml", *base[1:], "--trainer.max_steps", str(MAX_STEPS),
            "--trainer.val_check_interval", "10", "--trainer.limit_val_batches", "2",
            "--trainer.enable_progress_bar", "false"]


def _steps(path: Path) -> dict[int, list[tuple]]:
    seen: dict[int, list[tuple]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        seen.setdefault(row["step"], []).append((row["block"], row["loss"]))
    return seen


def _final(run: Path, task: str) -> dict:
    last = sorted((run / TASKS[task][1]).glob("version_*/checkpoints/last.ckpt"))[-1]
    return torch.load(last, map_location="cpu", weights_only=True)


def _assert_identical(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}

    def run(task: str) -> Path:
        if task not in runs:
            runs[task] = tmp_path_factory.mktemp(f"uninterrupted_{task}")
            result = run_dbl(_config(runs[task], task=task), runs[task])
            assert result.returncode == 0, result.stderr[-3000:]
        return runs[task]

    return run


@pytest.mark.parametrize("task, signal_name, stop_at, resumed_from", [
    ("image", "SIGTERM", 15, 15), ("image", "SIGKILL", 25, 20), ("text8", "SIGKILL", 25, 20),
    ("fashion", "SIGKILL", 25, 20)])
def test_stopped_and_rerun_is_bit_identical(uninterrupted, tmp_path, task, signal_name, stop_at, resumed_from):
    args = _config(tmp_path, f"    - {{class_path: faults.SignalAt, init_args: {{step: {stop_at}, "
                             f"signal_name: {signal_name}, once_file: signalled}}}}\n", task)
    stopped = run_dbl(args, tmp_path)
    if signal_name == "SIGTERM":
        # a scheduler must see a failure, and the user where the work went
        assert stopped.returncode == 143, stopped.stderr[-3000:]
        assert f"dbl: saved checkpoints/run/on_exception.ckpt at step {stop_at}" in stopped.stderr
    else:
        assert stopped.returncode == -signal.SIGKILL
    assert max(_steps(tmp_path / "steps.jsonl")) == stop_at

    resumed = run_dbl(args, tmp_path)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {resumed_from}); to start over, add --fresh" in resumed.stderr
    assert not (tmp_path / "checkpoints" / "run" / "on_exception.ckpt").exists()  # used up

    # every step's block and loss, bit for bit (steps run twice after a hard kill agree both times)
    whole = uninterrupted(task)
    reference = _steps(whole / "steps.jsonl")
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))
    for step, rows in _steps(tmp_path / "steps.jsonl").items():
        assert all(row == reference[step][0] for row in rows), step
    assert sorted(_steps(tmp_path / "steps.jsonl")) == sorted(reference)
    # and the whole final checkpoint: weights, optimizer and scheduler states, update counts, loop
    # counters, data position and random states (the callbacks' states name their run's own folders)
    ours, theirs = _final(tmp_path, task), _final(whole, task)
    assert ours["global_step"] == theirs["global_step"] == MAX_STEPS
    ours.pop("callbacks"), theirs.pop("callbacks")
    _assert_identical(ours, theirs)


# -- checkpoint hygiene, in-process --------------------------------------------------------------
TINY = ["--config", QUICKSTART, "--model.init_args.network.init_args.hidden_size", "32",
        "--model.init_args.network.init_args.num_heads", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "2", "--trainer.callbacks",
        '[{"class_path": "dbl.callbacks.ModelCheckpoint", "init_args": {"save_last": true, "every_n_train_steps": 2}},'
        ' {"class_path": "dbl.callbacks.OnExceptionCheckpoint", "init_args": {"dirpath": "checkpoints/quickstart"}}]']


def _main(args, capsys) -> tuple[int, list[str]]:
    from dbl.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip() and not line.startswith("Seed set")]


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture
def trained(tmp_path, monkeypatch, capsys):
    """A finished 2-step run of the experiment, and a crash checkpoint waiting next to it."""
    monkeypatch.chdir(tmp_path)
    assert _main(["fit", *TINY, "--trainer.max_steps", "2"], capsys)[0] == 0
    crash = tmp_path / "checkpoints" / "quickstart" / "on_exception.ckpt"
    crash.parent.mkdir(parents=True)
    crash.write_bytes((tmp_path / "lightning_logs/quickstart/version_0/checkpoints/last.ckpt").read_bytes())
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["--model.init_args.optimizer.init_args.lr", "0.002"],
     "checkpoints/quickstart/on_exception.ckpt (step 2) was written with other model options (checkpoint's -> yours): "
     "model.init_args.optimizer.init_args.lr: 0.001 -> 0.002; to resume, undo the change; to start over, add --fresh (or delete "
     "checkpoints/quickstart/on_exception.ckpt)"),
    (["--model.init_args.num_blocks", "2"], "model.init_args.num_blocks: 3 -> 2; to resume, undo the change"),
    (["--fresh", "true", "--ckpt_path", "lightning_logs/quickstart/version_0/checkpoints/last.ckpt"],
     "--fresh starts from step 0 and --ckpt_path resumes a checkpoint: give one of them"),
    (["--ckpt_path", "lightning_logs/quickstart/version_0/checkpoints/last.ckpt",
      "--model.init_args.optimizer.init_args.weight_decay", "0.1"],
     "(step 2) was written with other model options (checkpoint's -> yours): "
     "model.init_args.optimizer.init_args.weight_decay: 0.0 -> 0.1; to resume, undo the change; to start over, "
     "drop --ckpt_path and add --fresh"),
])
def test_a_resume_that_changes_the_model_is_refused_in_one_line(trained, capsys, args, message):
    before = _files(trained)
    code, lines = _main(["fit", *TINY, "--trainer.max_steps", "4", *args], capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert _files(trained) == before  # nothing written or deleted


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_an_unreadable_leftover_checkpoint_is_one_line_naming_it(trained, capsys, content):
    crash = trained / "checkpoints" / "quickstart" / "on_exception.ckpt"
    crash.write_bytes(content)
    before = _files(trained)
    code, lines = _main(["fit", *TINY, "--trainer.max_steps", "4"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("dbl: configuration error: checkpoints/quickstart/on_exception.ckpt cannot be read as a "
                               "checkpoint (") and lines[0].endswith("to start over, add --fresh (or delete "
                                                                      "checkpoints/quickstart/on_exception.ckpt)")
    assert _files(trained) == before


def test_evaluation_and_fresh_runs_leave_the_crash_checkpoint_alone(trained, capsys):
    crash = trained / "checkpoints" / "quickstart" / "on_exception.ckpt"
    for stage in ("validate", "predict"):  # (the digits have no test split)
        assert _main([stage, *TINY, "--ckpt_path", "last"], capsys)[0] == 0
        assert crash.exists(), stage
    assert _main(["fit", *TINY, "--trainer.max_steps", "2"], capsys)[0] == 0  # resumed at step 2: nothing to train
    assert crash.exists()
    code, lines = _main(["fit", *TINY, "--trainer.max_steps", "2", "--fresh", "true"], capsys)
    assert code == 0 and not any("resuming" in line for line in lines), lines
    newest = sorted((trained / "lightning_logs" / "quickstart").glob("version_*"))[-1]
    assert torch.load(newest / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2  # from step 0
    assert not crash.exists()  # a fresh fit that trained to its end retires the stale crash checkpoint


def test_a_checkpoint_from_before_the_new_options_still_resumes(trained, capsys):
    """Checkpoints written before `skip_nonfinite_steps` (its option and buffer) and the random states
    existed resume: an option the checkpoint does not know is not a change."""
    crash = trained / "checkpoints" / "quickstart" / "on_exception.ckpt"
    old = torch.load(crash, weights_only=True)
    del old["state_dict"]["skipped_steps"], old["hyper_parameters"]["skip_nonfinite_steps"], old["dbl_rng"]
    torch.save(old, crash)
    code, lines = _main(["fit", *TINY, "--trainer.max_steps", "3"], capsys)
    assert code == 0 and "dbl: resuming from checkpoints/quickstart/on_exception.ckpt (step 2)" in lines[0], lines
    newest = sorted((trained / "lightning_logs" / "quickstart").glob("version_*"))[-1]
    assert torch.load(newest / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
