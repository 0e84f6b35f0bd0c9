"""Evaluation loaders that share a split among processes without reading anything twice.

Lightning's own distributed sampler pads the last process's share with repeated items, so that
every process runs as many batches: that counts some sequences twice in sums such as BPC or
perplexity. Here each process reads its own items (rank r: r, r + W, r + 2W, ...) and none twice;
the metrics (torchmetrics states) are summed across processes at the end of the epoch.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset


def evaluation_loader(datamodule: L.LightningDataModule, dataset: Dataset, **loader_kwargs) -> DataLoader:
    """``DataLoader(dataset, **loader_kwargs)`` in order, this process's share of it under several processes."""
    trainer = datamodule.trainer
    sampler = None
    if trainer is not None and trainer.world_size > 1:
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                               shuffle=False)
    return DataLoader(dataset, sampler=sampler, **loader_kwargs)
