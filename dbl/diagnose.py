"""``dbl diagnose``: what each block of a block-wise model does, for any task (no Lightning here).

The report has four parts:

1. competence map: the task's per-sample loss (unweighted and weighted) at ``n`` noise levels
   over the whole range, computed by EVERY block, not only the one that owns the level; the
   owner's curve is the map's entry of the owning block at each level (the chain's routing), and a
   twin (the same task end to end) adds its own curve on the same inputs;
2. hand-over: at each boundary, the two neighbouring blocks' predictions on the same inputs at the
   boundary's level (their distance, the task's ``diagnostic_divergence``), and the size of the
   sampler's update at the last step of one block and the first of the next against the steps
   around them;
3. trajectories: the task's own sampler with a hook on its denoiser (``StepRecorder``): which block
   each step called, and the estimate at the end of each block's share of the steps;
4. a per-block table: parameters, updates, final training loss, validation value, gradient norms,
   read from the run's TensorBoard scalars (``dbl.scalars``).

A task takes part by offering the diagnostic protocol (``PROTOCOL``), methods on its module:

- ``diagnostic_spec() -> DiagnosticSpec``: names of its level, losses, distance and update;
- ``diagnostic_levels(n) -> [n]`` levels over the task's whole range, noisiest first;
- ``diagnostic_loss(batch, level, block, generator) -> (unweighted [N], weighted [N])``: the
  task's own per-sample loss at ``level``, computed by ``block`` whatever range it owns; all its
  noise drawn from ``generator``, so two blocks (or two models) called with generators seeded
  alike see the same inputs;
- ``diagnostic_prediction(batch, level, block, generator)`` and ``diagnostic_divergence(a, b) -> [N]``;
- ``diagnostic_trajectory(batch, num_samples, generator) -> Trajectory``.

Every evaluation goes through the task's chain (``block=`` of its per-sample loss, the sampler's
routing); nothing here runs a network by another path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dbl.errors import UsageError

PROTOCOL = ("diagnostic_spec", "diagnostic_levels", "diagnostic_loss", "diagnostic_prediction",
            "diagnostic_divergence", "diagnostic_trajectory")


@dataclass(frozen=True)
class DiagnosticSpec:
    """What a task's diagnostic numbers are called (report labels)."""

    level: str  # "sigma" (EDM) or "t" (masked)
    log_scale: bool  # levels spaced (and plotted) in log
    unweighted: str  # the per-sample loss before weighting
    weighted: str  # the loss the task trains on / reports
    distance: str  # the hand-over distance between two blocks' predictions
    update: str  # the size of one sampler step's update
    kind: str = "images"  # trajectory snapshots: "images" ([N, C, H, W]), "tokens" (ids [N, L]) or "labels" (classes [N, 1])


@dataclass
class Trajectory:
    """One sampling run: per denoiser call its level, the block the chain called, and the size of the
    update; ``snapshots[b]`` the estimate at the end of block b's share; ``final`` the samples."""

    levels: list[float]
    blocks: list[int]
    updates: list[float]
    snapshots: dict[int, Any]
    final: Any
    notes: dict[int, Any] = field(default_factory=dict)  # per block, a second view (text: the state after it)
    context: Any = None  # what the samples continue (autoregressive text: the prompts)


class StepRecorder:
    """Wraps a sampler's denoiser ``fn(z, level, *rest)`` to record, per call, the level, the block the
    chain routes it to (``chain.block_at``: the same routing the call itself takes), the state and the output."""

    def __init__(self, chain):
        self.chain = chain
        self.levels: list[float] = []
        self.blocks: list[int] = []
        self.states: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, fn: Callable) -> Callable:
        def recorded(z, level, *rest):
            out = fn(z, level, *rest)
            self.levels.append(float(torch.as_tensor(level).flatten()[0]))
            self.blocks.append(self.chain.block_at(level))
            self.states.append(z.detach().clone())
            self.outputs.append(out.detach().clone())
            return out

        return recorded

    def last_calls(self) -> dict[int, int]:
        """{block: index of its last call}, in the order the blocks were visited."""
        last: dict[int, int] = {}
        for i, block in enumerate(self.blocks):
            last[block] = i
        return last

    def state_after(self, i: int, final: torch.Tensor) -> torch.Tensor:
        """The state the call ``i``'s step led to: the next call's input, or the final sample."""
        return self.states[i + 1] if i + 1 < len(self.states) else final


