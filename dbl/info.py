"""The text of ``dbl info``: blocks, noise ranges, parameters and estimated training memory.

It needs neither the data nor trained weights: activations are measured on a random batch of the
data's shape (``example_batch``), so it runs on a machine that has neither."""

from __future__ import annotations

import lightning as L

from dbl import finetune_memory
from dbl.memory import count, estimate_training_memory, profile_activations

PROFILE_BATCH = 4  # samples actually run to measure activations; bytes scale linearly to the real batch


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _example_batch(module, datamodule: L.LightningDataModule):
    """A random batch shaped like the data module's training batches (its ``batch_size`` and, for
    text, ``seq_len``), from the module's ``example_batch``: no data is read or downloaded."""
    hp = getattr(datamodule, "hparams", {})
    if not hp.get("batch_size"):
        return None
    return module.example_batch(hp["batch_size"], hp.get("seq_len"))


def describe(module, datamodule: L.LightningDataModule | None) -> str:
    net = module.network
    hp = module.hparams
    out = [
        f"{type(module).__name__}: {type(net.net).__name__}, {len(net.net.layers)} layers in "
        f"{net.num_blocks} blocks, partition {hp.get('partition', '-')}, overlap {hp.get('overlap', '-')}, "
        f"shared_io {net.shared_io}, schedule {module.schedule.kind}",
        "",
    ]
    partition = getattr(module, "partition", None)  # a plain next-token baseline has none
    rows = [["block", "layers", "nominal noise range", "training noise range", "parameters"]]
    for b in range(net.num_blocks):
        start, end = net.bounds[b]
        nominal = "[{:.4g}, {:.4g}]".format(*partition.nominal_range(b)) if partition else "-"
        widened = "[{:.4g}, {:.4g}]".format(*partition.widened_range(b)) if partition else "-"
        rows.append([str(b), f"{start}-{end - 1}", nominal, widened, f"{count(net.block_parameters(b)):,}"])
    rows.append(["shared", "-", "-", "-", f"{count(net.shared_parameters()):,}"])
    rows.append(["total", "", "", "", f"{count(module.parameters()):,}"])
    out += [_table(rows), ""]
    batch = None if datamodule is None else _example_batch(module, datamodule)
    if finetune_memory.is_pretrained_decoder(net.net):  # will fine-tuning it fit: computed, needs no weights
        out += [finetune_memory.describe(module, None if batch is None else tuple(batch[0].shape)), ""]
    if batch is None:
        out.append("(no data module with a batch_size configured: memory estimate skipped)")
        return "\n".join(out)
    if finetune_memory.on_meta_device(module):
        out.append("(the network is on the meta device, shapes only: the measured estimate is skipped)")
        return "\n".join(out)
    batch_size = len(batch[0])
    small = type(batch)(t[:PROFILE_BATCH] if hasattr(t, "shape") else t for t in batch)
    profile = profile_activations(module, small, min(PROFILE_BATCH, batch_size))
    est = estimate_training_memory(module, profile, batch_size)
    base = est["end-to-end"].total
    rows = [["mode", "weights", "grads", "optimizer", "activations", "total", "vs end-to-end"]]
    for mode, e in est.items():
        rows.append([mode, _mib(e.weights), _mib(e.grads), _mib(e.optimizer), _mib(e.activations), _mib(e.total),
                     f"{e.total / base:.2f}x"])
    out += [
        f"Estimated memory of one training step, batch {batch_size}, fp32, Adam (MiB; activations measured "
        f"on {min(PROFILE_BATCH, batch_size)} samples and scaled):",
        _table(rows),
        "block-wise keeps every block's weights and optimizer state resident; 'offloaded' keeps only the "
        "active block and the shared part.",
    ]
    return "\n".join(out)
