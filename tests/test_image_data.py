import gzip
import pickle
import stat
import struct
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from dbl.data import CIFAR10DataModule, FashionMNISTDataModule, ImageNetDataModule, LatentShardDataset, MissingDataError
from dbl.data.cifar10 import _CIFAR10
from dbl.data.fashion_mnist import RAW_FILES
from dbl.data.imagenet import CenterCroppedImageFolder, center_crop_arr
from dbl.data.images import pick_view_at_random
from dbl.data.latents import encode_split
from dbl.errors import UsageError

# -- CIFAR-10: the "python version" pickles -----------------------------------------------------


def write_cifar10(root, n_train_per_batch=3, n_test=10):
    """Batches as the official release stores them: dict with data uint8 [n, 3072] (R, G, B planes
    of 32x32, row-major) and labels; batches.meta with label_names."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for name in names:
        n = n_test if name == "test_batch" else n_train_per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]}, f, protocol=2)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
                     "num_cases_per_batch": n_train_per_batch, "num_vis": 3072}, f, protocol=2)
    return written


def test_cifar10_reads_python_batches(tmp_path):
    written = write_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, verify_checksums=False, batch_size=4,
                           eval_batch_size=2, random_flip=False, val_fraction=0.2, num_workers=0)
    dm.setup("fit")
    train = dm.train_dataloader().dataset
    assert len(train) == 12  # 15 training images, 3 held out for validation
    x, y = train[0]
    data, labels = written["data_batch_1"]
    expected = torch.from_numpy(data[0].reshape(3, 32, 32)).float() / 127.5 - 1  # channel planes
    assert x.shape == (3, 32, 32) and torch.equal(x, expected) and y == labels[0]
    assert [len(b[0]) for b in dm.train_dataloader()] == [4, 4, 4]  # drop_last for training
    assert [len(b[0]) for b in dm.test_dataloader()] == [2, 2, 2, 2, 2]  # never for evaluation
    # validation: training images 3, 4 and 14 (seed 0), never the test split, never in training
    all_train = torch.cat([torch.from_numpy(written[f"data_batch_{i}"][0]) for i in range(1, 6)]).view(-1, 3, 32, 32)
    val = torch.cat([b[0] for b in dm.val_dataloader()])
    assert [len(b[0]) for b in dm.val_dataloader()] == [2, 1]
    assert torch.equal(val, all_train[[3, 4, 14]].float() / 127.5 - 1)
    assert torch.equal(dm.train_dataloader().dataset.images, all_train[[0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13]])
    assert torch.equal(dm.fid_reference("train").dataset.images, all_train)  # FID: the whole official split
    again = CIFAR10DataModule(root=str(tmp_path), download=False, verify_checksums=False, val_fraction=0.2, seed=1)
    again.setup("fit")
    assert again.split_indices()[1].tolist() == [4, 5, 10]  # another seed, another split
    with pytest.raises(UsageError, match="val_fraction 0.02 of 15 training images leaves 0 for validation"):
        CIFAR10DataModule(root=str(tmp_path), download=False, verify_checksums=False).val_dataloader()
    with pytest.raises(UsageError, match=r"val_fraction must be in \(0, 1\)"):
        CIFAR10DataModule(root=str(tmp_path), val_fraction=1.0)
    ref = dm.fid_reference("test")
    assert ref.dataset[3].dtype == torch.uint8 and torch.equal(ref.dataset[3].flatten(), torch.from_numpy(written["test_batch"][0][3]))
    with pytest.raises(MissingDataError, match="verify_checksums"):  # fixtures are not the official files
        CIFAR10DataModule(root=str(tmp_path), download=False, batch_size=4, num_workers=0).setup("fit")


def test_random_flip_mirrors_training_batches_only_in_the_training_process(tmp_path):
    """Flips are drawn once per step from the training process's random stream, after the batch
    reached the device (so that a resumed run draws the same ones); the loaders never flip nor draw."""
    from types import SimpleNamespace

    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, verify_checksums=False, batch_size=4, num_workers=0,
                           val_fraction=0.2)
    dm.setup("fit")
    train = dm.train_dataloader().dataset
    plain = dm._images["train"][dm.split_indices()[0]][:6].float() / 127.5 - 1
    state = torch.get_rng_state()
    assert all(torch.equal(train[i][0], plain[i]) for i in range(6)) and torch.equal(torch.get_rng_state(), state)

    labels = torch.arange(6)
    dm.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)  # torch.rand(6) < 0.5 under seed 0: [True, False, True, True, True, False]
    flipped, same_labels = dm.on_after_batch_transfer((plain, labels), 0)
    expected = torch.stack([plain[0].flip(-1), plain[1], plain[2].flip(-1), plain[3].flip(-1), plain[4].flip(-1), plain[5]])
    assert torch.equal(flipped, expected) and torch.equal(same_labels, labels)
    dm.trainer = SimpleNamespace(training=False)  # validation, test, predict: never flipped
    assert dm.on_after_batch_transfer((plain, labels), 0)[0] is plain


def test_cifar10_missing_offline_is_one_line_error(tmp_path, monkeypatch):
    with pytest.raises(MissingDataError) as err:
        CIFAR10DataModule(root=str(tmp_path / "none"), download=False).prepare_data()
    assert "\n" not in str(err.value) and "cifar-10-batches-py" in str(err.value)

    def offline(self):
        raise URLError("no network")

    monkeypatch.setattr(_CIFAR10, "download", offline)
    dm = CIFAR10DataModule(root=str(tmp_path / "none"), download=True)
    with pytest.raises(MissingDataError, match=r"download failed.*put the python version there") as err:
        dm.prepare_data()
    assert "\n" not in str(err.value)


def test_cli_reports_missing_data_in_one_line(tmp_path, capsys):
    from dbl.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model:
  class_path: dbl.ImageDiffusionModule
  init_args:
    network: {{class_path: dbl.models.DiT, init_args: {{input_size: 8, in_channels: 3, patch_size: 4, hidden_size: 16, depth: 1, num_heads: 1}}}}
    num_blocks: 1
data:
  class_path: dbl.data.CIFAR10DataModule
  init_args: {{root: {tmp_path / 'nowhere'}, download: false}}
""")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(cfg)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CIFAR-10 not found" in err[0]


