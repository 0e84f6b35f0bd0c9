"""Classification data (the ViT task): CIFAR-100, Tiny-ImageNet-200, Fashion-MNIST on fabricated
files in the real layouts (Fashion-MNIST also on the real shared files). Values are pinned by hand:
labels, normalised pixels, crops, and where augmentation may and may not happen."""

import gzip
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dbl.data.classification as classification
from dbl.data import (
    CIFAR100DataModule,
    FashionMNISTClassificationDataModule,
    MissingDataError,
    TinyImageNetDataModule,
)
from dbl.data.classification import Augmentation, crop_padded, random_crop
from dbl.errors import UsageError

CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHARED_FASHION = Path(__file__).resolve().parents[1] / "shared" / "data" / "fashion-mnist"
if not SHARED_FASHION.exists():
    SHARED_FASHION = Path("/work/shared/data/fashion-mnist")


def training(dm, on: bool):
    dm.trainer = SimpleNamespace(training=on, world_size=1, global_rank=0)
    return dm


def through_hooks(dm, batch):
    """What the model receives: the host-side hook, then (no device here) the device-side one."""
    return dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)


# -- augmentation primitives --------------------------------------------------------------------


def test_crop_with_forced_offsets_shows_the_zero_padding():
    images = torch.arange(1, 2 * 3 * 6 * 6 + 1).view(2, 3, 6, 6).to(torch.uint8)  # no zero pixel of its own
    top, left = torch.tensor([0, 4]), torch.tensor([0, 1])
    out = crop_padded(images, 2, top, left)
    assert out.shape == images.shape and out.dtype == torch.uint8
    # image 0 at offset (0, 0): two black rows on top, two black columns on the left, the rest shifted
    assert (out[0, :, :2, :] == 0).all() and (out[0, :, :, :2] == 0).all()
    assert torch.equal(out[0, :, 2:, 2:], images[0, :, :4, :4])
    # image 1 at offset (4, 1): two black rows at the bottom, one black column on the left
    assert (out[1, :, 4:, :] == 0).all() and (out[1, :, :, 0] == 0).all()
    assert torch.equal(out[1, :, :4, 1:], images[1, :, 2:, :5])
    # a hand-made crop of each padded image, for every offset
    for t in range(5):
        for s in range(5):
            expected = F.pad(images, (2, 2, 2, 2))[:, :, t:t + 6, s:s + 6]
            assert torch.equal(crop_padded(images, 2, torch.tensor([t, t]), torch.tensor([s, s])), expected)


def test_random_crop_draws_each_images_offset_from_the_global_stream():
    images = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    torch.manual_seed(3)
    offsets = torch.randint(0, 9, (2, 16))  # rows, then columns, in 0 .. 2 * padding
    torch.manual_seed(3)
    out = random_crop(images, 4)
    assert torch.equal(out, crop_padded(images, 4, offsets[0], offsets[1]))
    assert len({(int(t), int(s)) for t, s in offsets.T}) > 1  # not one draw for the whole batch


@pytest.mark.parametrize("options", [dict(random_crop_padding=4), dict(resized_crop_scale=(0.08, 1.0)),
                                     dict(rand_augment_ops=2)])
def test_per_image_ops_draw_per_image(options):
    """16 copies of one image come out different: each image gets its own draw (a torchvision v2 op
    called on the batch would give all 16 the same)."""
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out = Augmentation(32, **options)(image.repeat(16, 1, 1, 1))
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.uint8
    assert len({tuple(x.flatten().tolist()) for x in out}) > 8


# -- CIFAR-100 ------------------------------------------------------------------------------------


