"""ViT classification: the network against Hugging Face's ViT, the label-diffusion objective and chain
computed by hand, which blocks each call reaches, the metrics, the LR schedules, `dbl info`."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dbl.cli import main
from dbl.diffusion.preconditioning import edm_scalings
from dbl.errors import UsageError
from dbl.models import ViT
from dbl.training import LabelDiffusionModule, ViTClassifierModule
from dbl.training.lr_schedules import WarmupCosineLR

ROOT = Path(__file__).resolve().parents[1]


def tiny_vit(**kw) -> ViT:
    args = dict(num_classes=5, image_size=8, in_channels=1, patch_size=4, hidden_size=24, depth=6, num_heads=2, mlp_hidden=40,
                dropout=0.0)
    return ViT(**{**args, **kw})


def randomized(net: ViT) -> ViT:
    """Every parameter drawn at random, so the zero-initialised modulation and classifier matter."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return net


def batch(n=6, classes=5):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def test_the_end_to_end_vit_is_hugging_faces_vit():
    """Weights copied into transformers' ViTForImageClassification give the same logits: same pre-norm
    layers, LayerNorm eps, exact GELU, [CLS] and learned position embedding, readout."""
    transformers = pytest.importorskip("transformers")
    net = randomized(tiny_vit(noise_conditioning=False, norm_eps=1e-12)).eval()
    cfg = transformers.ViTConfig(hidden_size=24, num_hidden_layers=6, num_attention_heads=2, intermediate_size=40, image_size=8,
                                 patch_size=4, num_channels=1, num_labels=5, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, qkv_bias=True)
    hf = transformers.ViTForImageClassification(cfg).eval()
    sd = {"vit.embeddings.cls_token": net.cls_token, "vit.embeddings.position_embeddings": net.pos_embed,
          "vit.embeddings.patch_embeddings.projection.weight": net.patch_embed.weight,
          "vit.embeddings.patch_embeddings.projection.bias": net.patch_embed.bias,
          "vit.layernorm.weight": net.norm.weight, "vit.layernorm.bias": net.norm.bias,
          "classifier.weight": net.classifier.weight, "classifier.bias": net.classifier.bias}
    for i, layer in enumerate(net.layers):
        pre = f"vit.layers.{i}."  # transformers 5's names
        weights, biases = layer.attn.qkv.weight.chunk(3), layer.attn.qkv.bias.chunk(3)
        for name, w, b in zip("qkv", weights, biases):
            sd[pre + f"attention.{name}_proj.weight"], sd[pre + f"attention.{name}_proj.bias"] = w, b
        sd |= {pre + "attention.o_proj.weight": layer.attn.proj.weight, pre + "attention.o_proj.bias": layer.attn.proj.bias,
               pre + "mlp.fc1.weight": layer.mlp[0].weight, pre + "mlp.fc1.bias": layer.mlp[0].bias,
               pre + "mlp.fc2.weight": layer.mlp[2].weight, pre + "mlp.fc2.bias": layer.mlp[2].bias,
               pre + "layernorm_before.weight": layer.norm1.weight, pre + "layernorm_before.bias": layer.norm1.bias,
               pre + "layernorm_after.weight": layer.norm2.weight, pre + "layernorm_after.bias": layer.norm2.bias}
    missing, unexpected = hf.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    assert not unexpected and not missing
    images, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(net(images), hf(pixel_values=images).logits, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in hf.parameters())


def test_the_paper_vit_size_and_its_mlp():
    """CIFAR-100's network: 12 layers of width 128 with Hugging Face's 3,072-wide MLP; counted by hand."""
    net = ViT(noise_conditioning=False)
    per_layer = (128 * 384 + 384) + (128 * 128 + 128) + (128 * 3072 + 3072) + (3072 * 128 + 128) + 4 * 128
    embed = 3 * 16 * 128 + 128 + 128 + 65 * 128
    assert sum(p.numel() for p in net.parameters()) == 12 * per_layer + embed + 2 * 128 + (128 * 100 + 100)
    mlp = 12 * ((128 * 3072 + 3072) + (3072 * 128 + 128))
    assert sum(p.numel() for p in net.parameters()) == 10_302_180
    assert round(mlp / 10_302_180, 3) == 0.920  # the spec's "about 90%" of the parameters are the MLPs


def _calls(module, blocks_seen):
    hooks = []
    for b in range(module.num_blocks):
        for layer in module.network.block_layers(b):
            hooks.append(layer.register_forward_hook(lambda *_, b=b: blocks_seen.append(b)))
    return hooks


