"""Data parallelism whose gradient traffic shrinks with B.

PyTorch's DDP all-reduces every gradient bucket at every step, including the buckets of blocks that
did not train (their gradients are zeros; pytorch/pytorch issue 42183), so a block-wise step moves
the whole model's gradients. ``BlockwiseDDPStrategy`` is Lightning's ``DDPStrategy`` without the DDP
wrapper: after each backward it averages, in one flat all-reduce, exactly the gradients that exist,
which in a block-wise step are the training block's and the shared input/output parameters' (the
engine frees every gradient after its step). A step then moves about 1/B of the model's gradients
plus the shared part. Everything else (launch, process group, samplers, metric sync) is DDP's.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy


class BlockwiseDDPStrategy(DDPStrategy):
    """``trainer.strategy: {class_path: dbl.training.BlockwiseDDPStrategy}`` (same options as ``ddp``).

    ``bytes_reduced``: gradient bytes this process has all-reduced so far (for benchmarks and tests).
    """

    strategy_name = "ddp_blockwise"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bytes_reduced = 0
        self._reduce_after_backward = True

    def configure_ddp(self) -> None:
        # no DistributedDataParallel wrapper; start every process from rank 0's weights, as DDP does
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            dist.broadcast(tensor.data, src=0)

    @contextmanager
    def block_backward_sync(self) -> Generator:
        """Accumulating: keep the gradients local until the window's last backward."""
        self._reduce_after_backward = False
        try:
            yield
        finally:
            self._reduce_after_backward = True

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        if not self._reduce_after_backward or self.world_size == 1:
            return
        self._average([p.grad for p in self.lightning_module.parameters() if p.grad is not None], None, self.world_size)

    def _average(self, grads: list[torch.Tensor], group, size: int) -> None:
        """Average ``grads`` over the ``size`` processes of ``group`` (None: all), one flat all-reduce per dtype."""
        for dtype in sorted({g.dtype for g in grads}, key=str):
            same = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in same])
            dist.all_reduce(flat, group=group)
            flat /= size
            for g, averaged in zip(same, flat.split([g.numel() for g in same])):
                g.copy_(averaged.view_as(g))
            self.bytes_reduced += flat.numel() * flat.element_size()