def mean_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N] KL(a || b) of log-probabilities [N, L, V], mean over the positions where both are given (NaN elsewhere)."""
    kl = (a.exp() * (a - b)).sum(-1)
    return kl.nan_to_num(0.0).sum(1) / (~kl.isnan()).sum(1).clamp(min=1)


def check_protocol(module, role: str = "the model") -> None:
    missing = [name for name in PROTOCOL if not callable(getattr(module, name, None))]
    if missing:
        raise UsageError(f"{role} ({type(module).__name__}) cannot be diagnosed: it has no {', '.join(missing)} "
                         "(the diagnostic protocol of dbl.diagnose)")


def _seed(seed: int, i: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + i)


@dataclass
class Diagnosis:
    spec: DiagnosticSpec
    num_blocks: int
    boundaries: list[float]  # inner boundaries, noisiest first (between block b and b + 1)
    levels: list[float]
    owners: list[int]
    unweighted: list[list[float]]  # [B][n] mean over the batch
    weighted: list[list[float]]
    owner_unweighted: list[float]
    owner_weighted: list[float]
    twin_unweighted: list[float] | None
    twin_weighted: list[float] | None
    handover: list[dict]
    trajectory: Trajectory
    blocks: list[dict]
    scalars_found: bool = False
    info: dict = field(default_factory=dict)


def inner_boundaries(chain) -> list[float]:
    """The level at which block b hands over to b + 1, for b = 0..B-2 (noisiest first)."""
    return [chain.partition.nominal_range(b)[0] for b in range(chain.num_blocks - 1)]


def competence_map(task, batch, levels, seed: int = 0, tick: Callable[[], None] = lambda: None):
    """[B, n] unweighted and weighted losses (means over the batch) of every block at every level;
    level i's draws come from a generator seeded by (seed, i), the same for every block."""
    blocks = task.denoiser.num_blocks
    unweighted = [[0.0] * len(levels) for _ in range(blocks)]
    weighted = [[0.0] * len(levels) for _ in range(blocks)]
    for i, level in enumerate(levels):
        for b in range(blocks):
            u, w = task.diagnostic_loss(batch, float(level), b, _seed(seed, i))
            unweighted[b][i], weighted[b][i] = float(u.float().mean()), float(w.float().mean())
            tick()
    return unweighted, weighted


