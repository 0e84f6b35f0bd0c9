"""Save a checkpoint when a run is interrupted, but only once it has trained."""

from __future__ import annotations

from lightning.pytorch.callbacks import OnExceptionCheckpoint as LightningOnExceptionCheckpoint


class OnExceptionCheckpoint(LightningOnExceptionCheckpoint):
    """Lightning's ``OnExceptionCheckpoint`` (Ctrl-C, SIGTERM or a crash saves
    ``<dirpath>/on_exception.ckpt``; the next ``dbl fit`` with the same YAML resumes from it and
    deletes it when done), except that nothing is saved before the first training step.

    An error that stops a run before it trains is almost always a configuration or data problem
    (a missing dataset, a vocabulary that does not fit the network). Saving there would write the
    untrained model, hundreds of MiB for the paper's models, and the corrected rerun would then
    resume from a checkpoint of the old configuration.

    Args:
        dirpath: folder of ``on_exception.ckpt``; one per experiment.
        filename: checkpoint name without extension.
    """

    def on_exception(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step > 0:
            super().on_exception(trainer, *args, **kwargs)