# -- Fashion-MNIST: idx files, gzipped, in a read-only folder -------------------------------------


def write_idx_gz(raw, n_train=12, n_test=5):
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(1, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
        out[prefix] = (images, labels)
    return out


def read_only(path):
    for p in [*path.rglob("*"), path]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_fashion_mnist_unpacks_read_only_gz_into_cache(tmp_path, monkeypatch):
    root = tmp_path / "shared" / "fashion-mnist"
    written = write_idx_gz(root / "FashionMNIST" / "raw")
    read_only(root)
    before = sorted(p.name for p in root.rglob("*"))
    monkeypatch.setenv("DBL_CACHE", str(tmp_path / "cache"))
    dm = FashionMNISTDataModule(root=str(root), batch_size=4, eval_batch_size=2, random_flip=False, val_fraction=0.25)
    assert dm.cache_dir == tmp_path / "cache" / "fashion-mnist"
    dm.setup("fit")
    assert sorted(p.name for p in root.rglob("*")) == before  # nothing written next to the read-only data
    (unpacked,) = (dm.cache_dir / "unpacked").iterdir()  # keyed by the .gz files' content
    assert sorted(p.name for p in (unpacked / "FashionMNIST" / "raw").iterdir()) == sorted(RAW_FILES)
    x, y = dm.train_dataloader().dataset[0]  # training image 1 (images 0, 5 and 8 are validation's)
    assert x.shape == (1, 32, 32) and y == written["train"][1][1]
    assert torch.all(x[:, :2] == -1) and torch.all(x[:, :, -2:] == -1)  # black 2-pixel border
    assert torch.equal(x[0, 2:30, 2:30], torch.from_numpy(written["train"][0][1]).float() / 127.5 - 1)
    assert [len(b[0]) for b in dm.test_dataloader()] == [2, 2, 1]
    assert torch.cat([b[1] for b in dm.val_dataloader()]).tolist() == written["train"][1][[0, 5, 8]].tolist()
    rgb = FashionMNISTDataModule(root=str(root), channels=3, image_size=28)
    rgb.setup("test")
    assert rgb.fid_reference("test").dataset[0].shape == (3, 28, 28)


def test_fashion_mnist_damaged_gz_never_reaches_the_cache(tmp_path):
    """A .gz holding half its payload, and a truncated .gz: one-line errors naming the file, nothing
    left in the cache; once the .gz is fixed, it is unpacked afresh (the cache is keyed by content)."""
    root, cache = tmp_path / "fm", tmp_path / "cache"
    raw = root / "FashionMNIST" / "raw"
    written = write_idx_gz(raw, n_train=4, n_test=2)
    images = raw / "train-images-idx3-ubyte.gz"
    good = images.read_bytes()
    with gzip.open(images, "wb") as f:  # a whole gzip stream, but only 2 of the 4 images its header announces
        f.write(struct.pack(">IIII", 2051, 4, 28, 28) + written["train"][0][:2].tobytes())
    dm = FashionMNISTDataModule(root=str(root), cache_dir=str(cache), val_fraction=0.25)
    with pytest.raises(MissingDataError) as err:
        dm.prepare_data()
    assert str(err.value) == (f"{images} is damaged (ValueError: holds 1,584 bytes, but its header [4, 28, 28] needs "
                              f"3,152); replace it with the original Fashion-MNIST file")
    assert not (cache / "unpacked").exists()  # not even the folder made for it
    images.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(MissingDataError, match=f"{images} is damaged \\(EOFError"):
        FashionMNISTDataModule(root=str(root), cache_dir=str(cache)).prepare_data()
    assert not (cache / "unpacked").exists()  # not even the folder made for it
    images.write_bytes(good)  # fixed
    fixed = FashionMNISTDataModule(root=str(root), cache_dir=str(cache), val_fraction=0.25, batch_size=3)
    fixed.setup("fit")
    assert torch.equal(fixed._images["train"][:, 0, 2:30, 2:30], torch.from_numpy(written["train"][0]))
    assert len(list((cache / "unpacked").iterdir())) == 1
    with gzip.open(images, "wb") as f:  # replaced by other (valid) images: read afresh, not from the cache
        f.write(struct.pack(">IIII", 2051, 4, 28, 28) + (255 - written["train"][0]).tobytes())
    replaced = FashionMNISTDataModule(root=str(root), cache_dir=str(cache), val_fraction=0.25)
    replaced.setup("fit")
    assert torch.equal(replaced._images["train"][:, 0, 2:30, 2:30], torch.from_numpy(255 - written["train"][0]))
    assert len(list((cache / "unpacked").iterdir())) == 2


def test_fashion_mnist_missing_is_one_line_error(tmp_path):
    with pytest.raises(MissingDataError, match="Fashion-MNIST not found") as err:
        FashionMNISTDataModule(root=str(tmp_path), cache_dir=str(tmp_path / "c")).prepare_data()
    assert "\n" not in str(err.value)


# -- ImageNet: an ImageFolder tree and latent shards -------------------------------------------------


def write_image_tree(root):
    rng = np.random.default_rng(0)
    sizes = {"train": [(40, 30), (64, 64), (30, 50)], "val": [(33, 33), (50, 20)]}
    for split, dims in sizes.items():
        for i, (w, h) in enumerate(dims):
            cls = ["cat", "dog"][i % 2]
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def test_center_crop_keeps_the_middle():
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, 20:40] = 255  # white middle third of a wide image
    out = np.array(center_crop_arr(Image.fromarray(arr), 10))
    assert out.shape == (10, 10, 3) and out.min() > 200  # the crop is the white middle