def routed_curve(task, batch, levels, seed: int = 0, tick: Callable[[], None] = lambda: None):
    """The task's losses at each level by the block the chain routes it to (a twin's curve)."""
    unweighted, weighted = [], []
    for i, level in enumerate(levels):
        block = task.denoiser.block_at(torch.tensor(float(level), dtype=torch.float64))
        u, w = task.diagnostic_loss(batch, float(level), block, _seed(seed, i))
        unweighted.append(float(u.float().mean()))
        weighted.append(float(w.float().mean()))
        tick()
    return unweighted, weighted


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def handover(task, batch, trajectory: Trajectory, seed: int = 0, window: int = 3,
             tick: Callable[[], None] = lambda: None) -> list[dict]:
    """Per boundary between blocks b and b + 1: both blocks' predictions on the same inputs at the
    boundary's level and their distance; both blocks' losses there; and the sampler's update at the
    last step of b and the first of b + 1, with the step-to-step ratio of updates at the hand-over
    against the median ratio of the ``window`` steps on each side, and the median update of those steps."""
    rows = []
    for b, level in enumerate(inner_boundaries(task.denoiser)):
        i = 10_000 + b  # generators of their own, apart from the competence map's
        a = task.diagnostic_prediction(batch, level, b, _seed(seed, i))
        c = task.diagnostic_prediction(batch, level, b + 1, _seed(seed, i))
        distance = float(task.diagnostic_divergence(a, c).float().mean())
        loss_a = float(task.diagnostic_loss(batch, level, b, _seed(seed, i))[0].float().mean())
        loss_c = float(task.diagnostic_loss(batch, level, b + 1, _seed(seed, i))[0].float().mean())
        row = dict(boundary=b, level=level, blocks=(b, b + 1), distance=distance, loss_before=loss_a, loss_after=loss_c)
        calls = [j for j, blk in enumerate(trajectory.blocks) if blk == b]
        nxt = [j for j, blk in enumerate(trajectory.blocks) if blk == b + 1]
        u = trajectory.updates
        if calls and nxt and nxt[0] == calls[-1] + 1:
            j = calls[-1]
            row.update(step=j, update_before=u[j], update_after=u[j + 1], handover_ratio=_ratio(u[j + 1], u[j]))
            around = [k for k in range(max(0, j - window), min(len(u) - 1, j + 1 + window)) if k != j]
            ratios = [r for r in (_ratio(u[k + 1], u[k]) for k in around) if math.isfinite(r)]
            row["neighbour_ratio"] = float(torch.tensor(ratios).median()) if ratios else float("nan")
            sizes = [u[k] for k in range(max(0, j - window), min(len(u), j + 2 + window)) if k not in (j, j + 1) and math.isfinite(u[k])]
            row["neighbour_update"] = float(torch.tensor(sizes).median()) if sizes else float("nan")
        rows.append(row)
        tick()
    return rows


def block_table(module, scalars: dict[str, list[tuple[int, float]]], tail: int = 10) -> list[dict]:
    """Per block: layers, parameters, updates (the checkpoint's counter), final training loss (mean of the
    last ``tail`` logged values), the last per-block validation value and the gradient-norm history."""
    network = module.network
    rows = []
    val_tags = sorted({tag.split("/")[0] for tag in scalars if tag.startswith("val_") and "/block" in tag})
    for b in range(module.num_blocks):
        def series(tag):
            return scalars.get(f"{tag}/block{b}", [])

        def tail_mean(tag):
            points = series(tag)[-tail:]
            return sum(v for _, v in points) / len(points) if points else float("nan")

        grad = series("grad_norm")
        row = dict(
            block=b,
            layers=network.layers_per_block[b],
            parameters=sum(p.numel() for p in network.block_parameters(b)),
            updates=int(module.block_updates[b]),
            train_loss=tail_mean("train_loss"),
            grad_first=sum(v for _, v in grad[:tail]) / len(grad[:tail]) if grad else float("nan"),
            grad_last=tail_mean("grad_norm"),
            grad_max=max((v for _, v in grad), default=float("nan")),
            grad_history=grad,
            train_history=series("train_loss"),
        )
        for tag in val_tags:
            points = series(tag)
            row[tag] = points[-1][1] if points else float("nan")
        rows.append(row)
    return rows


def diagnose(task, batch, num_levels: int = 40, twin=None, twin_batch=None, num_samples: int = 4, seed: int = 0,
             scalars: dict | None = None, progress: bool = True) -> Diagnosis:
    """Evaluate everything the report shows; ``task`` and ``twin`` in eval mode on their device, ``batch`` on it."""
    from tqdm.auto import tqdm

    check_protocol(task)
    if twin is not None:
        check_protocol(twin, "the twin")
    spec = task.diagnostic_spec()
    levels = [float(v) for v in task.diagnostic_levels(num_levels)]
    blocks = task.denoiser.num_blocks
    total = len(levels) * blocks + (len(levels) if twin is not None else 0) + (blocks - 1) + 1
    bar = tqdm(total=total, desc="dbl diagnose", disable=not progress, leave=False)
    tick = lambda: bar.update(1)  # noqa: E731
    with torch.no_grad():
        unweighted, weighted = competence_map(task, batch, levels, seed, tick)
        owners = task.denoiser.owner(torch.tensor(levels, dtype=torch.float64)).tolist()
        twin_u = twin_w = None
        if twin is not None:
            twin_u, twin_w = routed_curve(twin, batch if twin_batch is None else twin_batch, levels, seed, tick)
        trajectory = task.diagnostic_trajectory(batch, num_samples, torch.Generator().manual_seed(seed))
        tick()
        rows = handover(task, batch, trajectory, seed, tick=tick)
    bar.close()
    return Diagnosis(
        spec=spec, num_blocks=blocks, boundaries=inner_boundaries(task.denoiser), levels=levels, owners=owners,
        unweighted=unweighted, weighted=weighted,
        owner_unweighted=[unweighted[o][i] for i, o in enumerate(owners)],
        owner_weighted=[weighted[o][i] for i, o in enumerate(owners)],
        twin_unweighted=twin_u, twin_weighted=twin_w, handover=rows, trajectory=trajectory,
        blocks=block_table(task, scalars or {}), scalars_found=bool(scalars),
    )


