from functools import partial

import lightning as L
import pytest
import torch
from conftest import tiny_dit
from torch.utils.data import DataLoader, TensorDataset

from dbl.training import make_schedule


def loader(batch, repeats=64):
    x, y = batch
    return DataLoader(TensorDataset(x.repeat(repeats, 1, 1, 1), y.repeat(repeats)), batch_size=len(x), shuffle=False)


def fit(module, batch, steps, tmp_path, ckpt_path=None, callbacks=()):
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, callbacks=list(callbacks),
    )
    trainer.fit(module, loader(batch), ckpt_path=ckpt_path)
    return trainer


def snapshot(params):
    return [p.detach().clone() for p in params]


def adamw_wd(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def test_step_changes_only_active_block_and_shared(tiny_module, image_batch, tmp_path):
    m = tiny_module(train_blocks=[1], optimizer=adamw_wd)
    net = m.network
    before = {b: snapshot(net.block_parameters(b)) for b in range(3)}
    shared = snapshot(net.shared_parameters())
    fit(m, image_batch, 2, tmp_path)
    for b in (0, 2):  # bit for bit, despite weight decay
        assert all(torch.equal(p, q) for p, q in zip(before[b], net.block_parameters(b)))
    assert all(not torch.equal(p, q) for p, q in zip(before[1], net.block_parameters(1)) if p.dim() > 1)
    assert any(not torch.equal(p, q) for p, q in zip(shared, net.shared_parameters()))
    assert m.block_updates.tolist() == [0, 2, 0]


def test_optimizer_state_only_for_trained_blocks(tiny_module, image_batch, tmp_path):
    m = tiny_module(train_blocks=[0, 2], block_schedule="phased", phase_steps=1)
    trainer = fit(m, image_batch, 4, tmp_path)
    opts = trainer.optimizers
    assert len(opts) == 4  # three blocks + shared
    assert len(opts[0].state) > 0 and len(opts[2].state) > 0 and len(opts[3].state) > 0
    assert len(opts[1].state) == 0
    assert all(p.grad is None for p in m.network.block_parameters(1))


def test_blocks_are_isolated(tiny_module, image_batch):
    m = tiny_module()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)

    def loss(block):
        torch.manual_seed(3)
        return m.block_loss(image_batch, block).loss

    ref = loss(0)
    with torch.no_grad():
        for p in m.network.block_parameters(1):
            p.add_(1.0)
    assert torch.equal(loss(0), ref)
    # and the test can fail: changing block 0's own weights does change its loss
    with torch.no_grad():
        for p in m.network.block_parameters(0):
            p.add_(0.1)
    assert not torch.equal(loss(0), ref)
    # gradients never cross a block boundary
    m.zero_grad()
    m.block_loss(image_batch, 2).loss.backward()
    assert all(p.grad is None for b in (0, 1) for p in m.network.block_parameters(b))


def test_random_schedule_is_identical_across_ranks():
    rank0 = make_schedule("random", 4, None, 1000, seed=7)
    torch.manual_seed(123)  # a different global RNG state must not matter
    rank1 = make_schedule("random", 4, None, 1000, seed=7)
    seq0 = [rank0.block_at(s) for s in range(400)]
    assert seq0 == [rank1.block_at(s) for s in range(400)]
    assert seq0 != [make_schedule("random", 4, None, 1000, seed=8).block_at(s) for s in range(400)]
    counts = torch.bincount(torch.tensor(seq0), minlength=4)
    assert counts.min() > 70  # roughly uniform (expected 100 each)


def test_phased_schedule_and_train_blocks():
    s = make_schedule("phased", 3, None, 2, seed=0)
    assert [s.block_at(k) for k in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    s = make_schedule("random", 3, [2], 2, seed=0)
    assert {s.block_at(k) for k in range(50)} == {2}
    with pytest.raises(ValueError, match="outside 0..2"):
        make_schedule("phased", 3, [3], 2, seed=0)


class RecordBlocks(L.Callback):
    def __init__(self):
        self.blocks = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.blocks.append(pl_module.schedule.block_at(trainer.global_step))


def linear_warmup(opt):
    return torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=100)


