"""``dbl fit|validate|test|predict|info --config run.yaml``: LightningCLI, plus ``info``.

The YAML is the whole experiment (model, data, trainer, callbacks). ``info`` builds the same
objects and prints the blocks, their noise ranges, parameter counts and the estimated memory of a
training step, without training.
"""

from __future__ import annotations

import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from dbl.errors import UsageError
from dbl.training.engine import BlockwiseLightningModule


class ConfigError(Exception):
    """A bad value in the configuration: reported as one line, exit status 2."""


_NOISE = ("Parser key", "Does not validate", "Subtypes:", "Errors:", "Problem with given class_path", "Given value",
          "Expected a <class 'NoneType'>")


def condense(message: str) -> str:
    """jsonargparse's nested union report -> ``model.partition: got 'x'; choose one of ...``."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    reasons = [line.strip(" -") for line in message.splitlines()]
    reasons = [r for r in reasons if r and not r.startswith(_NOISE)] or [message.splitlines()[0]]
    reason = reasons[0]
    literal = re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", reason)
    if literal:
        reason = f"got {literal.group(2)!r}; choose one of {literal.group(1)}"
    return f"{'.'.join(keys)}: {reason}" if keys else reason


# --ckpt_path values that Lightning resolves itself (also "registry:<name>" and URLs)
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


class Trainer(L.Trainer):
    """Lightning's Trainer with one more entry point, ``info``."""

    def info(self, model: L.LightningModule, datamodule: L.LightningDataModule | None = None) -> None:
        """Print the blocks, their noise ranges and parameters, and the estimated training memory."""
        from dbl.info import describe

        print(describe(model, datamodule))


class DBLCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "info": {"model", "datamodule"}}

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the model's configuration with the hyperparameters stored in
        # --ckpt_path, silently dropping any model option given in the YAML or on the command
        # line. Say which ones, so nobody evaluates with settings they did not get.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        resolved_by_lightning = str(ckpt_path).split(":")[0] in _CKPT_KEYWORDS or "://" in str(ckpt_path)
        if ckpt_path and not resolved_by_lightning and not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path {ckpt_path}: no such file; give a checkpoint written by `dbl fit` "
                              "(e.g. <run>/version_<n>/checkpoints/last.ckpt) or 'last' to resume the latest")
        before = _flat(self.config[subcommand].get("model")) if subcommand else {}
        super()._parse_ckpt_path()
        after = _flat(self.config[subcommand].get("model")) if subcommand else {}
        replaced = [f"{k}: {before[k]!r} -> {after[k]!r}" for k in sorted(before) if k in after and before[k] != after[k]]
        if replaced:
            warnings.warn(
                "the checkpoint's hyperparameters replace these model options (for evaluation settings use the "
                "evaluation callbacks' own options): " + "; ".join(replaced),
                stacklevel=1,
            )

    def _resolve_last_checkpoint(self) -> None:
        # Lightning looks for `--ckpt_path last` in this run's checkpoint folder, which the logger
        # has just made a new, empty version_<n>: fit would silently train from scratch and
        # test would evaluate untrained weights. Resolve it to the newest checkpoint of this
        # experiment's earlier runs instead.
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        found = latest_checkpoint(self.trainer)
        if found is None and self.subcommand != "fit":
            raise ConfigError("ckpt_path last: this experiment has no checkpoint yet; train it first or give a file")
        if found is None:
            print("dbl: --ckpt_path last: this experiment has no earlier checkpoint; training from scratch",
                  file=sys.stderr)
        else:
            print(f"dbl: --ckpt_path last: using {found}", file=sys.stderr)
        config["ckpt_path"] = None if found is None else str(found)

    before_fit = before_validate = before_test = before_predict = _resolve_last_checkpoint

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            # jsonargparse re-raises our constructors' errors wrapped in a union report; the
            # original exception (which names the option) is the cause.
            raise ConfigError(str(err.__cause__ or err)) from err


def latest_checkpoint(trainer: L.Trainer) -> Path | None:
    """The newest ``last*.ckpt`` of the experiment's runs (every ``version_<n>`` of its logger, and
    any ModelCheckpoint with its own folder) or its on-exception checkpoint; None if there is none."""
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

    candidates: list[Path] = []
    for callback in trainer.callbacks:
        if isinstance(callback, OnExceptionCheckpoint):
            candidates.append(Path(callback.ckpt_path))
        elif isinstance(callback, ModelCheckpoint) and callback.dirpath:
            candidates += Path(callback.dirpath).glob("last*.ckpt")
    logger = trainer.logger
    if logger is not None and getattr(logger, "save_dir", None):
        candidates += (Path(logger.save_dir) / (logger.name or "")).glob("version_*/checkpoints/last*.ckpt")
    else:
        candidates += (Path(trainer.default_root_dir) / "checkpoints").glob("last*.ckpt")
    existing = [path for path in candidates if path.is_file()]
    return max(existing, key=lambda path: path.stat().st_mtime) if existing else None


def _flat(node, prefix: str = "") -> dict:
    """Namespace/dict -> {"init_args.overlap": 0.05, ...} for comparing configurations."""
    if node is None:
        return {}
    items = node.items() if isinstance(node, dict) else vars(node).items()
    out = {}
    for key, value in items:
        if isinstance(value, dict) or hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# For tools that use an experiment's model and data but not its Trainer: a Trainer that builds on
# any machine, whatever accelerator, devices or strategy the YAML asks for.
PORTABLE_TRAINER = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]


def load_experiment(config: str, overrides: list[str] = (), portable_trainer: bool = False) -> DBLCLI:
    """Build an experiment's model, data and trainer from its YAML without running anything
    (for tools and notebooks): ``cli.model``, ``cli.datamodule``, ``cli.trainer``.
    ``portable_trainer``: build the trainer on the CPU (``PORTABLE_TRAINER``), for tools that do not use it."""
    overrides = [*(PORTABLE_TRAINER if portable_trainer else []), *overrides]
    return DBLCLI(
        BlockwiseLightningModule,
        L.LightningDataModule,
        trainer_class=Trainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", config, *overrides],
    )


def _trainer_hint(message: str) -> str:
    """What to do instead, for Lightning's trainer errors whose own advice does not fit dbl."""
    if "gpu" in message.lower() and not torch.cuda.is_available():
        return "; this machine has no CUDA GPU: set trainer.accelerator to auto or cpu"
    if "gradient clipping" in message:
        return "; dbl clips each step's block itself: set model.init_args.gradient_clip_val instead"
    if "gradient accumulation" in message:
        return "; dbl steps one block per batch and does not accumulate: raise the data's batch_size instead"
    return ""


def main(args=None) -> None:
    # Checkpoints of manual optimization are taken after the step, which is what dbl wants.
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # OnExceptionCheckpoint makes fit resume from its checkpoint when one exists; say so only then.
    warnings.filterwarnings("ignore", message=r".*\.fit\(ckpt_path=None\)` was called without a model.*")
    try:
        DBLCLI(
            BlockwiseLightningModule,
            L.LightningDataModule,
            trainer_class=Trainer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            args=args,
        )
    except ArgumentError as err:
        print(f"dbl: configuration error: {condense(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    except ConfigError as err:
        print(f"dbl: configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except MisconfigurationException as err:  # Lightning's own checks of the trainer options
        print(f"dbl: configuration error: trainer: {err}{_trainer_hint(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    except UsageError as err:  # found only once the run started (missing data, a model that cannot load, ...)
        print(f"dbl: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
