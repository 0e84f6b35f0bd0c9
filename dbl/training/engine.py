"""The block-wise training engine: manual optimization, one block per step, per-block optimizers.

``BlockwiseLightningModule`` owns everything that is the same for every task: which block trains
at each step (``dbl.training.schedules``), the optimizer and LR scheduler of each block and of the
shared input/output parameters, gradient clipping, per-block logging and checkpointed state.
A task subclass (images: ``ImageDiffusionModule``) says only how to compute one block's loss.

With ``num_blocks: 1`` the same module trains the network end to end (all layers, the whole noise
range): the baseline for like-for-like comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from typing import Literal, NamedTuple

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import Metric

from dbl.data.loaders import split_batch_index
from dbl.errors import DivergenceError, UsageError
from dbl.models.blockwise import BlockwiseNetwork
from dbl.training import rng
from dbl.training.checks import check_has_weights, check_optimizer_options, check_trainer_options
from dbl.training.offload import BlockOffloader
from dbl.training.schedules import make_schedule
from dbl.training.strategies import BlockwiseDDPStrategy


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


class BlockLoss(NamedTuple):
    """What a task returns for one block-wise step."""

    loss: torch.Tensor  # scalar that is back-propagated
    unweighted: torch.Tensor  # scalar, the same loss before per-sample weighting (for logs)
    noise_level: torch.Tensor  # [N] sigma (or t) drawn for each sample


class BlockwiseLightningModule(L.LightningModule):
    """Trains a network split into ``num_blocks`` blocks, one block per optimizer step.

    Args:
        network: a layered network (see ``dbl.models.blockwise``), e.g. ``dbl.models.DiT``.
        num_blocks: B. 1 trains end to end.
        layers_per_block: explicit split such as ``[4, 4, 4]`` or ``[3, 6, 3]``; required when B
            does not divide the depth.
        shared_io: share the input/output layers among blocks (updated every step, as the official
            code) or give each block its own copy (blocks share nothing).
        block_schedule: ``random`` (one uniformly chosen block per step) or ``phased``
            (``phase_steps`` steps on each block in turn, cycling).
        phase_steps: length of a phase, in optimizer steps.
        train_blocks: train only these blocks (e.g. ``[1]`` for one block per job); default all.
        schedule_seed: seed of the random schedule; the block at step k depends only on it and k.
        optimizer: optimizer factory, built once per block and once for the shared parameters.
        lr_scheduler: LR scheduler factory, one per optimizer; it steps only when its block
            trains, so a block's warm-up counts that block's own updates.
        shared_lr_scheduler: the shared input/output optimizer's scheduler factory; default
            ``lr_scheduler``. The shared part steps on EVERY step, B times as often as a block, so a
            schedule with a horizon (warm-up, cosine) needs B times the block's lengths here.
        gradient_clip_val: max global norm of the gradients of one step (block + shared); None: off.
        offload_inactive: keep only the training block's weights and optimizer state on the
            accelerator; the others wait in pinned host memory (``dbl.training.offload``). They
            move when the training block changes: once per phase with ``phased``, on most steps
            with ``random``. Evaluation and sampling bring every block back for their duration.
        activation_checkpointing: recompute each layer's activations in backward (both modes).
        accumulate_grad_batches: k > 1 accumulates the gradients of k batches before each optimizer
            step, all k on the same block (a step is k batches: ``max_steps``, the schedule and the
            schedulers count steps), for an effective batch k times the data's ``batch_size``.
            Lightning's own ``trainer.accumulate_grad_batches`` does not apply to this manual loop.
        skip_nonfinite_steps: a step whose loss or gradient norm is not finite stops the run with an
            error naming the step and block (``dbl.errors.DivergenceError``); with N > 0 up to N such
            steps are skipped instead (no update; the batch is dropped), and the N+1-th stops the run.
    """

    def __init__(
        self,
        network: nn.Module,
        num_blocks: int = 3,
        layers_per_block: Sequence[int] | None = None,
        shared_io: bool = True,
        block_schedule: Literal["random", "phased"] = "random",
        phase_steps: int = 1000,
        train_blocks: Sequence[int] | None = None,
        schedule_seed: int = 0,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        shared_lr_scheduler: LRSchedulerCallable | None = None,
        gradient_clip_val: float | None = 1.0,
        offload_inactive: bool = False,
        activation_checkpointing: bool = False,
        accumulate_grad_batches: int = 1,
        skip_nonfinite_steps: int = 0,
    ):
        super().__init__()
        # Under LightningCLI the hyperparameters are the YAML's (network and optimizer as class_path
        # dicts), so `load_from_checkpoint` rebuilds everything; built in Python, the network and
        # factories are objects that do not belong in a checkpoint's hyperparameters.
        from_yaml = _given_hyperparameters.get() is not None
        self.save_hyperparameters(ignore=[] if from_yaml else ["network", "optimizer", "lr_scheduler", "shared_lr_scheduler"])
        self.automatic_optimization = False
        self.network = BlockwiseNetwork(network, num_blocks, layers_per_block, shared_io, activation_checkpointing)
        self.schedule = make_schedule(block_schedule, num_blocks, train_blocks, phase_steps, schedule_seed)
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise UsageError(f"gradient_clip_val must be positive or null, got {gradient_clip_val}")
        self.gradient_clip_val = gradient_clip_val
        if accumulate_grad_batches < 1:
            raise UsageError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.accumulate_grad_batches = accumulate_grad_batches
        self._window: list[BlockLoss] = []  # the batches of the optimizer step under way
        if skip_nonfinite_steps < 0:
            raise UsageError(f"skip_nonfinite_steps must be >= 0, got {skip_nonfinite_steps}")
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        check_optimizer_options(optimizer, lr_scheduler)
        if shared_lr_scheduler is not None:
            if lr_scheduler is None:
                raise UsageError("shared_lr_scheduler needs lr_scheduler too (the blocks' schedule); set both or neither")
            check_optimizer_options(optimizer, shared_lr_scheduler, "shared_lr_scheduler")
        self.shared_lr_scheduler_factory = shared_lr_scheduler or lr_scheduler
        self.offload_inactive = offload_inactive
        self.offloader: BlockOffloader | None = None
        self.register_buffer("block_updates", torch.zeros(num_blocks, dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self._restored_rng: dict | None = None  # this rank's random state from a resumed checkpoint
        self._rng_outside_evaluation: dict | None = None

    @property
    def num_blocks(self) -> int:
        return self.network.num_blocks

    def prepare_data(self) -> None:
        # Lightning calls this after the data module's prepare_data and before the logger makes its
        # version folder: a bad trainer option or data that does not fit the network stops the run
        # here, before step 0, as a one-line error that leaves nothing behind.
        trainer = self._trainer
        if trainer is None:
            return
        check_trainer_options(trainer)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            stage = trainer.state.fn.value if trainer.state.fn is not None else "fit"
            datamodule.setup(stage)  # idempotent in dbl's data modules; Lightning's own call then finds it done
            self.check_data(datamodule, stage)

    def check_data(self, datamodule: L.LightningDataModule, stage: str) -> None:
        """Raise a ``UsageError`` naming the option when ``datamodule`` does not fit the network
        (shapes, classes, vocabulary, sequence length). Called before step 0; tasks override it."""

    @property
    def leaves_parameters_unused(self) -> bool:
        """Whether a training step leaves some parameters without a gradient: every other block's in
        block-wise training (a task whose objective skips part of the network says so too)."""
        return self.num_blocks > 1

    def setup(self, stage: str) -> None:
        check_has_weights(self, stage)  # before the strategy moves the model (meta tensors cannot be copied)
        # Data-parallel: DDP treats a parameter without a gradient as an error unless it looks for
        # unused parameters. Turn that on before the strategy wraps the model (right after this
        # hook), instead of failing at the second step.
        strategy = self._trainer.strategy if self._trainer is not None else None
        wrapped_in_ddp = isinstance(strategy, DDPStrategy) and not isinstance(strategy, BlockwiseDDPStrategy)
        if stage == "fit" and self.leaves_parameters_unused and wrapped_in_ddp:
            ddp_kwargs = strategy._ddp_kwargs  # read by DDPStrategy when it wraps the model
            if not ddp_kwargs.get("find_unused_parameters"):
                ddp_kwargs["find_unused_parameters"] = True
                rank_zero_info("dbl: DDP find_unused_parameters turned on (a training step leaves parameters unused)")

    def on_fit_start(self) -> None:
        if self.trainer.precision == "16-mixed":
            raise UsageError(
                "trainer.precision '16-mixed' needs loss scaling, which the block-wise manual loop does not do; "
                "use 'bf16-mixed' or '32-true'"
            )

    def on_train_start(self) -> None:
        if self._restored_rng is not None:
            # Resuming: continue every random stream where the checkpoint left it, so the resumed
            # run draws what the uninterrupted run would have (the data order is restored by
            # Lightning from the StatefulDataLoader's own state).
            rng.restore(self._restored_rng)
            self._restored_rng = None
        elif (sharing := self.trainer.distributed_sampler_kwargs or {}).get("num_replicas", 1) > 1:
            # seed_everything gives every process the same seed, so each would draw the same sigmas,
            # noise and label dropout for its own data: offset the seed by rank (as DiT does). The
            # block schedule does not use this generator, so every rank still trains the same block.
            # The rank among the processes that share the data: the global rank under DDP, the rank in
            # the block's group under BlockParallelStrategy (whose one-process groups draw as one process).
            torch.manual_seed((torch.initial_seed() + sharing["rank"]) % 2**63)
        # Below: after Lightning restored any checkpoint (and moved all optimizer state to the device).
        if self.offload_inactive:
            optimizers = self.optimizers()
            optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
            block_params = [self.network.block_parameters(b) for b in range(self.num_blocks)]
            self.offloader = BlockOffloader(block_params, [o.optimizer for o in optimizers[: self.num_blocks]], self.device)

    def all_blocks_on_device(self) -> None:
        """Evaluation and sampling visit every block: bring offloaded blocks back first."""
        if self.offloader is not None:
            self.offloader.load_all()

    def on_validation_start(self) -> None:
        # Validation in the middle of training must not move the training's random streams: a run
        # resumed from a checkpoint taken before a validation would otherwise draw other noise.
        self._rng_outside_evaluation = rng.collect() if self.trainer.state.fn == TrainerFn.FITTING else None
        self.all_blocks_on_device()

    def on_validation_end(self) -> None:
        # the module's hook runs after the callbacks' (sample grids, FID), so this covers them too
        if self._rng_outside_evaluation is not None:
            rng.restore(self._rng_outside_evaluation)
            self._rng_outside_evaluation = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A step can leave weights non-finite while its loss and gradients were finite (a huge update);
        # the next step's loss then stops the run. Never let such weights become the `last` to resume.
        # With EMA the average is the `state_dict` and the raw weights, which training resumes from, are
        # `current_model_state` (dbl.callbacks.EMA, whose hook runs before this one).
        weights = {**checkpoint.get("current_model_state", {}), **checkpoint["state_dict"]}
        broken = [name for name, value in weights.items()
                  if value.is_floating_point() and not torch.isfinite(value).all()]
        if broken:
            raise DivergenceError(
                f"training diverged by step {self.global_step}: {broken[0]} (and {len(broken) - 1} more weights) not "
                "finite; no checkpoint written; lower the learning rate and resume from the last checkpoint"
            )
        checkpoint["dbl_rng"] = rng.collect_all_ranks(self.trainer)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # checkpoints written before these buffers existed still load
        for buffer in ("skipped_steps",):
            checkpoint["state_dict"].setdefault(buffer, torch.zeros((), dtype=torch.long))
        states = checkpoint.get("dbl_rng")
        if states is not None:
            rank = self.global_rank if self._trainer is not None else 0
            self._restored_rng = states[rank] if rank < len(states) else None

    def on_test_start(self) -> None:
        self.all_blocks_on_device()

    # -- what the engine knows about itself --------------------------------------------------
    @property
    def last_trained_block(self) -> int | None:
        """The block the latest training step trained (None before the first step)."""
        return self.schedule.block_at(self.global_step - 1) if self.global_step > 0 else None

    @property
    def block_steps(self) -> int:
        """Block steps trained so far, all blocks together (checkpointed; after a merge of block-parallel
        jobs, the sum of theirs)."""
        return int(self.block_updates.sum())

    @property
    def layer_updates(self) -> int:
        """Updates summed over layers: a block step of a block with n layers adds n. Equal layer-updates
        is how block-wise and end-to-end runs are compared (method spec, section 4)."""
        return sum(int(u) * n for u, n in zip(self.block_updates.tolist(), self.network.layers_per_block))

    @property
    def depth(self) -> int:
        """Layers of the whole network, all blocks together."""
        return sum(self.network.layers_per_block)

    @contextmanager
    def sampling_mode(self):
        """Every block on the device, the network in eval mode (no label dropout), no autograd."""
        self.all_blocks_on_device()
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.network.train(was_training)

    def log_per_block(self, name: str, metric: Metric) -> None:
        """Log a per-block metric (``dbl.training.metrics``) as ``<name>/block<b>`` and reset it.

        Every process computes (and so syncs) it. A block that no sample reached (its ``count`` is
        0) is not logged; a block that was reached and gives NaN or inf is, so divergence shows.
        """
        counts = None
        if hasattr(metric, "count"):
            with metric.sync_context():  # every process's samples: all ranks then log the same blocks
                counts = metric.count.flatten().clone()
        # flatten: torchmetrics returns a one-block (end-to-end) vector as a 0-dim tensor
        values = metric.compute().flatten().tolist()
        reached = [True] * len(values) if counts is None else (counts > 0).tolist()
        for block, value in enumerate(values):
            if reached[block] and not (counts is None and math.isnan(value)):
                # already synced by compute(); sync_dist only tells Lightning so
                self.log(f"{name}/block{block}", value, sync_dist=True)
        metric.reset()

    # -- the task's part -------------------------------------------------------------------
    def block_loss(self, batch, block: int) -> BlockLoss:
        """Loss of ``block`` on ``batch``, with noise drawn from that block's training range."""
        raise NotImplementedError

    def evaluation_step(self, batch, batch_idx: int, stage: str) -> None:
        """One validation (``stage`` "val") or test ("test") batch: update and log the stage's metrics."""
        raise NotImplementedError

    def evaluation_epoch_end(self, stage: str) -> None:
        """Log what a stage computes over the whole epoch (per-block metrics)."""

    def example_batch(self, batch_size: int, seq_len: int | None = None):
        """Random data shaped like the task's batches, on the CPU, for ``tools/bench_memory.py`` and
        ``bench_speed.py`` (which measure memory and speed, not quality). ``seq_len``: the data's
        sequence length, for tasks on sequences (None: the network's own)."""
        raise NotImplementedError(f"{type(self).__name__} has no example_batch(batch_size, seq_len); the benchmarks need one")

    # -- evaluation: one path for validation and test --------------------------------------
    # evaluation_step gets the batch's index in the whole split, whatever process reads it: the
    # evaluations seed their draws with it, so their metrics do not depend on the process count
    def validation_step(self, batch, batch_idx: int) -> None:
        self.evaluation_step(batch, split_batch_index(batch_idx, self._trainer), "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self.evaluation_step(batch, split_batch_index(batch_idx, self._trainer), "test")

    def on_validation_epoch_end(self) -> None:
        self.evaluation_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self.evaluation_epoch_end("test")

    # -- optimization ----------------------------------------------------------------------
    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """One group per block, then the shared input/output group when there is one."""
        groups = [self.network.block_parameters(b) for b in range(self.num_blocks)]
        if self.network.shared_io:
            groups.append(self.network.shared_parameters())
        return groups

    def configure_optimizers(self):
        optimizers = [self.optimizer_factory(params) for params in self.parameter_groups()]
        if self.lr_scheduler_factory is None:
            return optimizers
        schedulers = [self.lr_scheduler_factory(opt) for opt in optimizers[: self.num_blocks]]
        schedulers += [self.shared_lr_scheduler_factory(opt) for opt in optimizers[self.num_blocks:]]
        return optimizers, schedulers

    def _optimizers_and_schedulers(self, block: int) -> tuple[list, list]:
        """The optimizers (and schedulers) that step when ``block`` trains: its own, then shared."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = self.lr_schedulers() or []
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        index = [block] + ([self.num_blocks] if self.network.shared_io else [])
        return [optimizers[i] for i in index], [schedulers[i] for i in index if i < len(schedulers)]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        # global_step counts block steps: the shared optimizer is stepped outside Lightning's
        # counter (below), so max_steps, checkpoint intervals and the schedule all mean "steps".
        block = self.schedule.block_at(self.global_step)
        if self.offloader is not None:
            self.offloader.activate(block)
        optimizers, schedulers = self._optimizers_and_schedulers(block)
        out = self.block_loss(batch, block)
        k = self.accumulate_grad_batches
        strategy = self.trainer.strategy
        if k > 1 and len(self._window) + 1 < k and isinstance(strategy, ParallelStrategy):
            sync = strategy.block_backward_sync()  # processes exchange gradients once per window, at its end
        else:
            sync = nullcontext()
        with sync:
            self.manual_backward(out.loss / k if k > 1 else out.loss)
        if k > 1:  # the step's loss is the mean over its k batches (equal sizes: drop_last)
            self._window.append(BlockLoss(out.loss.detach(), out.unweighted.detach(), out.noise_level.detach()))
            if len(self._window) < k:
                return out.loss.detach()
            window, self._window = self._window, []
            out = BlockLoss(torch.stack([w.loss for w in window]).mean(), torch.stack([w.unweighted for w in window]).mean(),
                            torch.cat([w.noise_level for w in window]))
        params = [p for g in (self.network.block_parameters(block), self.network.shared_parameters()) for p in g]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.gradient_clip_val or float("inf"))
        finite = bool(torch.isfinite(out.loss) & torch.isfinite(grad_norm))
        # every rank decides the same (one rank's NaN stops or skips the step everywhere), or the
        # replicas would drift apart or wait on each other
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            return self._nonfinite_step(block, out, grad_norm, optimizers)
        optimizers[0].step()
        for opt in optimizers[1:]:
            opt.optimizer.step()  # shared parameters: a raw step, not counted as a training step
        for opt in optimizers:  # free the gradients now: an idle block must not hold them
            opt.zero_grad(set_to_none=True)
        for sched in schedulers:
            sched.step()
        self.block_updates[block] += 1
        self._log_step(block, out, grad_norm)
        return out.loss.detach()

    def _nonfinite_step(self, block: int, out: BlockLoss, grad_norm: torch.Tensor, optimizers: list) -> None:
        """Stop at a non-finite loss or gradient norm before it reaches the weights, or skip the step."""
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        what = f"loss {out.loss.item():.4g}, gradient norm {grad_norm.item():.4g}"
        if int(self.skipped_steps) >= self.skip_nonfinite_steps:
            skipped = f" after skipping {int(self.skipped_steps)}" if self.skip_nonfinite_steps else ""
            raise DivergenceError(
                f"training diverged at step {self.global_step}, block {block}: {what}{skipped}; lower the learning "
                "rate (or raise warm-up), or set model.init_args.skip_nonfinite_steps to skip such steps"
            )
        self.skipped_steps += 1
        rank_zero_info(f"dbl: skipped step {self.global_step} (block {block}): {what} "
                       f"[{int(self.skipped_steps)} of {self.skip_nonfinite_steps} allowed]")
        self.log("train/skipped_steps", self.skipped_steps.float(), batch_size=out.noise_level.shape[0])
        return None

    def _log_step(self, block: int, out: BlockLoss, grad_norm: torch.Tensor) -> None:
        n = out.noise_level.shape[0]
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=n)
        self.log("train/block", float(block), prog_bar=True, batch_size=n)
        per_block = {
            f"train_loss/block{block}": out.loss.detach(),
            f"train_loss_unweighted/block{block}": out.unweighted.detach(),
            f"noise_level_median/block{block}": out.noise_level.detach().float().median(),
            f"grad_norm/block{block}": grad_norm.detach(),
            f"updates/block{block}": self.block_updates[block].float(),
        }
        gather = getattr(self.trainer.strategy, "gather_block_logs", None)  # BlockParallelStrategy: every group's
        self.log_dict(gather(per_block) if gather is not None else per_block, batch_size=n)
