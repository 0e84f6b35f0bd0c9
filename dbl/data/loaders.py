"""Evaluation loaders that share a split among processes batch by batch, reading nothing twice.

Lightning's own distributed sampler pads the last process's share with repeated items, so that
every process runs as many batches: that counts some items twice in sums such as BPC or
perplexity. Here the split is cut into batches in order, as one process would, and process r of W
reads whole batches r, r + W, r + 2W, ... (``BatchShards``). So every batch holds the same items
for any number of processes, and ``split_batch_index`` recovers its index in the split: the
evaluations seed their random draws (noise levels, noise, masks) with it, and their metrics
(torchmetrics states, summed across processes at the end of the epoch) equal the one-process ones.
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dbl.errors import UsageError


class BatchShards(DistributedSampler):
    """This process's items: those of batches ``rank``, ``rank + W``, ... of ``dataset`` cut in order
    into batches of ``batch_size``. A ``DistributedSampler``, so Lightning does not replace it.

    A split of fewer batches than processes is cut into W smaller ones instead, so that no process
    goes without (Lightning stops on an empty loader); the metrics of such a tiny split then
    depend on W. One of fewer items than processes is an error.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        n = len(dataset)
        if n < num_replicas:
            raise UsageError(f"an evaluation split of {n} item(s) cannot be shared by {num_replicas} processes; "
                             "give it more data or run it on fewer devices")
        if -(-n // batch_size) < num_replicas:
            batch_size = -(-n // num_replicas)
        step = batch_size * num_replicas
        self.items = [i for start in range(rank * batch_size, n, step) for i in range(start, min(start + batch_size, n))]
        self.num_samples = len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return self.num_samples


def evaluation_loader(datamodule: L.LightningDataModule, dataset: Dataset, batch_size: int | None = 1,
                      **loader_kwargs) -> DataLoader:
    """``DataLoader(dataset, batch_size, **loader_kwargs)`` in order; under W processes, this process's
    batches of it (``BatchShards``). ``batch_size=None``: the dataset's items are whole batches."""
    trainer = datamodule.trainer
    sampler = None
    if trainer is not None and trainer.world_size > 1:
        sampler = BatchShards(dataset, batch_size or 1, trainer.world_size, trainer.global_rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **loader_kwargs)


def split_batch_index(batch_idx: int, trainer: L.Trainer | None) -> int:
    """The index in the whole split of this process's ``batch_idx``-th evaluation batch."""
    if trainer is None or trainer.world_size == 1:
        return batch_idx
    return batch_idx * trainer.world_size + trainer.global_rank