def test_imagenet_image_folder(tmp_path):
    write_image_tree(tmp_path)
    dm = ImageNetDataModule(root=str(tmp_path), image_size=16, batch_size=2, num_workers=0)
    train = dm.train_dataloader().dataset
    assert len(train) == 3
    x, y = train[2]  # ImageFolder order: cat/0, cat/2, dog/1
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1 and y == 1
    assert [len(b[0]) for b in dm.test_dataloader()] == [2]
    ref = dm.fid_reference("test")  # test = val
    assert ref.description["split"] == "val" and len(ref.dataset) == 2 and ref.dataset[0].dtype == torch.uint8
    assert torch.all(dm.decode_samples(x[None]) == x[None])  # pixels pass through


class FakePosterior:
    def __init__(self, mean):
        self.mean = mean

    def sample(self, generator=None):
        return self.mean


class FakeVAE:
    """A VAE-shaped object: 8x down-sampling by average pooling to 4 channels, and back."""

    config = type("Config", (), {"scaling_factor": 0.5})

    def encode(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        return type("Out", (), {"latent_dist": FakePosterior(torch.cat([pooled, pooled.mean(1, keepdim=True)], 1))})

    def decode(self, z):
        return type("Out", (), {"sample": torch.nn.functional.interpolate(z[:, :3], scale_factor=8)})

    def to(self, device):
        return self


def test_latent_shards_round_trip(tmp_path, monkeypatch):
    write_image_tree(tmp_path / "img")
    images = CenterCroppedImageFolder(tmp_path / "img" / "train", 16)
    batches = [(torch.stack([images[i][0] for i in (0, 1)]), torch.tensor([0, 1])), (images[2][0][None], torch.tensor([0]))]
    meta = encode_split(batches, FakeVAE(), tmp_path / "lat" / "train", vae_name="fake", image_size=16,
                        classes=images.classes, shard_size=2, flips=True)
    assert [s["count"] for s in meta["shards"]] == [2, 1] and meta["latent_shape"] == [4, 2, 2]
    ds = LatentShardDataset(tmp_path / "lat" / "train")
    assert len(ds) == 3 and ds.scale_factor == 0.5
    z, label = ds[2]
    pixels = images[2][0][None].float() / 127.5 - 1
    expected = FakeVAE().encode(pixels).latent_dist.sample()[0] * 0.5
    assert label == 0 and torch.allclose(z, expected, atol=1e-3)
    both = LatentShardDataset(tmp_path / "lat" / "train", all_views=True)[2][0]
    expected_flip = FakeVAE().encode(pixels.flip(-1)).latent_dist.sample()[0] * 0.5
    assert both.shape == (2, 4, 2, 2)
    assert torch.allclose(both[0], z) and torch.allclose(both[1], expected_flip, atol=1e-3)
    torch.manual_seed(0)  # torch.randint(2, (3,)) under seed 0: [0, 1, 1]
    picked = pick_view_at_random(torch.stack([both, both + 1, both + 2]))
    assert torch.equal(picked, torch.stack([both[0], both[1] + 1, both[1] + 2]))

    monkeypatch.setattr("dbl.data.imagenet.load_vae", lambda name, subfolder, device: FakeVAE())
    dm = ImageNetDataModule(root=str(tmp_path / "img"), latents=str(tmp_path / "lat"), image_size=16, num_workers=0,
                            batch_size=2)
    views, _ = next(iter(dm.train_dataloader()))  # each latent with its mirror image's
    batch, _ = dm.on_after_batch_transfer((views, _), 0)  # one of them per item, drawn at the step
    assert views.shape == (2, 2, 4, 2, 2) and batch.shape == (2, 4, 2, 2)
    decoded = dm.decode_samples(z[None])
    assert torch.allclose(decoded, FakeVAE().decode(z[None] / 0.5).sample.clamp(-1, 1))
    with pytest.raises(UsageError) as err:  # no val shards: an error, not the training latents in disguise
        dm.val_dataloader()
    assert str(err.value) == (f"ImageNet has no validation folder {tmp_path / 'lat' / 'val'}: encode it with "
                              f"tools/encode_latents.py --split val, or set trainer.limit_val_batches: 0 to train "
                              f"without validation")
    pixels_only = ImageNetDataModule(root=str(tmp_path / "lat"), image_size=16, num_workers=0)  # train/ but no val/
    with pytest.raises(UsageError, match=f"no validation folder {tmp_path / 'lat' / 'val'}: put the validation images"):
        pixels_only.test_dataloader()


def test_imagenet_missing_tree_is_one_line_error(tmp_path):
    with pytest.raises(MissingDataError, match="one folder of images per class"):
        ImageNetDataModule(root=str(tmp_path)).prepare_data()
    with pytest.raises(MissingDataError, match="encode_latents"):
        ImageNetDataModule(latents=str(tmp_path)).prepare_data()


def test_encode_latents_tool_with_a_real_tiny_autoencoder(tmp_path):
    """tools/encode_latents.py end to end with diffusers' AutoencoderKL (random weights, saved locally)."""
    diffusers = pytest.importorskip("diffusers")
    import runpy
    from pathlib import Path

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")
    write_image_tree(tmp_path / "img")
    tool = runpy.run_path(str(Path(__file__).parent.parent / "tools" / "encode_latents.py"), run_name="encode_latents")
    tool["main"](["--data", str(tmp_path / "img"), "--split", "train", "--out", str(tmp_path / "lat" / "train"),
                  "--vae", str(tmp_path / "vae"), "--image_size", "16", "--batch_size", "2", "--shard_size", "2",
                  "--num_workers", "0", "--device", "cpu", "--flips"])
    ds = LatentShardDataset(tmp_path / "lat" / "train")
    assert len(ds) == 3 and ds.meta["views"] == 2 and ds.scale_factor == pytest.approx(0.18215)
    z, label = ds[0]
    assert z.shape == (4, 8, 8) and label == 0
    dm = ImageNetDataModule(root=str(tmp_path / "img"), latents=str(tmp_path / "lat"), image_size=16, num_workers=0)
    decoded = dm.decode_samples(z[None])  # loads the VAE named in meta.json
    with torch.no_grad():
        expected = vae.decode(z[None] / ds.scale_factor).sample.clamp(-1, 1)
    assert decoded.shape == (1, 3, 16, 16) and torch.allclose(decoded, expected, atol=1e-5)


def test_sample_grid_decodes_latents(tiny_module):
    from conftest import tiny_dit

    from dbl.callbacks import SampleGrid

    module = tiny_module(net=tiny_dit(in_channels=4))
    grid = SampleGrid(num_classes=2, per_class=2, num_steps=2)
    assert grid.make_grid(module).shape[0] == 4  # raw latents
    decoded = grid.make_grid(module, decode=lambda z: torch.tanh(z[:, :3]))
    assert decoded.shape[0] == 3


def test_fashion_mnist_incomplete_cache_folder_is_unpacked_again(tmp_path):
    """A cache folder holding only some of the four files (by hand, or an older dbl) is redone."""
    root = tmp_path / "fm"
    written = write_idx_gz(root / "FashionMNIST" / "raw", n_train=4, n_test=2)
    dm = FashionMNISTDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.25)
    partial = dm.dataset_root() / "FashionMNIST" / "raw"
    partial.mkdir(parents=True)
    (partial / RAW_FILES[0]).write_bytes(b"half")
    dm.prepare_data()
    assert sorted(p.name for p in partial.iterdir()) == sorted(RAW_FILES)
    dm.setup("test")
    assert torch.equal(dm._images["test"][:, 0, 2:30, 2:30], torch.from_numpy(written["t10k"][0]))
