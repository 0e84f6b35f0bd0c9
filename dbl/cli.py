"""``dbl fit|validate|test|predict|info|export|diagnose --config run.yaml``: LightningCLI, plus ``info``, ``export``
and ``diagnose``.

The YAML is the whole experiment (model, data, trainer, callbacks). ``info`` builds the same
objects and prints the blocks, their noise ranges, parameter counts and the estimated memory of a
training step, without training. ``export --ckpt_path <ckpt> --out <dir>`` writes a trained
checkpoint as a folder to share and load back (``dbl.export``). ``diagnose --ckpt_path <ckpt> [--twin e2e.yaml
--twin_ckpt <ckpt>]`` writes a report of what each block does (``dbl.diagnose``, ``dbl.diagnostics_cli``).
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
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dbl.errors import DivergenceError, UsageError
from dbl.training.checks import check_has_weights
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


def config_syntax_error(message: str, args) -> str | None:
    """For jsonargparse's "Problems parsing config" (YAML that does not parse): ``<file>:<line>: <problem>``
    for the first ``--config`` file that does not parse; None when no file is to blame."""
    if not message.startswith("Problems parsing config"):
        return None
    import yaml

    args = list(sys.argv[1:] if args is None else args)
    paths = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in paths:
        try:
            yaml.safe_load(Path(path).read_text())
        except OSError:
            continue
        except yaml.MarkedYAMLError as err:
            mark = err.context_mark or err.problem_mark
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            what = "; ".join(str(x) for x in (err.context, err.problem) if x)
            return f"{where}: YAML syntax error ({what}{f', line {err.problem_mark.line + 1}' if err.problem_mark else ''}); fix the file"
        except yaml.YAMLError as err:
            return f"{path}: YAML error ({str(err).splitlines()[0]}); fix the file"
    return None


def usage_line(err: Exception) -> str:
    """A UsageError's message as one line; raised in a DataLoader worker, it arrives wrapped in the
    worker's traceback, whose last line holds the message."""
    message = str(err).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split("Error: ", 1)[-1]
    return " ".join(message.splitlines())


# --ckpt_path values that Lightning resolves itself (also "registry:<name>" and URLs)
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


class Trainer(L.Trainer):
    """Lightning's Trainer with one more entry point, ``info``."""

    def info(self, model: L.LightningModule, datamodule: L.LightningDataModule | None = None) -> None:
        """Print the blocks, their noise ranges and parameters, and the estimated training memory."""
        from dbl.info import describe

        print(describe(model, datamodule))

    def export(self, model: L.LightningModule, datamodule: L.LightningDataModule | None = None,
               ckpt_path: str | None = None, out: str | None = None, overwrite: bool = False) -> None:
        """Write a checkpoint as a folder to share: weights, model config, tokenizer, model card (and a plain
        transformers folder where the model has a next-token path); ``dbl.load_exported`` loads it back.

        Args:
            ckpt_path: the checkpoint, or ``last``: this experiment's newest.
            out: the folder to write; it must be new or empty.
            overwrite: replace an earlier export at ``out``.
        """
        from dbl.export import check_export_options, export

        check_export_options(ckpt_path, out, overwrite)
        path = export(model, ckpt_path, out, datamodule=datamodule, overwrite=overwrite, callbacks=self.callbacks)
        print(f"dbl: exported {ckpt_path} to {path}", file=sys.stderr)


    def diagnose(self, model: L.LightningModule, datamodule: L.LightningDataModule | None = None,
                 ckpt_path: str | None = None, twin: str | None = None, twin_ckpt: str | None = None,
                 out: str | None = None, levels: int = 40, batch_size: int = 64, samples: int = 4, seed: int = 0,
                 progress: bool = True) -> None:
        """Write a report of what each block does (``dbl.diagnose``): the loss of every block at every noise
        level, the hand-overs, sampling trajectories and a per-block table; Markdown with PNG figures, the same
        figures in the run's TensorBoard folder.

        Args:
            ckpt_path: the checkpoint, or ``last``: this experiment's newest.
            twin: the YAML of the same task trained end to end (``num_blocks: 1``): its curve joins the map.
            twin_ckpt: the twin's checkpoint.
            out: the report's folder; default ``<run>/diagnose`` next to the checkpoint's run.
            levels: noise levels of the competence map (40 or more span the range).
            batch_size: validation samples every evaluation uses (the first of the validation split).
            samples: samples drawn for the trajectories.
            seed: seed of the noise draws (the same for every block and for the twin).
            progress: show a progress bar.
        """
        from dbl.diagnostics_cli import run_diagnose

        path = run_diagnose(model, datamodule, ckpt_path, twin, twin_ckpt, out, levels, batch_size, samples, seed, progress)
        print(f"dbl: diagnose report written to {path}", file=sys.stderr)


class DBLCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "info": {"model", "datamodule"}, "export": {"model", "datamodule"},
                "diagnose": {"model", "datamodule"}}

    def before_instantiate_classes(self) -> None:
        # export reads a checkpoint and writes files: its options are checked before the model is built (which
        # may load a large pretrained model), and its trainer must build on any machine (a login node)
        if self.config.get("subcommand") == "export":
            from dbl.export import check_export_options

            options = self.config["export"]
            check_export_options(options.get("ckpt_path"), options.get("out"), options.get("overwrite"))
            trainer = options["trainer"]
            trainer["accelerator"], trainer["devices"], trainer["strategy"] = "cpu", 1, "auto"
        if self.config.get("subcommand") == "diagnose":  # its own device choice (dbl.diagnostics_cli), any machine
            from dbl.diagnostics_cli import check_diagnose_options

            options = self.config["diagnose"]
            check_diagnose_options(options)
            trainer = options["trainer"]
            trainer["accelerator"], trainer["devices"], trainer["strategy"] = "cpu", 1, "auto"

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--fresh", type=bool, default=False,
                            help="fit: start from step 0 even if this experiment has checkpoints to resume from")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the model's configuration with the hyperparameters stored in
        # --ckpt_path, silently dropping any model option given in the YAML or on the command
        # line. For evaluation, say which ones, so nobody evaluates with settings they did not get;
        # for fit, refuse: the run would train with settings other than those the user asked for.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        resolved_by_lightning = str(ckpt_path).split(":")[0] in _CKPT_KEYWORDS or "://" in str(ckpt_path)
        if ckpt_path and not resolved_by_lightning and not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path {ckpt_path}: no such file; give a checkpoint written by `dbl fit` "
                              "(e.g. <run>/version_<n>/checkpoints/last.ckpt) or 'last' to resume the latest")
        step = None
        if ckpt_path and not resolved_by_lightning:
            step = read_checkpoint(Path(ckpt_path), "give a checkpoint written by `dbl fit`").get("global_step")
        yours = self.config[subcommand].get("model") if subcommand else None
        super()._parse_ckpt_path()
        saved = self.config[subcommand].get("model") if subcommand else None
        changed = _changed_options(saved, yours, "model.") if yours is not None and saved is not None else []
        if changed and subcommand == "fit":
            raise ConfigError(f"ckpt_path {ckpt_path} (step {step}) was written with other model options (checkpoint's "
                              f"-> yours): {'; '.join(changed)}; to resume, undo the change; to start over, drop "
                              "--ckpt_path and add --fresh")
        if changed:
            warnings.warn(
                "the checkpoint's hyperparameters replace these model options (checkpoint's -> yours; for evaluation "
                "settings use the evaluation callbacks' own options): " + "; ".join(changed),
                stacklevel=1,
            )

    def _resolve_last_checkpoint(self) -> None:
        # Lightning looks for `--ckpt_path last` in this run's checkpoint folder, which the logger
        # has just made a new, empty version_<n>: fit would silently train from scratch and
        # test would evaluate untrained weights. Resolve it to the newest checkpoint of this
        # experiment's earlier runs instead.
        config = self.config_init[self.subcommand]
        if "weights_only" in config:  # every checkpoint a user hands in is data, not code
            config["weights_only"] = True
        if config.get("ckpt_path") != "last":
            return
        found = latest_checkpoint(self.trainer)
        if found is None:
            raise ConfigError("ckpt_path last: this experiment has no checkpoint yet; train it first or give a file")
        read_checkpoint(found, "give another checkpoint with --ckpt_path")
        print(f"dbl: --ckpt_path last: using {found}", file=sys.stderr)
        config["ckpt_path"] = str(found)

    before_validate = before_test = before_predict = before_export = before_diagnose = _resolve_last_checkpoint

    def before_fit(self) -> None:
        """Re-running an interrupted experiment's command resumes it (preemption, a crash, a hard kill):
        from the newest of its on-exception and periodic ``last`` checkpoints, unless ``--fresh``."""
        config = self.config_init["fit"]
        config["weights_only"] = True
        if config.get("fresh"):
            if config.get("ckpt_path"):
                raise ConfigError("--fresh starts from step 0 and --ckpt_path resumes a checkpoint: give one of them")
            config["ckpt_path"] = None
            return
        if config.get("ckpt_path") not in (None, "last"):
            return  # a file the user named: checked, and its options compared, in _parse_ckpt_path
        found = latest_checkpoint(self.trainer)
        if found is None:
            if config.get("ckpt_path") == "last":
                print("dbl: --ckpt_path last: this experiment has no earlier checkpoint; training from scratch",
                      file=sys.stderr)
            config["ckpt_path"] = None
            return
        discard = f"to start over, add --fresh (or delete {found})"
        checkpoint = read_checkpoint(found, discard)
        changed = _changed_options(checkpoint.get("hyper_parameters") or {}, dict(self.model.hparams), "model.init_args.")
        if changed:
            raise ConfigError(f"{found} (step {checkpoint.get('global_step')}) was written with other model options "
                              f"(checkpoint's -> yours): {'; '.join(changed)}; to resume, undo the change; {discard}")
        print(f"dbl: resuming from {found} (step {checkpoint.get('global_step')}); {discard}", file=sys.stderr)
        config["ckpt_path"] = str(found)

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand != "info":  # a network built on the meta device (shapes only) cannot run: refuse before any data
            check_has_weights(self.model, subcommand)
        super()._run_subcommand(subcommand)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            # jsonargparse re-raises our constructors' errors wrapped in a union report; the
            # original exception (which names the option) is the cause. Only a UsageError is the
            # user's to fix; any other error is a defect and keeps its traceback.
            cause = err.__cause__ or err
            if isinstance(cause, UsageError):
                raise ConfigError(str(cause)) from err
            raise


