"""What ``dbl predict`` writes for the classification tasks."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from dbl.callbacks.paths import run_dir


class ClassPredictionWriter(BasePredictionWriter):
    """Writes the predicted class of every image ``dbl predict`` reads (the data module's test split) to
    ``<output_dir>/predictions.csv``: ``index,predicted,label``, and the accuracy over the file on the
    console at the end. With several processes each writes ``predictions_rank<r>.csv`` (indices are
    positions in that process's share).

    Args:
        output_dir: destination; default ``<log_dir>/predictions`` of the predict run.
    """

    def __init__(self, output_dir: str | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self._path: Path | None = None
        self._rows = self._correct = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = Path(self.output_dir) if self.output_dir else run_dir(trainer) / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions_rank{trainer.global_rank}.csv"
        self._path, self._rows, self._correct = folder / name, 0, 0
        with open(self._path, "w", newline="") as f:
            csv.writer(f).writerow(["index", "predicted", "label"])

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        labels = batch[1].tolist() if isinstance(batch, (tuple, list)) and len(batch) > 1 else [""] * len(prediction)
        with open(self._path, "a", newline="") as f:
            writer = csv.writer(f)
            for predicted, label in zip(prediction.tolist(), labels):
                writer.writerow([self._rows, predicted, label])
                self._rows += 1
                self._correct += label != "" and predicted == label

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        print(f"dbl: {self._rows} predictions in {self._path} (accuracy {self._correct / max(self._rows, 1):.4f})")
