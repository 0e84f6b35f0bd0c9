"""Image classification data (the ViT task): CIFAR-100, Tiny-ImageNet-200 and Fashion-MNIST.

Batches are ``(images float32 [N, C, H, W], labels long [N])``, the images normalised by the
dataset's per-channel mean and std. The datasets keep and yield uint8 images, as stored; what
happens to a batch happens in the training process, at the step that uses it:

- ``on_before_batch_transfer`` (training only, ``trainer.training``): the training augmentation,
  on the uint8 batch while it is still on the host, each image drawn apart (``Augmentation``).
  The draws come from torch's global random stream of the training process, which checkpoints
  save and resumed runs restore (``dbl.training.rng``; see ``dbl.data.images`` above
  ``mirror_at_random``): never from the loader or its workers. On the host, per-image torchvision
  ops cost less than the kernel launches they would take on an accelerator, the draws do not
  depend on the device, and the batch travels as uint8 (a quarter of the bytes);
- ``on_after_batch_transfer`` (every stage): ``normalize``, ``(x / 255 - mean) / std`` per channel,
  on the device.

Each data module exposes ``num_classes``, ``image_size`` and ``channels``, which the
classification module compares with its network before a run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR100

from dbl.data.checks import check_loader_options
from dbl.data.cifar import CIFARDataModule, OptionalChecksums
from dbl.data.download import atomic_path, download
from dbl.data.fashion_mnist import FashionMNISTDataModule
from dbl.data.images import (
    InMemoryImageDataModule,
    check_val_fraction,
    default_cache_dir,
    is_writable,
    mirror_at_random,
)
from dbl.errors import MissingDataError, UsageError

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

# -- augmentation ---------------------------------------------------------------------------------


def crop_padded(images: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] zero-padded by ``padding`` on every side, then image n cropped back to H x W
    at row ``top[n]``, column ``left[n]`` of the padded image (each in ``0 .. 2 * padding``)."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding)).permute(0, 2, 3, 1)  # [N, H', W', C]
    rows = top[:, None] + torch.arange(h, device=images.device)  # [N, H]
    cols = left[:, None] + torch.arange(w, device=images.device)  # [N, W]
    crops = padded[torch.arange(n, device=images.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """torchvision's ``RandomCrop(size, padding)`` (zero fill) for each image of a batch, vectorised:
    offsets uniform in ``0 .. 2 * padding``, drawn (rows, then columns) from torch's global stream."""
    offsets = torch.randint(0, 2 * padding + 1, (2, images.shape[0]))
    return crop_padded(images, padding, offsets[0].to(images.device), offsets[1].to(images.device))


class Augmentation:
    """The classification training augmentation of a uint8 batch [N, C, H, W], each image drawn
    apart, in this order (the official recipes'): random resized crop or random crop with zero
    padding, horizontal flip, RandAugment. Every draw is from torch's global random stream.

    A ``torchvision.transforms.v2`` op called on a batch draws once for the whole batch, so the
    per-image ops (resized crop, RandAugment) run image by image; crop and flip are vectorised.

    Args:
        image_size: side of the images (the output of the resized crop).
        random_crop_padding: pad each side by this many black pixels and crop back at a random
            offset (torchvision's ``RandomCrop(image_size, padding)``); 0: off.
        resized_crop_scale: area range of torchvision's ``RandomResizedCrop(image_size, scale)``
            (aspect ratio 3/4 to 4/3, antialiased); None: off.
        random_flip: mirror each image left-right with probability 1/2.
        rand_augment_ops: operations per image of torchvision's ``RandAugment``; 0: off.
        rand_augment_magnitude: RandAugment's magnitude (0 .. 30).
    """

    def __init__(self, image_size: int, random_crop_padding: int = 0, resized_crop_scale: Sequence[float] | None = None,
                 random_flip: bool = False, rand_augment_ops: int = 0, rand_augment_magnitude: int = 9):
        from torchvision.transforms import v2

        check_augmentation(random_crop_padding, resized_crop_scale, rand_augment_ops, rand_augment_magnitude)
        self.padding = random_crop_padding
        self.random_flip = random_flip
        self.resized_crop = None if resized_crop_scale is None else v2.RandomResizedCrop(
            image_size, scale=tuple(resized_crop_scale), antialias=True)
        self.rand_augment = v2.RandAugment(rand_augment_ops, rand_augment_magnitude) if rand_augment_ops else None

    @property
    def active(self) -> bool:
        return bool(self.padding or self.random_flip or self.resized_crop or self.rand_augment)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.resized_crop is not None:
            images = torch.stack([self.resized_crop(image) for image in images])
        if self.padding:
            images = random_crop(images, self.padding)
        if self.random_flip:
            images = mirror_at_random(images)
        if self.rand_augment is not None:
            images = torch.stack([self.rand_augment(image) for image in images])
        return images


