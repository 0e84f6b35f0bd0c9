"""Checks made before anything runs: optimizer and scheduler options (when the module is built),
trainer options and data against the model (in ``prepare_data``, which Lightning calls before the
logger makes its version folder and before step 0). Each failure is a ``UsageError``: one line
naming the option, no traceback, nothing written."""

from __future__ import annotations

from numbers import Number

import torch

from dbl.errors import UsageError


def _describe(factory) -> tuple[str, dict]:
    """``("torch.optim.AdamW", {"lr": -0.1, ...})`` for jsonargparse's partials; the repr otherwise."""
    args, keywords = getattr(factory, "args", ()), getattr(factory, "keywords", None) or {}
    cls = next((a for a in reversed(args) if isinstance(a, type)), None)
    name = f"{cls.__module__}.{cls.__qualname__}" if cls is not None else getattr(factory, "__name__", repr(factory))
    return name, keywords


def _factory_error(option: str, factory, err: Exception) -> UsageError:
    name, keywords = _describe(factory)
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    named = [f"{k}={v!r}" for k, v in keywords.items()
             if isinstance(v, Number) and not isinstance(v, bool) and str(v) in message]
    where = f"model.init_args.{option}.init_args" + (f".{named[0].split('=')[0]}" if len(named) == 1 else "")
    return UsageError(f"{where}: {name}{' (' + ', '.join(named) + ')' if named else ''} rejects its options: "
                      f"{message}; set valid values under model.init_args.{option}.init_args")


def check_optimizer_options(optimizer, lr_scheduler, scheduler_option: str = "lr_scheduler") -> None:
    """Build the optimizer (and scheduler) once on a dummy parameter, so that their own range checks
    (a negative learning rate or weight decay, a scheduler factor of 0) fail now, not at step 0."""
    if optimizer is None:
        return
    try:
        opt = optimizer([torch.nn.Parameter(torch.zeros(1))])
    except ValueError as err:
        raise _factory_error("optimizer", optimizer, err) from None
    if lr_scheduler is not None and isinstance(opt, torch.optim.Optimizer):
        try:
            lr_scheduler(opt)
        except ValueError as err:
            raise _factory_error(scheduler_option, lr_scheduler, err) from None


def check_trainer_options(trainer) -> None:
    """Trainer options that Lightning accepts but that fail later (``val_check_interval: 0``:
    "integer modulo by zero" at the first step)."""
    interval = getattr(trainer, "val_check_interval", None)
    if isinstance(interval, Number) and not isinstance(interval, bool) and interval <= 0:
        raise UsageError(f"trainer.val_check_interval must be > 0 (steps between validations, or a fraction of an "
                         f"epoch), got {interval}; to train without validation set trainer.limit_val_batches: 0")


_LOADERS = {"fit": "train_dataloader", "validate": "val_dataloader", "test": "test_dataloader"}


def first_item(datamodule, stage: str):
    """The first item of the split that ``stage`` reads first (training for fit), or None (predict,
    an empty split, a data module without that loader). The global random state is left as it was."""
    loader = getattr(datamodule, _LOADERS.get(stage, ""), None)
    if loader is None:
        return None
    with torch.random.fork_rng(devices=[]):
        try:
            dataset = loader().dataset
        except NotImplementedError:  # LightningDataModule's default: this module has no such loader
            return None
        if dataset is None or not hasattr(dataset, "__getitem__") or len(dataset) == 0:
            return None
        return dataset[0]


def check_has_weights(module: torch.nn.Module, command: str = "this command") -> None:
    """A network built on the meta device (shapes only, e.g. ``PretrainedCausalLM`` with ``meta_device: true``)
    is for ``dbl info``; anything that runs it is refused here, in one line, before any data is read."""
    if any(p.is_meta for p in module.parameters()):
        command = getattr(command, "value", command)  # Lightning's TrainerFn -> "fit"
        raise UsageError(f"{command}: the network has no weights (built on the meta device: meta_device: true), "
                         "it serves `dbl info` only; set meta_device: false (and give name_or_path) to run it")
