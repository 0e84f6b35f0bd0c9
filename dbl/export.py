"""``dbl export``: a trained checkpoint as a folder to share, and ``dbl.load_exported`` to load it back.

    dbl export --config run.yaml --ckpt_path <run>/version_0/checkpoints/last.ckpt --out exported/
    dbl export --config run.yaml --ckpt_path last --out exported/      # this experiment's newest checkpoint

The folder holds:

- ``model.safetensors``: the LightningModule's weights as the checkpoint has them (with
  ``dbl.callbacks.EMA``, the average: the checkpoint's ``state_dict``);
- ``dbl_config.yaml``: the model section of the configuration (``model: {class_path, init_args}``),
  which rebuilds the module without the data;
- ``network/config.json``: for a ``PretrainedCausalLM``, the Hugging Face config of its model, so the
  network is rebuilt without the pretrained directory (its weights all come from ``model.safetensors``);
- the tokenizer's files (the data module's tokenizer, else the pretrained model's), when one loads;
- ``hf/``: where the model has a next-token path (``NextTokenLMModule``, or ``ARDiffusionLMModule``
  with a chained clean stream, LoRA merged in either), a plain ``transformers`` folder:
  ``AutoModelForCausalLM.from_pretrained("exported/hf")`` gives the clean path's logits, no dbl needed;
- ``README.md``: a model card: recipe, data, last logged validation/test metrics, and what is (not) in
  the folder and why.

``dbl.load_exported(folder)`` rebuilds the module from ``dbl_config.yaml`` (and ``network/``) and loads
``model.safetensors``: in eval mode, ready to ``generate``.
"""

from __future__ import annotations

import copy
import csv
import importlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from dbl.errors import MissingDataError, UsageError

CONFIG = "dbl_config.yaml"
WEIGHTS = "model.safetensors"
NETWORK = "network"  # the HF config of a PretrainedCausalLM
HF = "hf"
CARD = "README.md"
PRETRAINED = "dbl.models.pretrained.PretrainedCausalLM"
# class paths load_exported imports without trust_config: dbl's own, and torch's optimizers and schedulers
TRUSTED = ("dbl.", "torch.optim.")
EVALUATION_PREFIXES = ("val", "test")


# -- what the module is --------------------------------------------------------------------------
def model_config(module) -> dict:
    """``{"class_path", "init_args"}``: the module's configuration as LightningCLI recorded it."""
    hp = dict(module.hparams)
    class_path = hp.pop("_class_path", f"{type(module).__module__}.{type(module).__qualname__}")
    hp.pop("_instantiator", None)
    if not isinstance(hp.get("network"), dict):
        raise UsageError(f"{type(module).__name__} was not built from a configuration (its hyperparameters have no "
                         "network class_path); export checkpoints of runs of `dbl fit --config ...`")
    return {"class_path": class_path, "init_args": _plain(hp)}


def _plain(value):
    """YAML-safe copies: dicts, lists, strings, numbers."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def causal_lm_status(module) -> str | None:
    """None when the module's clean path is a causal LM to write as a transformers folder; else why not."""
    from dbl.models.pretrained import PretrainedCausalLM
    from dbl.training.autoregressive import ARDiffusionLMModule, NextTokenLMModule

    net = module.network.net
    if not isinstance(net, PretrainedCausalLM):
        return (f"the network is {type(net).__name__}, trained from scratch in dbl: it has no Hugging Face architecture "
                "to be written as; load it with `dbl.load_exported`")
    if module.num_blocks > 1 and not module.network.shared_io:
        return "its blocks have their own input/output layers (shared_io: false), so there is no one clean path"
    if isinstance(module, NextTokenLMModule):
        return None
    if isinstance(module, ARDiffusionLMModule):
        if not net.chained_clean_stream:
            return ("its blocks did not chain the clean stream (chain_clean_stream: false): each block read the token "
                    "embeddings, so the clean path through all layers was never trained as a causal LM")
        return None
    return f"{type(module).__name__} has no next-token path"


