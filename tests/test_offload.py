import torch
from test_engine import fit

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
