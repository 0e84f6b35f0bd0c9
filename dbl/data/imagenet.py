"""ImageNet (or any ImageFolder tree of class folders) at 256x256, in pixels or VAE latents.

The paper's ImageNet run is a latent DiT: images are center-cropped to 256 (DiT's/ADM's
preprocessing), encoded once by Stable Diffusion's VAE (``tools/encode_latents.py``), and the
model learns the 4x32x32 latents. For FID the generated latents are decoded by the same VAE and
compared with the center-cropped pixel images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from dbl.data.checks import check_loader_options
from dbl.data.images import ReferenceImages, default_cache_dir, is_writable, mirror_at_random, pick_view_at_random
from dbl.data.latents import LatentShardDataset, load_vae, read_meta
from dbl.data.loaders import evaluation_loader
from dbl.errors import MissingDataError, UsageError


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM's (and DiT's) preprocessing: halve with a box filter while the short side is at least
    twice the target, resize the short side to ``image_size`` (bicubic), then crop the center."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


class CenterCroppedImageFolder(Dataset):
    """``(uint8 [3, S, S], label)`` from an ImageFolder tree (one folder per class), center-cropped."""

    def __init__(self, folder: str | Path, image_size: int = 256):
        from torchvision.datasets import ImageFolder

        if not Path(folder).is_dir():
            raise MissingDataError(f"image folder {folder} does not exist: it should hold one sub-folder of images per class")
        self.image_size = image_size
        self.folder = ImageFolder(str(folder))

    @property
    def classes(self) -> list[str]:
        return self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            image, label = self.folder[i]  # PIL RGB
        except OSError as err:  # not an image, truncated, unreadable (PIL's UnidentifiedImageError is an OSError)
            raise UsageError(f"{self.folder.samples[i][0]} is not a readable image ({type(err).__name__}: {err}); "
                             f"remove or replace it") from None
        arr = np.array(center_crop_arr(image, self.image_size))
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), label

    def fingerprint(self) -> str:
        """A hash of every image file's path (relative to the folder), size, modification time and
        label, and the crop size: a changed, added or removed image changes it (without reading
        1.28M images)."""
        root = Path(self.folder.root)
        digest = hashlib.sha256(f"image_size={self.image_size}".encode())
        for path, label in self.folder.samples:
            st = Path(path).stat()
            digest.update(f"\n{Path(path).relative_to(root)}\t{st.st_size}\t{st.st_mtime_ns}\t{label}".encode())
        return digest.hexdigest()[:16]


class _Scaled(Dataset):
    """uint8 items -> [-1, 1] floats."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, label = self.base[i]
        return x.float() / 127.5 - 1.0, label


class _ImagesOnly(Dataset):
    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.base[i][0]

    def fingerprint(self) -> str:
        return self.base.fingerprint()