def objective(module) -> str:
    from dbl.training.autoregressive import ARDiffusionLMModule, NextTokenLMModule

    if isinstance(module, NextTokenLMModule):
        return "next-token cross-entropy, end to end (one block)"
    if isinstance(module, ARDiffusionLMModule):
        text = (f"block-wise autoregressive diffusion in embedding space: each block denoises its slice of the noise "
                f"range, loss {module.hparams.get('loss_weighting', 'edm')}-weighted cross-entropy")
        if module.anchor_weight:
            text += f" + {module.anchor_weight:g} x next-token cross-entropy of the clean path (anchor)"
        return text
    doc = (type(module).__doc__ or "").strip().splitlines()
    return doc[0] if doc else type(module).__name__


# -- what the run recorded -----------------------------------------------------------------------
def logged_metrics(ckpt_path: Path, checkpoint: dict) -> tuple[list[tuple[str, int | None, float]], str | None]:
    """The last value of every validation/test scalar the run logged up to the checkpoint's step,
    ``[(tag, step, value)]``, and where it was found: the run folder's ``metrics.csv`` (CSVLogger) or
    TensorBoard event files, else the checkpoint's ModelCheckpoint score."""
    step = checkpoint.get("global_step")
    run = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    last: dict[str, tuple[int | None, float]] = {}
    source = None
    table = run / "metrics.csv"
    if table.is_file():
        with table.open(newline="") as f:
            for row in csv.DictReader(f):
                at = int(row["step"]) if (row.get("step") or "").isdigit() else None
                if at is not None and step is not None and at > step:
                    continue
                for tag, value in row.items():
                    if tag and tag.startswith(EVALUATION_PREFIXES) and value not in (None, ""):
                        last[tag] = (at, float(value))
        source = str(table) if last else None
    if not last and any(run.glob("events.out.tfevents.*")):
        try:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                points = [e for e in acc.Scalars(tag) if step is None or e.step <= step]
                if tag.startswith(EVALUATION_PREFIXES) and points:
                    last[tag] = (points[-1].step, points[-1].value)
            source = f"{run} (TensorBoard)" if last else None
        except ImportError:
            pass
    if not last:
        for key, state in (checkpoint.get("callbacks") or {}).items():
            score = state.get("current_score") if isinstance(state, dict) else None
            if str(key).startswith("ModelCheckpoint") and state.get("monitor") and score is not None:
                last[state["monitor"]] = (step, float(score))
                source = "the checkpoint's ModelCheckpoint"
    return [(tag, *last[tag]) for tag in sorted(last)], source


def _ema(callbacks) -> str | None:
    from lightning.pytorch.callbacks import WeightAveraging

    for callback in callbacks or ():
        if isinstance(callback, WeightAveraging):
            decay = getattr(callback, "decay", None)
            return f"{type(callback).__name__}" + (f", decay {decay:g} per block update" if decay is not None else "")
    return None


def _tokenizer(module, datamodule, data_options: dict | None):
    """(tokenizer, where it came from) or (None, why there is none)."""
    from dbl.data.lm1b import load_tokenizer

    def usable(tokenizer):  # transformers builds an empty tokenizer for a model folder without tokenizer files
        if len(tokenizer) < 2:
            raise UsageError("no tokenizer files there (an empty vocabulary)")
        return tokenizer

    tried = []
    if datamodule is not None and hasattr(type(datamodule), "tokenizer"):
        try:
            return usable(datamodule.tokenizer), f"the data module's ({type(datamodule).__name__}) tokenizer"
        except Exception as err:  # noqa: BLE001 - any failure: try the next source, say why in the card
            tried.append(f"the data module's: {_line(err)}")
    candidates = []
    if data_options and data_options.get("tokenizer"):
        candidates.append(("data.tokenizer", data_options["tokenizer"], data_options.get("tokenizer_gguf_file")))
    net_options = (module.hparams.get("network") or {}).get("init_args", {})
    if net_options.get("name_or_path"):
        candidates.append(("the pretrained model's", net_options["name_or_path"], net_options.get("gguf_file")))
    for what, name, gguf in candidates:
        try:
            if gguf:
                from transformers import AutoTokenizer

                return usable(AutoTokenizer.from_pretrained(name, gguf_file=gguf)), f"{what} {name} ({gguf})"
            return usable(load_tokenizer(name)), f"{what} {name}"
        except Exception as err:  # noqa: BLE001
            tried.append(f"{what} {name}: {_line(err)}")
    return None, "; ".join(tried) if tried else "neither the data nor the network names one"


