from pathlib import Path

import pytest
import torch
from faults import run_dbl

from dbl.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")


def run_main(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.init_args.partition", "bogus"], "model.partition: got 'bogus'; choose one of 'equiprobable'"),
        (["--model.init_args.num_blocks", "9"], "num_blocks 9 is larger than the network's depth 6"),
        (["--model.init_args.overlap", "-0.1"], "overlap must be >= 0, got -0.1"),
        (["--model.init_args.network.init_args.depth", "7"], "set layers_per_block explicitly, e.g. [3, 2, 2]"),
        (["--ckpt_path", "missing.ckpt"], "ckpt_path missing.ckpt: no such file"),
        (["--trainer.gradient_clip_val", "1.0"], "set model.init_args.gradient_clip_val instead"),
        (["--trainer.accumulate_grad_batches", "2"], "set model.init_args.accumulate_grad_batches instead"),
    ],
)
def test_bad_config_gives_one_line_error(override, message, capsys):
    code, _, err = run_main(["fit", "--config", QUICKSTART, *override], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert len(lines) == 1, err
    assert lines[0].startswith("dbl: configuration error:") and message in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_gpu_is_a_one_line_error(capsys):
    code, _, err = run_main(["info", "--config", QUICKSTART, "--trainer.accelerator", "gpu"], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert lines == ["dbl: configuration error: trainer: No supported gpu backend found!; this machine has no CUDA GPU: "
                     "set trainer.accelerator to auto or cpu"]


def test_info_prints_blocks_and_memory(capsys):
    main(["info", "--config", QUICKSTART])
    out = capsys.readouterr().out
    assert "6 layers in 3 blocks, partition equiprobable, overlap 0.05" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in {"0", "1", "2", "shared"}}
    assert "[0.505, 80]" in rows["0"] and "[0.392, 80]" in rows["0"] and "0-1" in rows["0"]
    assert "[0.002, 0.1796]" in rows["2"] and "4-5" in rows["2"]
    for mode in ("end-to-end", "block-wise", "block-wise, offloaded"):
        assert any(line.startswith(mode) for line in out.splitlines())


def test_info_needs_no_data(tmp_path, monkeypatch, capsys):
    """The CIFAR-10 YAML on a machine without CIFAR-10: the memory table from a random batch of the
    data's shape (batch 512), and nothing downloaded or written."""
    monkeypatch.chdir(tmp_path)
    main(["info", "--config", str(ROOT / "experiments" / "cifar10_dit_s2_b3.yaml")])
    out = capsys.readouterr().out
    assert "Estimated memory of one training step, batch 512" in out
    assert any(line.startswith("block-wise, offloaded") for line in out.splitlines())
    assert list(tmp_path.iterdir()) == []


def test_print_config_roundtrip(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: dbl.models.DiT" in capsys.readouterr().out


def _dbl(args, cwd) -> tuple[int, str]:
    result = run_dbl(args, cwd)
    return result.returncode, result.stdout + result.stderr


def test_quickstart_ctrl_c_checkpoints_and_rerun_resumes(tmp_path):
    """The quickstart YAML trains; Ctrl-C leaves a checkpoint; the same command resumes from it."""
    args = ["fit", "--config", QUICKSTART, "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
            "--trainer.val_check_interval", "3"]
    # same callbacks, plus Ctrl-C at the end of step 4 (tests/faults.py), at that step and no other
    (tmp_path / "often.yaml").write_text(
        "trainer:\n  callbacks:\n"
        "    - {class_path: dbl.callbacks.SampleGrid, init_args: {every_n_steps: 0, per_class: 2, num_steps: 4}}\n"
        "    - {class_path: dbl.callbacks.ModelCheckpoint, init_args: {every_n_train_steps: 2}}\n"
        "    - {class_path: dbl.callbacks.OnExceptionCheckpoint, init_args: {dirpath: checkpoints/quickstart}}\n"
        "    - {class_path: faults.SignalAt, init_args: {step: 4, signal_name: SIGINT, once_file: interrupted}}\n"
    )
    args += ["--config", "often.yaml"]
    code, out = _dbl([*args, "--trainer.max_steps", "100000"], tmp_path)
    ckpt = tmp_path / "checkpoints" / "quickstart" / "on_exception.ckpt"
    assert code == 1 and ckpt.exists(), out  # Lightning's exit status after Ctrl-C
    assert "dbl: saved checkpoints/quickstart/on_exception.ckpt at step 4; run the same command to resume" in out
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4

    code, out = _dbl([*args, "--trainer.max_steps", "6"], tmp_path)
    assert code == 0, out
    assert "dbl: resuming from checkpoints/quickstart/on_exception.ckpt (step 4)" in out
    assert not ckpt.exists()  # removed once the resumed run completed
    samples = list((tmp_path / "lightning_logs" / "quickstart" / "version_1" / "samples").glob("*.png"))
    assert samples, out
    # a checkpoint written by `dbl fit` rebuilds the whole module from its YAML hyperparameters
    from dbl import ImageDiffusionModule

    last = sorted((tmp_path / "lightning_logs" / "quickstart" / "version_1" / "checkpoints").glob("*.ckpt"))[-1]
    module = ImageDiffusionModule.load_from_checkpoint(last)
    assert module.num_blocks == 3
    assert module.sample(labels=torch.arange(2), num_steps=3).shape == (2, 1, 8, 8)
    # evaluating a checkpoint: a model option that the checkpoint overrides is reported, not dropped silently
    with pytest.warns(UserWarning, match=r"model.init_args.sample_steps: 32 -> 7"):
        main(["validate", "--config", QUICKSTART, "--ckpt_path", str(last), "--model.init_args.sample_steps", "7",
              "--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(tmp_path)])

    # `dbl predict` writes one PNG per generated image
    out = tmp_path / "predictions"
    (tmp_path / "writer.yaml").write_text(
        "trainer:\n  callbacks:\n"
        f"    - {{class_path: dbl.callbacks.ImagePredictionWriter, init_args: {{output_dir: {out}}}}}\n"
    )
    main(["predict", "--config", QUICKSTART, "--config", str(tmp_path / "writer.yaml"), "--ckpt_path", str(last),
          "--data.init_args.num_predict", "3", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path)])
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]


def test_on_exception_checkpoint_is_saved_and_deleted_only_when_it_should(tmp_path):
    """Saved by a fit that trained in this run (not before step 0: the corrected rerun would resume
    the old configuration; not on divergence), and deleted only by a fit that trained to its end."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from dbl.callbacks import OnExceptionCheckpoint
    from dbl.errors import DivergenceError

    def trainer(fn, step):
        saved = lambda path: (saves.append(str(path)), Path(path).write_text("ckpt"))  # noqa: E731
        return SimpleNamespace(global_step=step, save_checkpoint=saved, is_global_zero=True, state=SimpleNamespace(fn=fn))

    saves: list[str] = []
    callback = OnExceptionCheckpoint(dirpath=str(tmp_path))
    path = str(tmp_path / "on_exception.ckpt")
    for fn, start, step, error in [(TrainerFn.FITTING, 0, 0, RuntimeError("bad data")),  # failed before training
                                   (TrainerFn.FITTING, 5, 5, RuntimeError("boom")),  # resumed, trained nothing
                                   (TrainerFn.FITTING, 0, 3, DivergenceError("nan")),
                                   (TrainerFn.VALIDATING, 0, 7, KeyboardInterrupt()),
                                   (TrainerFn.FITTING, 0, 3, KeyboardInterrupt())]:  # the only one saved
        t = trainer(fn, start)
        callback.on_train_start(t, None)
        t.global_step = step
        callback.on_exception(t, None, error)
    assert saves == [path]

    for fn, start, step in [(TrainerFn.FITTING, 3, 3)]:  # e.g. max_steps 0: no step trained, nothing deleted
        t = trainer(fn, start)
        callback.on_train_start(t, None)
        callback.on_fit_end(t, None)
    assert Path(path).exists()
    t = trainer(TrainerFn.FITTING, 3)
    callback.on_train_start(t, None)
    t.global_step = 4
    callback.on_fit_end(t, None)
    assert not Path(path).exists()


def test_ckpt_path_last_resumes_the_previous_run(tmp_path, capsys, monkeypatch):
    """Each run logs into a new version_<n>; `--ckpt_path last` must still find the previous run's last.ckpt."""
    monkeypatch.chdir(tmp_path)
    args = ["--config", QUICKSTART, "--model.init_args.network.init_args.hidden_size", "32",
            "--model.init_args.network.init_args.num_heads", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks",
            '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
            '"init_args": {"save_last": true, "every_n_train_steps": 2, "save_top_k": -1}}]']
    with pytest.raises(SystemExit) as exit_:  # evaluating "last" before any training is an error, not random weights
        main(["validate", *args, "--ckpt_path", "last"])
    assert exit_.value.code == 2 and "this experiment has no checkpoint yet" in capsys.readouterr().err
    main(["fit", *args, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert "no earlier checkpoint; training from scratch" in capsys.readouterr().err
    main(["fit", *args, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert "resuming from lightning_logs/quickstart/version_0/checkpoints/last.ckpt (step 4)" in capsys.readouterr().err
    runs = tmp_path / "lightning_logs" / "quickstart"
    assert sorted(p.name for p in (runs / "version_0" / "checkpoints").glob("epoch*")) == [
        "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    # the second run continued at step 4: its only periodic checkpoint is step 6
    assert [p.name for p in (runs / "version_1" / "checkpoints").glob("epoch*")] == ["epoch=0-step=6.ckpt"]


def test_a_defect_while_building_keeps_its_traceback(capsys, monkeypatch):
    """Only a UsageError is reported as a configuration error; a TypeError from a constructor is a bug
    and must not pass for one."""
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    with pytest.raises(Exception) as raised:
        main(["fit", "--config", QUICKSTART, "--model.init_args.network", '{"class_path": "faults.BrokenNetwork"}'])
    assert not isinstance(raised.value, SystemExit)
    assert "unsupported operand type(s) for +: 'int' and 'str'" in str(raised.value.__cause__ or raised.value)
    assert "configuration error" not in capsys.readouterr().err