class ImageNetDataModule(L.LightningDataModule):
    """ImageNet in pixels (``latents`` unset) or as VAE latents (``latents`` set).

    Validation and test use ``val/`` (ImageNet's validation set); without it they raise a one-line
    ``UsageError`` naming the folder (``trainer.limit_val_batches: 0`` trains without validation).

    Args:
        root: ImageFolder root with ``train/`` and ``val/`` (class sub-folders, as
            ``torchvision.datasets.ImageFolder`` reads). Needed for pixel training and for FID
            reference images; a latent-only run without FID can leave it unset.
        latents: folder with ``train/`` and ``val/`` latent shards written by
            ``tools/encode_latents.py``; when set, batches are latents and generated samples are
            decoded by the VAE for FID.
        image_size: side of the center crop (256 for the paper).
        vae: VAE for decoding (local folder or hub id); default the one the shards were encoded with.
        vae_subfolder: sub-folder of ``vae`` that holds the AutoencoderKL (e.g. ``vae`` in a full
            Stable Diffusion repository).
        decode_batch_size: latents decoded at once for FID.
        cache_dir: writable folder for FID statistics; default ``root`` if writable, else
            ``$DBL_CACHE/imagenet``.
        batch_size, eval_batch_size, random_flip, num_predict, num_workers: as the other DataModules;
            with latents, ``random_flip`` picks the stored mirror-image latent when there is one.
    """

    @property
    def num_classes(self) -> int:
        """Classes of the training data: the latents' class list, else the class folders of
        ``root/train``; 1000 (ImageNet) when neither says."""
        if self.latents is not None:
            classes = read_meta(self.latents / "train").get("classes")
            if classes:
                return len(classes)
        elif self.root is not None and (self.root / "train").is_dir():
            return sum(1 for d in (self.root / "train").iterdir() if d.is_dir()) or 1000
        return 1000

    def __init__(
        self,
        root: str | None = None,
        latents: str | None = None,
        image_size: int = 256,
        vae: str | None = None,
        vae_subfolder: str | None = None,
        decode_batch_size: int = 32,
        cache_dir: str | None = None,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        random_flip: bool = True,
        num_predict: int = 100,
        num_workers: int = 8,
    ):
        super().__init__()
        if root is None and latents is None:
            raise UsageError("ImageNetDataModule needs root (an ImageFolder tree) and/or latents (encoded shards)")
        check_loader_options(batch_size=batch_size, eval_batch_size=eval_batch_size, num_predict=num_predict,
                             decode_batch_size=decode_batch_size, image_size=image_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.root = Path(root).expanduser() if root else None
        self.latents = Path(latents).expanduser() if latents else None
        base = self.root or self.latents
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else (
            base if is_writable(base) else default_cache_dir("imagenet"))
        self._vae = None

    def prepare_data(self) -> None:
        """Check that the data is there (nothing is downloaded: ImageNet needs a manual download)."""
        if self.latents is not None:
            read_meta(self.latents / "train")
        elif not (self.root / "train").is_dir():
            raise MissingDataError(f"ImageNet not found: {self.root / 'train'} should hold one folder of images per class")

    @property
    def meta(self) -> dict | None:
        """The training latents' meta.json (VAE, scale factor), or None for pixel data."""
        return read_meta(self.latents / "train") if self.latents is not None else None

    def _split_folder(self, split: str) -> str:
        if split not in ("train", "val", "test"):
            raise UsageError(f"ImageNet splits are 'train' and 'val' ('test' means val), not {split!r}")
        return "train" if split == "train" else "val"

    def _dataset(self, split: str, train: bool) -> Dataset:
        folder = self._split_folder(split)
        if self.latents is not None:  # training: every stored view, one picked per step (on_after_batch_transfer)
            return LatentShardDataset(self.latents / folder, all_views=train and self.hparams.random_flip)
        return _Scaled(CenterCroppedImageFolder(self.root / folder, self.hparams.image_size))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # random views are drawn here, in the training process, so that resume is exact (dbl.data.images)
        x, labels = batch
        if x.dim() == 5:  # training latents with all their views
            return pick_view_at_random(x), labels
        if self.latents is None and self.hparams.random_flip and self.trainer is not None and self.trainer.training:
            return mirror_at_random(x), labels
        return batch

    def _eval_folder(self) -> str:
        """``val``, which validation and test both use; without it a one-line error (never the
        training images in disguise)."""
        base = self.latents or self.root
        if not (base / "val").is_dir():
            fix = ("encode it with tools/encode_latents.py --split val" if self.latents is not None
                   else "put the validation images there, one sub-folder per class")
            raise UsageError(f"ImageNet has no validation folder {base / 'val'}: {fix}, "
                             f"or set trainer.limit_val_batches: 0 to train without validation")
        return "val"

    def train_dataloader(self) -> DataLoader:
        return StatefulDataLoader(self._dataset("train", True), batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def _eval_loader(self) -> DataLoader:
        return evaluation_loader(self, self._dataset(self._eval_folder(), False), batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def predict_dataloader(self) -> DataLoader:
        labels = torch.arange(self.hparams.num_predict) % self.num_classes
        return DataLoader(labels, batch_size=self.hparams.batch_size)

    # -- FID -------------------------------------------------------------------------------
    def fid_reference(self, split: str) -> ReferenceImages:
        """Center-cropped pixel images of ``train`` or ``val`` (``test`` is an alias of ``val``)."""
        folder = self._split_folder(split)
        if self.root is None:
            raise UsageError("FID needs the pixel images: set root to the ImageFolder tree with train/ and val/")
        images = CenterCroppedImageFolder(self.root / folder, self.hparams.image_size)
        description = dict(dataset="imagefolder", root=str(self.root.resolve()), split=folder, n=len(images),
                           image_size=self.hparams.image_size)
        return ReferenceImages(_ImagesOnly(images), description, self.cache_dir)

    def vae(self, device: torch.device | str, meta: dict):
        if self._vae is None:
            self._vae = load_vae(self.hparams.vae or meta["vae"], self.hparams.vae_subfolder, device)
        return self._vae.to(device)

    @torch.no_grad()
    def decode_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """Generated samples -> pixels in [-1, 1]: latents go through the VAE; pixels pass unchanged."""
        if self.latents is None:
            return samples
        meta = self.meta
        vae, scale = self.vae(samples.device, meta), meta["scale_factor"]
        chunks = samples.split(self.hparams.decode_batch_size)
        return torch.cat([vae.decode(z / scale).sample.clamp(-1, 1) for z in chunks])
