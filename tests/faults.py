"""Callbacks for fault-injection tests, loaded by `dbl fit` subprocesses through a YAML's class_path
(the tests put this folder on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

TESTS = Path(__file__).resolve().parent


def run_dbl(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m dbl *args`` in a child, as a user runs it, with this folder importable (these
    callbacks) and one thread per process. SIGINT is reset to its default in the child: a shell running
    the suite in the background (CI runners, nohup) starts its children with SIGINT ignored. The
    child is always killed on the way out, whatever failed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dbl", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class RecordSteps(Callback):
    """Append one JSON line per training step: step, block, loss (exact, as float.hex)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "block": pl_module.last_trained_block,
                                "loss": float(loss).hex()}) + "\n")


class SignalAt(Callback):
    """Send ``signal`` to this process at the end of training step ``step``: a preemption (SIGTERM) or
    a hard kill (SIGKILL) at an exact, reproducible point, instead of a race against the clock."""

    def __init__(self, step: int, signal_name: str, once_file: str):
        self.step = step
        self.signal = getattr(signal, signal_name)
        self.once_file = Path(once_file)  # so that the rerun of the same command is not stopped again

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.once_file.exists():
            self.once_file.touch()
            os.kill(os.getpid(), self.signal)


class DrawInValidation(Callback):
    """Draw from the global random streams during validation, as a user's callback may: training
    must not notice (validation runs at different points of an interrupted run than of a whole one)."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        torch.rand(3)


class BrokenNetwork(torch.nn.Module):
    """A network whose constructor has a bug (a TypeError of its own, not a bad setting)."""

    def __init__(self, depth: int = 2):
        super().__init__()
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")
