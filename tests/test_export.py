"""``dbl export`` and ``dbl.load_exported``: a trained run as a folder, loaded back with no data and no
pretrained files, and its next-token path as a plain transformers model.

Tiny random Llama and GPT-2 models (``save_tiny``) and an LM1B-format archive are built in the test.
"""

import csv
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_lm1b import WORDS, write_archive
from test_pretrained import VOCAB, reference, save_tiny

import dbl
from dbl.cli import main
from dbl.export import export
from dbl.models.llama import ARInput
from dbl.training.autoregressive import ARDiffusionLMModule

pytestmark = pytest.mark.usefixtures("one_thread")


def run_main(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


def build(class_path, network, **init_args):
    """A module as LightningCLI builds it (its hyperparameters are the configuration), from Python."""
    from lightning.pytorch.cli import instantiate_module
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    from dbl.training.engine import BlockwiseLightningModule

    hparams = {"_class_path": class_path, "network": network, **init_args}
    with _given_hyperparameters_context(hparams=hparams, instantiator="lightning.pytorch.cli.instantiate_module"):
        return instantiate_module(BlockwiseLightningModule, hparams)


def save_checkpoint(module, path, step=3):
    torch.save({"state_dict": module.state_dict(), "global_step": step, "hyper_parameters": dict(module.hparams)}, path)
    return path


def token_ids(n=3, t=10, seed=0):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def states_equal(a, b):
    a, b = a.state_dict(), b.state_dict()
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# -- a run trained through the CLI: tiny pretrained Llama (tied), block-wise, anchor, EMA, CSV logs ----
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    model_dir = save_tiny("llama_tied", root / "model")
    vocab = root / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    write_archive(root / "lm1b")
    config = {
        "seed_everything": 0,
        "model": {"class_path": "dbl.training.autoregressive.ARDiffusionLMModule", "init_args": {
            "network": {"class_path": "dbl.models.pretrained.PretrainedCausalLM",
                        "init_args": {"name_or_path": str(model_dir), "frequency_dim": 64}},
            "num_blocks": 2, "sample_steps": 2, "anchor_weight": 0.5, "block_schedule": "phased", "phase_steps": 1,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}}},
        "data": {"class_path": "dbl.data.LM1BDataModule", "init_args": {
            "root": str(root / "lm1b"), "download": False, "tokenizer": str(vocab), "seq_len": 16, "batch_size": 4,
            "val_sentences": 8}},
        "trainer": {
            "accelerator": "cpu", "max_steps": 2, "limit_val_batches": 1, "val_check_interval": 2,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root / "logs"), "name": "run"}},
            "callbacks": [{"class_path": "dbl.callbacks.EMA", "init_args": {"decay": 0.5}},
                          {"class_path": "dbl.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(root / "run.yaml")])
    ckpt = root / "logs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    out = root / "export"
    main(["export", "--config", str(root / "run.yaml"), "--ckpt_path", "last", "--out", str(out)])
    return SimpleNamespace(root=root, yaml=str(root / "run.yaml"), ckpt=ckpt, out=out, model_dir=model_dir, vocab=vocab)


def test_cli_export_loads_back_with_the_same_weights_and_generations(run):
    checkpoint = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    # the folder alone: neither the pretrained model nor the data is there when it loads
    run.model_dir.rename(run.root / "model_away")
    (run.root / "lm1b").rename(run.root / "lm1b_away")
    try:
        module = dbl.load_exported(run.out)
    finally:
        (run.root / "model_away").rename(run.model_dir)
        (run.root / "lm1b_away").rename(run.root / "lm1b")
    assert isinstance(module, ARDiffusionLMModule) and not module.training
    state = module.state_dict()
    assert set(state) == set(checkpoint["state_dict"])
    assert all(torch.equal(state[k], v) for k, v in checkpoint["state_dict"].items())
    # with EMA the checkpoint's state_dict is the average, which differs from the raw weights
    raw = checkpoint["current_model_state"]
    assert any(not torch.equal(raw[k], v) for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    assert module.block_updates.tolist() == [1, 1]

    original = ARDiffusionLMModule.load_from_checkpoint(run.ckpt, weights_only=True).eval()
    prompt = token_ids(2, 4, seed=5)
    for temperature in (0.0, 1.0):
        runs = [m.generate(prompt, 6, generator=torch.Generator().manual_seed(7), num_steps=3, temperature=temperature)
                for m in (original, module)]
        assert runs[0].shape == (2, 6)
        assert torch.equal(runs[0], runs[1])

    saved = yaml.safe_load((run.out / "dbl_config.yaml").read_text())["model"]
    assert saved["class_path"] == "dbl.training.autoregressive.ARDiffusionLMModule"
    assert saved["init_args"]["network"]["init_args"]["name_or_path"] == str(run.model_dir)
    assert saved["init_args"]["anchor_weight"] == 0.5 and saved["init_args"]["optimizer"]["init_args"]["lr"] == 0.01

    from transformers import AutoTokenizer

    from dbl.data.lm1b import load_tokenizer

    text = "the company said it would sell shares ."
    assert AutoTokenizer.from_pretrained(run.out)(text)["input_ids"] == load_tokenizer(str(run.vocab))(text)["input_ids"]


def test_the_card_states_recipe_data_weights_and_metrics(run):
    card = (run.out / "README.md").read_text()
    for row in ["| module | dbl.training.autoregressive.ARDiffusionLMModule |", "| num_blocks | 2 |",
                "| layers_per_block | [2, 2] |", "| anchor_weight | 0.5 |", "| LoRA rank | 0 (every weight trained) |",
                "| steps | 2 |", "| block_updates | [1, 1] |", "| layer_updates | 4 |",
                "| weights | EMA average (EMA, decay 0.5 per block update); the raw weights are not exported |",
                "`dbl.data.LM1BDataModule`", f"| tokenizer | {run.vocab} |", "| seq_len | 16 |"]:
        assert row in card
    assert "torch.optim.AdamW(lr=0.01" in card
    with (run.ckpt.parents[1] / "metrics.csv").open() as f:
        logged = [row for row in csv.DictReader(f) if row.get("val/loss")][-1]
    assert f"| val/loss | {float(logged['val/loss']):.6g} | {logged['step']} |" in card
    assert f"| val/next_token_ppl | {float(logged['val/next_token_ppl']):.6g} |" in card
    assert "- `hf/`: a plain transformers causal LM" in card and "no `hf/`" not in card


def test_the_chained_run_is_a_plain_transformers_model(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = dbl.load_exported(run.out)
    hf = AutoModelForCausalLM.from_pretrained(run.out / "hf").eval()
    ids = token_ids()
    with torch.no_grad():
        expected = module.network(None, None, ARInput(ids), block=None)
        got = hf(ids).logits
        pretrained = reference(run.model_dir)(ids).logits
    assert (got - expected).abs().max() <= 1e-5
    assert (got - pretrained).abs().max() > 1e-3  # the trained weights, not the pretrained ones
    assert AutoTokenizer.from_pretrained(run.out / "hf").get_vocab() == AutoTokenizer.from_pretrained(run.out).get_vocab()


# -- the other recipes, built in Python (as the CLI builds them) -----------------------------------
@pytest.mark.parametrize("recipe", ["full_finetune_llama", "lora_gpt2", "lora_llama_blockwise"])
def test_hf_folder_of_next_token_recipes(recipe, tmp_path):
    """Full fine-tuning (every layer weight moved) and LoRA with nonzero adapters (lora_B moved, so the merge
    matters); the transformers folder's logits are the dbl clean path's."""
    from transformers import AutoModelForCausalLM

    kind = "gpt2" if "gpt2" in recipe else "llama"
    model_dir = save_tiny(kind, tmp_path / "model")
    lora = 2 if "lora" in recipe else 0
    network = {"class_path": "dbl.models.pretrained.PretrainedCausalLM",
               "init_args": {"name_or_path": str(model_dir), "frequency_dim": 32, "lora_rank": lora}}
    if "blockwise" in recipe:
        module = build("dbl.training.autoregressive.ARDiffusionLMModule", network, num_blocks=2)
    else:
        module = build("dbl.training.autoregressive.NextTokenLMModule", network)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ("lora_B" in name) if lora else (".layer." in name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    out = export(module, save_checkpoint(module, tmp_path / "trained.ckpt"), tmp_path / "export")
    assert (out / "hf" / "config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    assert not any("lora" in name for name in hf.state_dict())
    ids = token_ids()
    module.eval()
    with torch.no_grad():
        expected = module.network(None, None, ARInput(ids), block=None if module.num_blocks > 1 else 0)
        got = hf(ids).logits
        pretrained = reference(model_dir)(ids).logits
    assert (got - expected).abs().max() <= 1e-5
    assert (got - pretrained).abs().max() > 1e-3
    shutil.rmtree(model_dir)  # load back from the folder alone
    assert states_equal(dbl.load_exported(out), module)
    card = (out / "README.md").read_text()
    assert (f"| LoRA rank | {lora} (alpha {2 * lora}) |" if lora else "| LoRA rank | 0 (every weight trained) |") in card
    assert ("LoRA merged into the base weights" in card) == bool(lora)


@pytest.mark.parametrize("recipe", ["from_scratch_llama", "unchained_pretrained"])
def test_no_hf_folder_without_a_next_token_path_and_the_card_says_why(recipe, tmp_path):
    if recipe == "from_scratch_llama":
        network = {"class_path": "dbl.models.llama.Llama", "init_args": {
            "vocab_size": VOCAB, "hidden_size": 32, "depth": 2, "num_heads": 2, "frequency_dim": 32}}
        why = ("- no `hf/` folder: the network is Llama, trained from scratch in dbl: it has no Hugging Face "
               "architecture to be written as")
        files = ["README.md", "dbl_config.yaml", "model.safetensors"]
    else:
        network = {"class_path": "dbl.models.pretrained.PretrainedCausalLM", "init_args": {
            "name_or_path": str(save_tiny("gpt2", tmp_path / "model")), "frequency_dim": 32,
            "chain_clean_stream": False}}
        why = ("- no `hf/` folder: its blocks did not chain the clean stream (chain_clean_stream: false): each block "
               "read the token embeddings, so the clean path through all layers was never trained as a causal LM")
        files = ["README.md", "dbl_config.yaml", "model.safetensors", "network"]
    module = build("dbl.training.autoregressive.ARDiffusionLMModule", network, num_blocks=2)
    out = export(module, save_checkpoint(module, tmp_path / "x.ckpt"), tmp_path / "export")
    card = (out / "README.md").read_text()
    assert why in card
    assert "No validation or test metrics were recorded" in card
    assert "The checkpoint records no data module." in card
    if recipe == "from_scratch_llama":
        assert "- no tokenizer: none could be loaded (neither the data nor the network names one)" in card
        assert sorted(p.name for p in out.iterdir()) == files
    else:  # the pretrained directory has weights but no tokenizer files
        assert "- no tokenizer: none could be loaded (the pretrained model's" in card
        assert sorted(p.name for p in out.iterdir()) == files
        shutil.rmtree(tmp_path / "model")
    loaded = dbl.load_exported(out)
    assert states_equal(loaded, module)
    prompt = token_ids(2, 3)
    module.eval()
    assert torch.equal(loaded.generate(prompt, 3, generator=torch.Generator().manual_seed(0), num_steps=2),
                       module.generate(prompt, 3, generator=torch.Generator().manual_seed(0), num_steps=2))


# -- one-line errors -------------------------------------------------------------------------------
def test_export_errors_are_one_line(run, tmp_path, capsys):
    base = ["export", "--config", run.yaml]
    code, err = run_main([*base, "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "missing.ckpt: no such file" in err and err.count("\n") == 1
    code, err = run_main([*base, "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "needs --ckpt_path" in err and err.count("\n") == 1

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, err = run_main([*base, "--ckpt_path", str(run.ckpt), "--out", str(busy)], capsys)
    assert code == 2 and "exists and is not empty" in err and "--overwrite" in err and err.count("\n") == 1
    code, err = run_main([*base, "--ckpt_path", str(run.ckpt), "--out", str(busy), "--overwrite", "true"], capsys)
    assert code == 2 and "is not a dbl export" in err and err.count("\n") == 1
    assert (busy / "notes.txt").read_text() == "mine"

    again = tmp_path / "again"
    shutil.copytree(run.out, again)
    (again / "stale.txt").write_text("from an earlier export")
    main([*base, "--ckpt_path", str(run.ckpt), "--out", str(again), "--overwrite", "true"])
    assert not (again / "stale.txt").exists() and (again / "hf" / "config.json").is_file()
    from safetensors.torch import load_file

    replaced, first = load_file(again / "model.safetensors"), load_file(run.out / "model.safetensors")
    assert set(replaced) == set(first) and all(torch.equal(replaced[k], first[k]) for k in first)
