"""Every bad input is one line: exit status 2, one ``dbl: ...`` line on stderr that names the option
or file, no traceback, and nothing written or deleted in the run folder (no log version folder, no
checkpoint, no half-unpacked cache).

Table-driven: each case is a small run (tiny models, tiny fake data files written here) with one
thing wrong: an option out of range, data that does not fit the model, or a corrupted file. The CLI
runs in-process. Nothing touches the network (every data module runs with ``download: false``).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dbl.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINER = {
    "accelerator": "cpu", "devices": 1, "max_steps": 2, "val_check_interval": 2, "check_val_every_n_epoch": None,
    "limit_val_batches": 1, "enable_progress_bar": False, "enable_model_summary": False,
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "lightning_logs", "name": "run", "default_hp_metric": False}},
    "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True, "every_n_train_steps": 1}},
        {"class_path": "dbl.callbacks.OnExceptionCheckpoint", "init_args": {"dirpath": "checkpoints"}},
    ],
}
OPTIMIZER = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001, "weight_decay": 0.0}}
SCHEDULER = {"class_path": "torch.optim.lr_scheduler.LinearLR", "init_args": {"start_factor": 0.1, "total_iters": 10}}


def dit(**kw) -> dict:
    args = dict(input_size=8, in_channels=1, patch_size=2, hidden_size=16, depth=2, num_heads=1, num_classes=10)
    return {"class_path": "dbl.models.DiT", "init_args": {**args, **kw}}


def image_model(network: dict) -> dict:
    return {"class_path": "dbl.ImageDiffusionModule",
            "init_args": {"network": network, "num_blocks": 2, "sample_steps": 2, "optimizer": OPTIMIZER,
                          "lr_scheduler": SCHEDULER}}


# -- tiny data in the real on-disk formats -------------------------------------------------------------

TEXT = "the of and one zero in a to is as was anarchism political philosophy that advocates self governed"


def write_text8(root: Path) -> None:
    root.mkdir(parents=True)
    words = TEXT.split()
    text = (" " + " ".join(words[i % len(words)] for i in range(400)))[:2000]
    with zipfile.ZipFile(root / "text8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("text8", text)


LM1B_TOP = "1-billion-word-language-modeling-benchmark-r13output"
SENTENCES = ["the market rose on monday , analysts said .", "officials expect the vote before friday .",
             "the company said profits fell in the third quarter .", "the team won its third game in a row ."]


def write_lm1b(root: Path) -> None:
    root.mkdir(parents=True)
    members = {
        f"{LM1B_TOP}/training-monolingual.tokenized.shuffled/news.en-00001-of-00100": "\n".join(SENTENCES * 8) + "\n",
        f"{LM1B_TOP}/heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050": "\n".join(SENTENCES * 4) + "\n",
    }
    with tarfile.open(root / f"{LM1B_TOP}.tar.gz", "w:gz") as tar:
        for name, text in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    words = sorted({w for s in SENTENCES for w in s.split()})
    (root.parent / "vocab").mkdir()
    (root.parent / "vocab" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")


def write_fashion_mnist(raw: Path) -> None:
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 5)):
        with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + rng.integers(1, 256, (n, 28, 28), dtype=np.uint8).tobytes())
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())


def write_cifar10(root: Path) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = 10
        batch = {"batch_label": name, "labels": rng.integers(0, 10, n).tolist(),
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}, protocol=2))


def write_image_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(4):
            cls = ("cat", "dog")[i % 2]
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def write_latents(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        folder = root / split
        folder.mkdir(parents=True)
        # each latent with its mirror image's (views 2), as tools/encode_latents.py writes them with flips
        np.save(folder / "latents_00000.npy", rng.standard_normal((4, 2, 4, 2, 2)).astype(np.float16))
        np.save(folder / "labels_00000.npy", np.array([0, 1, 0, 1], dtype=np.int64))
        meta = {"format": "dbl-latents-v1", "vae": "none", "scale_factor": 0.5, "image_size": 16, "latent_shape": [4, 2, 2],
                "views": 2, "num_images": 4, "classes": ["cat", "dog"],
                "shards": [{"latents": "latents_00000.npy", "labels": "labels_00000.npy", "count": 4}]}
        (folder / "meta.json").write_text(json.dumps(meta))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garble(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes())


# -- the runs: a base experiment per kind of data -------------------------------------------------------


def base_config(kind: str, tmp: Path) -> dict:
    """The experiment (with its data written under ``tmp``) that trains fine as it is."""
    if kind == "digits":
        model, data = image_model(dit()), {"class_path": "dbl.data.DigitsDataModule", "init_args": {"batch_size": 16}}
    elif kind == "text8":
        write_text8(tmp / "text8")
        model = {"class_path": "dbl.training.MaskedDiffusionModule", "init_args": {
            "network": {"class_path": "dbl.models.token_dit.TokenDiT",
                        "init_args": {"seq_len": 32, "hidden_size": 16, "depth": 2, "num_heads": 1}},
            "num_blocks": 2, "eval_times": 1, "sample_steps": 2, "optimizer": OPTIMIZER}}
        data = {"class_path": "dbl.data.Text8DataModule", "init_args": {
            "root": str(tmp / "text8"), "download": False, "train_chars": 1800, "val_chars": 100, "test_chars": 100,
            "seq_len": 32, "batch_size": 4}}
    elif kind == "lm1b":
        write_lm1b(tmp / "lm1b")
        model = {"class_path": "dbl.training.autoregressive.NextTokenLMModule", "init_args": {
            "network": {"class_path": "dbl.models.llama.Llama",
                        "init_args": {"vocab_size": 64, "hidden_size": 16, "depth": 2, "num_heads": 2}},
            "generate_tokens": 2, "optimizer": OPTIMIZER}}
        data = {"class_path": "dbl.data.LM1BDataModule", "init_args": {
            "root": str(tmp / "lm1b"), "download": False, "tokenizer": str(tmp / "vocab"), "seq_len": 16,
            "batch_size": 4, "val_sentences": 4}}
    elif kind == "fashion_mnist":
        write_fashion_mnist(tmp / "fm" / "FashionMNIST" / "raw")
        model = image_model(dit(input_size=32))
        data = {"class_path": "dbl.data.FashionMNISTDataModule", "init_args": {"root": str(tmp / "fm"), "batch_size": 4}}
    elif kind == "cifar10":
        write_cifar10(tmp / "cifar")
        model = image_model(dit(input_size=32, in_channels=3, patch_size=8))
        data = {"class_path": "dbl.data.CIFAR10DataModule", "init_args": {
            "root": str(tmp / "cifar"), "download": False, "verify_checksums": False, "batch_size": 4, "num_workers": 0}}
    elif kind == "imagefolder":
        write_image_tree(tmp / "img")
        model = image_model(dit(input_size=16, in_channels=3, patch_size=4, num_classes=2))
        data = {"class_path": "dbl.data.ImageNetDataModule", "init_args": {
            "root": str(tmp / "img"), "image_size": 16, "batch_size": 2, "num_workers": 0}}
    elif kind == "latents":
        write_latents(tmp / "lat")
        model = image_model(dit(input_size=2, in_channels=4, patch_size=1, num_classes=2))
        data = {"class_path": "dbl.data.ImageNetDataModule", "init_args": {
            "latents": str(tmp / "lat"), "batch_size": 2, "num_workers": 0}}
    else:
        raise AssertionError(kind)
    return {"seed_everything": 0, "model": model, "data": data, "trainer": TRAINER}


def prepare_lm1b(tmp: Path) -> None:
    """Unpack and tokenise once, as an earlier run would have: the bad-input runs then find the cache."""
    from dbl.data.lm1b import LM1BDataModule

    LM1BDataModule(root=str(tmp / "lm1b"), download=False, tokenizer=str(tmp / "vocab"), seq_len=16, batch_size=4,
                   val_sentences=4).prepare_data()


def prepare_fashion_mnist(tmp: Path) -> None:
    """Unpack the .gz files into the cache once, as an earlier run would have."""
    from dbl.data import FashionMNISTDataModule

    FashionMNISTDataModule(root=str(tmp / "fm")).prepare_data()


PREPARE = {"lm1b": prepare_lm1b, "fashion_mnist": prepare_fashion_mnist}


@dataclass
class Case:
    id: str
    kind: str  # which base experiment
    args: list[str] = field(default_factory=list)  # command-line overrides (after "fit --config run.yaml")
    named: str = ""  # what the line must name ("{tmp}" is the run folder)
    corrupt: object = None  # (tmp) -> None: breaks a data file after the base experiment is written
    config: object = None  # (config dict, tmp) -> None: edits the YAML
    yaml_text: str | None = None  # the YAML file's text instead of the base experiment
    subcommand: str = "fit"
    prepared: bool = True  # LM1B, Fashion-MNIST: unpacked (tokenised) before the run; False: the run meets the archive first
    during_run: bool = False  # found only when the loader reaches the item: logs may exist, no checkpoint may


M = "--model.init_args."
NET = "--model.init_args.network.init_args."
D = "--data.init_args."

CASES = [
    # -- options out of range, checked where they are declared ----------------------------------------
    Case("lr_negative", "digits", [M + "optimizer.init_args.lr", "-0.1"], "lr"),
    Case("weight_decay_negative", "digits", [M + "optimizer.init_args.weight_decay", "-1"], "weight_decay"),
    Case("lr_not_a_number", "digits", [M + "optimizer.init_args.lr", "fast"], "lr"),
    Case("scheduler_start_factor_0", "digits", [M + "lr_scheduler.init_args.start_factor", "0"], "lr_scheduler"),
    Case("sample_steps_0", "digits", [M + "sample_steps", "0"], "sample_steps"),
    Case("overlap_1.5", "digits", [M + "overlap", "1.5"], "overlap"),
    Case("overlap_negative", "digits", [M + "overlap", "-0.1"], "overlap"),
    Case("num_blocks_0", "digits", [M + "num_blocks", "0"], "num_blocks"),
    Case("num_blocks_deeper_than_network", "digits", [M + "num_blocks", "3"], "num_blocks"),
    Case("layers_per_block_wrong_sum", "digits", [M + "layers_per_block", "[1, 2]"], "layers_per_block"),
    Case("train_blocks_out_of_range", "digits", [M + "train_blocks", "[5]"], "train_blocks"),
    Case("phase_steps_0", "digits", [M + "block_schedule", "phased", M + "phase_steps", "0"], "phase_steps"),
    Case("gradient_clip_val_0", "digits", [M + "gradient_clip_val", "0"], "gradient_clip_val"),
    Case("partition_unknown", "digits", [M + "partition", "bogus"], "partition"),
    Case("sample_solver_unknown", "digits", [M + "sample_solver", "rk99"], "sample_solver"),
    Case("sigma_min_above_max", "digits", [M + "sigma_min", "100"], "sigma_min"),
    Case("heads_do_not_divide_hidden", "digits", [NET + "num_heads", "3"], "num_heads"),
    Case("patch_does_not_divide_input", "digits", [NET + "patch_size", "3"], "patch_size"),
    Case("batch_size_0", "digits", [D + "batch_size", "0"], "batch_size"),
    Case("val_fraction_1.5", "digits", [D + "val_fraction", "1.5"], "val_fraction"),
    Case("val_check_interval_0", "digits", ["--trainer.val_check_interval", "0"], "val_check_interval"),
    Case("max_steps_minus_5", "digits", ["--trainer.max_steps", "-5"], "max_steps"),
    Case("devices_0", "digits", ["--trainer.devices", "0"], "devices"),
    Case("precision_unknown", "digits", ["--trainer.precision", "13"], "precision"),
    Case("unknown_option", "digits", [M + "num_blockz", "2"], "num_blockz"),
    Case("ema_decay_1.5", "digits", ["--trainer.callbacks+=dbl.callbacks.EMA", "--trainer.callbacks.decay", "1.5"], "decay"),
    Case("text8_eval_times_0", "text8", [M + "eval_times", "0"], "t per sequence"),
    Case("text8_batch_size_0", "text8", [D + "batch_size", "0"], "batch_size"),
    Case("text8_splits_longer_than_file", "text8", [D + "train_chars", "5000"], "train_chars"),
    Case("lm1b_seq_len_1", "lm1b", [D + "seq_len", "1"], "seq_len"),
    Case("lm1b_temperature_negative", "lm1b", [M + "temperature", "-1"], "temperature"),
    # -- data that does not fit the model: checked at setup, before step 0 ----------------------------
    Case("num_classes_fewer_than_labels", "digits", [NET + "num_classes", "5"], "num_classes"),
    Case("in_channels_mismatch", "digits", [NET + "in_channels", "3"], "in_channels"),
    Case("input_size_mismatch", "digits", [NET + "input_size", "16"], "input_size"),
    Case("cifar_in_channels_mismatch", "cifar10", [NET + "in_channels", "1"], "in_channels"),
    Case("fashion_image_size_vs_input_size", "fashion_mnist", [D + "image_size", "28"], "input_size"),
    Case("imagefolder_num_classes", "imagefolder", [NET + "num_classes", "1"], "num_classes"),
    Case("imagefolder_image_size_mismatch", "imagefolder", [D + "image_size", "32"], "input_size"),
    Case("latents_channels_mismatch", "latents", [NET + "in_channels", "3"], "in_channels"),
    Case("text8_seq_len_longer_than_model", "text8", [D + "seq_len", "64"], "seq_len"),
    Case("text8_vocab_mismatch", "text8", [NET + "vocab_size", "30"], "vocab_size"),
    Case("lm1b_vocab_smaller_than_tokenizer", "lm1b", [NET + "vocab_size", "8"], "vocab_size"),
    # -- corrupted files ----------------------------------------------------------------------------------
    Case("text8_truncated_zip", "text8", named="{tmp}/text8/text8.zip", corrupt=lambda t: truncate(t / "text8" / "text8.zip")),
    Case("text8_random_bytes_zip", "text8", named="{tmp}/text8/text8.zip", corrupt=lambda t: garble(t / "text8" / "text8.zip")),
    Case("text8_bad_characters", "text8", named="{tmp}/text8/text8.zip",
         corrupt=lambda t: zipfile.ZipFile(t / "text8" / "text8.zip", "w").writestr("text8", "Hello World! " * 200)),
    Case("lm1b_truncated_tar", "lm1b", named="{tmp}/lm1b/" + LM1B_TOP + ".tar.gz",
         corrupt=lambda t: truncate(t / "lm1b" / f"{LM1B_TOP}.tar.gz", 0.6), prepared=False),
    Case("lm1b_random_bytes_tar", "lm1b", named="{tmp}/lm1b/" + LM1B_TOP + ".tar.gz",
         corrupt=lambda t: garble(t / "lm1b" / f"{LM1B_TOP}.tar.gz"), prepared=False),
    Case("fashion_mnist_truncated_gz", "fashion_mnist", named="train-images-idx3-ubyte.gz",
         corrupt=lambda t: truncate(t / "fm" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz"), prepared=False),
    Case("fashion_mnist_not_gzip", "fashion_mnist", named="t10k-labels-idx1-ubyte.gz",
         corrupt=lambda t: garble(t / "fm" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"), prepared=False),
    Case("cifar_corrupt_pickle", "cifar10", named="data_batch_3",
         corrupt=lambda t: garble(t / "cifar" / "cifar-10-batches-py" / "data_batch_3")),
    Case("cifar_truncated_pickle", "cifar10", named="test_batch",
         corrupt=lambda t: truncate(t / "cifar" / "cifar-10-batches-py" / "test_batch")),
    Case("imagefolder_non_image", "imagefolder", named="{tmp}/img/train/cat/0.png",
         corrupt=lambda t: (t / "img" / "train" / "cat" / "0.png").write_text("not an image\n")),
    Case("imagefolder_truncated_image", "imagefolder", named="{tmp}/img/val/cat/2.png",
         corrupt=lambda t: truncate(t / "img" / "val" / "cat" / "2.png", 0.3), during_run=True),
    Case("imagefolder_truncated_image_in_worker", "imagefolder", [D + "num_workers", "1"], "{tmp}/img/val/cat/0.png",
         corrupt=lambda t: truncate(t / "img" / "val" / "cat" / "0.png", 0.3), during_run=True),
    Case("latents_meta_not_json", "latents", named="{tmp}/lat/train/meta.json",
         corrupt=lambda t: (t / "lat" / "train" / "meta.json").write_text('{"format": "dbl-latents-v1", ')),
    Case("latents_meta_missing_shards", "latents", named="{tmp}/lat/train/meta.json",
         corrupt=lambda t: (t / "lat" / "train" / "meta.json").write_text('{"format": "dbl-latents-v1"}')),
    Case("latents_truncated_shard", "latents", named="{tmp}/lat/train/latents_00000.npy",
         corrupt=lambda t: truncate(t / "lat" / "train" / "latents_00000.npy")),
    Case("latents_missing_shard", "latents", named="{tmp}/lat/train/labels_00000.npy",
         corrupt=lambda t: (t / "lat" / "train" / "labels_00000.npy").unlink()),
    Case("ckpt_truncated", "digits", ["--ckpt_path", "{tmp}/old.ckpt"], "{tmp}/old.ckpt",
         corrupt=lambda t: (t / "old.ckpt").write_bytes(zip_bytes()[:300])),
    Case("ckpt_random_bytes", "digits", ["--ckpt_path", "{tmp}/old.ckpt"], "{tmp}/old.ckpt",
         corrupt=lambda t: garble(t / "old.ckpt")),
    Case("ckpt_truncated_validate", "digits", ["--ckpt_path", "{tmp}/old.ckpt"], "{tmp}/old.ckpt",
         corrupt=lambda t: (t / "old.ckpt").write_bytes(zip_bytes()[:300]), subcommand="validate"),
    # -- the configuration file itself --------------------------------------------------------------------
    Case("yaml_syntax_error", "digits", named="{tmp}/run.yaml:4",
         yaml_text="model:\n  class_path: dbl.ImageDiffusionModule\n  init_args:\n    num_blocks: [2\ntrainer: {}\n"),
    Case("yaml_tab_indent", "digits", named="{tmp}/run.yaml:3", yaml_text="model:\n  init_args:\n\tnum_blocks: 2\n"),
    Case("config_missing", "digits", ["--config", "{tmp}/nowhere.yaml"], "nowhere.yaml"),
]


def zip_bytes() -> bytes:
    """A real checkpoint-shaped file (torch's zip format), to be cut short."""
    import torch

    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(100)}}, buffer)
    return buffer.getvalue()