def write_cifar100(root, n_train=10, n_test=4):
    """The python version's pickles: dict with data uint8 [n, 3072] (R, G, B planes of 32x32),
    fine_labels, coarse_labels; meta with fine_label_names."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"filenames": [f"{i}.png" for i in range(n)], "batch_label": name, "fine_labels": labels,
                         "coarse_labels": [x // 5 for x in labels], "data": data}, f, protocol=2)
        written[name] = (data, labels)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, f, protocol=2)
    return written


def cifar100(root, **kw):
    kw = dict(root=str(root), download=False, verify_checksums=False, batch_size=4, eval_batch_size=3,
              val_fraction=0.2, **kw)
    dm = CIFAR100DataModule(**kw)
    dm.setup("fit")
    return dm


def test_cifar100_batches_are_uint8_from_the_loaders_and_normalised_by_the_hooks(tmp_path):
    written = write_cifar100(tmp_path)
    dm = cifar100(tmp_path)
    assert (dm.num_classes, dm.image_size, dm.channels) == (100, 32, 3)
    train_idx, val_idx = dm.split_indices()
    assert val_idx.tolist() == [1, 4]  # seed 0, 2 of 10
    data, labels = written["train"]
    x, y = dm.train_dataloader().dataset[0]  # training image 0 is not held out
    assert x.dtype == torch.uint8 and torch.equal(x.flatten(), torch.from_numpy(data[0])) and y == labels[0]

    images, batch_labels = next(iter(dm.val_dataloader()))
    assert images.dtype == torch.uint8 and batch_labels.dtype == torch.long
    assert batch_labels.tolist() == [labels[1], labels[4]]
    training(dm, False)
    out, out_labels = through_hooks(dm, (images, batch_labels))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32) and out_labels is batch_labels
    # one pixel by hand: validation image 1 = training image 4, green plane, row 5, column 7
    p = int(data[4][1024 + 5 * 32 + 7])
    assert out[1, 1, 5, 7].item() == pytest.approx((p / 255 - 0.4865) / 0.2564, abs=1e-6)
    mean, std = torch.tensor(CIFAR100_MEAN)[:, None, None], torch.tensor(CIFAR100_STD)[:, None, None]
    expected = (images.float() / 255 - mean) / std
    assert torch.equal(out, expected)
    test = next(iter(dm.test_dataloader()))[0]
    assert torch.equal(test[2].flatten(), torch.from_numpy(written["test"][0][2]))
    assert torch.equal(next(iter(dm.predict_dataloader()))[0], test)  # predict reads the test split


def test_augmentation_happens_in_training_only_and_is_seeded(tmp_path):
    write_cifar100(tmp_path)
    dm = cifar100(tmp_path)
    images, labels = next(iter(dm.train_dataloader()))
    plain = dm.normalize(images)

    training(dm, True)
    torch.manual_seed(0)
    first, first_labels = through_hooks(dm, (images, labels))
    torch.manual_seed(0)
    second, _ = through_hooks(dm, (images, labels))
    assert torch.equal(first, second) and torch.equal(first_labels, labels)
    assert first.shape == plain.shape and not torch.equal(first, plain)
    torch.manual_seed(0)  # the recipe: crop 32 with padding 4, flip, RandAugment(2, 9), then normalisation
    assert torch.equal(first, dm.normalize(Augmentation(32, 4, None, True, 2, 9)(images)))
    torch.manual_seed(1)
    assert not torch.equal(through_hooks(dm, (images, labels))[0], first)

    training(dm, False)  # validation, test, predict: normalised, never augmented, nothing drawn
    state = torch.get_rng_state()
    assert dm.on_before_batch_transfer((images, labels), 0)[0] is images
    assert torch.equal(through_hooks(dm, (images, labels))[0], plain)
    assert torch.equal(torch.get_rng_state(), state)
    dm.trainer = None  # used outside a Trainer
    assert torch.equal(through_hooks(dm, (images, labels))[0], plain)

    off = cifar100(tmp_path, random_crop_padding=0, random_flip=False, rand_augment_ops=0)
    training(off, True)
    assert torch.equal(through_hooks(off, (images, labels))[0], plain)


def test_cifar100_download_path_with_the_download_mocked(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    calls = []

    def fake_download(url, download_root, filename=None, md5=None):
        calls.append((url, Path(download_root), filename))
        write_cifar100(Path(download_root))

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fake_download)
    dm = CIFAR100DataModule(root=str(tmp_path / "c100"), verify_checksums=False, val_fraction=0.2)  # download: true
    dm.prepare_data()
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", tmp_path / "c100",
                      "cifar-100-python.tar.gz")]
    dm.setup("fit")
    assert len(dm.train_dataloader().dataset) == 8
    dm.prepare_data()
    assert len(calls) == 1  # present: nothing fetched again


def test_cifar100_missing_or_damaged_is_one_line(tmp_path, monkeypatch):
    from urllib.error import URLError

    with pytest.raises(MissingDataError) as err:
        CIFAR100DataModule(root=str(tmp_path / "none"), download=False).prepare_data()
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "none" / "cifar-100-python") in message
    assert "train, test, meta" in message

    def offline(self):
        raise URLError("no network")

    monkeypatch.setattr(classification._CIFAR100, "download", offline)
    with pytest.raises(MissingDataError, match=r"download failed.*put the python version there") as err:
        CIFAR100DataModule(root=str(tmp_path / "none")).prepare_data()
    assert "\n" not in str(err.value)

    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    dm = CIFAR100DataModule(root=str(tmp_path), download=False, verify_checksums=False)
    with pytest.raises(UsageError) as err:
        dm.test_dataloader()
    assert "\n" not in str(err.value) and str(tmp_path / "cifar-100-python" / "test") in str(err.value)
    with pytest.raises(MissingDataError, match="verify_checksums"):  # fabricated files are not the official ones
        CIFAR100DataModule(root=str(tmp_path), download=False).setup("fit")


@pytest.mark.parametrize("options, message", [
    (dict(random_crop_padding=-1), "random_crop_padding must be >= 0"),
    (dict(random_crop_padding=0, resized_crop_scale=(0.5, 1.5)), "resized_crop_scale must be"),
    (dict(random_crop_padding=0, resized_crop_scale=(0.6, 0.5)), "resized_crop_scale must be"),
    (dict(resized_crop_scale=(0.08, 1.0)), "choose one crop"),
    (dict(rand_augment_ops=-1), "rand_augment_ops must be >= 0"),
    (dict(rand_augment_magnitude=31), r"rand_augment_magnitude must be in 0 \.\. 30"),
    (dict(val_fraction=0.0), "val_fraction must be in"),
    (dict(batch_size=0), "batch_size must be >= 1"),
])
def test_bad_options_are_one_line_errors(options, message):
    for cls in (CIFAR100DataModule, FashionMNISTClassificationDataModule):
        with pytest.raises(UsageError, match=message) as err:
            cls(**options)
        assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="choose one crop"):
        TinyImageNetDataModule(random_crop_padding=4)  # its default crop is the resized one


def test_options_parse_from_the_command_line():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TinyImageNetDataModule, "data")
    cfg = parser.parse_args(["--data.resized_crop_scale=[0.35, 1.0]", "--data.rand_augment_ops=2"])
    assert tuple(cfg.data.resized_crop_scale) == (0.35, 1.0) and cfg.data.rand_augment_ops == 2
    cfg = parser.parse_args(["--data.resized_crop_scale=null", "--data.random_crop_padding=8"])
    dm = TinyImageNetDataModule(**cfg.data.as_dict())
    assert dm.hparams.resized_crop_scale is None and dm.augmentation.padding == 8


# -- Tiny-ImageNet-200 ----------------------------------------------------------------------------

WNIDS = ["n03000003", "n01000001", "n02000002"]  # as listed; labels follow the sorted order: n01 0, n02 1, n03 2
VAL = [("val_0.JPEG", "n02000002"), ("val_1.JPEG", "n03000003"), ("val_2.JPEG", "n01000001"),
       ("val_3.JPEG", "n02000002")]


def write_jpeg(path, seed, gray=False):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = rng.integers(0, 256, (64, 64) if gray else (64, 64, 3), dtype=np.uint8)
    Image.fromarray(array).save(path, format="JPEG", quality=95)


def write_tiny_imagenet(root, per_class=3):
    """The release's layout: wnids.txt, train/<wnid>/images/<wnid>_<i>.JPEG (+ boxes file),
    val/images/val_<i>.JPEG, val/val_annotations.txt; train image n01000001_1 is grayscale."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    seed = 0
    for wnid in WNIDS:
        for i in range(per_class):
            seed += 1
            gray = (wnid, i) == ("n01000001", 1)
            write_jpeg(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", seed, gray=gray)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    for name, _ in VAL:
        seed += 1
        write_jpeg(folder / "val" / "images" / name, seed)
    (folder / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t3\t60\t61\n" for n, w in VAL))
    (folder / "test" / "images").mkdir(parents=True)  # no labels: never read
    return folder


def decoded_by_pil(path):
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def tiny(root, **kw):
    kw = dict(root=str(root), download=False, cache_dir=str(root / "cache"), batch_size=2, val_fraction=0.25, **kw)
    return TinyImageNetDataModule(**kw)


def test_tiny_imagenet_labels_follow_sorted_wnids_and_val_is_the_test_split(tmp_path):
    folder = write_tiny_imagenet(tmp_path)
    dm = tiny(tmp_path)
    dm.setup("fit")
    assert (dm.num_classes, dm.image_size, dm.channels) == (3, 64, 3)
    assert dm.wnids() == ["n01000001", "n02000002", "n03000003"]
    # official val = our test split, in val_annotations.txt's order, labels by hand
    test = dm._dataset("test")
    assert test.labels.tolist() == [1, 2, 0, 1]
    for i, (name, _) in enumerate(VAL):
        assert torch.equal(test[i][0], decoded_by_pil(folder / "val" / "images" / name))
    # train: sorted by wnid then file name; labels 0, 0, 0, 1, 1, 1, 2, 2, 2
    assert dm._labels["train"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    gray = dm._images["train"][1]  # n01000001_1.JPEG, a grayscale JPEG: three equal channels
    assert gray.shape == (3, 64, 64) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.equal(gray, decoded_by_pil(folder / "train" / "n01000001" / "images" / "n01000001_1.JPEG"))
    third = folder / "train" / "n03000003" / "images" / "n03000003_1.JPEG"
    assert torch.equal(dm._images["train"][7], decoded_by_pil(third))
    # our validation: 2 of the 9 training images (seed 0), ImageNet normalisation, no augmentation
    val_idx = dm.split_indices()[1]
    assert val_idx.tolist() == [0, 8]
    images, labels = next(iter(dm.val_dataloader()))
    assert labels.tolist() == [0, 2]
    out = through_hooks(training(dm, False), (images, labels))[0]
    p = int(dm._images["train"][8, 2, 10, 20])
    assert out[1, 2, 10, 20].item() == pytest.approx((p / 255 - 0.406) / 0.225, abs=1e-6)
    torch.manual_seed(0)
    augmented = through_hooks(training(dm, True), (images, labels))[0]
    torch.manual_seed(0)
    assert torch.equal(augmented, dm.normalize(Augmentation(64, 0, (0.08, 1.0), True)(images)))
    assert augmented.shape == (2, 3, 64, 64) and not torch.equal(augmented, out)


def test_tiny_imagenet_decodes_once_and_again_when_the_files_change(tmp_path, monkeypatch):
    folder = write_tiny_imagenet(tmp_path)
    first = tiny(tmp_path)
    first.setup("fit")
    cached = sorted(p.name for p in (tmp_path / "cache" / "decoded").iterdir())
    assert len(cached) == 2 and cached[0].startswith("train-") and cached[1].startswith("val-")

    def no_decoding(path, size):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(classification, "decode_rgb", no_decoding)
    again = tiny(tmp_path)
    again.setup("fit")  # from the cache
    assert torch.equal(again._images["train"], first._images["train"])
    assert torch.equal(again._labels["test"], first._labels["test"])

    write_jpeg(folder / "train" / "n02000002" / "images" / "n02000002_9.JPEG", 99)  # one more image
    with pytest.raises(AssertionError, match="decoded"):
        tiny(tmp_path).setup("fit")
    monkeypatch.undo()
    grown = tiny(tmp_path)
    grown.setup("fit")
    assert grown._labels["train"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert len(list((tmp_path / "cache" / "decoded").iterdir())) == 3


def test_tiny_imagenet_bad_files_are_one_line_errors_naming_them(tmp_path):
    folder = write_tiny_imagenet(tmp_path)
    annotations = folder / "val" / "val_annotations.txt"

    def error_of(split="test"):
        with pytest.raises(UsageError) as err:
            tiny(tmp_path)._dataset(split)
        assert "\n" not in str(err.value)
        return str(err.value)

    text = annotations.read_text()
    annotations.write_text(text + "val_9.JPEG\tn09999999\t0\t0\t1\t1\n")
    assert str(annotations) in (message := error_of()) and "line 5" in message and "n09999999" in message
    annotations.unlink()
    assert str(annotations) in error_of() and "not found" in error_of()
    annotations.write_text(text)

    broken = folder / "val" / "images" / "val_1.JPEG"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    assert str(broken) in error_of() and "not a readable image" in error_of()
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(broken, format="JPEG")
    assert str(broken) in (message := error_of()) and "64x32 pixels" in message

    shutil.rmtree(folder / "train" / "n02000002")
    assert str(folder / "train" / "n02000002" / "images") in error_of("train")


def test_tiny_imagenet_missing_offline_is_one_line_naming_the_folder(tmp_path):
    dm = TinyImageNetDataModule(root=str(tmp_path / "none"), download=False)
    assert dm.num_classes == 200  # before the data is there
    with pytest.raises(MissingDataError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "none" / "tiny-imagenet-200") in message
    assert "val/val_annotations.txt" in message and "train/<wnid>/images/*.JPEG" in message


def test_tiny_imagenet_download_path_with_the_download_mocked(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_tiny_imagenet(source)
    archive = shutil.make_archive(str(tmp_path / "release"), "zip", root_dir=source, base_dir="tiny-imagenet-200")
    calls = []

    def fake_download(url, path, check=None):
        calls.append((url, path))
        path.parent.mkdir(parents=True, exist_ok=True)  # as dbl.data.download.download does
        shutil.copy(archive, path)
        check(path)

    monkeypatch.setattr(classification, "download", fake_download)
    root = tmp_path / "data"
    dm = TinyImageNetDataModule(root=str(root), batch_size=2, val_fraction=0.25)  # download: true by default
    dm.prepare_data()
    assert calls == [("http://cs231n.stanford.edu/tiny-imagenet-200.zip", root / "tiny-imagenet-200.zip")]
    assert (root / "tiny-imagenet-200" / "val" / "val_annotations.txt").is_file()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    dm.setup("fit")
    assert dm._labels["test"].tolist() == [1, 2, 0, 1] and dm.cache_dir == root

    def offline(url, path, check=None):
        raise MissingDataError(f"downloading {url} failed (no network); put {path.name} at {path} by hand")

    monkeypatch.setattr(classification, "download", offline)
    with pytest.raises(MissingDataError, match="download failed") as err:
        TinyImageNetDataModule(root=str(tmp_path / "elsewhere")).prepare_data()
    assert "\n" not in str(err.value) and str(tmp_path / "elsewhere" / "tiny-imagenet-200") in str(err.value)

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tiny-imagenet-200.zip").write_bytes(b"not a zip")  # a zip already there is unpacked
    with pytest.raises(MissingDataError, match="could not be unpacked") as err:
        TinyImageNetDataModule(root=str(tmp_path / "bad")).prepare_data()
    assert "\n" not in str(err.value) and [p.name for p in (tmp_path / "bad").iterdir()] == ["tiny-imagenet-200.zip"]


# -- Fashion-MNIST --------------------------------------------------------------------------------


@pytest.fixture
def fashion(tmp_path):
    if not (SHARED_FASHION / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("the shared Fashion-MNIST files are not here")
    return dict(root=str(SHARED_FASHION), cache_dir=str(tmp_path / "cache"))


def test_fashion_mnist_classification_on_the_real_files(fashion):
    dm = FashionMNISTClassificationDataModule(**fashion, batch_size=5)
    dm.setup("fit")
    assert (dm.num_classes, dm.image_size, dm.channels) == (10, 28, 1)
    with gzip.open(SHARED_FASHION / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28)
    with gzip.open(SHARED_FASHION / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte.gz") as f:
        raw_labels = np.frombuffer(f.read()[8:], np.uint8)
    val_idx = dm.split_indices()[1]
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (5, 1, 28, 28) and labels.tolist() == raw_labels[val_idx[:5]].tolist()
    out = through_hooks(training(dm, False), (images, labels))[0]
    p = int(raw[val_idx[3], 14, 9])
    assert p == int(images[3, 0, 14, 9])
    assert out[3, 0, 14, 9].item() == pytest.approx((p / 255 - 0.2860) / 0.3530, abs=1e-6)
    # the constants are the training images' own: normalised, mean 0 and std 1 to three decimals
    whole = dm.normalize(dm._images["train"])
    assert round(whole.mean().item(), 3) == 0.0 and round(whole.std().item(), 3) == 1.0

    torch.manual_seed(0)
    augmented = through_hooks(training(dm, True), (images, labels))[0]
    torch.manual_seed(0)  # padding 2 and flip by default
    assert torch.equal(augmented, dm.normalize(Augmentation(28, 2, None, True)(images)))
    assert not torch.equal(augmented, out)


def test_fashion_mnist_classification_padded_rgb(fashion):
    dm = FashionMNISTClassificationDataModule(**fashion, image_size=32, channels=3, batch_size=4, random_crop_padding=4)
    dm.setup("fit")
    assert (dm.image_size, dm.channels) == (32, 3)
    images, labels = next(iter(dm.test_dataloader()))
    out = through_hooks(training(dm, False), (images, labels))[0]
    assert out.shape == (4, 3, 32, 32)
    black = (0 / 255 - 0.2860) / 0.3530  # the 2-pixel border added to reach 32
    assert torch.allclose(out[:, :, :2, :], torch.full((4, 3, 2, 32), black), rtol=0, atol=1e-6)
    assert torch.equal(out[:, 0], out[:, 2])
