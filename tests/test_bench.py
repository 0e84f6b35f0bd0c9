"""The benchmark scripts run and their numbers hang together (no timing assertions)."""

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


def test_bench_memory(tiny_config, capsys, monkeypatch):
    out = run_tool("bench_memory.py", ["--config", tiny_config, "--blocks", "3", "--batch-size", "16"], capsys, monkeypatch)
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
                                      "--num-samples", "2", "--phase-steps", "2"], capsys, monkeypatch)
    rows = rows_of(out)
    assert set(rows) == {"end-to-end", "block-wise B=3", "block-wise B=3 + offload, new block every step"}
    assert rows["block-wise B=3"][-1].endswith("%")