# -- the report -------------------------------------------------------------------------------
FIGURES = {"competence": "competence_map.png", "curves": "competence_curves.png", "handover": "handover.png",
           "trajectory": "trajectory.png", "training": "training.png"}


def _fmt(x, digits: int = 4) -> str:
    if isinstance(x, int):
        return f"{x:,}"
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


def _mark_boundaries(ax, d: Diagnosis) -> None:
    for level in d.boundaries:
        ax.axvline(level, color="black", linestyle=":", linewidth=1)


def figures(d: Diagnosis, decode: Callable | None = None) -> dict[str, Any]:
    """{name: matplotlib Figure} of the report (``FIGURES``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    spec, figs = d.spec, {}
    levels = torch.tensor(d.levels, dtype=torch.float64)
    # cell edges between the levels (geometric means for log-spaced levels)
    if spec.log_scale:
        logs = levels.log()
        mids = ((logs[1:] + logs[:-1]) / 2).exp()
        edges = torch.cat([levels[:1] ** 2 / mids[:1], mids, levels[-1:] ** 2 / mids[-1:]])
    else:
        mids = (levels[1:] + levels[:-1]) / 2
        edges = torch.cat([2 * levels[:1] - mids[:1], mids, 2 * levels[-1:] - mids[-1:]])
    fig, axes = plt.subplots(2, 1, figsize=(8, 1.6 + 0.9 * d.num_blocks), sharex=True, constrained_layout=True)
    for ax, values, name in zip(axes, (d.unweighted, d.weighted), (spec.unweighted, spec.weighted)):
        grid = torch.tensor(values, dtype=torch.float64)
        positive = grid[grid > 0]
        norm = LogNorm(float(positive.min()), float(positive.max())) if positive.numel() else None
        mesh = ax.pcolormesh(edges.numpy(), torch.arange(d.num_blocks + 1).numpy() - 0.5, grid.clamp(min=1e-12).numpy(),
                             norm=norm, cmap="viridis", shading="flat")
        for i, owner in enumerate(d.owners):  # the owner's cells
            ax.plot([edges[i], edges[i + 1]], [owner, owner], color="red", linewidth=2)
        _mark_boundaries(ax, d)
        ax.set_yticks(range(d.num_blocks))
        ax.set_ylabel("block")
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9)
        fig.colorbar(mesh, ax=ax, pad=0.01)
        if spec.log_scale:
            ax.set_xscale("log")
    axes[-1].set_xlabel(f"{spec.level} (boundaries dotted; red: the owning block)")
    figs["competence"] = fig

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), constrained_layout=True)
    for ax, values, owner, twin, name in zip(axes, (d.unweighted, d.weighted), (d.owner_unweighted, d.owner_weighted),
                                             (d.twin_unweighted, d.twin_weighted), (spec.unweighted, spec.weighted)):
        for b, row in enumerate(values):
            ax.plot(d.levels, row, linewidth=1, alpha=0.7, label=f"block {b}")
        ax.plot(d.levels, owner, color="black", linewidth=2.2, label="owner (block-wise chain)")
        if twin is not None:
            ax.plot(d.levels, twin, color="red", linestyle="--", linewidth=1.8, label="end-to-end twin")
        _mark_boundaries(ax, d)
        if spec.log_scale:
            ax.set_xscale("log")
        if min(min(r) for r in values) > 0:
            ax.set_yscale("log")
        ax.set_xlabel(spec.level)
        ax.set_title(name, fontsize=9)
    axes[0].legend(fontsize=7)
    figs["curves"] = fig

    t = d.trajectory
    fig, ax = plt.subplots(figsize=(8, 2.8), constrained_layout=True)
    steps = torch.arange(len(t.updates))
    for b in sorted(set(t.blocks)):
        idx = [i for i, blk in enumerate(t.blocks) if blk == b]
        ax.plot(steps[idx].numpy(), [t.updates[i] for i in idx], "o-", markersize=3, label=f"block {b}")
    for row in d.handover:
        if "step" in row:
            ax.axvline(row["step"] + 0.5, color="black", linestyle=":", linewidth=1)
    finite = [u for u in t.updates if math.isfinite(u) and u > 0]
    if finite and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("sampler call (noisiest first; hand-overs dotted)")
    ax.set_title(spec.update, fontsize=9)
    ax.legend(fontsize=7)
    figs["handover"] = fig

    if spec.kind == "images":
        order = list(t.snapshots)
        columns = [t.snapshots[b] for b in order] + [t.final]
        n = columns[0].shape[0]
        fig, axes = plt.subplots(n, len(columns), figsize=(1.2 * len(columns), 1.2 * n), squeeze=False)
        for j, images in enumerate(columns):
            for i in range(n):
                image = images[i].float().clamp(-1, 1).add(1).div(2).permute(1, 2, 0).cpu()
                ax = axes[i][j]
                ax.imshow(image.squeeze(-1).numpy() if image.shape[-1] == 1 else image.numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"after block {order[j]}" if j < len(order) else "sample", fontsize=7)
        fig.tight_layout()
        figs["trajectory"] = fig

    fig, axes = plt.subplots(1, 2, figsize=(10, 3), constrained_layout=True)
    any_history = False
    for row in d.blocks:
        for ax, key in zip(axes, ("grad_history", "train_history")):
            if row[key]:
                any_history = True
                ax.plot([s for s, _ in row[key]], [v for _, v in row[key]], linewidth=1, label=f"block {row['block']}")
    axes[0].set_title("gradient norm (before clipping)", fontsize=9)
    axes[1].set_title("training loss", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        if any_history:
            ax.set_yscale("log")
            ax.legend(fontsize=7)
    if any_history:
        figs["training"] = fig
    else:
        plt.close(fig)
    return figs


def _trajectory_text(d: Diagnosis, decode: Callable | None) -> list[str]:
    t, lines = d.trajectory, []
    decode = decode or (lambda ids: " ".join(str(int(i)) for i in ids))
    n = t.final.shape[0]
    if d.spec.kind == "labels":  # snapshots: the class nearest each block's estimate; notes: the true label
        if t.notes:
            truth = next(iter(t.notes.values())).flatten()
            hits = [f"after block {b}: {int((t.snapshots[b].flatten() == truth).sum())}/{n}" for b in t.snapshots]
            lines.append(f"agreeing with the label: {', '.join(hits)}; prediction: {int((t.final.flatten() == truth).sum())}/{n}")
        for i in range(min(n, 8)):
            steps = ", ".join(f"after block {b}: {decode(t.snapshots[b][i])}" for b in t.snapshots)
            truth = decode(next(iter(t.notes.values()))[i]) if t.notes else "?"
            lines.append(f"sample {i} (label {truth}): {steps}; prediction: {decode(t.final[i])}")
        return lines
    for i in range(n):
        lines.append(f"sample {i}:")
        if t.context is not None:
            lines.append(f"  prompt:                    {decode(t.context[i])}")
        for b in t.snapshots:
            if b in t.notes:
                lines.append(f"  after block {b} (state):    {decode(t.notes[b][i])}")
            lines.append(f"  after block {b} (estimate): {decode(t.snapshots[b][i])}")
        lines.append(f"  final:                    {decode(t.final[i])}")
    return lines


def markdown(d: Diagnosis, files: dict[str, str], decode: Callable | None = None) -> str:
    spec, info = d.spec, d.info
    out = [f"# dbl diagnose: {info.get('title', 'report')}", ""]
    for key in ("command", "model", "checkpoint", "twin", "batch", "time"):
        if key in info:
            out.append(f"- {key}: {info[key]}")
    out += ["", f"Noise level: {spec.level}; {len(d.levels)} levels from {_fmt(d.levels[0])} to {_fmt(d.levels[-1])}; "
            f"{d.num_blocks} blocks; hand-overs at {spec.level} = {', '.join(_fmt(x) for x in d.boundaries) or '-'}.", ""]

    out += ["## 1. Competence map", "",
            f"Every block evaluated at every level on the same inputs (the same data and noise draws per level). "
            f"Top: {spec.unweighted}; bottom: {spec.weighted}. Red: the block the chain routes the level to.", "",
            f"![competence map]({files['competence']})", "", f"![competence curves]({files['curves']})", ""]
    header = "| block | owns | best at (levels) | of which its own | mean weighted loss on its own levels | "
    header += "same levels, best other block |" if d.num_blocks > 1 else ""
    out += [header, "|" + "---|" * (header.count("|") - 1)]
    for b in range(d.num_blocks):
        own = [i for i, o in enumerate(d.owners) if o == b]
        best = [i for i in range(len(d.levels)) if min(range(d.num_blocks), key=lambda k: d.weighted[k][i]) == b]
        mean_own = sum(d.weighted[b][i] for i in own) / len(own) if own else float("nan")
        row = f"| {b} | {len(own)} | {len(best)} | {len([i for i in best if i in own])} | {_fmt(mean_own)} |"
        if d.num_blocks > 1:
            others = [min(d.weighted[k][i] for k in range(d.num_blocks) if k != b) for i in own]
            row += f" {_fmt(sum(others) / len(others) if others else float('nan'))} |"
        out.append(row)
    if d.twin_weighted is not None:
        n = len(d.levels)
        chain_mean = sum(d.owner_weighted) / n
        twin_mean = sum(d.twin_weighted) / n
        wins = sum(1 for a, b in zip(d.owner_weighted, d.twin_weighted) if a < b)
        out += ["", f"Over the {n} levels (uniform in {'log ' if spec.log_scale else ''}{spec.level}), mean {spec.weighted}: "
                f"block-wise chain {_fmt(chain_mean)}, end-to-end twin {_fmt(twin_mean)}; the chain is lower at {wins} of {n} levels."]

    out += ["", "## 2. Hand-over consistency", "",
            f"At each boundary, both neighbouring blocks on the same inputs at the boundary's level: {spec.distance}, and each "
            f"one's {spec.unweighted}. Sampler: {spec.update} at the last call of the earlier block and the first of the later "
            "one, against the median update of the 3 calls on each side; 'ratio' is after/before, against the median "
            "step-to-step ratio of the calls around it.", "",
            f"![update sizes]({files['handover']})", "",
            f"| boundary | {spec.level} | distance | loss, earlier block | loss, later block | update before | update after | "
            "median update around | ratio at hand-over | median ratio around |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d.handover:
        out.append(f"| {r['blocks'][0]} -> {r['blocks'][1]} | {_fmt(r['level'])} | {_fmt(r['distance'])} | {_fmt(r['loss_before'])} | "
                   f"{_fmt(r['loss_after'])} | {_fmt(r.get('update_before'))} | {_fmt(r.get('update_after'))} | {_fmt(r.get('neighbour_update'))} | "
                   f"{_fmt(r.get('handover_ratio'))} | {_fmt(r.get('neighbour_ratio'))} |")
    if not d.handover:
        out.append("| (one block: no hand-over) | | | | | | | | | |")

    t = d.trajectory
    out += ["", "## 3. Trajectories", "",
            f"The task's own sampler, {len(t.blocks)} denoiser calls; blocks called in order: "
            + ", ".join(f"{b} x{t.blocks.count(b)}" for b in dict.fromkeys(t.blocks)) + ".", ""]
    if "trajectory" in files:
        out += ["Each row a sample; each column the denoised estimate at the end of a block's share of the steps, then the sample.",
                "", f"![trajectories]({files['trajectory']})", ""]
    else:
        out += ["Per sample: after each block's share of the steps, the class nearest the block's estimate of the label "
                "embedding, then the chain's prediction." if spec.kind == "labels" else
                "Per sample: after each block's share of the steps, the state ('_' still masked) and the estimate "
                "(every masked position filled with the block's most likely token), then the sample.", "", "```",
                *_trajectory_text(d, decode), "```", ""]

    out += ["## 4. Blocks", ""]
    val_tags = [k for k in (d.blocks[0] if d.blocks else {}) if k.startswith("val_")]
    out += ["| block | layers | parameters | updates | final train loss | " + " | ".join(f"last {t}" for t in val_tags)
            + (" | " if val_tags else "") + "grad norm: first / last / max |",
            "|" + "---|" * (6 + len(val_tags))]
    for r in d.blocks:
        vals = " | ".join(_fmt(r[t]) for t in val_tags) + (" | " if val_tags else "")
        out.append(f"| {r['block']} | {r['layers']} | {r['parameters']:,} | {r['updates']:,} | {_fmt(r['train_loss'])} | {vals}"
                   f"{_fmt(r['grad_first'])} / {_fmt(r['grad_last'])} / {_fmt(r['grad_max'])} |")
    if "training" in files:
        out += ["", "Train loss: mean of the last 10 logged values; grad norm first / last: means of the first and last 10.", "",
                f"![training]({files['training']})"]
    elif not d.scalars_found:
        out += ["", "No TensorBoard scalars were found next to the checkpoint: parameters and updates come from the checkpoint."]
    return "\n".join(out) + "\n"


def numbers(d: Diagnosis) -> dict:
    """The report's numbers (levels, the map, the curves, hand-overs, the sampler's calls, the block table), for JSON."""
    blocks = [{k: v for k, v in row.items() if not k.endswith("history")} for row in d.blocks]
    t = d.trajectory
    return dict(spec=vars(d.spec), boundaries=d.boundaries, levels=d.levels, owners=d.owners, unweighted=d.unweighted,
                weighted=d.weighted, owner_unweighted=d.owner_unweighted, owner_weighted=d.owner_weighted,
                twin_unweighted=d.twin_unweighted, twin_weighted=d.twin_weighted, handover=d.handover,
                sampler=dict(levels=t.levels, blocks=t.blocks, updates=t.updates), blocks=blocks)


def write_report(d: Diagnosis, out_dir: str | Path, decode: Callable | None = None, writer=None, step: int = 0,
                 dpi: int = 80) -> Path:
    """Write ``report.md``, its PNG figures and ``diagnosis.json`` (the numbers) into ``out_dir``; with a TensorBoard ``writer``
    (``SummaryWriter``), the same figures as ``diagnose/<name>`` (and text trajectories as text)."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = figures(d, decode)
    files = {}
    for name, fig in figs.items():
        files[name] = FIGURES[name]
        fig.savefig(out_dir / FIGURES[name], dpi=dpi)
        if writer is not None:
            writer.add_figure(f"diagnose/{name}", fig, global_step=step, close=False)
        plt.close(fig)
    text = markdown(d, files, decode)
    if writer is not None:
        if d.spec.kind != "images":
            writer.add_text("diagnose/trajectory", "\n".join("    " + line for line in _trajectory_text(d, decode)), step)
        writer.flush()
    path = out_dir / "report.md"
    path.write_text(text)
    (out_dir / "diagnosis.json").write_text(json.dumps(numbers(d), indent=1))
    return path