def _line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


# -- writing ---------------------------------------------------------------------------------------
def export(module, ckpt_path: str | Path, out: str | Path, datamodule=None, overwrite: bool = False,
           callbacks=()) -> Path:
    """Write ``out`` (see the module docstring) from ``ckpt_path``, loaded into ``module`` (built from the
    run's configuration). ``callbacks``: the run's (names the weight average in the card)."""
    from dbl.cli import read_checkpoint

    ckpt_path, out = Path(ckpt_path), Path(out).expanduser()
    _check_out(out, overwrite)
    checkpoint = read_checkpoint(ckpt_path, "give a checkpoint written by `dbl fit`")
    config = model_config(module)
    checkpoint = dict(checkpoint)
    module.on_load_checkpoint(checkpoint)
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise UsageError(f"{ckpt_path} does not fit the model built from the configuration "
                         f"({_line(err)}); give the YAML the run was trained with") from None
    module.eval()
    averaged = "current_model_state" in checkpoint  # Lightning's WeightAveraging keeps the raw weights there
    data_options = checkpoint.get("datamodule_hyper_parameters")
    if data_options is None and datamodule is not None:
        data_options = dict(getattr(datamodule, "hparams", {}) or {})
    data_options = _plain(data_options) if data_options is not None else None
    tokenizer, tokenizer_note = _tokenizer(module, datamodule, data_options) if _is_language_model(module) else (
        None, f"{type(module).__name__} does not read text")
    hf_reason = causal_lm_status(module) if _is_language_model(module) else f"{type(module).__name__} is not a language model"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the export is an ordinary folder
    try:
        from safetensors.torch import save_model

        save_model(module, str(tmp / WEIGHTS), metadata={"format": "pt", "dbl_weights": "ema" if averaged else "raw"})
        (tmp / CONFIG).write_text("# the model section of the run's configuration (dbl export); "
                                  "load with dbl.load_exported(<this folder>)\n"
                                  + yaml.safe_dump({"model": config}, sort_keys=False))
        net = module.network.net
        if hasattr(net, "to_causal_lm") and hasattr(net, "config"):
            net.config.save_pretrained(tmp / NETWORK)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if hf_reason is None:
            net.to_causal_lm().save_pretrained(tmp / HF)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / HF)
        card = model_card(module, config, checkpoint, ckpt_path, data_options, tokenizer, tokenizer_note, hf_reason,
                          averaged, _ema(callbacks), out)
        (tmp / CARD).write_text(card)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _is_language_model(module) -> bool:
    return hasattr(module.network.net, "token_vectors")


