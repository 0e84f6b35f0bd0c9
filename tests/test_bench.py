"""The benchmark scripts run and their numbers hang together (no timing assertions)."""

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = """
model:
  class_path: dbl.ImageDiffusionModule
  init_args:
    network:
      class_path: dbl.models.DiT
      init_args: {input_size: 8, in_channels: 1, patch_size: 2, hidden_size: 32, depth: 6, num_heads: 2, num_classes: 10}
    num_blocks: 3
    sample_steps: 4
data:
  class_path: dbl.data.DigitsDataModule
trainer:
  accelerator: cpu
"""


def run_tool(name, args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(ROOT / "tools" / name), run_name="__main__")
    return capsys.readouterr().out


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return str(path)


def rows_of(out: str) -> dict[str, list[str]]:
    return {line.split("  ")[0].strip(): line.split() for line in out.splitlines() if line.startswith(("end-to-end", "block-wise"))}


# 16: each variant in a fresh process (the default); 2: smaller than the 4 samples `dbl info` profiles
@pytest.mark.parametrize("batch_size, mode", [(16, []), (2, ["--in-process"])])
def test_bench_memory(tiny_config, batch_size, mode, capsys, monkeypatch):
    out = run_tool("bench_memory.py", ["--config", tiny_config, "--blocks", "3", "--batch-size", str(batch_size), *mode],
                   capsys, monkeypatch)
    assert "Training memory per step" in out and "CPU (no CUDA" in out
    table = out.split("`dbl info` estimate")[0]
    rows = rows_of(table)
    assert float(rows["block-wise B=3"][-2]) > 2.0  # activations e2e / block-wise
    assert float(rows["block-wise B=3 + offload"][-1]) > float(rows["block-wise B=3"][-1])  # offload saves more
    # the estimate of `dbl info` agrees with the measurement to within 10%
    for line in out.split("`dbl info` estimate")[1].splitlines():
        if line.startswith(("end-to-end", "block-wise")):
            diffs = [float(c.rstrip("%")) for c in line.split() if c.endswith("%")]
            assert all(abs(d) <= 10 for d in diffs), line


def test_bench_speed(tiny_config, capsys, monkeypatch):
    out = run_tool("bench_speed.py", ["--config", tiny_config, "--blocks", "3", "--steps", "2", "--sample-steps", "3",
                                      "--num-samples", "2", "--phase-steps", "2", "--rounds", "2"], capsys, monkeypatch)
    rows = rows_of(out)
    assert set(rows) == {"end-to-end", "block-wise B=3", "block-wise B=3 + offload, new block every step"}
    assert rows["block-wise B=3"][-1].endswith("%")
    # two rounds of the variants in turn: each ratio is the median with its range over the rounds
    assert re.fullmatch(r"\d+\.\d\d \(\d+\.\d\d-\d+\.\d\d\)", " ".join(rows["block-wise B=3"][3:5]))
    ratio = re.search(r"^B=3: 3 block steps / 1 end-to-end step = (\d+\.\d\d) \(", out, re.M)
    assert ratio and ratio.group(1) == rows["block-wise B=3"][3]  # the printed line is the table's ratio


def test_bench_speed_overrides_without_offload(tiny_config, capsys, monkeypatch):
    """``--set`` reaches every variant (here a 4-layer network split 2 + 2) and ``--no-offload`` skips those rows."""
    out = run_tool("bench_speed.py", ["--config", tiny_config, "--blocks", "2", "--steps", "1", "--rounds", "1",
                                      "--sample-steps", "2", "--num-samples", "1", "--no-offload",
                                      "--set", "model.init_args.network.init_args.depth=4"], capsys, monkeypatch)
    rows = rows_of(out)
    assert set(rows) == {"end-to-end", "block-wise B=2"} and rows["block-wise B=2"][-1] == "-"
    assert re.search(r"^B=2: 2 block steps / 1 end-to-end step = \d+\.\d\d;", out, re.M)


TEXT = """
model:
  class_path: dbl.training.autoregressive.{module}
  init_args:
    network:
      class_path: dbl.models.llama.Llama
      init_args: {{vocab_size: 64, hidden_size: 32, depth: 4, num_heads: 2}}
data:
  class_path: dbl.data.LM1BDataModule
  init_args: {{root: {root}, tokenizer: unused-here, seq_len: 12}}
trainer:
  accelerator: cpu
"""


def test_bench_memory_on_text_models(tmp_path, capsys, monkeypatch):
    """AR diffusion (the [noisy ; clean] 2T sequence) block-wise vs its next-token baseline (T)."""
    for module in ("ARDiffusionLMModule", "NextTokenLMModule"):
        (tmp_path / f"{module}.yaml").write_text(TEXT.format(module=module, root=tmp_path))
    ar = rows_of(run_tool("bench_memory.py", ["--config", str(tmp_path / "ARDiffusionLMModule.yaml"), "--blocks", "2",
                                              "--batch-size", "4", "--in-process"], capsys, monkeypatch)
                 .split("`dbl info` estimate")[0])
    assert float(ar["block-wise B=2"][-2]) > 1.5  # activations e2e / block-wise
    nt = rows_of(run_tool("bench_memory.py", ["--config", str(tmp_path / "NextTokenLMModule.yaml"), "--blocks",
                                              "--batch-size", "4", "--in-process"], capsys, monkeypatch)
                 .split("`dbl info` estimate")[0])
    assert set(nt) == {"end-to-end", "end-to-end + act. ckpt"}
    # the AR diffusion model runs twice the sequence, so its end-to-end activations are larger
    assert float(ar["end-to-end"][4].replace(",", "")) > float(nt["end-to-end"][4].replace(",", ""))


def test_read_scalars_compares_runs_at_layer_updates(tiny_module, image_batch, tmp_path, capsys, monkeypatch):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    data = DataLoader(TensorDataset(*image_batch), batch_size=8)
    runs = []
    for name, blocks, steps in (("blockwise", 3, 6), ("e2e", 1, 2)):  # 2 updates per layer in both
        logger = TensorBoardLogger(tmp_path, name=name)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=logger, log_every_n_steps=1, limit_val_batches=1,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(tiny_module(num_blocks=blocks, block_schedule="phased", phase_steps=2), data, data)
        runs.append(logger.log_dir)
    out = run_tool("read_scalars.py", runs, capsys, monkeypatch)
    rows = {m.group(1): m.group(2).split() for m in re.finditer(r"^(\S.*?)\s{2,}(\S.*)$", out, re.M)}
    assert rows["updates per layer"] == ["2", "2"]
    assert len(rows["val/loss"]) == 2 and rows["val_loss/block0"][1] != "-"
    assert rows["val_loss/block2"][0] != "-" and "train/loss" not in rows  # evaluation tags only
    single = run_tool("read_scalars.py", [runs[0], "--tags", "updates/block1"], capsys, monkeypatch)
    assert single.splitlines()[1].split()[:3] == ["updates/block1", "3", "2.0000"]  # step index 3: block 1's 2nd step
    with pytest.raises(SystemExit, match="no TensorBoard scalars under"):
        run_tool("read_scalars.py", [str(tmp_path / "nothing")], capsys, monkeypatch)
