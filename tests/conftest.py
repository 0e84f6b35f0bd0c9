import pytest
import torch

from dbl.models import DiT
from dbl.training import ImageDiffusionModule


def tiny_dit(**kw) -> DiT:
    args = dict(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=6, num_heads=2, num_classes=10)
    return DiT(**{**args, **kw})


@pytest.fixture
def tiny_module():
    def make(num_blocks=3, net=None, **kw):
        torch.manual_seed(0)
        return ImageDiffusionModule(net or tiny_dit(), num_blocks=num_blocks, **kw)

    return make


@pytest.fixture
def image_batch():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(16, 1, 8, 8, generator=gen) * 2 - 1, torch.randint(0, 10, (16,), generator=gen)


@pytest.fixture
def one_thread():
    """For tests of many tiny matmuls, which threads only slow down (10x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