def read_checkpoint(path: Path, fix: str) -> dict:
    """A checkpoint's contents (tensors memory-mapped, not read), or a ConfigError naming the file and ``fix``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated, not a torch file, or holding code: all unusable here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path} cannot be read as a checkpoint ({reason[:160]}); {fix}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a checkpoint written by `dbl fit` (no state_dict); {fix}")
    return checkpoint


def _changed_options(saved, yours, prefix: str) -> list[str]:
    """``["<prefix>optimizer.init_args.lr: 0.001 -> 0.002", ...]``: the model options whose values differ
    between a checkpoint (``saved``) and the configuration (``yours``), as dicts or jsonargparse
    Namespaces. Options one side does not have at all (added to dbl after the checkpoint was
    written) and Lightning's ``_``-keys are left out."""

    def option(key: str) -> str:  # "init_args.optimizer.init_args.lr" -> "optimizer"
        parts = key.split(".")
        return parts[1] if parts[0] == "init_args" and len(parts) > 1 else parts[0]

    saved, yours = _flat(saved), _flat(yours)
    both = {option(k) for k in saved} & {option(k) for k in yours}
    keys = sorted(k for k in saved.keys() | yours.keys() if option(k) in both and not k.split(".")[-1].startswith("_"))
    return [f"{prefix}{k}: {saved.get(k)!r} -> {yours.get(k)!r}" for k in keys if saved.get(k) != yours.get(k)]


def latest_checkpoint(trainer: L.Trainer) -> Path | None:
    """The newest ``last*.ckpt`` of the experiment's runs (every ``version_<n>`` of its logger, and
    any ModelCheckpoint with its own folder) or its on-exception checkpoint; None if there is none."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dbl.callbacks import OnExceptionCheckpoint

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
        return "; dbl's manual loop accumulates itself: set model.init_args.accumulate_grad_batches instead"
    return ""


def main(args=None) -> None:
    # Checkpoints of manual optimization are taken after the step, which is what dbl wants.
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated.*")  # torchdata's StatefulDataLoader
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
    except SIGTERMException:  # a scheduler's preemption: the on-exception checkpoint (if any) said where it saved
        print("dbl: stopped by SIGTERM; exit status 143 (run the same command to resume)", file=sys.stderr)
        raise SystemExit(143) from None
    except DivergenceError as err:
        print(f"dbl: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except ArgumentError as err:
        print(f"dbl: configuration error: {config_syntax_error(str(err), args) or condense(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    except ConfigError as err:
        print(f"dbl: configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except MisconfigurationException as err:  # Lightning's own checks of the trainer options
        print(f"dbl: configuration error: trainer: {err}{_trainer_hint(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    except UsageError as err:  # found only once the run started (missing data, a model that cannot load, ...)
        print(f"dbl: {usage_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