def check_augmentation(random_crop_padding: int, resized_crop_scale: Sequence[float] | None, rand_augment_ops: int,
                       rand_augment_magnitude: int) -> None:
    """One-line ``UsageError`` for an augmentation option out of range."""
    if random_crop_padding < 0:
        raise UsageError(f"random_crop_padding must be >= 0 (0: no random crop), got {random_crop_padding}")
    if resized_crop_scale is not None:
        if len(resized_crop_scale) != 2 or not 0 < resized_crop_scale[0] <= resized_crop_scale[1] <= 1:
            raise UsageError(f"resized_crop_scale must be [low, high] with 0 < low <= high <= 1 (shares of the image "
                             f"area), or null for no resized crop; got {resized_crop_scale}")
        if random_crop_padding:
            raise UsageError("choose one crop: resized_crop_scale (random resized crop) or random_crop_padding "
                             "(random crop with padding), and set the other to null / 0")
    if rand_augment_ops < 0:
        raise UsageError(f"rand_augment_ops must be >= 0 (0: no RandAugment), got {rand_augment_ops}")
    if not 0 <= rand_augment_magnitude <= 30:
        raise UsageError(f"rand_augment_magnitude must be in 0 .. 30 (torchvision's 31 bins), "
                         f"got {rand_augment_magnitude}")


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 ``(x / 255 - mean[c]) / std[c]``."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device)[:, None, None]
    return (images.float() / 255 - mean_t) / std_t


# -- the shared base --------------------------------------------------------------------------------


class ClassificationImageDataModule(InMemoryImageDataModule):
    """Labelled uint8 images in memory, as normalised classification batches.

    On top of ``InMemoryImageDataModule`` (the seeded train/validation split of the official
    training images, the test split for ``dbl test``, the loaders): the datasets yield uint8, the
    training augmentation (``Augmentation``) is drawn in ``on_before_batch_transfer`` during
    training only, and every stage's batch is normalised in ``on_after_batch_transfer`` (see the
    module docstring). ``predict`` reads the test split, like ``test``.

    A subclass sets ``num_classes``, ``image_size``, ``channels``, ``mean`` and ``std`` (one value
    per channel), saves the hyperparameters that ``InMemoryImageDataModule`` names plus
    ``random_crop_padding``, ``resized_crop_scale``, ``random_flip``, ``rand_augment_ops`` and
    ``rand_augment_magnitude`` (checked by ``check_augmentation``), and fills the splits in
    ``_load``.
    """

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale_images = False  # the datasets yield the uint8 images; on_after_batch_transfer normalises

    @property
    def augmentation(self) -> Augmentation:
        """The training augmentation the hyperparameters describe."""
        if getattr(self, "_augmentation", None) is None:
            h = self.hparams
            self._augmentation = Augmentation(self.image_size, h.random_crop_padding, h.resized_crop_scale,
                                              h.random_flip, h.rand_augment_ops, h.rand_augment_magnitude)
        return self._augmentation

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """The training augmentation of a uint8 batch (draws from torch's global random stream)."""
        return self.augmentation(images)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] -> float32, normalised by this dataset's per-channel mean and std."""
        return normalize(images, self.mean, self.std)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training and self.augmentation.active:
            images, labels = batch
            batch = self.augment(images), labels
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        return self.normalize(images), labels

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


