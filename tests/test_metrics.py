import math

import lightning as L
import pytest
import torch
from test_masked_diffusion import make_module
from torch.utils.data import DataLoader, TensorDataset

from dbl.training import BitsPerCharacter, PerBlockMean


def test_per_block_mean_groups_by_owner_and_marks_unvisited_blocks():
    metric = PerBlockMean(3)
    metric.update(torch.tensor([1.0, 2.0, 10.0]), torch.tensor([0, 0, 2]))
    metric.update(torch.tensor([4.0]), torch.tensor([2]))
    value = metric.compute()
    assert value[0].item() == 1.5 and value[2].item() == 7.0
    assert math.isnan(value[1].item())  # no sample reached block 1


def test_per_block_bits_per_character_shares_add_up_to_the_whole():
    whole, shares = BitsPerCharacter(), BitsPerCharacter(num_blocks=3)
    nats = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 4.0]])  # two sequences' nats split by block
    whole.update(nats.sum(1), 10)
    shares.update(nats, 10)
    assert shares.compute().tolist() == pytest.approx([1.5 / 10 / math.log(2), 0.2 / math.log(2), 0.7 / math.log(2)])
    assert shares.compute().sum().item() == pytest.approx(whole.compute().item())


def test_masked_evaluation_logs_block_shares_that_sum_to_the_bpc(tmp_path):
    module = make_module()
    data = TensorDataset(torch.randint(0, 27, (24, 32), generator=torch.Generator().manual_seed(0)))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    val = trainer.validate(module, DataLoader(data, batch_size=8), verbose=False)[0]
    test = trainer.test(module, DataLoader(data, batch_size=8), verbose=False)[0]
    for stage, metrics in (("val", val), ("test", test)):  # one evaluation step serves both stages
        shares = [metrics[f"{stage}_bpc/block{b}"] for b in range(3)]
        assert all(s > 0 for s in shares)
        assert sum(shares) == pytest.approx(metrics[f"{stage}/bpc"], rel=1e-5)
    assert test["test/bpc"] == val["val/bpc"]  # same data, same seeded t and masks


@pytest.mark.parametrize("num_blocks", [1, 3])
@pytest.mark.parametrize("task", ["image", "ar_text", "masked"])
def test_validation_logs_every_block_also_end_to_end(task, num_blocks, tiny_module, tmp_path):
    from test_lm1b import tiny_llama

    from dbl.training import ARDiffusionLMModule

    gen = torch.Generator().manual_seed(0)
    if task == "image":
        module = tiny_module(num_blocks=num_blocks)
        data, name = TensorDataset(torch.rand(64, 1, 8, 8, generator=gen) * 2 - 1, torch.randint(0, 10, (64,), generator=gen)), "val_loss"
    elif task == "ar_text":
        module = ARDiffusionLMModule(tiny_llama(depth=3), num_blocks=num_blocks)
        data, name = TensorDataset(torch.randint(0, 20, (64, 8), generator=gen), torch.ones(64, 8)), "val_ce"
    else:
        module = make_module(num_blocks=num_blocks, net=None)
        data, name = TensorDataset(torch.randint(0, 27, (64, 32), generator=gen)), "val_bpc"
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    metrics = trainer.validate(module, DataLoader(data, batch_size=32), verbose=False)[0]
    assert {k for k in metrics if k.startswith(name + "/")} == {f"{name}/block{b}" for b in range(num_blocks)}


def test_log_per_block_shows_a_diverged_block_and_skips_an_unreached_one(tiny_module):
    """NaN from divergence must reach the logs; NaN because no sample reached a block must not."""
    module = tiny_module()
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    metric = PerBlockMean(3)
    metric.update(torch.tensor([float("nan"), 2.0, 4.0]), torch.tensor([0, 1, 1]))
    module.log_per_block("val_loss", metric)
    assert set(logged) == {"val_loss/block0", "val_loss/block1"}
    assert math.isnan(logged["val_loss/block0"]) and logged["val_loss/block1"] == 3.0
