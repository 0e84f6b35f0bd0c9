"""FID against the number of denoiser evaluations, for several solvers, of a trained image model.

    python tools/solver_fid.py --config experiments/fashion_mnist_dit_b3.yaml \
        --ckpt_path runs/fashion_mnist_dit_b3/version_0/checkpoints/last.ckpt \
        --solvers euler heun dpmpp_2m --steps 10 20 50 [--num-samples 500 --reference-size 1000]

For each solver and step count: samples through the block chain (``dbl.callbacks.FID`` with those
sampler settings; the experiment's CFG scale, and its grid unless ``--grid``), FID against the first ``--reference-size``
images of the test split, and the number of denoiser evaluations (NFE) one sample took, counted at
the chain (a guided evaluation, which runs the conditional and unconditional batch together,
counts once). The step count never depends on B: every step calls the one block that owns its sigma.
Prints a Markdown table and writes it, with every setting, to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from dbl.benchmark import default_accelerator
from dbl.callbacks import FID
from dbl.cli import load_experiment
from dbl.denoisers import EDMDenoiser
from dbl.diffusion.samplers import SOLVERS, check_solver
from dbl.errors import UsageError


class SamplingCalls:
    """Counts the chain's denoiser evaluations (``EDMDenoiser.__call__``) made inside ``module.sample``
    and the ``sample`` calls themselves, so NFE per sample = calls / sample calls."""

    def __init__(self, module):
        self.module, self.calls, self.samples, self.sampling = module, 0, 0, False

    def __enter__(self):
        chain_call, sample = self.chain_call, self.sample = EDMDenoiser.__call__, self.module.sample

        def counted_call(chain, *args, **kwargs):
            self.calls += self.sampling
            return chain_call(chain, *args, **kwargs)

        def counted_sample(*args, **kwargs):
            self.samples, self.sampling = self.samples + 1, True
            try:
                return sample(*args, **kwargs)
            finally:
                self.sampling = False

        EDMDenoiser.__call__, self.module.sample = counted_call, counted_sample
        return self

    def __exit__(self, *exc):
        EDMDenoiser.__call__ = self.chain_call
        del self.module.sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--solvers", nargs="+", default=["euler", "heun", "dpmpp_2m"], choices=SOLVERS)
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50])
    parser.add_argument("--grid", choices=["cdf", "karras"], default=None, help="sigma grid (default: the experiment's)")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--reference-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the results (default: next to the checkpoint)")
    args = parser.parse_args()
    if not Path(args.ckpt_path).is_file():
        parser.error(f"--ckpt_path {args.ckpt_path} does not exist")
    try:
        for solver in args.solvers:
            check_solver(solver)
    except UsageError as err:
        parser.error(str(err))
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|smaller than the logging).*")

    cli = load_experiment(args.config, portable_trainer=True)
    module, datamodule = cli.model, cli.datamodule
    module.load_state_dict(torch.load(args.ckpt_path, map_location="cpu", weights_only=True)["state_dict"])
    rows = []
    for solver in args.solvers:
        for steps in args.steps:
            fid = FID(num_samples=args.num_samples, reference_splits=["test"], reference_size=args.reference_size,
                      seeds=[args.seed], batch_size=args.batch_size, num_steps=steps, solver=solver, grid=args.grid)
            trainer = L.Trainer(accelerator=default_accelerator(), devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[fid], limit_test_batches=1, default_root_dir=str(Path(args.ckpt_path).parent))
            started = time.perf_counter()
            with SamplingCalls(module) as counter:
                trainer.test(module, datamodule=datamodule, verbose=False)
            row = dict(solver=solver, grid=args.grid or module.sample_defaults["grid"], steps=steps, nfe=counter.calls / counter.samples,
                       fid=float(trainer.callback_metrics["fid/test"]), seconds=round(time.perf_counter() - started, 1))
            rows.append(row)
            print(f"{solver:>10} {row['grid']:>6} {steps:>3} steps  NFE {row['nfe']:>5.0f}  FID {row['fid']:.2f}", flush=True)
    print("\n| solver | grid | steps | NFE | FID |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['solver']} | {r['grid']} | {r['steps']} | {r['nfe']:.0f} | {r['fid']:.1f} |")
    out = Path(args.out) if args.out else Path(args.ckpt_path).parent / "solver_fid.json"
    out.write_text(json.dumps(dict(config=args.config, ckpt_path=args.ckpt_path, num_samples=args.num_samples,
                                   reference_size=args.reference_size, seed=args.seed, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