def test_phased_schedule_resumes_mid_phase(tiny_module, image_batch, tmp_path):
    make = partial(tiny_module, block_schedule="phased", phase_steps=3, lr_scheduler=linear_warmup)
    full, rec_full = make(), RecordBlocks()
    fit(full, image_batch, 10, tmp_path / "full", callbacks=[rec_full])

    first, rec_first = make(), RecordBlocks()
    trainer = fit(first, image_batch, 4, tmp_path / "a", callbacks=[rec_first])  # stops inside block 1's phase
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed, rec_resumed = make(), RecordBlocks()
    trainer = fit(resumed, image_batch, 10, tmp_path / "b", ckpt_path=ckpt, callbacks=[rec_resumed])

    assert rec_full.blocks == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]
    assert rec_first.blocks + rec_resumed.blocks == rec_full.blocks
    assert resumed.block_updates.tolist() == full.block_updates.tolist() == [4, 3, 3]
    # each block's scheduler counted only that block's updates, across the restart
    scheds = [c.scheduler for c in trainer.lr_scheduler_configs]
    assert [s.last_epoch for s in scheds] == [4, 3, 3, 10]
    state = torch.load(ckpt, weights_only=False)
    assert len(state["optimizer_states"]) == 4 and len(state["lr_schedulers"]) == 4


def test_one_block_is_end_to_end(tiny_module, image_batch, tmp_path):
    m = tiny_module(num_blocks=1)
    assert m.partition.widened_range(0) == (0.002, 80.0)
    before = [snapshot(layer.parameters()) for layer in m.network.net.layers]
    fit(m, image_batch, 2, tmp_path)
    for old, layer in zip(before, m.network.net.layers):  # every layer trained
        assert any(not torch.equal(p, q) for p, q in zip(old, layer.parameters()))


def test_fp16_mixed_precision_is_refused_with_the_way_out(tiny_module):
    from types import SimpleNamespace

    from dbl.errors import UsageError

    m = tiny_module()
    m._trainer = SimpleNamespace(precision="16-mixed")
    with pytest.raises(UsageError, match="use 'bf16-mixed' or '32-true'"):
        m.on_fit_start()
    m._trainer = SimpleNamespace(precision="bf16-mixed")
    m.on_fit_start()


class RecordLastTrained(L.Callback):
    def __init__(self):
        self.blocks = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.blocks.append(pl_module.last_trained_block)


def test_engine_answers_which_block_trained_and_how_many_updates(tiny_module, image_batch, tmp_path):
    m = tiny_module(layers_per_block=[1, 2, 3], block_schedule="phased", phase_steps=1)
    assert (m.last_trained_block, m.block_steps, m.layer_updates, m.depth) == (None, 0, 0, 6)
    recorder = RecordLastTrained()
    fit(m, image_batch, 4, tmp_path, callbacks=[recorder])
    assert recorder.blocks == [0, 1, 2, 0]  # the block each step trained, as seen right after it
    assert m.block_updates.tolist() == [2, 1, 1]
    assert (m.last_trained_block, m.block_steps, m.layer_updates) == (0, 4, 2 * 1 + 1 * 2 + 1 * 3)


def test_k_diffusion_solver_steps_call_the_block_that_owns_each_sigma(tiny_module, monkeypatch):
    from dbl.models.blockwise import BlockwiseNetwork

    m = tiny_module()
    calls, forward = [], BlockwiseNetwork.forward

    def record(self, x, c_noise, cond=None, block=None):
        calls.append((block, c_noise[0].item()))
        return forward(self, x, c_noise, cond, block)

    monkeypatch.setattr(BlockwiseNetwork, "forward", record)
    m.sample(labels=torch.arange(2), num_steps=6, solver="dpmpp_2m", generator=torch.Generator().manual_seed(0))
    sigmas = m.denoiser.sigmas(6)[:-1]
    assert [b for b, _ in calls] == m.partition.block_of(sigmas).tolist() == [0, 0, 1, 1, 2, 2]
    assert [c for _, c in calls] == pytest.approx((sigmas.float().log() / 4).tolist(), rel=1e-6)


class _PoisonedAt:
    """Wraps a module's block_loss so that the loss at ``step`` is NaN the first ``times`` times it is
    tried (a diverging run, made exact)."""

    def __init__(self, module, step, times=1):
        self.module, self.step, self.times, self.real = module, step, times, module.block_loss

    def __call__(self, batch, block):
        out = self.real(batch, block)
        if self.module.global_step == self.step and self.times > 0:
            self.times -= 1
            out = out._replace(loss=out.loss * float("nan"))
        return out