def test_block_loss_is_the_objective_computed_by_hand_and_reaches_only_its_block():
    """lambda-weighted CE of the logits from D = c_skip z + c_out F_b(c_in z), z = y/|y| + sigma eps, with
    the output adaLN and classifier; ``batch_mean``: mean CE x mean lambda. Only block 1's layers run."""
    torch.manual_seed(0)
    module = LabelDiffusionModule(randomized(tiny_vit()), num_blocks=3)
    net = module.network.net
    images, labels = batch()
    seen: list[int] = []
    hooks = _calls(module, seen)
    torch.manual_seed(5)
    out = module.block_loss((images, labels), 1)
    for h in hooks:
        h.remove()
    assert set(seen) == {1} and len(seen) == 2

    torch.manual_seed(5)
    sigma = module.denoiser.training_sigma(1, 6)
    noise = torch.randn(6, 24)
    lo, hi = module.partition.widened_range(1)
    assert bool(((sigma >= lo) & (sigma <= hi)).all())
    y = net.label_table.weight[labels] / net.label_table.weight[labels].norm(dim=-1, keepdim=True)
    z = y + sigma[:, None] * noise
    s, sd = sigma[:, None], 0.5
    c_in, c_skip, c_out = 1 / (s**2 + sd**2).sqrt(), sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    c_noise = sigma.log() / 4
    h = torch.cat([(c_in * z)[:, None], net.patch_embed(images).flatten(2).transpose(1, 2)], 1) + net.pos_embed
    cond = net.noise_embed(c_noise)
    for layer in net.layers[2:4]:
        h = layer(h, cond)
    d = c_skip * z + c_out * net.norm(h[:, 0])
    shift, scale = net.out_modulation(cond).chunk(2, dim=-1)
    logits = net.classifier(F.layer_norm(d, (24,), eps=1e-6) * (1 + scale) + shift)
    ce = F.cross_entropy(logits, labels, reduction="none")
    lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
    torch.testing.assert_close(out.loss, ce.mean() * lam.mean())
    torch.testing.assert_close(out.unweighted, ce.mean())

    torch.manual_seed(0)
    per_sample = LabelDiffusionModule(randomized(tiny_vit()), num_blocks=3, loss_weighting="edm")
    torch.manual_seed(5)
    torch.testing.assert_close(per_sample.block_loss((images, labels), 1).loss, (ce * lam).mean())


def test_a_block_step_gives_gradients_to_its_block_and_the_shared_part_only():
    torch.manual_seed(0)
    module = LabelDiffusionModule(randomized(tiny_vit()), num_blocks=3)
    module.block_loss(batch(), 2).loss.backward()
    net = module.network
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.block_parameters(2))
    assert all(p.grad is None for b in (0, 1) for p in net.block_parameters(b))
    shared = dict(net.net.named_parameters())
    for name in ("label_table.weight", "classifier.weight", "out_modulation.1.weight", "noise_embed.mlp.0.weight", "pos_embed"):
        assert shared[name].grad is not None and shared[name].grad.abs().sum() > 0, name
    assert shared["cls_token"].grad is None  # the diffusion task puts the label token there


@pytest.mark.parametrize("table", ["normalized", "raw"])
def test_classify_chains_one_block_per_step_and_euler_steps_on_softmax_times_the_table(table):
    """Default B solver steps on the CDF grid visit blocks 0, 1, 2 in turn; each estimate is
    softmax(logits) @ E (normalised or raw rows), Euler from sigma_max*noise; the answer is the last logits."""
    torch.manual_seed(0)
    module = LabelDiffusionModule(randomized(tiny_vit()), num_blocks=3, inference_table=table).eval()
    net = module.network.net
    images, _ = batch()
    seen: list[int] = []
    hooks = _calls(module, seen)
    logits = module.classify(images, torch.Generator().manual_seed(3))
    for h in hooks:
        h.remove()
    assert seen == [0, 0, 1, 1, 2, 2]

    sigmas = module.denoiser.sigmas(3, "cdf")
    z = torch.randn(6, 24, generator=torch.Generator().manual_seed(3)).double() * sigmas[0]
    rows = net.label_table.weight.double()
    table_rows = rows / rows.norm(dim=-1, keepdim=True) if table == "normalized" else rows
    with torch.no_grad():
        for i in range(3):
            s = sigmas[i]
            d = module.denoiser(z.float(), s.float(), images, block=i).double()
            last = net.label_logits(d.float(), edm_scalings(s.float().expand(6), 0.5).c_noise)
            z = z + (sigmas[i + 1] - s) * (z - last.double().softmax(-1) @ table_rows) / s
    torch.testing.assert_close(logits, last, rtol=1e-4, atol=1e-4)
    assert module.classify(images, torch.Generator().manual_seed(3), num_steps=6).shape == (6, 5)


class _Data(L.LightningDataModule):
    num_classes, channels, image_size = 5, 1, 8

    def __init__(self, images, labels):
        super().__init__()
        self.images, self.labels = images, labels

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=3, drop_last=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=4)

    predict_dataloader = val_dataloader


def _trainer(tmp_path, **kw):
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kw)