def snapshot(folder: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            stat = path.lstat()
            out[str(path.relative_to(folder))] = (path.is_dir(), stat.st_size, stat.st_mtime_ns)
    return out


def run_case(case: Case, tmp: Path, capsys) -> tuple[object, str]:
    """Write the case's experiment under ``tmp``, run it; returns (exit code, stderr)."""
    config = base_config(case.kind, tmp)
    if case.prepared and case.kind in PREPARE:
        PREPARE[case.kind](tmp)
    if case.config:
        case.config(config, tmp)
    (tmp / "run.yaml").write_text(case.yaml_text if case.yaml_text is not None else yaml.safe_dump(config))
    if case.corrupt:
        case.corrupt(tmp)
    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    capsys.readouterr()
    code = "no exit"
    try:
        main([case.subcommand, "--config", str(tmp / "run.yaml"), *args])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("Seed set")]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dbl"])
    monkeypatch.setenv("DBL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before: dict = {}

    def corrupt_then_snapshot(tmp):
        if case.corrupt:
            case.corrupt(tmp)
        before.update(snapshot(tmp))

    code, stderr = run_case(Case(**{**case.__dict__, "corrupt": corrupt_then_snapshot}), tmp_path, capsys)
    after = snapshot(tmp_path)
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert code == 2, f"exit {code!r}, stderr: {stderr}"
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dbl: ")
    assert case.named.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]
    written = sorted(set(after) - set(before))
    if case.during_run:  # the logger's folder exists by then; a checkpoint at step 0 must not
        written = [w for w in written if w.endswith(".ckpt")]
    deleted = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if not before[k][0] and before[k] != after[k])
    assert (written, deleted, changed) == ([], [], []), lines[0]


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
