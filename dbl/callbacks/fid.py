"""FID of samples generated through the block chain, against a DataModule's train or test images."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Subset
from tqdm import tqdm

from dbl.callbacks.paths import run_dir
from dbl.data.images import ReferenceImages, to_uint8
from dbl.diffusion.draws import per_sample_generators
from dbl.diffusion.samplers import check_solver
from dbl.errors import UsageError
from dbl.evaluation.fid import (
    INCEPTION,
    FeatureExtractor,
    frechet_distance,
    inception_score,
    reference_statistics,
    statistics,
)
from dbl.evaluation.sharding import Shard


class FID(L.Callback):
    """Generate ``num_samples`` images with ``pl_module.sample`` and score them with torch-fidelity's FID.

    Runs at ``dbl test`` (``on_test_epoch_end``) and, with ``every_n_epochs > 0``, after validation.
    Logs ``fid/<split>`` for each reference split: the minimum over ``seeds`` (the paper reports
    the minimum of 3), and ``fid/<split>/seed<k>`` for each seed when there are several; with
    ``inception_score``, ``inception_score`` (the maximum over seeds). A JSON of every number and
    setting is written to ``<log_dir>/fid_<stage>_step<k>.json`` (k: the model's training steps).

    The DataModule provides the reference images via ``fid_reference(split)`` and, for latent
    models, ``decode_samples(latents)`` (pixels in [-1, 1]) so that FID sees images. Labels are
    balanced over the model's classes (shuffled by the seed); unconditional models get none.
    Reference statistics are cached next to the data, keyed by a hash of the images' content and
    the feature extractor, so they are computed once (with the DataModule's ``num_workers``). Sample i of
    a seed is drawn from its own generator, seeded by (seed, i), so the sample set does not depend on
    ``batch_size`` or on the number of processes, and several processes share the work batch by batch
    (every one ends with the same numbers; process 0 writes the files). When a run will use
    it (``dbl test``, or ``fit`` with ``every_n_epochs > 0``), the data module and the extractor's
    weights are checked at setup, before anything is trained or sampled.

    Args:
        num_samples: generated images per seed (paper: 50,000).
        reference_splits: which of the DataModule's splits to compare against (``train``, ``test``).
        reference_size: use only the first n images of each reference split (None: all of it, as the
            paper); for quick CPU runs, where Inception features cost about half a second per image.
        seeds: one FID per seed (noise and labels); the logged value is the minimum.
        num_steps, solver, grid, cfg_scale: sampler settings; None uses the module's defaults
            (the paper: Euler, 50 steps, CFG 2.0).
        batch_size: samples generated (and featurised) at once.
        every_n_epochs: also evaluate after every n-th epoch's validation; 0: only at test.
        feature_extractor, feature_layer: torch-fidelity extractor and layer (standard FID:
            ``inception-v3-compat``, ``2048``).
        feature_extractor_weights_path: weights for machines without internet (not needed when
            ``shared/tools/offline_assets.sh`` has put them in ``$TORCH_HOME/hub/checkpoints``).
        inception_score: also compute the Inception Score (needs weights with the logits layer).
        save_samples: ``png`` (one file per image, ``seed<k>/<index>.png``) or ``npz`` (``arr_0``
            uint8 NHWC and ``arr_1`` labels, the layout external evaluators read); ``none``.
        samples_dir: where samples go; default ``<log_dir>/fid_samples``.
        stats_cache_dir: folder for reference statistics; default the DataModule's cache folder.
    """

    def __init__(
        self,
        num_samples: int = 50_000,
        reference_splits: list[str] = ["train", "test"],  # noqa: B006 - jsonargparse shows the default
        reference_size: int | None = None,
        seeds: list[int] = [0],  # noqa: B006
        num_steps: int | None = None,
        solver: str | None = None,
        grid: str | None = None,
        cfg_scale: float | None = None,
        batch_size: int = 250,
        every_n_epochs: int = 0,
        feature_extractor: str = INCEPTION,
        feature_layer: str = "2048",
        feature_extractor_weights_path: str | None = None,
        inception_score: bool = False,
        save_samples: Literal["none", "png", "npz"] = "none",
        samples_dir: str | None = None,
        stats_cache_dir: str | None = None,
    ):
        if num_samples < 2:
            raise UsageError(f"num_samples must be >= 2 (FID needs a covariance), got {num_samples}")
        if not seeds:
            raise UsageError("seeds is empty; give at least one evaluation seed")
        if not reference_splits:
            raise UsageError("reference_splits is empty; give 'train' and/or 'test'")
        if save_samples not in ("none", "png", "npz"):
            raise UsageError(f"save_samples must be 'none', 'png' or 'npz', got {save_samples!r}")
        if reference_size is not None and reference_size < 2:
            raise UsageError(f"reference_size must be >= 2 or null, got {reference_size}")
        self.num_samples, self.reference_splits, self.seeds = num_samples, list(reference_splits), list(seeds)
        self.reference_size = reference_size
        if solver is not None:
            check_solver(solver)
        self.sampler = dict(num_steps=num_steps, solver=solver, grid=grid, cfg_scale=cfg_scale)
        self.batch_size, self.every_n_epochs = batch_size, every_n_epochs
        self.extractor_args = dict(name=feature_extractor, layer=feature_layer, weights_path=feature_extractor_weights_path,
                                   inception_score=inception_score)
        self.inception_score = inception_score
        self.save_samples, self.samples_dir, self.stats_cache_dir = save_samples, samples_dir, stats_cache_dir
        self._extractor: FeatureExtractor | None = None
        self._last_evaluated_epoch = -1

    # -- hooks -----------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Check the data module and load the feature extractor now, when this run will use them:
        a wrong data module, a missing weights file or no internet is reported before the model
        is trained or sampled, not after."""
        if not (stage == "test" or (stage == "fit" and self.every_n_epochs > 0)):
            return
        self._check_datamodule(trainer)
        self._feature_extractor(trainer.strategy.root_device)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if (trainer.sanity_checking or self.every_n_epochs <= 0 or (epoch + 1) % self.every_n_epochs
                or epoch == self._last_evaluated_epoch):
            return
        self._last_evaluated_epoch = epoch
        self._log(pl_module, self.evaluate(trainer, pl_module, "val"))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self._log(pl_module, self.evaluate(trainer, pl_module, "test"))

    def _log(self, pl_module, results: dict) -> None:
        for name, value in results["metrics"].items():  # the same on every process
            pl_module.log(name, value)

    # -- the evaluation --------------------------------------------------------------------
    @staticmethod
    def _check_datamodule(trainer: L.Trainer):
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "fid_reference"):
            raise UsageError("the FID callback needs a DataModule with fid_reference(split), e.g. dbl.data.CIFAR10DataModule")
        return datamodule

    def _feature_extractor(self, device: torch.device) -> FeatureExtractor:
        if self._extractor is None or self._extractor.device != torch.device(device):
            self._extractor = FeatureExtractor(**self.extractor_args, device=device)
        return self._extractor

    def _reference(self, datamodule, split: str) -> ReferenceImages:
        reference = datamodule.fid_reference(split)
        if self.reference_size is None or self.reference_size >= len(reference.dataset):
            return reference
        subset = Subset(reference.dataset, range(self.reference_size))
        return ReferenceImages(subset, {**reference.description, "n": self.reference_size}, reference.cache_dir)

    def _labels(self, pl_module, seed: int) -> torch.Tensor | None:
        num_classes = getattr(pl_module, "num_classes", 0)
        if not num_classes:
            return None
        gen = torch.Generator().manual_seed(seed)
        labels = torch.arange(self.num_samples) % num_classes
        return labels[torch.randperm(self.num_samples, generator=gen)]

    def generate(self, trainer: L.Trainer, pl_module, seed: int, start: int, n: int, labels: torch.Tensor | None):
        """(uint8 images [n, C, H, W], their labels or None): samples ``start`` .. ``start + n - 1`` of
        ``seed``, each drawn from its own generator (so any batching on any process gives them)."""
        batch_labels = None if labels is None else labels[start:start + n]
        generators = per_sample_generators(seed, range(start, start + n))
        # the trainer's precision (e.g. bf16 autocast): callback hooks run outside it otherwise
        with trainer.precision_plugin.forward_context():
            images = pl_module.sample(labels=batch_labels, num_samples=n, generator=generators, **self.sampler)
            decode = getattr(trainer.datamodule, "decode_samples", None)
            if decode is not None:
                images = decode(images)
        return to_uint8(images).cpu(), batch_labels

    def evaluate(self, trainer: L.Trainer, pl_module, stage: str = "test") -> dict:
        """Compute FID against each reference split for each seed; returns metrics and settings.

        Under several processes each generates and featurises its share of the batches
        (``dbl.evaluation.sharding``); all end with the same numbers, and process 0 writes the files.
        """
        datamodule = self._check_datamodule(trainer)
        extractor = self._feature_extractor(pl_module.device)
        shard = Shard.current()
        started = time.perf_counter()
        reference_sets = {split: self._reference(datamodule, split) for split in self.reference_splits}
        workers = getattr(datamodule, "hparams", {}).get("num_workers", 0) or 0  # load references as training does
        references = {split: reference_statistics(ref, extractor, self.batch_size, self.stats_cache_dir, num_workers=workers,
                                                  shard=shard)
                      for split, ref in reference_sets.items()}
        reference_seconds = time.perf_counter() - started
        per_seed: dict[int, dict[str, float]] = {}
        num_batches = -(-self.num_samples // self.batch_size)
        for seed in self.seeds:
            started_seed = time.perf_counter()
            labels = self._labels(pl_module, seed)
            parts: dict[str, list[torch.Tensor]] = {}
            saved_images, saved_labels = [], []
            sampling_seconds = 0.0
            progress = tqdm(total=self.num_samples, desc=f"FID samples, seed {seed}", unit="img",
                            disable=None if shard.rank == 0 else True)
            for k in shard.rounds(num_batches):
                part = None
                if k is not None:
                    start = k * self.batch_size
                    tic = time.perf_counter()
                    images, batch_labels = self.generate(trainer, pl_module, seed, start,
                                                         min(self.batch_size, self.num_samples - start), labels)
                    sampling_seconds += time.perf_counter() - tic
                    if self.save_samples == "png":
                        self._save_png(trainer, seed, start, images)
                    keep = (images, batch_labels) if self.save_samples == "npz" else None
                    part = (extractor(images), keep)
                for features, keep in shard.gather(part):
                    progress.update(len(features[extractor.layer]))
                    for name, value in features.items():
                        parts.setdefault(name, []).append(value)
                    if keep is not None and shard.rank == 0:
                        saved_images.append(keep[0])
                        if keep[1] is not None:
                            saved_labels.append(keep[1])
            progress.close()
            features = {k: torch.cat(v) for k, v in parts.items()}
            generated = statistics(features[extractor.layer])
            scores = {f"fid/{split}": frechet_distance(generated, ref) for split, ref in references.items()}
            if self.inception_score:
                scores["inception_score"] = inception_score(features["logits_unbiased"])[0]
            scores["seconds"] = time.perf_counter() - started_seed
            scores["sampling_seconds"] = sampling_seconds  # this process's
            per_seed[seed] = scores
            if self.save_samples == "npz" and shard.rank == 0:
                self._write_npz(trainer, seed, saved_images, saved_labels)
        metrics = {f"fid/{split}": min(s[f"fid/{split}"] for s in per_seed.values()) for split in self.reference_splits}
        if self.inception_score:
            metrics["inception_score"] = max(s["inception_score"] for s in per_seed.values())
        if len(self.seeds) > 1:
            for seed, scores in per_seed.items():
                metrics.update({f"fid/{split}/seed{seed}": scores[f"fid/{split}"] for split in self.reference_splits})
        # at `dbl test` the trainer's step counter starts at 0; the module's buffer knows the training steps
        trained_steps = pl_module.block_steps
        results = dict(
            stage=stage, trained_steps=trained_steps, num_samples=self.num_samples, seeds=self.seeds,
            processes=shard.world_size, reference_sizes={split: len(ref.dataset) for split, ref in reference_sets.items()},
            sampler={k: v for k, v in self.sampler.items() if v is not None} or "module defaults",
            module_sampler_defaults=getattr(pl_module, "sample_defaults", None),
            feature_extractor=extractor.identity, metrics=metrics,
            per_seed={str(k): v for k, v in per_seed.items()}, reference_seconds=reference_seconds,
        )
        out = run_dir(trainer) / f"fid_{stage}_step{trained_steps}.json"
        if shard.rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
        rank_zero_info(f"FID ({self.num_samples} samples, seeds {self.seeds}): "
                       + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"; details in {out}")
        return results

    # -- writing samples -------------------------------------------------------------------
    def _samples_root(self, trainer: L.Trainer) -> Path:
        return Path(self.samples_dir) if self.samples_dir else run_dir(trainer) / "fid_samples"

    def _save_png(self, trainer, seed: int, offset: int, images: torch.Tensor) -> None:
        from PIL import Image

        folder = self._samples_root(trainer) / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f"{offset + i:06d}.png")

    def _write_npz(self, trainer, seed, saved_images, saved_labels) -> None:
        folder = self._samples_root(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"arr_0": torch.cat(saved_images).permute(0, 2, 3, 1).numpy()}
        if saved_labels:
            arrays["arr_1"] = torch.cat(saved_labels).numpy()
        np.savez(folder / f"samples_seed{seed}.npz", **arrays)
