"""Assembling one model from block-parallel jobs.

Blocks share nothing when ``shared_io: false``, so each can train in a job of its own
(``train_blocks: [b]``) with no communication. Each job's checkpoint holds the whole network but
only its block trained; ``merge_block_checkpoints`` takes every block from the job that trained
it (read off the per-block ``block_updates`` counts) and writes one checkpoint to evaluate and
sample from (``tools/merge_blocks.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dbl.errors import UsageError


def block_state_keys(module) -> list[list[str]]:
    """The ``state_dict`` keys of the parameters that only block b trains, for each b."""
    names = {id(p): name for name, p in module.named_parameters()}
    return [[names[id(p)] for p in module.network.block_parameters(b)] for b in range(module.num_blocks)]


def merge_block_checkpoints(module, checkpoints: Sequence[dict], labels: Sequence[str] | None = None) -> dict:
    """One checkpoint whose block b comes from the checkpoint that trained block b.

    ``module``: the experiment's module (its structure says which weights belong to which block);
    ``checkpoints``: Lightning checkpoint dicts of the jobs; ``labels``: their names for messages.
    The result holds weights, hyperparameters (``train_blocks`` cleared) and the per-block update
    counts, not optimizer state: it is for ``dbl validate|test|predict``, not for resuming.
    """
    labels = list(labels or [f"checkpoint {i}" for i in range(len(checkpoints))])
    if not checkpoints:
        raise UsageError("no checkpoints to merge; give one per block-parallel job")
    if module.network.shared_io and len(checkpoints) > 1:
        raise UsageError("these jobs ran with shared_io: true, so each trained the shared input/output layers and "
                         "their checkpoints disagree on them; block-parallel jobs need shared_io: false")
    expected = set(module.state_dict())
    owners: dict[int, int] = {}
    for i, ckpt in enumerate(checkpoints):
        state = ckpt.get("state_dict", {})
        if set(state) != expected:
            raise UsageError(f"{labels[i]} does not hold this experiment's model (its weights have other names); "
                             "give the YAML the jobs were trained with")
        for block in state["block_updates"].nonzero().flatten().tolist():
            if block in owners:
                raise UsageError(f"block {block} was trained in both {labels[owners[block]]} and {labels[i]}; "
                                 "give each block's job once")
            owners[block] = i
    untrained = [b for b in range(module.num_blocks) if b not in owners]
    if untrained:
        raise UsageError(f"no checkpoint trained block(s) {untrained}; every block needs its job's checkpoint")
    merged_state = dict(checkpoints[0]["state_dict"])
    for block, keys in enumerate(block_state_keys(module)):
        source = checkpoints[owners[block]]["state_dict"]
        merged_state.update({key: source[key] for key in keys})
    merged_state["block_updates"] = torch.stack(
        [checkpoints[owners[b]]["state_dict"]["block_updates"][b] for b in range(module.num_blocks)])
    first = checkpoints[0]
    merged = {key: first[key] for key in ("pytorch-lightning_version", "hparams_name") if key in first}
    merged["hyper_parameters"] = {**first.get("hyper_parameters", {}), "train_blocks": None}
    merged["state_dict"] = merged_state
    merged["global_step"] = int(merged_state["block_updates"].sum())
    merged["epoch"] = 0
    merged["merged_from"] = {f"block{b}": labels[i] for b, i in sorted(owners.items())}
    return merged