@pytest.mark.parametrize("kind", ["diffusion", "end_to_end"])
def test_validation_accuracy_and_ce_are_those_of_the_predictions(tmp_path, kind):
    """val/acc and val/ce equal the hand-computed accuracy and CE of predict_logits over two batches (4 + 2)."""
    torch.manual_seed(0)
    if kind == "diffusion":
        module = LabelDiffusionModule(randomized(tiny_vit()), num_blocks=3)
    else:
        module = ViTClassifierModule(randomized(tiny_vit(noise_conditioning=False)))
    images, labels = batch()
    result = _trainer(tmp_path).validate(module, datamodule=_Data(images, labels), verbose=False)[0]
    module.eval()
    logits = torch.cat([module.predict_logits(images[:4], 0), module.predict_logits(images[4:], 1)])
    assert result["val/acc"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item(), abs=1e-6)
    assert result["val/ce"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert 0 < result["val/acc"] < 1  # both right and wrong predictions in the pinned case


def test_end_to_end_loss_is_plain_cross_entropy_of_the_cls_token():
    torch.manual_seed(0)
    module = ViTClassifierModule(randomized(tiny_vit(noise_conditioning=False)))
    images, labels = batch()
    module.eval()
    torch.testing.assert_close(module.block_loss((images, labels), 0).loss, F.cross_entropy(module.network.net(images), labels))
    with pytest.raises(UsageError, match="num_blocks must be 1"):
        ViTClassifierModule(tiny_vit(noise_conditioning=False), num_blocks=3)
    with pytest.raises(UsageError, match="noise_conditioning: true"):
        LabelDiffusionModule(tiny_vit(noise_conditioning=False))


def test_data_that_does_not_fit_the_network_is_one_line(tmp_path):
    module = LabelDiffusionModule(tiny_vit(), num_blocks=3)
    data = _Data(*batch())
    data.num_classes = 10
    with pytest.raises(UsageError, match="num_classes 10 but model.init_args.network.init_args.num_classes is 5"):
        module.check_data(data, "fit")


def test_warmup_cosine_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = WarmupCosineLR(opt, warmup_steps=2, total_steps=6, min_factor=0.1)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 1.0, 2.0, 2 * (0.1 + 0.9 * (2 + 2**0.5) / 4), 2 * (0.1 + 0.9 * 0.5),
                          2 * (0.1 + 0.9 * (2 - 2**0.5) / 4), 0.2, 0.2])  # cos(pi/4) = sqrt(2)/2
    with pytest.raises(UsageError, match="warmup_steps < total_steps"):
        WarmupCosineLR(opt, 6, 6)


def test_the_shared_part_follows_its_own_schedule(tmp_path):
    """B = 2, 4 steps: each block's scheduler stepped only on its own steps, the shared one on all 4."""
    torch.manual_seed(0)
    module = LabelDiffusionModule(tiny_vit(depth=2), num_blocks=2, block_schedule="phased", phase_steps=2,
                                  optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
                                  lr_scheduler=lambda o: WarmupCosineLR(o, 1, 10),
                                  shared_lr_scheduler=lambda o: WarmupCosineLR(o, 2, 20))
    images, labels = torch.randn(12, 1, 8, 8), torch.randint(0, 5, (12,))
    _trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(module, datamodule=_Data(images, labels))
    lrs = [s.get_last_lr()[0] for s in module.lr_schedulers()]
    assert lrs == pytest.approx([WarmupCosineLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 1, 10).factor(2)] * 2
                                + [WarmupCosineLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 2, 20).factor(4)])


@pytest.mark.parametrize("config", ["cifar100_vit_b3.yaml", "cifar100_vit_e2e.yaml", "tiny_imagenet_vit_b2.yaml"])
def test_info_on_the_paper_configs_needs_no_data(tmp_path, monkeypatch, capsys, config):
    monkeypatch.chdir(tmp_path)
    main(["info", "--config", str(ROOT / "experiments" / config)])
    out = capsys.readouterr().out
    assert "Estimated memory of one training step, batch" in out
    assert list(tmp_path.iterdir()) == []


def test_dbl_predict_writes_each_images_predicted_class_and_label(tmp_path, capsys):
    from dbl.callbacks import ClassPredictionWriter

    torch.manual_seed(0)
    module = LabelDiffusionModule(randomized(tiny_vit()), num_blocks=3)
    images, labels = batch()
    _trainer(tmp_path, callbacks=[ClassPredictionWriter(str(tmp_path / "out"))]).predict(module, datamodule=_Data(images, labels))
    module.eval()
    predicted = torch.cat([module.predict_logits(images[:4], 0), module.predict_logits(images[4:], 1)]).argmax(-1)
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert rows == ["index,predicted,label"] + [f"{i},{p},{y}" for i, (p, y) in enumerate(zip(predicted.tolist(), labels.tolist()))]
    accuracy = (predicted == labels).float().mean().item()
    assert f"6 predictions in {tmp_path / 'out' / 'predictions.csv'} (accuracy {accuracy:.4f})" in capsys.readouterr().out
