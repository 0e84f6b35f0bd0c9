"""`dbl fit` then `dbl test` on a tiny DiT and a Fashion-MNIST fixture: test reports FID."""

import json
import math

import tiny_features  # noqa: F401 - registers the tiny extractor with torch-fidelity
from test_image_data import write_idx_gz

from dbl.cli import main

CONFIG = """
seed_everything: 0
model:
  class_path: dbl.ImageDiffusionModule
  init_args:
    network:
      class_path: dbl.models.DiT
      init_args: {{input_size: 32, in_channels: 1, patch_size: 8, hidden_size: 16, depth: 3, num_heads: 1, num_classes: 10}}
    num_blocks: 3
    sample_steps: 2
data:
  class_path: dbl.data.FashionMNISTDataModule
  init_args: {{root: {root}, cache_dir: {cache}, batch_size: 4, eval_batch_size: 4, val_fraction: 0.25}}
trainer:
  accelerator: cpu
  max_steps: 3
  limit_val_batches: 1
  val_check_interval: 3
  check_val_every_n_epoch: null
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {out}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {out}, name: run}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true}}
    - class_path: dbl.callbacks.FID
      init_args:
        num_samples: 6
        batch_size: 3
        every_n_epochs: 1
        seeds: [0, 1]
        reference_splits: [train, test]
        feature_extractor: {tiny}
        feature_layer: "8"
        save_samples: png
"""


def test_fit_then_test_reports_fid(tmp_path, capsys):
    write_idx_gz(tmp_path / "fm" / "FashionMNIST" / "raw")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.format(root=tmp_path / "fm", cache=tmp_path / "cache", out=tmp_path / "out",
                                 tiny=tiny_features.TINY))
    main(["fit", "--config", str(cfg)])
    ckpt = tmp_path / "out" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    during_fit = json.loads((tmp_path / "out" / "run" / "version_0" / "fid_val_step3.json").read_text())
    assert during_fit["stage"] == "val" and math.isfinite(during_fit["metrics"]["fid/test"])  # every_n_epochs
    capsys.readouterr()
    main(["test", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    printed = capsys.readouterr().out
    assert "fid/test" in printed and "fid/train" in printed
    results = json.loads((tmp_path / "out" / "run" / "version_1" / "fid_test_step3.json").read_text())
    assert results["num_samples"] == 6 and results["trained_steps"] == 3
    assert results["reference_sizes"] == {"train": 12, "test": 5}
    per_seed = [results["per_seed"][s]["fid/test"] for s in ("0", "1")]
    assert results["metrics"]["fid/test"] == min(per_seed) and all(math.isfinite(v) and v > 0 for v in per_seed)
    pngs = sorted((tmp_path / "out" / "run" / "version_1" / "fid_samples" / "seed1").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)]
    assert list((tmp_path / "cache").glob("fid_stats_test_*.npz"))  # reference statistics cached next to the data
