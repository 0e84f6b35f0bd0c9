import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_engine import fit, loader

from dbl.memory import profile_activations


def params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_phased_offload_is_bit_identical_and_really_moves(tiny_module, image_batch, tmp_path):
    kw = dict(block_schedule="phased", phase_steps=2)
    plain = tiny_module(**kw)
    torch.manual_seed(0)
    fit(plain, image_batch, 7, tmp_path / "plain")

    offloaded = tiny_module(offload_inactive=True, **kw)
    ptrs = [p.data_ptr() for p in offloaded.network.block_parameters(0)]
    torch.manual_seed(0)
    trainer = fit(offloaded, image_batch, 7, tmp_path / "off")
    off = offloaded.offloader
    assert off is not None and off.moves >= 6 and off.bytes_moved > 0
    assert off.location == ["device", "storage", "storage"]  # steps 0-6 train blocks 0,0,1,1,2,2,0
    assert [p.data_ptr() for p in offloaded.network.block_parameters(0)] != ptrs
    a, b = params(plain), params(offloaded)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # optimizer state survived the trips bit for bit
    for opt_a, opt_b in zip(plain.trainer.optimizers, trainer.optimizers):
        for pa, pb in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
            for key in opt_a.state.get(pa, {}):
                assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key])


def test_checkpoint_with_offloaded_blocks_resumes(tiny_module, image_batch, tmp_path):
    kw = dict(block_schedule="phased", phase_steps=2, offload_inactive=True)
    m = tiny_module(**kw)
    trainer = fit(m, image_batch, 3, tmp_path / "a")
    ckpt = tmp_path / "off.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert len(saved["optimizer_states"]) == 4
    assert all(len(s["state"]) > 0 for s in saved["optimizer_states"][:2])  # blocks 0 and 1 trained
    resumed = tiny_module(**kw)
    fit(resumed, image_batch, 6, tmp_path / "b", ckpt_path=ckpt)
    assert resumed.block_updates.tolist() == [2, 2, 2]


def test_activation_checkpointing_same_gradients_fewer_activations(tiny_module, image_batch):
    def grads(module):
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
        torch.manual_seed(1)
        module.zero_grad()
        module.block_loss(image_batch, 1).loss.backward()
        return [p.grad for p in module.network.block_parameters(1)]

    torch.manual_seed(0)
    plain = tiny_module()
    torch.manual_seed(0)
    ckpt = tiny_module(activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    torch.manual_seed(2)
    g_plain = grads(plain)
    torch.manual_seed(2)
    g_ckpt = grads(ckpt)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_plain, g_ckpt))
    full = profile_activations(plain, image_batch, 16)
    lean = profile_activations(ckpt, image_batch, 16)
    assert sum(lean.layer_bytes) < 0.5 * sum(full.layer_bytes)


def test_ema_works_with_block_wise_training_and_offloading(tiny_module, image_batch, tmp_path):
    """The EMA callback: each block's average follows its own weights, offloaded or not; counts stay exact."""
    from dbl.callbacks import EMA

    plain = tiny_module(block_schedule="phased", phase_steps=2, offload_inactive=True)
    torch.manual_seed(0)
    fit(plain, image_batch, 6, tmp_path / "plain")
    ema = tiny_module(block_schedule="phased", phase_steps=2, offload_inactive=True)
    start = {name: p.detach().clone() for name, p in ema.named_parameters()}
    callback = EMA(decay=0.125)
    torch.manual_seed(0)
    fit(ema, image_batch, 6, tmp_path / "ema", callbacks=[callback])
    assert callback.step_decay == pytest.approx(0.5)  # 0.125 per block update = 0.5 per step at B = 3
    assert ema.block_updates.tolist() == [2, 2, 2]  # copied, not averaged
    trained = dict(plain.named_parameters())
    for b in range(3):  # the module now holds the average: neither the start nor the trained weights
        names = [n for n, p in ema.named_parameters() if any(p is q for q in ema.network.block_parameters(b))]
        assert any(not torch.equal(ema.get_parameter(n), trained[n]) for n in names)
        assert any(not torch.equal(ema.get_parameter(n), start[n]) for n in names)
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(decay=1.0)


def test_ema_checkpoint_resumes_raw_weights_and_keeps_the_average(tiny_module, image_batch, tmp_path):
    from dbl.callbacks import EMA

    kw = {"block_schedule": "phased", "phase_steps": 1}
    # a checkpoint taken during training (after training ends, the module itself holds the average)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[EMA(decay=0.5), saver])
    trainer.fit(tiny_module(**kw), loader(image_batch))
    (path,) = (tmp_path / "ckpt").glob("*step=3.ckpt")
    ckpt = torch.load(path, weights_only=False)
    # the checkpoint's weights are the average; the raw weights (what training continues from) are kept too
    raw, averaged = ckpt["current_model_state"], ckpt["state_dict"]
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)
    assert raw["block_updates"].tolist() == averaged["block_updates"].tolist() == [1, 1, 1]
    resumed = tiny_module(**kw)
    fit(resumed, image_batch, 6, tmp_path / "b", ckpt_path=path, callbacks=[EMA(decay=0.5)])
    assert resumed.block_updates.tolist() == [2, 2, 2]


@pytest.mark.parametrize("train_blocks, step_decay", [(None, 0.25 ** (1 / 3)), ([1], 0.25), ([0, 2], 0.5)])
def test_ema_decay_counts_only_the_blocks_that_train(tiny_module, image_batch, tmp_path, train_blocks, step_decay):
    """decay is per update of a block: with train_blocks [1] block 1 changes every step, so each step
    applies 0.25 itself, not 0.25 ** (1/3) (as if block 1 trained one step in three)."""
    from dbl.callbacks import EMA

    module = tiny_module(train_blocks=train_blocks)
    seen = []

    class Record(L.Callback):  # the raw weights after each step, before EMA puts the average in the module
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append([p.detach().clone() for p in pl_module.network.block_parameters(1)])

    callback = EMA(decay=0.25)
    fit(module, image_batch, 3, tmp_path, callbacks=[Record(), callback])
    assert callback.step_decay == step_decay
    expected = seen[0]  # the first update copies the weights; later ones average with the step decay
    for raw in seen[1:]:
        expected = [e * step_decay + r * (1 - step_decay) for e, r in zip(expected, raw)]
    for e, p in zip(expected, module.network.block_parameters(1)):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-7)


class _Uncopyable:
    """A factory that holds what a CLI-built factory can reach (a lock): deep copies fail on it."""

    def __init__(self, make):
        import threading

        self.make, self.lock = make, threading.Lock()

    def __call__(self, optimizer):
        return self.make(optimizer)


def test_ema_averages_without_copying_any_optimizer_or_scheduler_factory(tiny_module, image_batch, tmp_path):
    """The average is a deep copy of the module: the optimizer, block and shared scheduler factories stay out."""
    from dbl.callbacks import EMA

    step = _Uncopyable(lambda o: torch.optim.lr_scheduler.StepLR(o, 10))
    module = tiny_module(optimizer=_Uncopyable(lambda p: torch.optim.AdamW(p)), lr_scheduler=step, shared_lr_scheduler=step)
    fit(module, image_batch, 2, tmp_path, callbacks=[EMA(decay=0.5)])
    assert module.shared_lr_scheduler_factory is step and int(module.block_updates.sum()) == 2