def _check_options(val_fraction: float, batch_size: int, eval_batch_size: int | None, num_workers: int,
                   random_crop_padding: int, resized_crop_scale: Sequence[float] | None, rand_augment_ops: int,
                   rand_augment_magnitude: int) -> None:
    check_val_fraction(val_fraction)
    check_loader_options(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
    check_augmentation(random_crop_padding, resized_crop_scale, rand_augment_ops, rand_augment_magnitude)


# -- CIFAR-100 --------------------------------------------------------------------------------------

CIFAR100_FILES = ("train", "test", "meta")


class _CIFAR100(OptionalChecksums, CIFAR100):
    """torchvision's CIFAR-100 reader; ``verify_checksums=False`` skips its md5s (``OptionalChecksums``)."""


class CIFAR100DataModule(ClassificationImageDataModule, CIFARDataModule):
    """CIFAR-100 (50,000 train / 10,000 test, 32x32 RGB, 100 fine classes), read by torchvision.

    Batches are ``(images [N, 3, 32, 32] normalised by CIFAR-100's mean (0.5071, 0.4865, 0.4409)
    and std (0.2673, 0.2564, 0.2762), fine labels [N])``. The default augmentation is the official
    DiffusionBlocks ViT recipe: random crop 32 with padding 4, horizontal flip, RandAugment (2
    operations, magnitude 9).

    Args:
        root: folder that holds (or will hold) ``cifar-100-python/`` (the "python version":
            ``train``, ``test``, ``meta``).
        download: when the files are missing, download them with torchvision (needs the internet).
            Offline and missing is a one-line error that says where to put the files.
        verify_checksums: compare the files' md5s with the official release.
        cache_dir: writable folder for FID statistics (unused by classification; kept for the
            shared base); default ``root`` when writable, else ``$DBL_CACHE/cifar100``.
        batch_size: training batch size (training drops the last partial batch; evaluation does not).
        eval_batch_size: batch size of validation/test/predict loaders; default ``batch_size``.
        random_crop_padding: zero padding of the random crop back to 32x32; 0: no crop.
        resized_crop_scale: area range of a random resized crop instead (e.g. [0.08, 1.0]); null: off.
        random_flip: mirror training images left-right with probability 1/2.
        rand_augment_ops: RandAugment operations per image (torchvision's ``num_ops``); 0: off.
        rand_augment_magnitude: RandAugment's magnitude (0 .. 30).
        val_fraction: share of the official training images held out for validation (a seeded
            split; default 2%: 1,000 of 50,000); the test split is kept for ``dbl test``.
        seed: seed of that split.
        num_workers: DataLoader workers (the images are in memory: 0 is usually fastest).
    """

    num_classes = 100
    image_size = 32
    channels = 3
    mean = CIFAR100_MEAN
    std = CIFAR100_STD
    reference_name = "cifar100"
    reader = _CIFAR100
    files = CIFAR100_FILES
    display_name = "CIFAR-100"
    file_kind = "python file"

    def __init__(
        self,
        root: str = "data/cifar100",
        download: bool = True,
        verify_checksums: bool = True,
        cache_dir: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        random_crop_padding: int = 4,
        resized_crop_scale: tuple[float, float] | None = None,
        random_flip: bool = True,
        rand_augment_ops: int = 2,
        rand_augment_magnitude: int = 9,
        val_fraction: float = 0.02,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        _check_options(val_fraction, batch_size, eval_batch_size, num_workers, random_crop_padding, resized_crop_scale,
                       rand_augment_ops, rand_augment_magnitude)
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else (
            self.root if is_writable(self.root) else default_cache_dir("cifar100"))

    @staticmethod
    def check_file(name: str, content) -> None:
        """``train`` and ``test`` hold ``data`` and ``fine_labels`` of equal length, ``meta`` holds
        ``fine_label_names``."""
        key = "fine_label_names" if name == "meta" else "fine_labels"
        if key not in content or (name != "meta" and len(content["data"]) != len(content[key])):
            raise ValueError(f"no {key}" if key not in content else "data and fine_labels differ in length")


# -- Tiny-ImageNet-200 ------------------------------------------------------------------------------

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
TINY_IMAGENET_LAYOUT = ("wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt")
JPEG_SUFFIXES = (".jpeg", ".jpg")


def decode_rgb(path: Path, size: int) -> np.ndarray:
    """The image at ``path`` as uint8 [size, size, 3] RGB (grayscale and CMYK converted); a file that
    cannot be decoded, or of another size, is a one-line ``UsageError`` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:  # PIL: UnidentifiedImageError / truncated are OSErrors
        raise UsageError(f"{path} is not a readable image ({type(err).__name__}: {err}); replace it "
                         f"(unzip tiny-imagenet-200.zip again)") from None
    if array.shape[:2] != (size, size):
        raise UsageError(f"{path} is {array.shape[1]}x{array.shape[0]} pixels, Tiny-ImageNet images are {size}x{size}; "
                         f"replace it")
    return array


def check_tiny_imagenet_zip(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is a zip holding ``tiny-imagenet-200/wnids.txt``."""
    try:
        with zipfile.ZipFile(path) as zf:
            if f"{TINY_IMAGENET_FOLDER}/wnids.txt" not in zf.namelist():
                raise ValueError(f"{path} holds no {TINY_IMAGENET_FOLDER}/wnids.txt")
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a zip file ({err})") from None


class TinyImageNetDataModule(ClassificationImageDataModule):
    """Tiny-ImageNet-200 (100,000 train / 10,000 val, 64x64 RGB, 200 classes) from its folder layout.

    ``<root>/tiny-imagenet-200/`` holds ``wnids.txt`` (one WordNet id per class),
    ``train/<wnid>/images/*.JPEG`` (500 per class) and ``val/images/*.JPEG`` with
    ``val/val_annotations.txt`` (tab-separated: file name, wnid, 4 box coordinates). A label is the
    index of the image's wnid in the *sorted* list of ``wnids.txt`` (so ``n01443537`` is 0 in the
    full set), the same for train and val. ``num_classes`` is the number of wnids (200; read from
    ``wnids.txt`` when it is there, so a subset of classes works too).

    The official ``val`` split is our ``test`` split (``dbl test``; the ``test/`` folder has no
    labels); our validation split is ``val_fraction`` of the training images, held out by a seeded
    permutation. Validation/test images are used as they are (64x64); the val images keep the
    order of ``val_annotations.txt``, the train images sorted by wnid, then file name.

    The JPEGs are decoded once (grayscale ones converted to RGB) and cached as uint8 tensors in
    ``<cache_dir>/decoded/<split>-<key>.pt``; the key hashes each image's path, size in bytes and
    label, so adding, removing, replacing (with another size) or relabelling an image decodes
    afresh.

    Batches are ``(images [N, 3, 64, 64] normalised by ImageNet's mean (0.485, 0.456, 0.406) and
    std (0.229, 0.224, 0.225), labels [N])``. Default augmentation (the paper's): random resized
    crop 64 (torchvision's default scale 0.08 .. 1) and horizontal flip.

    Args:
        root: folder that holds (or will hold) ``tiny-imagenet-200/``.
        download: when it is missing, fetch ``tiny-imagenet-200.zip`` (about 240 MB) from
            cs231n.stanford.edu into ``root`` and unpack it there (needs the internet); a zip
            already in ``root`` is unpacked without the network. Offline and missing is a
            one-line error that says what to put where.
        cache_dir: writable folder for the decoded images; default ``root`` when writable, else
            ``$DBL_CACHE/tiny-imagenet``.
        batch_size: training batch size (training drops the last partial batch; evaluation does not).
        eval_batch_size: batch size of validation/test/predict loaders; default ``batch_size``.
        random_crop_padding: zero padding of a random crop back to 64x64 instead of the resized
            crop (set ``resized_crop_scale: null`` with it); 0: off.
        resized_crop_scale: area range of the random resized crop; null: off.
        random_flip: mirror training images left-right with probability 1/2.
        rand_augment_ops: RandAugment operations per image (torchvision's ``num_ops``); 0: off.
        rand_augment_magnitude: RandAugment's magnitude (0 .. 30).
        val_fraction: share of the training images held out for validation (a seeded split;
            default 2%: 2,000 of 100,000).
        seed: seed of that split.
        num_workers: DataLoader workers (the images are in memory: 0 is usually fastest).
    """

    image_size = 64
    channels = 3
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    reference_name = "tiny-imagenet-200"

    def __init__(
        self,
        root: str = "data/tiny-imagenet",
        download: bool = True,
        cache_dir: str | None = None,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        random_crop_padding: int = 0,
        resized_crop_scale: tuple[float, float] | None = (0.08, 1.0),
        random_flip: bool = True,
        rand_augment_ops: int = 0,
        rand_augment_magnitude: int = 9,
        val_fraction: float = 0.02,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        _check_options(val_fraction, batch_size, eval_batch_size, num_workers, random_crop_padding, resized_crop_scale,
                       rand_augment_ops, rand_augment_magnitude)
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else (
            self.root if is_writable(self.root) else default_cache_dir("tiny-imagenet"))

    @property
    def folder(self) -> Path:
        return self.root / TINY_IMAGENET_FOLDER

    @property
    def num_classes(self) -> int:
        """The number of wnids in ``wnids.txt``; 200 (Tiny-ImageNet's) before the data is there."""
        return len(self.wnids()) if (self.folder / "wnids.txt").is_file() else 200

    def wnids(self) -> list[str]:
        """The class ids, sorted: label i is ``wnids()[i]``."""
        path = self.folder / "wnids.txt"
        wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not wnids:
            raise UsageError(f"{path} lists no wnids; replace it (unzip tiny-imagenet-200.zip again)")
        if len(set(wnids)) != len(wnids):
            raise UsageError(f"{path} lists a wnid twice; replace it (unzip tiny-imagenet-200.zip again)")
        return sorted(wnids)

    def _present(self) -> bool:
        return all((self.folder / name).exists() for name in ("wnids.txt", "train", "val"))

    def _missing(self, why: str) -> MissingDataError:
        return MissingDataError(f"Tiny-ImageNet-200 not found in {self.folder} ({why}): put {TINY_IMAGENET_LAYOUT} "
                                f"there (unzip tiny-imagenet-200.zip from {TINY_IMAGENET_URL} into {self.root})")

    def prepare_data(self) -> None:
        if self._present():
            return
        archive = self.root / f"{TINY_IMAGENET_FOLDER}.zip"
        if not archive.exists():
            if not self.hparams.download:
                raise self._missing("download is off")
            try:
                download(TINY_IMAGENET_URL, archive, check=check_tiny_imagenet_zip)
            except MissingDataError as err:
                raise self._missing(f"download failed: {err}") from None
        self._unzip(archive)

    def _unzip(self, archive: Path) -> None:
        """Unpack ``archive`` into a staging folder next to ``tiny-imagenet-200/``, then move its
        ``tiny-imagenet-200/`` into place: a cut-short unpacking never looks finished."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{TINY_IMAGENET_FOLDER}.", suffix=".tmp", dir=self.root))
        try:
            check_tiny_imagenet_zip(archive)
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
            os.replace(staging / TINY_IMAGENET_FOLDER, self.folder)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            if not self._present():  # else a concurrent run unpacked it first
                raise MissingDataError(f"{archive} could not be unpacked ({type(err).__name__}: {err}); replace it "
                                       f"with tiny-imagenet-200.zip from {TINY_IMAGENET_URL}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _files(self, split: str) -> list[tuple[Path, int]]:
        """(JPEG path, label) of the official ``train`` or (for our ``test``) ``val`` split."""
        index = {wnid: i for i, wnid in enumerate(self.wnids())}
        if split == "train":
            files = []
            for wnid, label in index.items():
                folder = self.folder / "train" / wnid / "images"
                if not folder.is_dir():
                    raise MissingDataError(f"{folder} does not exist: wnids.txt lists {wnid}, so its training "
                                           f"images belong there (unzip tiny-imagenet-200.zip again)")
                names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in JPEG_SUFFIXES)
                if not names:
                    raise MissingDataError(f"{folder} holds no JPEG images (unzip tiny-imagenet-200.zip again)")
                files += [(folder / name, label) for name in names]
            return files
        annotations = self.folder / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise MissingDataError(f"{annotations} not found: the val images' labels are read from it "
                                   f"(unzip tiny-imagenet-200.zip again)")
        files = []
        for number, line in enumerate(annotations.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise UsageError(f"{annotations} line {number} is not 'file<TAB>wnid<TAB>box': {line!r}")
            name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in index:
                raise UsageError(f"{annotations} line {number}: wnid {wnid} of {name} is not in wnids.txt")
            files.append((self.folder / "val" / "images" / name, index[wnid]))
        if not files:
            raise UsageError(f"{annotations} lists no images")
        return files

    def _key(self, files: list[tuple[Path, int]]) -> str:
        """A hash of each image's path (relative to the folder), size in bytes and label."""
        digest = hashlib.sha256(f"image_size={self.image_size}".encode())
        for path, label in files:
            try:
                size = path.stat().st_size
            except OSError as err:
                raise MissingDataError(f"{path} cannot be read ({type(err).__name__}); "
                                       f"unzip tiny-imagenet-200.zip again") from None
            digest.update(f"\n{path.relative_to(self.folder)}\t{size}\t{label}".encode())
        return digest.hexdigest()[:16]

    def decoded(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 [N, 3, 64, 64], long [N]) of ``train`` or ``test`` (official val), decoded once and
        cached in ``<cache_dir>/decoded/``."""
        files = self._files(split)
        cache = self.cache_dir / "decoded" / f"{'train' if split == 'train' else 'val'}-{self._key(files)}.pt"
        if cache.exists():
            stored = torch.load(cache, weights_only=True)
            return stored["images"], stored["labels"]
        from tqdm import tqdm

        images = np.empty((len(files), self.image_size, self.image_size, 3), dtype=np.uint8)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
            arrays = pool.map(lambda item: decode_rgb(item[0], self.image_size), files, chunksize=256)
            for i, array in enumerate(tqdm(arrays, total=len(files), desc=f"decoding Tiny-ImageNet {split}",
                                           disable=None)):
                images[i] = array
        images_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor([label for _, label in files], dtype=torch.long)
        try:
            with atomic_path(cache, suffix=".pt") as part:
                torch.save({"images": images_t, "labels": labels}, part)
        except OSError as err:  # a read-only cache: decode again next time rather than fail
            import warnings

            warnings.warn(f"could not cache the decoded Tiny-ImageNet images in {cache.parent} ({err})", stacklevel=2)
        return images_t, labels

    def _load(self, split: str) -> None:
        if split in self._images:
            return
        if not self._present():
            raise self._missing("no files")
        self._images[split], self._labels[split] = self.decoded(split)


# -- Fashion-MNIST ----------------------------------------------------------------------------------


class FashionMNISTClassificationDataModule(ClassificationImageDataModule, FashionMNISTDataModule):
    """Fashion-MNIST for classification on a CPU: ``FashionMNISTDataModule``'s files and loading
    (``.gz`` files in a read-only ``root`` unpacked once into the cache), as normalised batches.

    Batches are ``(images [N, channels, image_size, image_size] normalised by Fashion-MNIST's mean
    0.2860 and std 0.3530 (of the 28x28 training images; the same for every channel), labels [N])``.

    Default augmentation: random crop with padding 2 and horizontal flip. Not CIFAR's padding 4:
    Fashion-MNIST's items are scaled so that their long side spans the 28 pixels (two thirds of
    the training images have ink in their top or bottom row), so a shift of 4 pixels can cut off
    7% of an item's ink (the share in its outer 4 rows), a shift of 2 at most 2.7%.

    Args:
        root: folder holding ``FashionMNIST/raw/`` (unpacked files, or only the ``.gz`` files).
        cache_dir: writable folder for the unpacked files; default ``root`` when it is writable,
            else ``$DBL_CACHE/fashion-mnist``.
        download: fetch the dataset with torchvision when it is missing (needs the internet).
        batch_size: training batch size (training drops the last partial batch; evaluation does not).
        eval_batch_size: batch size of validation/test/predict loaders; default ``batch_size``.
        image_size: side after zero-padding the 28x28 images (28, 30, 32, ...); 28 keeps them.
        channels: 1 (gray) or 3 (gray repeated, for networks built for RGB).
        random_crop_padding: zero padding of the random crop back to ``image_size``; 0: no crop.
        resized_crop_scale: area range of a random resized crop instead; null: off.
        random_flip: mirror training images left-right with probability 1/2.
        rand_augment_ops: RandAugment operations per image (torchvision's ``num_ops``); 0: off.
        rand_augment_magnitude: RandAugment's magnitude (0 .. 30).
        val_fraction: share of the official training images held out for validation (a seeded
            split; default 2%: 1,200 of 60,000); the test split is kept for ``dbl test``.
        seed: seed of that split.
        num_workers: DataLoader workers (the images are in memory: 0 is usually fastest).
    """

    def __init__(
        self,
        root: str = "data/fashion-mnist",
        cache_dir: str | None = None,
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        image_size: int = 28,
        channels: int = 1,
        random_crop_padding: int = 2,
        resized_crop_scale: tuple[float, float] | None = None,
        random_flip: bool = True,
        rand_augment_ops: int = 0,
        rand_augment_magnitude: int = 9,
        val_fraction: float = 0.02,
        seed: int = 0,
        num_workers: int = 0,
    ):
        check_augmentation(random_crop_padding, resized_crop_scale, rand_augment_ops, rand_augment_magnitude)
        super().__init__(root=root, cache_dir=cache_dir, download=download, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, image_size=image_size, channels=channels,
                         random_flip=random_flip, val_fraction=val_fraction, seed=seed, num_workers=num_workers)
        self.image_size, self.channels = image_size, channels
        self.mean, self.std = FASHION_MNIST_MEAN * channels, FASHION_MNIST_STD * channels
