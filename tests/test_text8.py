import csv
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from dbl.cli import main
from dbl.data.text8 import ALPHABET, Text8DataModule, decode, encode

WORDS = "the of and one zero in a to is as was anarchism political philosophy that advocates self governed".split()


def write_text8_zip(root: Path, num_chars: int) -> str:
    """A text8.zip in the real layout: one member ``text8``, one line of ``[a-z ]``, no trailing newline."""
    gen = torch.Generator().manual_seed(0)
    words, length = [], 0
    while length < num_chars:
        words.append(WORDS[int(torch.randint(len(WORDS), (), generator=gen))])
        length += len(words[-1]) + 1
    text = (" " + " ".join(words))[:num_chars]
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / "text8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("text8", text)
    return text


@pytest.fixture
def text8_root(tmp_path):
    root = tmp_path / "text8"
    return root, write_text8_zip(root, 20_000)


def test_encode_decode_round_trip():
    assert ALPHABET == "abcdefghijklmnopqrstuvwxyz " and len(ALPHABET) == 27
    ids = encode("hello world")
    assert ids.tolist()[:3] == [7, 4, 11] and ids[5] == 26
    assert decode(ids) == "hello world" and decode([0, 27, 26]) == "a_ "
    with pytest.raises(ValueError, match="outside text8's alphabet"):
        encode("Hello")


def test_splits_and_whole_split_evaluation(text8_root):
    root, text = text8_root
    dm = Text8DataModule(root=str(root), download=False, train_chars=17_000, val_chars=1_000, test_chars=2_000,
                         seq_len=64, batch_size=4, eval_batch_size=5)
    dm.setup("fit")
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [17_000, 1_000, 2_000]
    assert decode(dm.splits["train"][:50]) == text[:50]
    assert decode(dm.splits["test"]) == text[18_000:20_000]
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        batches = [b[0] for b in loader]
        # every character exactly once, in order; the 1,000 % 64 = 40 (2,000 % 64 = 16) left over
        # form a short last chunk, alone in the last batch
        assert decode(torch.cat([b.flatten() for b in batches])) == decode(dm.splits[split])
        assert batches[-1].shape == (1, len(dm.splits[split]) % 64)
        assert all(b.shape[1] == 64 for b in batches[:-1])
    train = next(iter(dm.train_dataloader()))[0]
    assert train.shape == (4, 64) and train.dtype == torch.long and train.max() < 27
    # random crops are real windows of the training text
    assert decode(train[0]) in text[:17_000]


def test_standard_split_is_default_and_checked(text8_root):
    root, _ = text8_root
    with pytest.raises(ValueError, match=r"need 100,000,000 characters but .* has 20,000; set data train_chars"):
        Text8DataModule(root=str(root))
    with pytest.raises(ValueError, match=r"text8.zip not found; put text8.zip \(http://mattmahoney.net/dc/text8.zip\) there"):
        Text8DataModule(root=str(root / "missing"), download=False)


def test_failed_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(url, path, reporthook=None):
        Path(path).write_bytes(b"partial")
        raise OSError("network is unreachable")

    monkeypatch.setattr("urllib.request.urlretrieve", offline)
    dm = Text8DataModule(root=str(tmp_path / "data"), download=True)
    with pytest.raises(FileNotFoundError, match=r"downloading http://mattmahoney.net/dc/text8.zip failed \(network is unreachable\); put text8.zip at"):
        dm.prepare_data()
    assert not (tmp_path / "data").exists()  # no partial file left behind, nor the folder made for it


def test_cli_round_trip(text8_root, tmp_path):
    root, _ = text8_root
    predictions = tmp_path / "predictions.txt"
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "dbl.training.MaskedDiffusionModule",
            "init_args": {
                "network": {"class_path": "dbl.models.token_dit.TokenDiT",
                            "init_args": {"seq_len": 32, "hidden_size": 32, "depth": 2, "num_heads": 2}},
                "num_blocks": 2, "eval_times": 2, "sample_steps": 8,
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
            },
        },
        "data": {
            "class_path": "dbl.data.Text8DataModule",
            "init_args": {"root": str(root), "download": False, "train_chars": 18_000, "val_chars": 1_000,
                          "test_chars": 1_000, "seq_len": 32, "batch_size": 8, "num_predict": 5, "predict_batch_size": 3},
        },
        "trainer": {
            "accelerator": "cpu", "max_steps": 6, "val_check_interval": 3, "check_val_every_n_epoch": None,
            "limit_val_batches": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}},
            "callbacks": [
                {"class_path": "dbl.callbacks.MaskedTextSamples", "init_args": {"every_n_steps": 3, "num_samples": 2}},
                {"class_path": "dbl.callbacks.MaskedTextPredictionWriter", "init_args": {"path": str(predictions)}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
            ],
        },
    }
    cfg = tmp_path / "text8.yaml"
    cfg.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(cfg)])
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.exists()
    assert sorted(p.name for p in (tmp_path / "logs").rglob("step_*.txt")) == ["step_0000003.txt", "step_0000006.txt"]

    main(["test", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    rows = [r for f in (tmp_path / "logs").rglob("metrics.csv") for r in csv.DictReader(f.open()) if r.get("test/bpc")]
    assert len(rows) == 1
    bpc = float(rows[0]["test/bpc"])
    assert 0 < bpc < 6  # finite, and not absurd for 27 symbols (uniform = 4.75)

    main(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    lines = predictions.read_text().split("\n")
    assert lines[-1] == "" and len(lines[:-1]) == 5
    assert all(len(line) == 32 and set(line) <= set(ALPHABET) for line in lines[:-1])


def test_download_lands_atomically(tmp_path, monkeypatch):
    from dbl.data.download import download

    def fetch(url, path, reporthook=None):
        Path(path).write_bytes(b"x" * 10)
        reporthook(1, 10, 10)
        assert not (tmp_path / "d" / "file.zip").exists()  # only the .part file while downloading

    monkeypatch.setattr("urllib.request.urlretrieve", fetch)
    download("http://example.invalid/file.zip", tmp_path / "d" / "file.zip")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["file.zip"]


def test_a_corrupt_download_is_not_kept(tmp_path, monkeypatch):
    """A download that arrives whole by size but is no intact text8.zip: refused, nothing left; a good one lands."""
    good_root = tmp_path / "good"
    write_text8_zip(good_root, 1_000)
    good = (good_root / "text8.zip").read_bytes()
    payload = {"bytes": good[:-30]}  # the zip's directory cut off

    def fetch(url, path, reporthook=None):
        Path(path).write_bytes(payload["bytes"])

    monkeypatch.setattr("urllib.request.urlretrieve", fetch)
    dm = Text8DataModule(root=str(tmp_path / "data"), download=True, train_chars=800, val_chars=100, test_chars=100, seq_len=10)
    with pytest.raises(FileNotFoundError, match=r"downloading http://mattmahoney.net/dc/text8.zip failed \(not a valid zip: File is not a zip file\); put text8.zip at"):
        dm.prepare_data()
    assert not (tmp_path / "data").exists()
    payload["bytes"] = good
    dm.prepare_data()
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["text8.zip"]
    assert (tmp_path / "data" / "text8.zip").read_bytes() == good
