"""Block-parallel training: one `dbl fit` job per block, merged into one model by tools/merge_blocks.py."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

from dbl.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")
SMALL = ["--model.init_args.network.init_args.hidden_size", "32", "--model.init_args.network.init_args.num_heads", "2",
         "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1"]


def fit_job(tmp_path, name, *overrides):
    out = tmp_path / name
    main(["fit", "--config", QUICKSTART, *SMALL, *overrides, "--trainer.max_steps", "2",
          "--trainer.default_root_dir", str(out), "--trainer.callbacks",
          f'[{{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {{"dirpath": "{out}", "every_n_train_steps": 2}}}}]'])
    (ckpt,) = out.glob("*.ckpt")
    return ckpt


def merge(args, capsys, monkeypatch):
    tool = ROOT / "tools" / "merge_blocks.py"
    monkeypatch.setattr(sys, "argv", [str(tool), "--config", QUICKSTART, *map(str, args)])
    runpy.run_path(str(tool), run_name="__main__")
    return capsys.readouterr().out


def test_block_parallel_jobs_merge_into_one_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = [fit_job(tmp_path, f"job{b}", "--model.init_args.shared_io", "false", "--model.init_args.train_blocks", f"[{b}]")
            for b in range(3)]
    out = merge([*reversed(jobs), "--out", tmp_path / "merged.ckpt"], capsys, monkeypatch)
    assert f"block1: {jobs[1]} (2 updates)" in out

    merged = torch.load(tmp_path / "merged.ckpt", weights_only=False)
    states = [torch.load(j, weights_only=False)["state_dict"] for j in jobs]
    assert merged["state_dict"]["block_updates"].tolist() == [2, 2, 2]
    assert merged["hyper_parameters"]["train_blocks"] is None
    for b, state in enumerate(states):  # block b's layers and its own input/output copy come from job b
        layer = f"network.net.layers.{2 * b}.modulation.1.weight"  # adaLN-Zero: the first weights to move
        io = "network.net.final.linear.weight" if b == 0 else f"network.io_copies.{b - 1}.final.linear.weight"
        for key in (layer, io):
            assert torch.equal(merged["state_dict"][key], state[key])
            assert not torch.equal(merged["state_dict"][key], states[(b + 1) % 3][key])  # the others did not train it

    # the merged model evaluates with every block (validation routes each sigma to its block)
    main(["validate", "--config", QUICKSTART, *SMALL, "--ckpt_path", str(tmp_path / "merged.ckpt"),
          "--trainer.callbacks", "null", "--trainer.default_root_dir", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    assert all(f"val_loss/block{b}" in printed for b in range(3)), printed


def test_merge_refuses_gaps_overlaps_and_shared_io(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    iso = ["--model.init_args.shared_io", "false"]
    job0 = fit_job(tmp_path, "job0", *iso, "--model.init_args.train_blocks", "[0]")
    job01 = fit_job(tmp_path, "job01", *iso, "--model.init_args.train_blocks", "[0, 1]",
                    "--model.init_args.block_schedule", "phased", "--model.init_args.phase_steps", "1")  # one step each
    for args, message in [
        ([job0], r"no checkpoint trained block\(s\) \[1, 2\]"),
        ([job0, job01], "block 0 was trained in both"),
    ]:
        with pytest.raises(SystemExit, match=message):
            merge([*args, "--out", tmp_path / "x.ckpt"], capsys, monkeypatch)
    shared = [fit_job(tmp_path, f"shared{b}", "--model.init_args.train_blocks", f"[{b}]") for b in range(2)]
    with pytest.raises(SystemExit, match="need shared_io: false"):
        merge([*shared, "--out", tmp_path / "x.ckpt"], capsys, monkeypatch)
    assert not (tmp_path / "x.ckpt").exists()
