"""Latent datasets: images encoded once by a VAE (Stable Diffusion's), stored as sharded arrays.

Layout of a latent folder (written by ``encode_split``, i.e. ``tools/encode_latents.py``)::

    meta.json               {"format": "dbl-latents-v1", "vae": ..., "scale_factor": ..., "image_size": ...,
                             "latent_shape": [C, h, w], "views": V, "num_images": N, "classes": [...],
                             "shards": [{"latents": "latents_00000.npy", "labels": "labels_00000.npy", "count": n}, ...]}
    latents_00000.npy       float16 [n, V, C, h, w], already multiplied by scale_factor
    labels_00000.npy        int64 [n]

V = 2 when the encoder also stored each image's mirror image (DiT's flip augmentation, done on
pixels before encoding), else 1. Shards are memory-mapped, so ImageNet's 1.28 M latents
(about 10 GB at fp16 with flips) need not fit in RAM.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dbl.errors import MissingDataError, UsageError
from dbl.hub import from_pretrained

FORMAT = "dbl-latents-v1"


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / "meta.json"
    if not path.exists():
        raise MissingDataError(f"no latent shards in {folder}: meta.json is missing; write them with tools/encode_latents.py")
    fix = "write the folder again with tools/encode_latents.py"
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UsageError(f"{path} has format {found!r}, expected {FORMAT!r}")
    missing = [key for key in ("views", "shards", "scale_factor") if key not in meta]
    if missing:
        raise UsageError(f"{path} lacks {', '.join(missing)}; {fix}")
    return meta


def load_vae(name_or_path: str, subfolder: str | None = None, device: torch.device | str = "cpu"):
    """A diffusers ``AutoencoderKL`` from a local folder or a hub id (``pip install 'dbl[vae]'``)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError("latent diffusion needs diffusers: pip install 'dbl[vae]' (or pip install diffusers)") from err
    kwargs = {"subfolder": subfolder} if subfolder else {}
    return from_pretrained(AutoencoderKL.from_pretrained, name_or_path, "VAE", **kwargs).to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_split(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    vae,
    out_dir: str | Path,
    vae_name: str,
    image_size: int,
    classes: list[str] | None = None,
    shard_size: int = 10_000,
    flips: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Encode ``(uint8 images [N, 3, H, W], labels)`` batches into latent shards; returns the meta.

    Latents are draws from the VAE posterior (as fast-DiT stores them) times the VAE's
    ``config.scaling_factor`` (0.18215 for Stable Diffusion's VAE), so they have roughly unit variance.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scale = float(vae.config.scaling_factor)
    meta = dict(format=FORMAT, vae=vae_name, scale_factor=scale, image_size=image_size, views=2 if flips else 1,
                classes=classes, shards=[], num_images=0, latent_shape=None)
    pending_latents: list[torch.Tensor] = []
    pending_labels: list[torch.Tensor] = []

    def flush(final: bool) -> None:
        while pending_latents and (final or sum(len(x) for x in pending_labels) >= shard_size):
            latents, labels = torch.cat(pending_latents), torch.cat(pending_labels)
            head, rest = (latents[:shard_size], labels[:shard_size]), (latents[shard_size:], labels[shard_size:])
            index = len(meta["shards"])
            names = {"latents": f"latents_{index:05d}.npy", "labels": f"labels_{index:05d}.npy"}
            np.save(out / names["latents"], head[0].numpy())
            np.save(out / names["labels"], head[1].numpy())
            meta["shards"].append({**names, "count": len(head[1])})
            meta["num_images"] += len(head[1])
            pending_latents[:] = [rest[0]] if len(rest[1]) else []
            pending_labels[:] = [rest[1]] if len(rest[1]) else []

    for images, labels in batches:
        pixels = images.to(device).float() / 127.5 - 1.0
        views = [pixels, pixels.flip(-1)] if flips else [pixels]
        encoded = [vae.encode(v).latent_dist.sample(generator=generator) * scale for v in views]
        latents = torch.stack(encoded, dim=1).to(torch.float16).cpu()  # [N, V, C, h, w]
        meta["latent_shape"] = list(latents.shape[2:])
        pending_latents.append(latents)
        pending_labels.append(torch.as_tensor(labels, dtype=torch.long))
        flush(final=False)
    flush(final=True)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


class LatentShardDataset(Dataset):
    """``(latent float32 [C, h, w], label)`` from a latent folder: the image itself; with ``all_views``
    and shards that hold the mirror image's latent too (training), ``[views, C, h, w]``, of which the
    data module picks one per step (``dbl.data.images.pick_view_at_random``)."""

    def __init__(self, folder: str | Path, all_views: bool = False):
        self.folder = Path(folder)
        self.meta = read_meta(folder)
        self.all_views = all_views and self.meta["views"] > 1
        self.latents = [self._load(s, "latents", mmap_mode="r") for s in self.meta["shards"]]
        self.labels = [self._load(s, "labels") for s in self.meta["shards"]]
        self.starts = np.cumsum([0] + [s["count"] for s in self.meta["shards"]]).tolist()

    def _load(self, shard: dict, kind: str, **kwargs) -> np.ndarray:
        """One shard's array, checked against the count in meta.json; a bad file is a one-line error."""
        try:
            path = self.folder / shard[kind]
            array = np.load(path, **kwargs)
        except KeyError as err:
            raise UsageError(f"{self.folder / 'meta.json'}: a shard entry lacks {err}; write the folder again with "
                             f"tools/encode_latents.py") from None
        except (OSError, ValueError, EOFError) as err:  # missing, truncated ("mmap length is greater ..."), not .npy
            raise UsageError(f"{path} is not a readable latent shard ({type(err).__name__}: {err}); write the folder "
                             f"again with tools/encode_latents.py") from None
        if len(array) != shard.get("count", len(array)):
            raise UsageError(f"{path} holds {len(array)} items but meta.json says {shard['count']}; write the folder "
                             f"again with tools/encode_latents.py")
        return array

    @property
    def scale_factor(self) -> float:
        return self.meta["scale_factor"]

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = bisect.bisect_right(self.starts, i) - 1
        j = i - self.starts[shard]
        view = slice(None) if self.all_views else 0
        latent = torch.from_numpy(np.array(self.latents[shard][j, view], dtype=np.float32))
        return latent, int(self.labels[shard][j])
