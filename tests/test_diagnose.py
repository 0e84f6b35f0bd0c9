"""dbl diagnose (issue 15): what each block does, on tiny models of each task."""

import math
from pathlib import Path

import pytest
import torch
from test_masked_diffusion import make_module as tiny_masked

from dbl.cli import main
from dbl.diagnose import FIGURES, block_table, diagnose, inner_boundaries, write_report
from dbl.diffusion.masked import mask_tokens, masked_cross_entropy, nelbo_integrand
from dbl.diffusion.preconditioning import loss_weight

ROOT = Path(__file__).resolve().parents[1]
SEED = 3


def gen(i: int) -> torch.Generator:  # the diagnosis's draws for level (or boundary) i
    return torch.Generator().manual_seed(SEED * 1_000_003 + i)


class BlockHooks:
    """Forward hooks on each block's first layer: the blocks that actually ran, in call order."""

    def __init__(self, module):
        self.calls: list[int] = []
        network = module.network
        self.handles = [network.block_layers(b)[0].register_forward_hook(lambda *_, b=b: self.calls.append(b))
                        for b in range(module.num_blocks)]

    def remove(self):
        for h in self.handles:
            h.remove()


def perturbed(module):
    """Untrained networks start with zero output layers (adaLN-Zero), so every block would answer alike:
    move all weights off their initial values so that blocks differ."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


@pytest.fixture
def images(tiny_module, image_batch):
    module = perturbed(tiny_module(num_blocks=3, sample_steps=6))
    x, labels = image_batch
    return module, (x[:8], labels[:8])


@pytest.fixture
def text():
    module = perturbed(tiny_masked(num_blocks=3, sample_steps=9))
    ids = torch.randint(0, 27, (8, 32), generator=torch.Generator().manual_seed(1))
    return module, (ids,)


def run(module, batch, levels=5, **kw):
    hooks = BlockHooks(module)
    d = diagnose(module, batch, levels, num_samples=2, seed=SEED, progress=False, **kw)
    hooks.remove()
    return d, hooks.calls


@pytest.mark.parametrize("task", ["images", "text"])
def test_every_block_answers_every_level_and_the_owner_curve_is_the_partitions_diagonal(task, request, one_thread):
    module, batch = request.getfixturevalue(task)
    d, calls = run(module, batch)
    n, blocks = len(d.levels), module.num_blocks
    # the competence map's calls come first: level by level, every block in turn (hooks saw them run)
    assert calls[: n * blocks] == list(range(blocks)) * n
    assert len(d.unweighted) == blocks and all(len(row) == n for row in d.unweighted)
    assert all(len({d.unweighted[b][i] for b in range(blocks)}) == blocks for i in range(n))  # blocks differ
    owners = module.denoiser.partition.block_of(torch.tensor(d.levels)).tolist()
    assert d.owners == owners and set(owners) == set(range(blocks))
    assert d.owner_weighted == [d.weighted[o][i] for i, o in enumerate(owners)]
    assert d.owner_unweighted == [d.unweighted[o][i] for i, o in enumerate(owners)]
    # the levels span the whole range, noisiest first
    if task == "images":
        assert d.levels[0] == pytest.approx(80.0) and d.levels[-1] == pytest.approx(0.002)
    else:
        assert d.levels[0] > 0.8 and d.levels[-1] < 0.2 and d.levels == sorted(d.levels, reverse=True)


def test_image_owner_value_is_the_tasks_own_loss(images, one_thread):
    module, (x, labels) = images
    d, _ = run(module, (x, labels))
    i = 3
    sigma = torch.full((x.shape[0],), d.levels[i])
    owner = module.denoiser.block_at(sigma)
    with torch.no_grad():
        mse = module.per_sample_loss(x, labels, sigma, torch.randn(x.shape, generator=gen(i)), owner)
    assert d.owner_unweighted[i] == pytest.approx(float(mse.mean()), rel=1e-5)
    assert d.owner_weighted[i] == pytest.approx(float((loss_weight(sigma, 0.5) * mse).mean()), rel=1e-5)


def test_text_owner_value_is_the_tasks_own_elbo_integrand(text, one_thread):
    module, batch = text
    d, _ = run(module, batch)
    x, i = batch[0], 1
    t = torch.full((x.shape[0],), d.levels[i])
    z = mask_tokens(x, t, module.masking, module.mask_id, gen(i))
    with torch.no_grad():
        ce = masked_cross_entropy(module.denoiser(z, t), x, z, module.mask_id)  # routed by t, as in evaluation
    bits = nelbo_integrand(ce, t, x.shape[1], module.masking) / math.log(2)
    assert d.owner_weighted[i] == pytest.approx(float(bits.mean()), rel=1e-5)
    assert d.owner_unweighted[i] == pytest.approx(float((ce / (z == module.mask_id).sum(1)).mean()), rel=1e-5)


def test_image_handover_distance_by_hand(images, one_thread):
    module, (x, labels) = images
    d, _ = run(module, (x, labels))
    level = module.denoiser.partition.nominal_range(0)[0]
    assert [r["level"] for r in d.handover] == inner_boundaries(module.denoiser) and d.handover[0]["level"] == level
    sigma = torch.full((x.shape[0],), level)
    noise = torch.randn(x.shape, generator=gen(10_000))
    z = x + level * noise
    with torch.no_grad():
        a, b = (module.denoiser(z, sigma, labels, block=k) for k in (0, 1))
    rms = (a - b).pow(2).flatten(1).mean(1).sqrt().mean()
    assert d.handover[0]["distance"] == pytest.approx(float(rms), rel=1e-5)
    assert d.handover[0]["blocks"] == (0, 1)


def test_text_handover_kl_by_hand(text, one_thread):
    module, batch = text
    d, _ = run(module, batch)
    x, level = batch[0], module.denoiser.partition.nominal_range(1)[0]
    t = torch.full((x.shape[0],), level)
    z = mask_tokens(x, t, module.masking, module.mask_id, gen(10_001))
    with torch.no_grad():
        p, q = (module.denoiser(z, t, k).float().log_softmax(-1) for k in (1, 2))
    kl = (p.exp() * (p - q)).sum(-1)
    masked = z == module.mask_id
    by_hand = ((kl * masked).sum(1) / masked.sum(1)).mean()
    assert d.handover[1]["distance"] == pytest.approx(float(by_hand), rel=1e-5)


@pytest.mark.parametrize("task", ["images", "text"])
def test_trajectory_visits_blocks_in_order_through_the_chain(task, request, one_thread):
    module, batch = request.getfixturevalue(task)
    d, calls = run(module, batch)
    t = d.trajectory
    assert t.blocks == sorted(t.blocks) and set(t.blocks) == set(range(module.num_blocks))
    assert list(t.snapshots) == list(range(module.num_blocks))
    # the block recorded for each sampler call is the block that ran (forward hooks), through the chain's routing
    steps = len(t.blocks)
    n_map = len(d.levels) * module.num_blocks
    ran = calls[n_map: n_map + steps]  # images: guidance runs cond and uncond as one batch
    assert ran == t.blocks
    assert t.blocks == module.denoiser.partition.block_of(torch.tensor(t.levels)).tolist()
    assert len(t.updates) == steps and all(u >= 0 for u in t.updates if not math.isnan(u))
    # hand-over rows read the sampler's updates at the switch
    row = d.handover[0]
    assert t.blocks[row["step"]] == 0 and t.blocks[row["step"] + 1] == 1
    assert row["update_after"] == t.updates[row["step"] + 1]
    j = row["step"]
    around = [t.updates[k] for k in range(max(0, j - 3), min(steps, j + 5)) if k not in (j, j + 1) and not math.isnan(t.updates[k])]
    assert row["neighbour_update"] == pytest.approx(float(torch.tensor(around).median()))


def test_twin_curve_is_the_twins_routed_loss(images, tiny_module, one_thread):
    module, batch = images
    twin = perturbed(tiny_module(num_blocks=1))
    d = diagnose(module, batch, 4, twin=twin, num_samples=2, seed=SEED, progress=False)
    x, labels = batch
    sigma = torch.full((x.shape[0],), d.levels[2])
    with torch.no_grad():
        mse = twin.per_sample_loss(x, labels, sigma, torch.randn(x.shape, generator=gen(2)), 0)
    assert d.twin_unweighted[2] == pytest.approx(float(mse.mean()), rel=1e-5)


def test_block_table_reads_the_runs_scalars(images):
    module, _ = images
    module.block_updates[:] = torch.tensor([5, 6, 7])
    scalars = {f"grad_norm/block{b}": [(s, float(b + s)) for s in range(20)] for b in range(3)}
    scalars |= {"train_loss/block1": [(s, 2.0 if s < 5 else 1.0) for s in range(15)], "val_loss/block2": [(0, 9.0), (10, 3.0)]}
    rows = block_table(module, scalars)
    assert [r["updates"] for r in rows] == [5, 6, 7]
    assert rows[0]["parameters"] == sum(p.numel() for p in module.network.block_parameters(0))
    assert rows[1]["train_loss"] == 1.0 and math.isnan(rows[0]["train_loss"])
    assert rows[2]["val_loss"] == 3.0 and math.isnan(rows[0]["val_loss"])
    assert rows[2]["grad_first"] == pytest.approx(2 + 4.5) and rows[2]["grad_last"] == pytest.approx(2 + 14.5)
    assert rows[2]["grad_max"] == 21.0


@pytest.mark.parametrize("task", ["images", "text"])
def test_report_files_exist_and_the_markdown_names_them(task, request, tmp_path, one_thread):
    module, batch = request.getfixturevalue(task)
    d, _ = run(module, batch, levels=4)
    decode = (lambda ids: "".join("abcdefghijklmnopqrstuvwxyz _"[int(i)] for i in ids)) if task == "text" else None
    path = write_report(d, tmp_path / "report", decode)
    text = path.read_text()
    pngs = sorted(p.name for p in path.parent.glob("*.png"))
    assert pngs and all(f"]({name})" in text for name in pngs)
    for name in ("competence", "curves", "handover"):
        assert FIGURES[name] in pngs
    assert ("trajectory.png" in pngs) == (task == "images")
    import json

    saved = json.loads((path.parent / "diagnosis.json").read_text())
    assert saved["owner_weighted"] == pytest.approx(d.owner_weighted) and len(saved["blocks"]) == module.num_blocks
    if task == "text":
        assert "after block 2 (state)" in text and "final:" in text
    for heading in ("## 1. Competence map", "## 2. Hand-over consistency", "## 3. Trajectories", "## 4. Blocks"):
        assert heading in text


def test_the_batch_goes_through_the_data_modules_transfer_hooks():
    import lightning as L

    from dbl.diagnostics_cli import first_samples, on_device

    class Data(L.LightningDataModule):
        def val_dataloader(self):
            return [(torch.full((3, 1, 2, 2), 255, dtype=torch.uint8), torch.arange(3))] * 2

        def on_after_batch_transfer(self, batch, dataloader_idx):
            return batch[0].float() / 255, batch[1]

    data = Data()
    images, labels = on_device(data, first_samples(data, 4), torch.device("cpu"))
    assert images.dtype == torch.float32 and images.shape[0] == 4 and (images == 1).all() and labels.tolist() == [0, 1, 2, 0]


# -- the command ---------------------------------------------------------------------------------
TINY = ["--model.init_args.network.init_args.hidden_size", "32", "--model.init_args.network.init_args.num_heads", "2",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.callbacks",
        '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": true}}]']


def _exit(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_dbl_diagnose_writes_the_report_and_tensorboard_figures_and_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    twin_yaml = tmp_path / "twin.yaml"
    twin_yaml.write_text((ROOT / "experiments" / "quickstart_e2e.yaml").read_text()
                         .replace("hidden_size: 128", "hidden_size: 32").replace("num_heads: 4", "num_heads: 2"))
    other_task = tmp_path / "other_task.yaml"  # a masked-diffusion twin (its data is never read)
    other_task.write_text("model:\n  class_path: dbl.training.MaskedDiffusionModule\n  init_args:\n    num_blocks: 1\n"
                          "    network:\n      class_path: dbl.models.token_dit.TokenDiT\n      init_args: {vocab_size: 27, "
                          "seq_len: 8, hidden_size: 16, depth: 2, num_heads: 2}\ndata:\n  class_path: dbl.data.DigitsDataModule\n")
    main(["fit", "--config", str(ROOT / "experiments" / "quickstart.yaml"), *TINY, "--trainer.max_steps", "3"])
    main(["fit", "--config", str(twin_yaml), *TINY[4:], "--trainer.max_steps", "2"])
    ckpt = tmp_path / "lightning_logs/quickstart/version_0/checkpoints/last.ckpt"
    twin_ckpt = tmp_path / "lightning_logs/quickstart_e2e/version_0/checkpoints/last.ckpt"
    base = ["diagnose", "--config", str(ROOT / "experiments" / "quickstart.yaml"), "--levels", "4", "--batch_size", "8",
            "--samples", "2", "--progress", "false"]
    capsys.readouterr()
    main([*base, "--ckpt_path", str(ckpt), "--twin", str(twin_yaml), "--twin_ckpt", str(twin_ckpt)])
    report = ckpt.parent.parent / "diagnose" / "report.md"  # default: next to the run
    assert f"written to {report}" in capsys.readouterr().err
    text = report.read_text()
    assert "end-to-end twin" in text and "3 blocks, step 3" in text
    # the same figures in the run's TensorBoard folder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ckpt.parent.parent))
    acc.Reload()
    assert "diagnose/competence" in acc.Tags()["images"]

    for args, message in [
        (["--ckpt_path", "missing.ckpt"], "ckpt_path missing.ckpt: no such file"),
        ([], "diagnose needs --ckpt_path"),
        (["--ckpt_path", str(ckpt), "--twin", str(twin_yaml)], "needs --twin_ckpt"),
        (["--ckpt_path", str(ckpt), "--twin", "nope.yaml", "--twin_ckpt", str(twin_ckpt)], "--twin nope.yaml: no such file"),
        (["--ckpt_path", str(ckpt), "--twin", str(other_task), "--twin_ckpt", str(twin_ckpt)],
         "is a MaskedDiffusionModule but the model a ImageDiffusionModule"),
        (["--ckpt_path", str(ckpt), "--twin", str(ROOT / "experiments" / "quickstart_e2e.yaml"), "--twin_ckpt", str(twin_ckpt)],
         "does not fit --twin"),
    ]:
        code, err = _exit([*base, *args], capsys)
        assert code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1 or "Traceback" not in err, err


# -- label diffusion (ViT classification) ------------------------------------------------------
def test_label_diffusion_map_owner_handover_and_trajectory(tmp_path, one_thread):
    from test_classification import randomized, tiny_vit

    from dbl.training import LabelDiffusionModule

    torch.manual_seed(0)
    module = LabelDiffusionModule(randomized(tiny_vit()), num_blocks=3, sample_steps=6).eval()
    g = torch.Generator().manual_seed(2)
    images, labels = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)
    d, calls = run(module, (images, labels))
    n = len(d.levels)
    assert calls[: n * 3] == [0, 1, 2] * n
    i = 2
    sigma = torch.full((8,), d.levels[i])
    with torch.no_grad():
        ce = module.per_sample_ce(images, labels, sigma, torch.randn(8, module.network.net.hidden_size, generator=gen(i)),
                                  d.owners[i])
    assert d.owner_unweighted[i] == pytest.approx(float(ce.mean()), rel=1e-5)
    assert d.trajectory.blocks == [0, 0, 1, 1, 2, 2] and calls[n * 3: n * 3 + 6] == d.trajectory.blocks
    assert d.handover[0]["distance"] > 0
    text = write_report(d, tmp_path).read_text()
    assert "(label " in text and "prediction:" in text
    agree = int((d.trajectory.final.flatten() == labels[:2]).sum())
    assert "agreeing with the label: after block 0: " in text and f"; prediction: {agree}/2" in text


# -- autoregressive diffusion (LM1B) -----------------------------------------------------------
def test_ar_diffusion_map_owner_handover_and_trajectory(tmp_path, one_thread):
    from test_lm1b import randomize, tiny_llama

    from dbl.training import ARDiffusionLMModule

    torch.manual_seed(0)
    module = ARDiffusionLMModule(tiny_llama(depth=6), num_blocks=3, sample_steps=6)
    randomize(module)
    module.diagnostic_prompt_tokens, module.diagnostic_new_tokens = 3, 2
    module.eval()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, module.network.net.vocab_size, (4, 8), generator=g)
    loss_mask = torch.ones(4, 8)
    loss_mask[0, 6:] = 0  # padding: not scored, not in the KL
    d, calls = run(module, (tokens, loss_mask))
    n = len(d.levels)
    assert calls[: n * 3] == [0, 1, 2] * n
    i = 1
    sigma = torch.full((4,), d.levels[i])
    noise = torch.randn(4, 8, module.network.net.hidden_size, generator=gen(i))
    with torch.no_grad():
        ce = module.per_sample_ce(tokens, loss_mask, sigma, noise, d.owners[i])
    assert d.owner_unweighted[i] == pytest.approx(float(ce.mean()), rel=1e-5)
    # hand-over KL by hand at the first boundary, over the scored positions
    level = d.handover[0]["level"]
    sigma = torch.full((4,), level)
    noise = torch.randn(4, 8, module.network.net.hidden_size, generator=gen(10_000))
    with torch.no_grad():
        p, q = (module.logits(tokens, sigma, noise, k).float().log_softmax(-1) for k in (0, 1))
    kl = (p.exp() * (p - q)).sum(-1)
    assert d.handover[0]["distance"] == pytest.approx(float(((kl * loss_mask).sum(1) / loss_mask.sum(1)).mean()), rel=1e-5)
    t = d.trajectory
    assert t.blocks == [0, 0, 1, 1, 2, 2] and list(t.snapshots) == [0, 1, 2]
    assert t.final.shape == (2, 2) and t.snapshots[2].shape == (2, 2)
    text = write_report(d, tmp_path).read_text()
    assert "prompt:" in text and "after block 1 (estimate)" in text


def test_a_task_without_the_protocol_is_a_one_line_error():
    from test_classification import tiny_vit

    from dbl.diagnose import check_protocol
    from dbl.errors import UsageError
    from dbl.training import ViTClassifierModule

    with pytest.raises(UsageError, match=r"the model \(ViTClassifierModule\) cannot be diagnosed: it has no diagnostic_spec"):
        check_protocol(ViTClassifierModule(tiny_vit(noise_conditioning=False)))


def test_an_end_to_end_model_alone_has_no_hand_over(tiny_module, image_batch, tmp_path, one_thread):
    module = perturbed(tiny_module(num_blocks=1, sample_steps=4))
    d, calls = run(module, (image_batch[0][:4], image_batch[1][:4]), levels=3)
    assert d.handover == [] and set(calls) == {0} and d.trajectory.blocks == [0] * 4
    assert "(one block: no hand-over)" in write_report(d, tmp_path).read_text()