class BlockParallelStrategy(BlockwiseDDPStrategy):
    """Every block at once, in one job: ``trainer.strategy: {class_path: dbl.training.BlockParallelStrategy}``.

    With B blocks and a world of W = B x D processes, the processes form a ``DeviceMesh`` of shape
    (B, D) with dimensions ``("block", "data")``: ranks ``b*D .. b*D + D-1`` are group b, which trains
    block b, and only block b, at every step, with data parallelism inside the group (its D processes
    split the data as a D-process job does, and average block b's gradients among themselves). So a
    step of the job is B block steps, one per group, and ``max_steps: N`` gives each block N updates.
    The module must be a ``dbl`` block-wise module; it keeps its YAML (no ``train_blocks``: the group
    decides the block). Same options as ``ddp``. Only ``fit`` forms the groups: ``validate``, ``test``
    and ``predict`` under this strategy run as under ``BlockwiseDDPStrategy``.

    - ``shared_io: false`` (per-block input/output copies): the groups never talk during training, and
      group b computes exactly what a D-process job ``train_blocks: [b]`` computes (same data order,
      same noise: the seed is offset by the rank within the group; with D = 1 no distributed sampler
      and no re-seeding at start-up, as in a one-process job), so the job equals the B per-block jobs
      merged with ``tools/merge_blocks.py``, bit for bit on CPU (tests/test_block_parallel.py: D = 1
      against one-process jobs, D = 2 against two-process ``BlockwiseDDPStrategy`` jobs).
    - ``shared_io: true``: the shared input/output gradients are averaged over all W processes, and a
      step clips the gradients by their norm over all blocks and the shared part together (one
      coefficient everywhere, so the shared weights stay identical on every process); the module's
      own clipping is then a no-op and its ``grad_norm`` logs show the clipped norm.
    - Checkpoints hold the whole model with no merge step: before a save, the first process of group
      b sends block b's weights (and EMA weights), its ``block_updates`` entry, its optimizer and LR
      scheduler state to rank 0, which writes the file. ``dbl validate|test|predict --ckpt_path`` read
      it on any number of processes, and a block-parallel fit resumes from it (each process loads
      the optimizer state of its own block only). A checkpoint asked for after an exception
      (``OnExceptionCheckpoint``) is not written, because the other groups may not answer then (an
      older file of that name is deleted): resume from the last periodic checkpoint.
    - Before each validation every process receives every block's current weights, so validation
      (split among all W processes) sees the whole model.
    - A non-finite step in any group skips (or stops) that step in every group: the groups step in lockstep.
    - The per-block training logs of every group reach rank 0, which writes them (``gather_block_logs``).
    """

    strategy_name = "block_parallel"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mesh = None
        self.block: int | None = None  # the block this process trains
        self.group_size = 1  # D
        self._global_clip: float | None = None
        self._module_settings: dict = {}  # the module's own schedule and clipping, given back at teardown

    @property
    def distributed_sampler_kwargs(self) -> dict:
        # fitting: the data is split among the D processes of a group, as in a D-process job of one
        # block; otherwise (validate, test, predict) among all processes, as under ddp
        if self.mesh is None:
            return super().distributed_sampler_kwargs
        return {"num_replicas": self.group_size, "rank": self.global_rank % self.group_size}

    def setup_distributed(self) -> None:
        # Lightning's DDP re-seeds every process here (reset_seed), after the model was built; a
        # one-process job does not. A group does what the job it stands for does: with D = 1 keep the
        # random streams where they are (the data order of an unseeded shuffle is drawn from them).
        from dbl.training import rng

        state = rng.collect()
        super().setup_distributed()
        blocks = getattr(self.lightning_module, "num_blocks", 0)
        if blocks and self.world_size == blocks:
            rng.restore(state)

    def setup_environment(self) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        super().setup_environment()  # the process group
        # form the groups before the setup hooks, which may read the schedule (the EMA callback's decay
        # per step), and before anything is written: a bad setting stops the run with nothing left behind
        trainer = self.lightning_module.trainer
        if trainer.state.fn == TrainerFn.FITTING:
            self._setup_groups(trainer)

    def _setup_groups(self, trainer) -> None:
        import dataclasses

        from torch.distributed.device_mesh import init_device_mesh

        from dbl.errors import UsageError

        module = self.lightning_module
        if not hasattr(module, "num_blocks") or not hasattr(module, "schedule"):
            raise UsageError(f"BlockParallelStrategy trains dbl's block-wise modules, not {type(module).__name__}; "
                             "use strategy ddp for it")
        blocks, world = module.num_blocks, self.world_size
        if world % blocks:
            raise UsageError(f"BlockParallelStrategy needs a multiple of num_blocks ({blocks}) processes, one group per "
                             f"block, got {world}; set trainer.devices (times trainer.num_nodes) to {blocks} x D")
        if module.hparams.get("train_blocks") is not None:
            raise UsageError(f"train_blocks {list(module.hparams['train_blocks'])} and BlockParallelStrategy both choose "
                             "the blocks to train (the strategy trains every block, one per process group); drop "
                             "model.init_args.train_blocks, or train one block per job without this strategy")
        self.group_size = world // blocks
        self.block = self.global_rank // self.group_size
        self.mesh = init_device_mesh(self.root_device.type, (blocks, self.group_size), mesh_dim_names=("block", "data"))
        # this process's group trains its block only (its schedule: block b at every step)
        self._module_settings = {"schedule": module.schedule, "gradient_clip_val": module.gradient_clip_val}
        module.schedule = dataclasses.replace(module.schedule, blocks=(self.block,))
        if self.group_size == 1:
            # a one-process group reads the data as a one-process job does: no distributed sampler
            trainer._accelerator_connector.use_distributed_sampler = False
        if module.network.shared_io and module.gradient_clip_val is not None:
            self._global_clip, module.gradient_clip_val = module.gradient_clip_val, None

    def teardown(self) -> None:
        # the module leaves the fit with its own schedule and clipping, as it came
        if self._module_settings and self.lightning_module is not None:
            for name, value in self._module_settings.items():
                setattr(self.lightning_module, name, value)
            self._module_settings = {}
        super().teardown()

    # -- gradients ---------------------------------------------------------------------------
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        if self.mesh is None:  # not fitting
            return super().post_backward(closure_loss)
        if not self._reduce_after_backward:
            return
        module = self.lightning_module
        shared_ids = {id(p) for p in module.network.shared_parameters()}
        block_grads = [p.grad for p in module.parameters() if p.grad is not None and id(p) not in shared_ids]
        shared_grads = [p.grad for p in module.network.shared_parameters() if p.grad is not None]
        if self.group_size > 1 and block_grads:
            self._average(block_grads, self.mesh.get_group("data"), self.group_size)
        if shared_grads:
            self._average(shared_grads, None, self.world_size)
        if self._global_clip is not None:
            # one clipping coefficient for the whole step: norm over every group's block and the shared part
            block_sq = torch.stack([g.float().pow(2).sum() for g in block_grads]).sum() if block_grads else torch.zeros(())
            block_sq = block_sq.to(self.root_device)
            dist.all_reduce(block_sq, group=self.mesh.get_group("block"))
            shared_sq = sum(g.float().pow(2).sum() for g in shared_grads) if shared_grads else 0.0
            total = (block_sq + shared_sq).sqrt()
            coef = (self._global_clip / (total + 1e-6)).clamp(max=1.0)
            for g in block_grads + shared_grads:
                g.mul_(coef.to(g.dtype))

    def gather_block_logs(self, logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The engine's per-step ``<name>/block<b>`` scalars of every group, not only this process's block
        (rank 0 alone writes the logs): one small all-gather among one process per group."""
        if self.mesh is None:
            return logs
        names = [key.rsplit("/block", 1)[0] for key in logs]
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()).to(self.root_device) for v in logs.values()])
        gathered = [torch.empty_like(values) for _ in range(self.lightning_module.num_blocks)]
        dist.all_gather(gathered, values, group=self.mesh.get_group("block"))  # group rank b: block b
        return {f"{name}/block{b}": row[i] for b, row in enumerate(gathered) for i, name in enumerate(names)}

    # -- the whole model, on every process or in the checkpoint ------------------------------
    def _block_keys(self) -> list[list[str]]:
        from dbl.training.checkpoints import block_state_keys

        return block_state_keys(self.lightning_module)

    def _broadcast_tensors(self, tensors: list[torch.Tensor], group, group_src: int) -> list[torch.Tensor]:
        """``tensors`` as the ``group_src`` process of ``group`` holds them (new tensors, one flat message per dtype)."""
        out: list[torch.Tensor | None] = [None] * len(tensors)
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            index = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            flat = torch.cat([tensors[i].detach().reshape(-1).to(self.root_device) for i in index])
            dist.broadcast(flat, group=group, group_src=group_src)
            for i, piece in zip(index, flat.split([tensors[i].numel() for i in index])):
                out[i] = piece.view_as(tensors[i]).to(tensors[i].device).clone()
        return out

    def on_validation_start(self) -> None:
        # every process evaluates the whole model: give each one every block's current weights
        if self.mesh is None:
            return
        module, keys = self.lightning_module, self._block_keys()
        named = dict(module.named_parameters())
        world = dist.group.WORLD
        for block, names in enumerate(keys):
            src = block * self.group_size
            params = [named[n] for n in names]
            received = self._broadcast_tensors([p.data for p in params], world, src)
            if self.block != block:
                with torch.no_grad():
                    for p, value in zip(params, received):
                        p.copy_(value)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if self.mesh is not None:
            if self.lightning_module.trainer.interrupted:
                from pathlib import Path

                from lightning.pytorch.utilities import rank_zero_warn

                # an older file of that name (an earlier interruption) must not pass for this one
                if self.is_global_zero and Path(filepath).is_file():
                    Path(filepath).unlink()
                rank_zero_warn(f"dbl: BlockParallelStrategy does not write {filepath} after an interruption: the other "
                               "groups' blocks cannot be gathered now; resume from the last periodic checkpoint")
                return
            self._gather_blocks(checkpoint)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _gather_blocks(self, checkpoint: dict) -> None:
        """Give ``checkpoint`` (on rank 0, which writes it) block b's state from group b's first process."""
        if self.global_rank % self.group_size:
            return  # only the first process of each group takes part: they form one "block" group
        leaders = self.mesh.get_group("block")
        states = [s for s in (checkpoint.get("state_dict"), checkpoint.get("current_model_state")) if s is not None]
        for state in states:
            state["block_updates"] = state["block_updates"].clone()
        for block, keys in enumerate(self._block_keys()):
            slots = [(state, key) for state in states for key in keys]
            received = self._broadcast_tensors([state[key] for state, key in slots] +
                                               [state["block_updates"][block] for state in states], leaders, block)
            for (state, key), value in zip(slots, received):
                state[key] = value
            for state, value in zip(states, received[len(slots):]):
                state["block_updates"][block] = value
            for entry in ("optimizer_states", "lr_schedulers"):
                if len(checkpoint.get(entry) or []) > block:
                    obj = [checkpoint[entry][block]]
                    dist.broadcast_object_list(obj, group=leaders, group_src=block)
                    checkpoint[entry][block] = obj[0]

    def load_optimizer_state_dict(self, checkpoint) -> None:
        """Resuming: each process loads its own block's optimizer state and the shared one, not the others'."""
        if self.block is None:
            return super().load_optimizer_state_dict(checkpoint)
        from lightning.fabric.utilities.optimizer import _optimizer_to_device

        blocks = self.lightning_module.num_blocks
        for index, (optimizer, state) in enumerate(zip(self.optimizers, checkpoint["optimizer_states"])):
            if index == self.block or index >= blocks:
                optimizer.load_state_dict(state)
                _optimizer_to_device(optimizer, self.root_device)
