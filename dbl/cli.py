"""``dbl fit|validate|test|predict|info --config run.yaml``: LightningCLI, plus ``info``.

The YAML is the whole experiment (model, data, trainer, callbacks). ``info`` builds the same
objects and prints the blocks, their noise ranges, parameter counts and the estimated memory of a
training step, without training.
"""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

from dbl.data.images import MissingDataError
from dbl.training.engine import BlockwiseLightningModule


class ConfigError(SystemExit):
    """A bad value in the configuration: reported as one line, exit status 2."""


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

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            raise ConfigError(f"dbl {self.subcommand}: configuration error: {err}") from err


def main(args=None) -> None:
    try:
        DBLCLI(
            BlockwiseLightningModule,
            L.LightningDataModule,
            trainer_class=Trainer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except ConfigError as err:
        print(err.code, file=sys.stderr)
        raise SystemExit(2) from None
    except MissingDataError as err:  # data found missing only when a run starts (e.g. a failed download)
        print(f"dbl: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