def check_export_options(ckpt_path: str | None, out: str | None, overwrite: bool) -> None:
    """The options of ``dbl export``, as one-line ``UsageError``s (the checkpoint file is checked by the CLI)."""
    if not ckpt_path:
        raise UsageError("dbl export needs --ckpt_path <checkpoint> (or --ckpt_path last)")
    if str(ckpt_path) != "last" and (str(ckpt_path).split(":")[0] in ("best", "hpc", "registry") or "://" in str(ckpt_path)):
        raise UsageError(f"dbl export: --ckpt_path {ckpt_path} is not supported; give a checkpoint file or 'last'")
    if not out:
        raise UsageError("dbl export needs --out <directory>")
    _check_out(Path(out).expanduser(), overwrite)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory to write the export to")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {out} exists and is not empty; give a new directory, or --overwrite true to replace "
                             "an earlier export")
        if not (out / CONFIG).is_file():
            raise UsageError(f"--out {out} is not empty and is not a dbl export (no {CONFIG}); --overwrite replaces "
                             "only earlier exports: give a new directory")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an earlier export at ``out`` goes only once the new one is there."""
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def model_card(module, config, checkpoint, ckpt_path, data_options, tokenizer, tokenizer_note, hf_reason, averaged,
               ema, out) -> str:
    hp = config["init_args"]
    net = module.network.net
    net_options = hp["network"].get("init_args", {})
    net_class = hp["network"].get("class_path", type(net).__name__)
    lora = getattr(net, "lora_rank", None)
    optimizer, scheduler = _call(hp.get("optimizer")), _call(hp.get("lr_scheduler"))
    anchor = getattr(module, "anchor_weight", None)
    recipe = [
        ("module", config["class_path"]),
        ("objective", objective(module)),
        ("network", f"{net_class}" + (f" ({net_options['name_or_path']}, {type(net.config).__name__})"
                                      if "name_or_path" in net_options and hasattr(net, "config") else "")),
        ("layers", str(module.depth)),
        ("num_blocks", str(module.num_blocks)),
        ("layers_per_block", str(list(module.network.layers_per_block))),
        ("anchor_weight", "-" if anchor is None else f"{anchor:g}"),
        ("LoRA rank", "-" if lora is None else (f"{lora} (alpha {net_options.get('lora_alpha') or 2 * lora})" if lora
                                                else "0 (every weight trained)")),
        ("optimizer", str(optimizer)),
        ("lr_scheduler", str(scheduler)),
        ("steps", str(checkpoint.get("global_step", "-"))),
        ("block_updates", str(module.block_updates.tolist())),
        ("layer_updates", str(module.layer_updates)),
        ("weights", f"EMA average ({ema or 'weight averaging'}); the raw weights are not exported" if averaged
         else "as trained (no EMA)"),
    ]
    lines = [f"# {out.name}", "",
             f"`{config['class_path'].rsplit('.', 1)[-1]}`, exported by `dbl export` from `{ckpt_path}` "
             f"(step {checkpoint.get('global_step', '?')}).", "",
             "## Load it", "", "```python", "import dbl", "",
             f'module = dbl.load_exported("{out}")  # eval mode, on the CPU; .to("cuda") to move it']
    if _is_language_model(module):
        lines += ["tokens = module.generate(prompt_ids, num_tokens=32)  # prompt_ids: [N, p] token ids"]
    lines += ["```", ""]
    if hf_reason is None:
        lines += ["With no dbl code, the next-token path (the clean path through all blocks"
                  + (", LoRA merged into the base weights" if lora else "") + "):", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{out}/{HF}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{out}/{HF}")' if tokenizer is not None else
                  "# no tokenizer was exported (see Files)", "```", ""]
        if getattr(module, "anchor_weight", None) == 0 and not _next_token_module(module):
            lines += ["Note: `anchor_weight` was 0, so no loss kept this path a next-token model while the blocks "
                      "trained as denoisers; check its perplexity (`val/next_token_ppl`) before relying on it.", ""]
    lines += ["## Recipe", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in recipe] + [""]
    lines += ["## Data", ""]
    if data_options:
        data_class = data_options.get("_class_path", "?")
        lines += [f"`{data_class}`:", "", "| option | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in data_options.items() if not k.startswith("_")]
    else:
        lines += ["The checkpoint records no data module."]
    lines += ["", "## Metrics", ""]
    metrics, source = logged_metrics(ckpt_path, checkpoint)
    if metrics:
        lines += [f"The last logged value of each validation/test metric up to step {checkpoint.get('global_step')}, "
                  f"from {source}:", "", "| metric | value | logged at step |", "|---|---|---|"]
        lines += [f"| {tag} | {value:.6g} | {'-' if at is None else at} |" for tag, at, value in metrics]
    else:
        lines += ["No validation or test metrics were recorded for this checkpoint (no `metrics.csv` or TensorBoard "
                  "events in its run folder, no monitored ModelCheckpoint score); evaluate it with `dbl test`."]
    lines += ["", "## Files", "",
              f"- `{WEIGHTS}`: the LightningModule's weights ({'EMA average' if averaged else 'as trained'}).",
              f"- `{CONFIG}`: the model section of the configuration; `dbl.load_exported` rebuilds the module from it."]
    if (getattr(net, "config", None) is not None) and hasattr(net, "to_causal_lm"):
        lines += [f"- `{NETWORK}/config.json`: the Hugging Face config of the pretrained model, so the network is rebuilt "
                  f"without its original files (every weight comes from `{WEIGHTS}`)."]
    lines += [f"- tokenizer files: {tokenizer_note}." if tokenizer is not None
              else f"- no tokenizer: none could be loaded ({tokenizer_note})."]
    lines += [f"- `{HF}/`: a plain transformers causal LM (config.json, weights"
              + (", tokenizer" if tokenizer is not None else "") + ")." if hf_reason is None
              else f"- no `{HF}/` folder: {hf_reason}."]
    return "\n".join(lines) + "\n"


def _call(factory) -> str:
    """``{class_path, init_args}`` -> ``class(arg=value, ...)``, leaving out the arguments that are off (None, False)."""
    if not isinstance(factory, dict):
        return str(factory)
    args = ", ".join(f"{k}={v}" for k, v in (factory.get("init_args") or {}).items() if v is not None and v is not False)
    return f"{factory.get('class_path')}({args})"


def _next_token_module(module) -> bool:
    from dbl.training.autoregressive import NextTokenLMModule

    return isinstance(module, NextTokenLMModule)


# -- loading back ----------------------------------------------------------------------------------
def _class_paths(node, key: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "class_path" and isinstance(v, str):
                yield v
            elif k in ("optimizer", "lr_scheduler") and isinstance(v, str):
                yield v  # a function given by its import path
            else:
                yield from _class_paths(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _class_paths(v, key)


def load_exported(path: str | Path, trust_config: bool = False):
    """The LightningModule of a ``dbl export`` folder, with its weights, in eval mode on the CPU.

    It is rebuilt from the folder alone: ``dbl_config.yaml`` (a ``PretrainedCausalLM`` from
    ``network/config.json``, no pretrained files), then every weight from ``model.safetensors``.
    The configuration names classes that are imported and built; only dbl's and ``torch.optim``'s
    are, unless ``trust_config`` (for a folder whose configuration you trust).
    """
    from lightning.pytorch.cli import instantiate_module
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context
    from safetensors.torch import load_model

    from dbl.training.engine import BlockwiseLightningModule

    path = Path(path).expanduser()
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise MissingDataError(f"{path} is not a dbl export: no {name} (write one with `dbl export`)")
    config = (yaml.safe_load((path / CONFIG).read_text()) or {}).get("model")
    if not isinstance(config, dict) or "class_path" not in config:
        raise UsageError(f"{path / CONFIG} has no model: {{class_path, init_args}} section")
    untrusted = sorted({c for c in _class_paths(config) if not c.startswith(TRUSTED)})
    if untrusted and not trust_config:
        raise UsageError(f"{path / CONFIG} names classes outside dbl and torch.optim ({', '.join(untrusted)}); "
                         "if you trust this folder, pass trust_config=True")
    hparams = {"_class_path": config["class_path"], **copy.deepcopy(config.get("init_args") or {})}
    network = hparams.get("network") or {}
    if _is_pretrained(network.get("class_path", "")):
        if not (path / NETWORK / "config.json").is_file():
            raise MissingDataError(f"{path} has no {NETWORK}/config.json to rebuild its PretrainedCausalLM from")
        init_args = network.setdefault("init_args", {})
        init_args.update(name_or_path=str(path / NETWORK), gguf_file=None, load_weights=False)
        for option in ("config", "meta_device"):  # an inline config is in network/config.json too; weights are real
            if option in init_args:
                init_args[option] = None if option == "config" else False
    with _given_hyperparameters_context(hparams=hparams, instantiator="lightning.pytorch.cli.instantiate_module"):
        module = instantiate_module(BlockwiseLightningModule, hparams)
    missing, unexpected = load_model(module, str(path / WEIGHTS), strict=False)
    if missing or unexpected:
        raise UsageError(f"{path / WEIGHTS} does not fit the module built from {CONFIG} (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return module.eval()


def _is_pretrained(class_path: str) -> bool:
    if class_path == PRETRAINED:
        return True
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return False
    from dbl.models.pretrained import PretrainedCausalLM

    return isinstance(cls, type) and issubclass(cls, PretrainedCausalLM)
