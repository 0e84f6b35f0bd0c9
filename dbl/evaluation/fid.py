"""FID (and Inception Score) computed by torch-fidelity's own code, fed from memory.

torch-fidelity's ``calculate_metrics`` wants both image sets up front (files or Datasets); a
training run has its samples as tensors batch by batch and its reference statistics cached. So
this module calls the same pieces ``calculate_metrics`` uses (``create_feature_extractor``,
``fid_features_to_statistics``, ``fid_statistics_to_metric``, ``isc_features_to_metric``): the
number is the library's number (``tests/test_fid.py`` checks it against ``calculate_metrics``).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dbl.data.download import atomic_path
from dbl.data.images import ReferenceImages, dataset_fingerprint, default_cache_dir, is_writable
from dbl.data.loaders import BatchShards
from dbl.errors import MissingDataError, UsageError
from dbl.evaluation.sharding import Shard

INCEPTION = "inception-v3-compat"


class FeatureExtractor:
    """A torch-fidelity feature extractor plus what identifies it (hashed into cached statistics).

    Args:
        name: a torch-fidelity feature extractor (``inception-v3-compat``: the standard FID network).
        layer: its feature layer for FID (``2048`` for Inception).
        weights_path: weights file for machines without internet; None: torch-fidelity's own
            lookup (``$TORCH_HOME/hub/checkpoints``, where ``shared/tools/offline_assets.sh``
            puts them, else a download).
        device: where features are computed.
    """

    def __init__(self, name: str = INCEPTION, layer: str = "2048", weights_path: str | None = None,
                 device: torch.device | str = "cpu", inception_score: bool = False):
        from torch_fidelity.utils import create_feature_extractor

        self.name, self.layer = name, layer
        self.layers = [layer] + (["logits_unbiased"] if inception_score else [])
        kwargs = {} if weights_path is None else {"feature_extractor_weights_path": str(weights_path)}
        if weights_path is not None and not Path(weights_path).is_file():
            raise MissingDataError(f"feature_extractor_weights_path {weights_path} is not a file")
        try:
            self.net = create_feature_extractor(name, self.layers, cuda=False, verbose=False, **kwargs).to(device)
        except OSError as err:  # a download attempt without internet
            raise UsageError(
                f"cannot load the {name} weights ({err}); on a machine without internet run "
                f"shared/tools/offline_assets.sh or set feature_extractor_weights_path"
            ) from err
        if inception_score and hasattr(self.net, "fc") and not self.net.fc.weight.any():
            raise UsageError("these Inception weights have no logits layer (fc is zero), so no Inception Score; "
                             "use torch-fidelity's original weights or turn inception_score off")
        self.device = torch.device(device)
        weights = Path(weights_path) if weights_path else None
        self.identity = dict(extractor=name, layer=layer,
                             weights=f"{weights.name}:{weights.stat().st_size}" if weights else "torch-fidelity default")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [N, C, H, W] (C = 1 is repeated to RGB) -> {layer: float features [N, D]} on the CPU."""
        if images.dtype != torch.uint8:
            raise TypeError(f"FID features need uint8 images, got {images.dtype}")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        out = self.net.convert_features_tuple_to_dict(self.net(images.to(self.device)))
        return {k: v.cpu() for k, v in out.items()}

    def features(self, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in batches:
            for k, v in self(batch).items():
                parts.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in parts.items()}


def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean and covariance of [N, D] features, as torch-fidelity computes them."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features)


def frechet_distance(stats_a: dict[str, np.ndarray], stats_b: dict[str, np.ndarray]) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID]


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score from unbiased logits, torch-fidelity's defaults."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(logits, splits=splits)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def stats_cache_path(reference: ReferenceImages, extractor: FeatureExtractor, cache_dir: Path | None = None) -> Path:
    """``<cache_dir>/fid_stats_<split>_<hash>.npz``, the hash covering the description, the images'
    content (``dataset_fingerprint``: a hash of the pixels, or of the image files) and the extractor."""
    key = json.dumps({**reference.description, "content": dataset_fingerprint(reference.dataset), **extractor.identity},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = Path(cache_dir or reference.cache_dir)
    if not is_writable(folder):
        folder = default_cache_dir("fid")
    return folder / f"fid_stats_{reference.description.get('split', 'ref')}_{digest}.npz"


def _read_statistics(path: Path) -> dict[str, np.ndarray]:
    """The cached statistics; ``ValueError`` unless they are a finite mean [D] and covariance [D, D]."""
    try:
        with np.load(path) as f:
            stats = {"mu": f["mu"], "sigma": f["sigma"]}
    except (OSError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"unreadable ({type(err).__name__}: {err})") from None
    mu, sigma = stats["mu"], stats["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"not a finite mean [D] and covariance [D, D]: shapes {mu.shape}, {sigma.shape}")
    return stats


def reference_statistics(reference: ReferenceImages, extractor: FeatureExtractor, batch_size: int = 256,
                         cache_dir: Path | None = None, num_workers: int = 0, shard: Shard | None = None) -> dict[str, np.ndarray]:
    """FID statistics of a reference set, computed once and then read from the cache.

    The file is written atomically (a temporary file in the cache folder, renamed) and read back
    before the rename, so a cache file is always whole; a damaged one is recomputed and replaced.
    ``num_workers``: DataLoader workers that load the reference images (the data module's).
    ``shard``: under several processes, each featurises its share of the batches
    (``dbl.evaluation.sharding``) and every process gets the statistics; process 0 writes the cache.
    """
    shard = shard or Shard()
    path = stats_cache_path(reference, extractor, cache_dir)
    stats = None
    if path.exists():
        try:
            stats = _read_statistics(path)
        except ValueError as err:
            rank_zero_warn(f"FID statistics cache {path} is damaged ({err}); computing it again")
    if shard.all(stats is not None):  # all processes read it, or all compute it together
        return stats
    dataset = reference.dataset
    sampler = BatchShards(dataset, batch_size, shard.world_size, shard.rank)
    batches = iter(DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers))
    parts = []
    # a progress bar on a terminal only (disable=None), on one process, so logs and CI stay clean
    rounds = tqdm(list(shard.rounds(-(-len(dataset) // batch_size))), unit="round", disable=None if shard.rank == 0 else True,
                  desc=f"FID reference statistics ({reference.description.get('split', '')})")
    for k in rounds:
        features = None if k is None else extractor(next(batches))[extractor.layer]
        parts.extend(shard.gather(features))
    stats = statistics(torch.cat(parts))
    if shard.rank == 0:
        with atomic_path(path, suffix=".npz") as part:
            np.savez(part, mu=stats["mu"], sigma=stats["sigma"],
                     description=json.dumps({**reference.description, **extractor.identity}, sort_keys=True))
            written = _read_statistics(part)
            if not (np.array_equal(written["mu"], stats["mu"]) and np.array_equal(written["sigma"], stats["sigma"])):
                raise OSError(f"FID statistics written to {part} read back different")
    return stats
