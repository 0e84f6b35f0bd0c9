"""``dbl diagnose``'s glue: checkpoint, twin, data, output folders and TensorBoard around ``dbl.diagnose``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from dbl.diagnose import check_protocol, diagnose, write_report
from dbl.errors import UsageError


def check_diagnose_options(options) -> None:
    """One-line errors for the options, before the model is built."""
    from dbl.cli import ConfigError

    get = options.get
    if not get("ckpt_path"):
        raise ConfigError("diagnose needs --ckpt_path: the checkpoint to diagnose (or 'last': this experiment's newest)")
    twin, twin_ckpt = get("twin"), get("twin_ckpt")
    if twin_ckpt and not twin:
        raise ConfigError("--twin_ckpt needs --twin: the YAML of the end-to-end twin it was trained with")
    if twin and not twin_ckpt:
        raise ConfigError(f"--twin {twin} needs --twin_ckpt: the twin's checkpoint (e.g. <run>/version_<n>/checkpoints/last.ckpt)")
    if twin and not Path(twin).is_file():
        raise ConfigError(f"--twin {twin}: no such file; give the end-to-end twin's YAML")
    if twin_ckpt and not Path(twin_ckpt).is_file():
        raise ConfigError(f"--twin_ckpt {twin_ckpt}: no such file; give a checkpoint written by `dbl fit --config {twin}`")
    if (get("levels") or 0) < 2:
        raise ConfigError(f"--levels must be >= 2 (the issue asks for 40 or more), got {get('levels')}")
    for name in ("batch_size", "samples"):
        if (get(name) or 0) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {get(name)}")


def run_dir_of(ckpt_path: str | Path) -> Path:
    """The run folder a checkpoint belongs to: ``<run>/checkpoints/x.ckpt`` -> ``<run>``, else the checkpoint's folder."""
    path = Path(ckpt_path).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def load_weights(module, ckpt_path: str | Path, what: str) -> dict:
    from dbl.cli import ConfigError, read_checkpoint

    checkpoint = read_checkpoint(Path(ckpt_path), f"give the checkpoint {what} was trained into")
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ConfigError(f"{ckpt_path} does not fit {what} ({' '.join(first[:2])[:200]}); give the checkpoint it was trained into") from None
    return checkpoint


def load_twin(twin: str, twin_ckpt: str, model):
    """The twin's module from its YAML, its weights loaded; a one-line error unless it is the same task."""
    from dbl.cli import ConfigError, load_experiment

    module = load_experiment(twin, portable_trainer=True).model
    if type(module) is not type(model):
        raise ConfigError(f"--twin {twin} is a {type(module).__name__} but the model a {type(model).__name__}: a twin is the "
                          "same task trained end to end (num_blocks: 1)")
    load_weights(module, twin_ckpt, f"--twin {twin}")
    if module.diagnostic_spec().level != model.diagnostic_spec().level:
        raise ConfigError(f"--twin {twin} measures noise as {module.diagnostic_spec().level}, the model as "
                          f"{model.diagnostic_spec().level}: not the same task")
    return module


def _cat(parts: list):
    first = parts[0]
    if torch.is_tensor(first):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    return first  # None (unconditional) and other constants


def _slice(batch, n: int):
    if torch.is_tensor(batch):
        return batch[:n]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(item, n) for item in batch)
    return batch


def _size(batch) -> int:
    if torch.is_tensor(batch):
        return batch.shape[0]
    return next(_size(item) for item in batch if torch.is_tensor(item) or isinstance(item, (tuple, list)))


def _to(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(item, device) for item in batch)
    return batch


def on_device(datamodule, batch, device):
    """``batch`` on ``device`` as a stage's step sees it: through the data module's transfer hooks (the ViT
    data normalises its uint8 images in ``on_after_batch_transfer``)."""
    before = getattr(datamodule, "on_before_batch_transfer", None)
    after = getattr(datamodule, "on_after_batch_transfer", None)
    batch = before(batch, 0) if before is not None else batch
    batch = _to(batch, device)
    return after(batch, 0) if after is not None else batch


def first_samples(datamodule, n: int):
    """The first ``n`` samples of the validation split, as one batch."""
    if datamodule is None:
        raise UsageError("dbl diagnose needs the experiment's data (the YAML's data section)")
    datamodule.setup("validate")
    parts, have = [], 0
    for batch in datamodule.val_dataloader():
        parts.append(batch)
        have += _size(batch)
        if have >= n:
            break
    if not parts:
        raise UsageError(f"{type(datamodule).__name__}'s validation split is empty: dbl diagnose evaluates on it")
    return _slice(_cat(parts), n)


def run_diagnose(model, datamodule, ckpt_path, twin=None, twin_ckpt=None, out=None, levels: int = 40, batch_size: int = 64,
                 samples: int = 4, seed: int = 0, progress: bool = True) -> Path:
    """Load, evaluate, write the report (and the figures to TensorBoard in the run's folder); the report's path."""
    from torch.utils.tensorboard import SummaryWriter

    from dbl.scalars import load

    check_protocol(model)
    checkpoint = load_weights(model, ckpt_path, "the model")
    twin_module = load_twin(twin, twin_ckpt, model) if twin else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = run_dir_of(ckpt_path)
    scalars = load(run) if run.is_dir() else {}
    start = time.perf_counter()
    batch = on_device(datamodule, first_samples(datamodule, batch_size), device)
    modules = [m for m in (model, twin_module) if m is not None]
    for module in modules:
        module.to(device).eval()
    d = diagnose(model, batch, levels, twin=twin_module, num_samples=samples, seed=seed, scalars=scalars, progress=progress)
    out_dir = Path(out) if out else run / "diagnose"
    d.info.update(
        title=f"{type(model).__name__}, {model.num_blocks} blocks, step {checkpoint.get('global_step')}",
        checkpoint=f"`{ckpt_path}`",
        batch=f"the first {_size(batch)} samples of the validation split; seed {seed}",
        time=f"{time.perf_counter() - start:.1f} s on {device.type} (evaluation only)",
    )
    if Path(sys.argv[0]).name == "dbl":
        d.info["command"] = "`dbl " + " ".join(sys.argv[1:]) + "`"
    if twin:
        d.info["twin"] = f"`{twin}`, `{twin_ckpt}`"
    writer = SummaryWriter(str(run)) if run.is_dir() else None
    try:
        return write_report(d, out_dir, getattr(datamodule, "decode", None), writer, int(checkpoint.get("global_step") or 0))
    finally:
        if writer is not None:
            writer.close()
