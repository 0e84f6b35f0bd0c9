"""Every YAML under experiments/ parses: `dbl fit --config X --print_config` (nothing is built)."""

from pathlib import Path

import pytest
import yaml

from dbl.cli import main

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))


def test_there_are_experiments():
    names = {p.stem for p in EXPERIMENTS}
    assert {"cifar10_dit_s2_b3", "cifar10_dit_s2_e2e", "imagenet256_dit_l2_b3", "imagenet256_dit_l2_e2e",
            "fashion_mnist_dit_b3", "fashion_mnist_dit_e2e"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]


@pytest.mark.parametrize("stem", ["cifar10_dit_s2", "imagenet256_dit_l2", "fashion_mnist_dit"])
def test_end_to_end_twins_have_equal_layer_updates(stem):
    def load(suffix):
        return yaml.safe_load((EXPERIMENTS[0].parent / f"{stem}_{suffix}.yaml").read_text())

    b3, e2e = load("b3"), load("e2e")
    blocks = b3["model"]["init_args"]["num_blocks"]
    assert e2e["model"]["init_args"]["num_blocks"] == 1
    budget = "max_epochs" if "max_epochs" in b3["trainer"] else "max_steps"
    assert b3["trainer"][budget] == blocks * e2e["trainer"][budget]
    for part in ("data", "model"):  # identical apart from the number of blocks
        a, b = dict(b3[part]["init_args"]), dict(e2e[part]["init_args"])
        a.pop("num_blocks", None), b.pop("num_blocks", None)
        assert a == b


def test_every_run_checkpoints_on_ctrl_c_and_periodically():
    """A crash or Ctrl-C must not lose a run: each YAML saves on exception, in a folder of its own
    (two runs sharing one would resume from each other's checkpoint), and keeps a last.ckpt."""
    dirpaths = {}
    for path in EXPERIMENTS:
        callbacks = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {})
                     for c in yaml.safe_load(path.read_text())["trainer"]["callbacks"]}
        assert "OnExceptionCheckpoint" in callbacks, path.name
        assert "dbl.callbacks.OnExceptionCheckpoint" in path.read_text(), path.name  # nothing saved before training
        assert callbacks.get("ModelCheckpoint", {}).get("save_last"), path.name
        assert "dbl.callbacks.ModelCheckpoint" in path.read_text(), path.name  # also saves the final step
        dirpaths.setdefault(callbacks["OnExceptionCheckpoint"]["dirpath"], []).append(path.stem)
    assert all(len(stems) == 1 for stems in dirpaths.values()), dirpaths


def test_every_run_logs_into_a_folder_of_its_own():
    """`--ckpt_path last` and the automatic resume look in the logger's folder: two YAMLs sharing one
    would resume each other's checkpoints."""
    folders: dict[tuple, list[str]] = {}
    for path in EXPERIMENTS:
        logger = yaml.safe_load(path.read_text())["trainer"]["logger"]["init_args"]
        folders.setdefault((logger.get("save_dir"), logger["name"]), []).append(path.stem)
    assert all(len(stems) == 1 for stems in folders.values()), folders


def test_the_fine_tuning_arms_share_model_data_and_layer_updates():
    """docs/finetune.md compares five arms on SmolLM2-135M: the same pretrained model and data, and equal
    layer-updates (steps x layers per step, 30 layers in all)."""
    arms = {p.stem.removeprefix("smollm2_finetune_"): yaml.safe_load(p.read_text())
            for p in EXPERIMENTS if p.stem.startswith("smollm2_finetune_")}
    assert set(arms) == {"full", "lora", "b3", "b3_anchor", "b3_lora"}
    data = {yaml.safe_dump(a["data"]) for a in arms.values()}
    assert len(data) == 1
    networks = {a["model"]["init_args"]["network"]["init_args"]["name_or_path"] for a in arms.values()}
    assert len(networks) == 1
    for name, arm in arms.items():
        blocks = arm["model"]["init_args"].get("num_blocks", 1)
        assert arm["trainer"]["max_steps"] * 30 // blocks == 600, name
        if blocks > 1:  # round robin, so every block gets the same share
            assert arm["model"]["init_args"]["block_schedule"] == "phased"
            assert arm["model"]["init_args"]["phase_steps"] == 1
        lora = arm["model"]["init_args"]["network"]["init_args"].get("lora_rank", 0)
        assert (lora > 0) == name.endswith("lora"), name
    assert arms["b3_anchor"]["model"]["init_args"]["anchor_weight"] > 0


@pytest.mark.parametrize("blockwise, e2e", [("cifar100_vit_b3", "cifar100_vit_e2e"), ("tiny_imagenet_vit_b2", "tiny_imagenet_vit_e2e"),
                                            ("fashion_mnist_vit_b3", "fashion_mnist_vit_e2e")])
def test_vit_twins_have_equal_layer_updates_data_network_and_block_schedule(blockwise, e2e):
    """Table 1 / A1 and the CPU pair: B times the steps, the same data, the same ViT (but its noise
    conditioning), the same optimizer and per-block LR schedule; the shared part's schedule B times longer."""
    def load(stem):
        return yaml.safe_load((EXPERIMENTS[0].parent / f"{stem}.yaml").read_text())

    b, e = load(blockwise), load(e2e)
    blocks = b["model"]["init_args"]["num_blocks"]
    budget = "max_epochs" if "max_epochs" in b["trainer"] else "max_steps"
    assert b["trainer"][budget] == blocks * e["trainer"][budget]
    assert b["data"] == e["data"]
    nb, ne = dict(b["model"]["init_args"]["network"]["init_args"]), dict(e["model"]["init_args"]["network"]["init_args"])
    assert (nb.pop("noise_conditioning"), ne.pop("noise_conditioning")) == (True, False) and nb == ne
    for key in ("optimizer", "lr_scheduler", "gradient_clip_val"):
        assert b["model"]["init_args"][key] == e["model"]["init_args"][key], key
    block, shared = (b["model"]["init_args"][k]["init_args"] for k in ("lr_scheduler", "shared_lr_scheduler"))
    assert shared == {k: blocks * v for k, v in block.items()}
