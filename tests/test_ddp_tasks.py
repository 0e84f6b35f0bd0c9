"""Every task trains, validates and tests on two CPU processes (gloo), launched as a user would
(`dbl fit`, `dbl test`), and the test metrics that are sums equal the one-process values."""

from pathlib import Path

import pytest
import torch
import yaml
from faults import run_dbl
from test_image_data import write_idx_gz
from test_lm1b import WORDS, write_archive, write_judge
from test_text8 import write_text8_zip

from dbl.cli import main

ROOT = Path(__file__).resolve().parents[1]
TWO_PROCESSES = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}


def _dbl(args, cwd: Path) -> None:
    result = run_dbl(args, cwd)
    assert result.returncode == 0, result.stderr[-3000:]


def _config(model: dict, data: dict, tmp_path: Path, callbacks: list[dict] = ()) -> Path:
    config = {
        "seed_everything": 0, "model": model, "data": data,
        "trainer": {**TWO_PROCESSES, "max_steps": 4, "val_check_interval": 2, "check_val_every_n_epoch": None,
                    "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "ddp_probe.RecordMetrics", "init_args": {"out_dir": str(tmp_path / "m")}},
                                  {"class_path": "dbl.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
                                  *callbacks]},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit_and_test_on_two_processes(config: Path, tmp_path: Path, capsys) -> tuple[dict, dict]:
    """(metrics of the two-process test on each rank, metrics of a one-process test of the same checkpoint)."""
    _dbl(["fit", "--config", str(config)], tmp_path)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    vals = [torch.load(tmp_path / "m" / f"val_rank{r}.pt") for r in (0, 1)]
    assert vals[0] == vals[1] and vals[0]  # validated, synced: both ranks log the same values
    _dbl(["test", "--config", str(config), "--ckpt_path", str(ckpt)], tmp_path)
    tests = [torch.load(tmp_path / "m" / f"test_rank{r}.pt") for r in (0, 1)]
    own = {k for k in tests[0] if "tokens_per_s" in k}  # each process's own generation speed
    assert {k: v for k, v in tests[0].items() if k not in own} == {k: v for k, v in tests[1].items() if k not in own}
    main(["test", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.devices", "1",
          "--trainer.strategy", "auto", "--trainer.callbacks+", "ddp_probe.RecordMetrics",
          "--trainer.callbacks.out_dir", str(tmp_path / "one")])
    capsys.readouterr()
    return tests[0], torch.load(tmp_path / "one" / "test_rank0.pt")


def test_text8_on_two_processes_gives_the_one_process_bpc(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    write_text8_zip(tmp_path / "text8", 20_000)
    model = {"class_path": "dbl.training.MaskedDiffusionModule",
             "init_args": {"network": {"class_path": "dbl.models.token_dit.TokenDiT",
                                       "init_args": {"seq_len": 32, "hidden_size": 32, "depth": 2, "num_heads": 2}},
                           "num_blocks": 2, "eval_times": 2}}
    data = {"class_path": "dbl.data.Text8DataModule",
            "init_args": {"root": str(tmp_path / "text8"), "download": False, "train_chars": 18_000, "val_chars": 1_000,
                          "test_chars": 1_000, "seq_len": 32, "batch_size": 8}}
    two, one = _fit_and_test_on_two_processes(_config(model, data, tmp_path), tmp_path, capsys)
    # every test chunk scored once, with the same t and masks: the same sum in float64
    assert two["test/bpc"] == pytest.approx(one["test/bpc"], rel=1e-12, abs=0)
    assert {k for k in two if k.startswith("test_bpc/block")} == {"test_bpc/block0", "test_bpc/block1"}


def _lm1b(tmp_path: Path) -> dict:
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    write_archive(tmp_path / "lm1b")
    return {"class_path": "dbl.data.LM1BDataModule",
            "init_args": {"root": str(tmp_path / "lm1b"), "download": False, "tokenizer": str(vocab), "seq_len": 16,
                          "batch_size": 4, "eval_batch_size": 3, "val_sentences": 8, "num_proc": None}}


def _llama() -> dict:
    return {"class_path": "dbl.models.llama.Llama",
            "init_args": {"vocab_size": len(WORDS) + 5, "hidden_size": 32, "depth": 2, "num_heads": 2}}


def test_lm1b_next_token_on_two_processes_gives_the_one_process_perplexity(tmp_path, capsys, monkeypatch):
    """The next-token baseline never uses the decoder's noise conditioning: DDP must allow that."""
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    model = {"class_path": "dbl.training.autoregressive.NextTokenLMModule", "init_args": {"network": _llama()}}
    two, one = _fit_and_test_on_two_processes(_config(model, _lm1b(tmp_path), tmp_path), tmp_path, capsys)
    # every test token scored once (none twice to even out the processes' shares)
    assert two["test/ppl"] == pytest.approx(one["test/ppl"], rel=1e-6, abs=0)


def test_lm1b_ar_diffusion_on_two_processes_gives_the_one_process_loss_and_generation_metrics(tmp_path, capsys, monkeypatch):
    """The test loss (noise seeded by the batch's index in the split), and gen-PPL and MAUVE of
    continuations generated by both processes (one generator per continuation), equal one process's."""
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    model = {"class_path": "dbl.training.autoregressive.ARDiffusionLMModule",
             "init_args": {"network": _llama(), "num_blocks": 2, "sample_steps": 2}}
    judge = write_judge(tmp_path / "judge")
    # 8 prompts x 2 = 16 continuations in batches of 5: process 0 makes batches 0 and 2, process 1 batches 1 and 3
    generation = {"class_path": "dbl.callbacks.LMGenerationMetrics",
                  "init_args": {"judge": str(judge), "num_prompts": 8, "prompt_length": 3, "continuation_length": 4,
                                "continuations_per_prompt": 2, "generation_batch_size": 5, "seeds": [7],
                                "sampler": {"temperature": 1.0}}}
    config = _config(model, _lm1b(tmp_path), tmp_path, [generation])
    two, one = _fit_and_test_on_two_processes(config, tmp_path, capsys)
    assert two["test/loss"] == pytest.approx(one["test/loss"], rel=1e-6, abs=0)
    assert two["test/ce"] == pytest.approx(one["test/ce"], rel=1e-6, abs=0)
    for name in ("test/gen_ppl", "test/mauve", "test/distinct_2", "test/repetition_rate"):
        assert two[name] == pytest.approx(one[name], rel=1e-9, abs=0), name
    assert two["test/gen_ppl"] != two["test/human_gen_ppl"]


def test_images_on_two_processes_give_the_one_process_loss_and_fid(tmp_path, capsys, monkeypatch):
    """Image test loss (noise seeded by the batch's index in the split) and FID of samples that
    both processes generate (one generator per sample) equal one process's."""
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    write_idx_gz(tmp_path / "fm" / "FashionMNIST" / "raw")  # 12 train and 5 test images
    model = {"class_path": "dbl.ImageDiffusionModule",
             "init_args": {"network": {"class_path": "dbl.models.DiT",
                                       "init_args": {"input_size": 32, "in_channels": 1, "patch_size": 8, "hidden_size": 16,
                                                     "depth": 3, "num_heads": 1, "num_classes": 10}},
                           "num_blocks": 3, "sample_steps": 3, "sample_solver": "euler_ancestral"}}
    data = {"class_path": "dbl.data.FashionMNISTDataModule",
            "init_args": {"root": str(tmp_path / "fm"), "cache_dir": str(tmp_path / "cache"), "batch_size": 4,
                          "eval_batch_size": 4, "val_fraction": 0.25}}
    # 10 samples in batches of 4: process 0 makes batches 0 and 2 (of 2 samples), process 1 batch 1
    fid = {"class_path": "dbl.callbacks.FID",
           "init_args": {"num_samples": 10, "batch_size": 4, "seeds": [3], "reference_splits": ["train", "test"],
                         "feature_extractor": "dbl-tiny-features", "feature_layer": "8"}}
    two, one = _fit_and_test_on_two_processes(_config(model, data, tmp_path, [fid]), tmp_path, capsys)
    assert two["test/loss"] == pytest.approx(one["test/loss"], rel=1e-6, abs=0)
    assert two["test/mse"] == pytest.approx(one["test/mse"], rel=1e-6, abs=0)
    assert two["fid/test"] == one["fid/test"] and two["fid/train"] == one["fid/train"]


def test_gradient_accumulation_on_two_processes_keeps_the_replicas_identical(tmp_path):
    """Two batches per step, gradients exchanged once per step (at its last batch)."""
    config = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    model = config["model"]["init_args"]
    model["network"]["init_args"].update(hidden_size=32, num_heads=2)
    model["accumulate_grad_batches"] = 2
    config["data"]["init_args"]["batch_size"] = 16
    config["trainer"] = {**TWO_PROCESSES, "max_steps": 4, "limit_val_batches": 0, "logger": False,
                         "enable_checkpointing": False, "enable_progress_bar": False,
                         "callbacks": [{"class_path": "ddp_probe.RecordState", "init_args": {"out_dir": str(tmp_path / "s")}}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    _dbl(["fit", "--config", str(tmp_path / "run.yaml")], tmp_path)
    states = [torch.load(tmp_path / "s" / f"rank{r}.pt") for r in (0, 1)]
    assert states[0]["batches"] == states[1]["batches"] == 8 and int(states[0]["state"]["block_updates"].sum()) == 4
    for name, value in states[0]["state"].items():
        assert torch.equal(value, states[1]["state"][name]), name


def _quickstart_on_two_processes(tmp_path: Path, strategy, callback: str, **model_options) -> Path:
    config = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    model = config["model"]["init_args"]
    model["network"]["init_args"].update(hidden_size=32, num_heads=2)
    model.update(model_options)
    config["data"]["init_args"]["batch_size"] = 16
    tmp_path.mkdir(parents=True, exist_ok=True)
    config["trainer"] = {**TWO_PROCESSES, "strategy": strategy, "max_steps": 6, "limit_val_batches": 0,
                         "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                         "callbacks": [{"class_path": callback, "init_args": {"out_dir": str(tmp_path / "s")}}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    _dbl(["fit", "--config", str(tmp_path / "run.yaml")], tmp_path)
    return tmp_path / "s"


def test_blockwise_ddp_all_reduces_only_the_trained_block_and_the_shared_part(tmp_path):
    """BlockwiseDDPStrategy: each step all-reduces exactly the training block's and the shared
    parameters' gradients (float32 bytes), and trains as DDP does (same final weights)."""
    from conftest import tiny_dit

    from dbl.models.blockwise import BlockwiseNetwork

    # plain SGD, no clipping, no warm-up: the update is proportional to the averaged gradient
    sgd = {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}, "lr_scheduler": None,
           "gradient_clip_val": None}
    ours = _quickstart_on_two_processes(tmp_path / "blockwise", {"class_path": "dbl.training.BlockwiseDDPStrategy"},
                                        "ddp_probe.RecordTraffic", **sgd)
    ranks = [torch.load(ours / f"rank{r}.pt") for r in (0, 1)]
    net = BlockwiseNetwork(tiny_dit(num_classes=10, class_dropout_prob=0.1), 3)
    block_bytes = [4 * sum(p.numel() for p in net.block_parameters(b)) for b in range(3)]
    shared_bytes = 4 * sum(p.numel() for p in net.shared_parameters())
    whole = 4 * sum(p.numel() for p in net.parameters())
    assert ranks[0]["steps"] == ranks[1]["steps"]
    assert [nbytes for _, nbytes in ranks[0]["steps"]] == [block_bytes[b] + shared_bytes for b, _ in ranks[0]["steps"]]
    assert all(nbytes < whole / 2 for _, nbytes in ranks[0]["steps"])  # DDP would move `whole` every step
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name

    ddp = _quickstart_on_two_processes(tmp_path / "ddp", "ddp", "ddp_probe.RecordState", **sgd)
    reference = torch.load(ddp / "rank0.pt")["state"]
    for name, value in ranks[0]["state"].items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_vit_label_diffusion_on_two_processes_gives_the_one_process_accuracy(tmp_path, capsys, monkeypatch):
    """Classification by label diffusion: the chained prediction's starting noise and the routed loss's
    draws are seeded by the batch's index in the split, so test/acc, test/ce and test/loss equal one process's."""
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    write_idx_gz(tmp_path / "fm" / "FashionMNIST" / "raw", n_train=12, n_test=7)
    model = {"class_path": "dbl.training.LabelDiffusionModule",
             "init_args": {"network": {"class_path": "dbl.models.ViT",
                                       "init_args": {"num_classes": 10, "image_size": 28, "in_channels": 1, "patch_size": 7,
                                                     "hidden_size": 16, "depth": 3, "num_heads": 2, "mlp_hidden": 32}},
                           "num_blocks": 3}}
    data = {"class_path": "dbl.data.FashionMNISTClassificationDataModule",
            "init_args": {"root": str(tmp_path / "fm"), "cache_dir": str(tmp_path / "cache"), "batch_size": 4,
                          "eval_batch_size": 2, "val_fraction": 0.25}}
    two, one = _fit_and_test_on_two_processes(_config(model, data, tmp_path), tmp_path, capsys)
    for name in ("test/acc", "test/ce", "test/loss", "test/denoising_ce"):
        assert two[name] == pytest.approx(one[name], rel=1e-6, abs=0), name


def _recurrent() -> dict:
    return {"class_path": "dbl.models.recurrent.RecurrentDepthLlama",
            "init_args": {"vocab_size": len(WORDS) + 5, "hidden_size": 32, "num_heads": 2, "prelude_depth": 1, "core_depth": 2,
                          "coda_depth": 1}}


def test_recurrent_depth_baseline_on_two_processes_gives_the_one_process_perplexity(tmp_path, capsys, monkeypatch):
    """Truncated back-propagation: every process draws the same r at a step (the adapter is used, the
    noise conditioning is not); the test initial state is seeded by the batch's index in the split."""
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    model = {"class_path": "dbl.training.recurrent.RecurrentDepthLMModule",
             "init_args": {"network": _recurrent(), "mean_iterations": 3, "backprop_iterations": 2, "eval_iterations": 3}}
    two, one = _fit_and_test_on_two_processes(_config(model, _lm1b(tmp_path), tmp_path), tmp_path, capsys)
    assert two["test/ppl"] == pytest.approx(one["test/ppl"], rel=1e-6, abs=0)


def test_recurrent_depth_diffusion_on_two_processes_gives_the_one_process_loss(tmp_path, capsys, monkeypatch):
    """B = 1 over the recurrence: the baseline's adapter gets no gradient, which DDP must be told."""
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    model = {"class_path": "dbl.training.autoregressive.ARDiffusionLMModule",
             "init_args": {"network": _recurrent(), "num_blocks": 1, "sample_steps": 2}}
    two, one = _fit_and_test_on_two_processes(_config(model, _lm1b(tmp_path), tmp_path), tmp_path, capsys)
    assert two["test/loss"] == pytest.approx(one["test/loss"], rel=1e-6, abs=0)
    assert two["test/ce"] == pytest.approx(one["test/ce"], rel=1e-6, abs=0)