def test_nonfinite_loss_stops_at_that_step_naming_step_and_block(tiny_module, image_batch, tmp_path):
    from dbl.errors import DivergenceError

    module = tiny_module()
    module.block_loss = _PoisonedAt(module, 3)
    before = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    block = module.schedule.block_at(3)
    with pytest.raises(DivergenceError, match=rf"^training diverged at step 3, block {block}: loss nan, gradient norm nan;"):
        fit(module, image_batch, 10, tmp_path, callbacks=[Snapshot()])
    assert module.global_step == 3 and int(module.block_updates.sum()) == 3
    # the poisoned step reached no weight: they are those before it, all finite
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_skip_nonfinite_steps_skips_up_to_n_then_stops(tiny_module, image_batch, tmp_path):
    from dbl.errors import DivergenceError

    module = tiny_module(skip_nonfinite_steps=1)
    module.block_loss = _PoisonedAt(module, 2)
    fit(module, image_batch, 5, tmp_path)  # one poisoned batch skipped: 5 steps still made, 6 batches used
    assert module.global_step == 5 and int(module.skipped_steps) == 1 and int(module.block_updates.sum()) == 5

    module = tiny_module(skip_nonfinite_steps=1)
    module.block_loss = _PoisonedAt(module, 2, times=2)  # step 2 is retried with the next batch: NaN again
    with pytest.raises(DivergenceError, match=r"^training diverged at step 2, block \d: .* after skipping 1;"):
        fit(module, image_batch, 5, tmp_path)


def test_a_checkpoint_of_non_finite_weights_is_never_written(tiny_module, image_batch, tmp_path):
    """A huge but finite update can leave inf weights before any loss is NaN; a periodic checkpoint
    at that step must not become the `last` that a rerun resumes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dbl.errors import DivergenceError

    module = tiny_module()

    class Blowup(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.network.net.layers[2].attn.qkv.weight.fill_(float("inf"))

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    with pytest.raises(DivergenceError, match=r"^training diverged by step 2: network\.net\.layers\.2\.attn\.qkv\.weight "
                                              r"\(and 0 more weights\) not finite; no checkpoint written"):
        L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  limit_val_batches=0, default_root_dir=tmp_path, callbacks=[Blowup(), saver]).fit(module, loader(image_batch))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_four_accumulated_batches_of_8_equal_one_batch_of_32(tiny_module, tmp_path):
    """Gradient accumulation in the manual loop: the same block for the whole window, one optimizer
    and scheduler step per window, the same update as one big batch (float tolerance)."""
    from dbl.training import BlockLoss

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8, generator=gen) * 2 - 1, torch.randint(0, 10, (32,), generator=gen)

    def deterministic_loss(module):
        # no random sigma, noise or label dropout: the two runs see the same function of the data
        def block_loss(batch, block):
            xb, yb = batch
            sigma = torch.full((xb.shape[0],), 0.7)
            mse = module.per_sample_loss(xb, yb, sigma, xb.flip(-1), block)
            return BlockLoss(mse.mean(), mse.mean(), sigma)
        return block_loss

    finals = []
    for batch_size, k in ((32, 1), (8, 4)):
        torch.manual_seed(0)  # the same initial weights in both runs
        module = tiny_module(net=tiny_dit(class_dropout_prob=0.0), accumulate_grad_batches=k,
                             optimizer=partial(torch.optim.SGD, lr=0.1), lr_scheduler=linear_warmup)
        module.block_loss = deterministic_loss(module)
        trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=tmp_path)
        trainer.fit(module, DataLoader(TensorDataset(x.repeat(3, 1, 1, 1), y.repeat(3)), batch_size=batch_size))
        assert trainer.global_step == 3 and int(module.block_updates.sum()) == 3
        assert [s.last_epoch for s in module.lr_schedulers()] == [int(u) for u in module.block_updates] + [3]
        finals.append(module.state_dict())
    for name, value in finals[0].items():
        torch.testing.assert_close(finals[1][name], value, rtol=1e-5, atol=1e-6, msg=name)
