import pytest
import torch
from conftest import tiny_dit

from dbl.models import BlockwiseNetwork, DiT, split_layers
from dbl.models.dit import PRESETS


def test_dit_shapes_and_identity_at_init():
    net = tiny_dit()
    x, c = torch.randn(3, 1, 8, 8), torch.randn(3)
    out = net(x, c, torch.tensor([1, 2, 3]))
    assert out.shape == x.shape
    # adaLN-Zero: final layer and every gate start at zero
    assert torch.count_nonzero(out) == 0
    h, cond = net.embed(x, c, None)
    assert torch.equal(net.layers[0](h, cond), h)


def test_presets():
    assert PRESETS["S/2"] == (384, 12, 6, 2)
    assert PRESETS["L/2"] == (1024, 24, 16, 2)
    net = DiT("S/2", input_size=8, depth=3)
    assert len(net.layers) == 3 and net.patch_size == 2
    with pytest.raises(ValueError, match="unknown DiT preset"):
        DiT("Q/2")


def test_split_layers():
    assert split_layers(12, 3) == [4, 4, 4]
    assert split_layers(12, 3, [3, 6, 3]) == [3, 6, 3]
    with pytest.raises(ValueError, match=r"not divisible by num_blocks 5; set layers_per_block explicitly, e.g. \[3, 3, 2, 2, 2\]"):
        split_layers(12, 5)
    with pytest.raises(ValueError, match="larger than the network's depth"):
        split_layers(4, 6)
    with pytest.raises(ValueError, match="summing to depth=12"):
        split_layers(12, 3, [4, 4, 3])


def test_block_runs_only_its_layers():
    net = tiny_dit()
    for p in net.parameters():  # make every layer non-trivial
        torch.nn.init.normal_(p, std=0.05)
    bw = BlockwiseNetwork(net, 3)
    x, c, y = torch.randn(2, 1, 8, 8), torch.randn(2), torch.tensor([0, 1])
    calls = []
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, layer in enumerate(net.layers)]
    bw(x, c, y, block=1)
    assert calls == [2, 3]
    calls.clear()
    bw(x, c, y)
    assert calls == list(range(6))
    for h in hooks:
        h.remove()


def test_unshared_io_gives_each_block_its_own_copy():
    bw = BlockwiseNetwork(tiny_dit(), 3, shared_io=False)
    assert bw.shared_parameters() == []
    ids = [set(map(id, bw.block_parameters(b))) for b in range(3)]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])
    n_layers = sum(p.numel() for p in bw.net.layers.parameters())
    n_io = sum(p.numel() for p in bw.io_parameters(0))
    assert sum(p.numel() for p in bw.parameters()) == n_layers + 3 * n_io
    with pytest.raises(ValueError, match="pass block="):
        bw(torch.randn(1, 1, 8, 8), torch.randn(1))
