"""Scoring the LM1B task's free-running text: generative perplexity, MAUVE, diversity guards, and a JSONL.

Neither headline metric is enough alone: a model that repeats one likely phrase gets a low
generative perplexity, and MAUVE on few samples is noisy. So ``LMGenerationMetrics`` reports both
together with distinct-n and a repetition rate, each also for the human continuations of the
same prompts, and writes every generation to a JSONL file a person can read.

Protocol (defaults; every number is an argument):
- prompts: the first ``num_prompts`` examples of the data module's split being evaluated
  (``generation_examples``: validation sentences or documents at validation, held-out test ones at
  ``dbl test``): ``prompt_length`` tokens from the start of a sentence or document, and the
  ``continuation_length`` tokens that follow it as the human reference;
- ``continuations_per_prompt`` continuations per prompt and seed, for every seed in ``seeds``;
- generative perplexity: the judge causal LM's perplexity of the continuation given the prompt
  text (continuation tokens only, judge tokenisation);
- MAUVE (``mauve-text``): features are the featurizer's last hidden state at the last token of
  each continuation text; model continuations vs human continuations; ``mauve_scaling_factor``
  and ``num_buckets`` as in mauve-text (5, 'auto');
- distinct-n (n = 1, 2, 3): distinct n-grams over all n-grams of all continuations (model
  tokens); repetition rate: mean over continuations of the share of repeated 4-grams;
- tokens/s: the tokens one process generated divided by the wall time of its ``generate`` calls.

The defaults name gpt2-large for the judge and featurizer (MDLM-style protocol); offline, point
them at a local causal LM (``shared/tools/offline_assets.sh`` fetches SmolLM2-135M as GGUF:
``judge_kwargs: {gguf_file: ...}``). Scores under different judges are not comparable.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from tqdm import tqdm

from dbl.callbacks.paths import run_dir
from dbl.diffusion.draws import per_sample_generators
from dbl.errors import UsageError
from dbl.evaluation.sharding import Shard
from dbl.hub import from_pretrained


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / all n-grams, pooled over ``sequences`` (0 when there are none)."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sequences: Sequence[Sequence[int]], n: int = 4) -> float:
    """Mean over sequences of 1 - distinct n-grams / n-grams within the sequence (seq-rep-n)."""
    rates = []
    for s in sequences:
        grams = [tuple(s[i : i + n]) for i in range(len(s) - n + 1)]
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return float(np.mean(rates)) if rates else 0.0


def load_causal_lm(name_or_path: str, kwargs: dict | None, device: torch.device):
    """A Hugging Face causal LM and its tokenizer, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(kwargs or {})
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name_or_path, "causal LM", **kwargs)
    model = from_pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, "causal LM", **kwargs)
    return model.to(device).eval(), tokenizer


def continuation_texts(dm, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[str]:
    """The text each continuation adds to its prompt: decode(prompt + continuation) minus decode(prompt).

    Decoding the continuation alone would cut words in two at the boundary (WordPiece ``##hip``);
    the result keeps its leading space when the continuation starts a new word.
    """
    texts = []
    for p, c in zip(prompts, continuations):
        head, full = dm.decode(list(p)), dm.decode(list(p) + list(c))
        texts.append(full[len(head):] if full.startswith(head) else " " + dm.decode(c))
    return texts


@torch.no_grad()
def generative_perplexity(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 8) -> float:
    """exp(mean NLL) of the continuations' tokens given their prompts, under a causal LM judge.

    ``prompt + continuation`` is the whole text: a continuation that starts a new word starts with
    a space (``continuation_texts``).
    """
    device = next(model.parameters()).device
    max_len = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = []
    for prompt, cont in zip(prompts, continuations):
        p = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(cont, add_special_tokens=False)["input_ids"]
        ids = (p + c)[-max_len:]
        rows.append((ids, min(len(c), len(ids) - 1)))
    nll_sum, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (row, n_cont) in enumerate(chunk):
            ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
            if n_cont > 0:
                labels[i, len(row) - n_cont : len(row)] = torch.tensor(row[len(row) - n_cont :])
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
        target = labels[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
        nll_sum += nll.item()
        count += int((target != -100).sum())
    return math.exp(nll_sum / max(count, 1))


@torch.no_grad()
def text_features(model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 1024) -> np.ndarray:
    """[n, d] the last layer's hidden state at each text's last token (mauve-text's featurisation)."""
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [(bos + tokenizer(t, add_special_tokens=False)["input_ids"])[:max_length] or [0] for t in texts]
    feats = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(e) for e in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, e in enumerate(chunk):
            ids[i, : len(e)] = torch.tensor(e)
            attention[i, : len(e)] = 1
        hidden = model(input_ids=ids.to(device), attention_mask=attention.to(device), output_hidden_states=True).hidden_states[-1]
        last = torch.tensor([len(e) - 1 for e in chunk], device=device)
        feats.append(hidden[torch.arange(len(chunk), device=device), last].float().cpu())
    return torch.cat(feats).numpy()


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, scaling_factor: float, num_buckets, seed: int) -> float:
    import mauve

    out = mauve.compute_mauve(p_features=p_features, q_features=q_features, mauve_scaling_factor=scaling_factor,
                              num_buckets=num_buckets, seed=seed, verbose=False)
    return float(out.mauve)


class LMGenerationMetrics(L.Callback):
    """At the end of ``dbl test`` (and, with ``every_n_validations``, during training), generate
    continuations of held-out prompts and score them (see the module docstring for the protocol).
    Several processes share the generation (each scores the whole set, so all log the same numbers).

    Args:
        judge: causal LM for generative perplexity (hub id or local directory).
        featurizer: causal LM whose features MAUVE compares; None: the judge.
        judge_kwargs, featurizer_kwargs: extra ``from_pretrained`` arguments (e.g. ``gguf_file``).
        num_prompts, prompt_length, continuation_length, continuations_per_prompt: the protocol.
        mauve_scaling_factor, mauve_num_buckets: passed to ``mauve.compute_mauve``.
        seeds: one generation (and MAUVE clustering) per seed; metrics are reported per seed and
            as their mean.
        sampler: options for the module's ``generate`` (``num_steps``, ``solver``, ``grid``,
            ``temperature``); unset ones take the module's defaults. The next-token baseline takes
            only ``temperature``.
        generation_batch_size, judge_batch_size: batch sizes of generation and of the judge.
        every_n_validations: also score after every n-th validation (0: only at test).
        output: name of the JSONL of generations, written next to the metrics JSON in the log dir.
    """

    def __init__(
        self,
        judge: str = "gpt2-large",
        featurizer: str | None = None,
        judge_kwargs: dict | None = None,
        featurizer_kwargs: dict | None = None,
        num_prompts: int = 1000,
        prompt_length: int = 32,
        continuation_length: int = 64,
        continuations_per_prompt: int = 1,
        mauve_scaling_factor: float = 5.0,
        mauve_num_buckets: int | str = "auto",
        seeds: Sequence[int] = (0,),
        sampler: dict | None = None,
        generation_batch_size: int = 64,
        judge_batch_size: int = 8,
        every_n_validations: int = 0,
        output: str = "generations.jsonl",
    ):
        for name, value in (("num_prompts", num_prompts), ("prompt_length", prompt_length),
                            ("continuation_length", continuation_length), ("continuations_per_prompt", continuations_per_prompt)):
            if value < 1:
                raise UsageError(f"{name} must be >= 1, got {value}")
        if not seeds:
            raise UsageError("seeds is empty; give at least one seed")
        self.judge, self.judge_kwargs = judge, judge_kwargs
        self.featurizer = featurizer or judge
        self.featurizer_kwargs = featurizer_kwargs if featurizer is not None else judge_kwargs
        self.num_prompts, self.prompt_length, self.continuation_length = num_prompts, prompt_length, continuation_length
        self.per_prompt = continuations_per_prompt
        self.scaling, self.num_buckets, self.seeds = mauve_scaling_factor, mauve_num_buckets, list(seeds)
        self.sampler = dict(sampler or {})
        self.generation_batch_size, self.judge_batch_size = generation_batch_size, judge_batch_size
        self.every_n_validations, self.output = every_n_validations, output
        self._validations = 0
        self.last_metrics: dict[str, float] = {}

    def generate(self, pl_module, prompts: torch.Tensor, seed: int) -> tuple[torch.Tensor, float]:
        """Continuations [P * k, continuation_length] (prompt-major) and this process's tokens per second
        of generation. Continuation i is drawn from its own generator, seeded by (seed, i), so the set
        does not depend on the batch size or the number of processes; under several processes each
        generates its share of the batches (``dbl.evaluation.sharding``) and all get every continuation."""
        repeated = prompts.repeat_interleave(self.per_prompt, dim=0)
        shard, size = Shard.current(), self.generation_batch_size
        outs, seconds, mine = [], 0.0, 0
        rounds = tqdm(list(shard.rounds(-(-len(repeated) // size))), desc=f"generating continuations, seed {seed}",
                      unit="round", disable=None if shard.rank == 0 else True)
        for k in rounds:
            out = None
            if k is not None:
                t0 = time.perf_counter()
                start, stop = k * size, min((k + 1) * size, len(repeated))
                out = pl_module.generate(repeated[start:stop], self.continuation_length,
                                         generator=per_sample_generators(seed, range(start, stop)), **self.sampler).cpu()
                seconds += time.perf_counter() - t0
                mine += out.numel()
            outs.extend(shard.gather(out))
        return torch.cat(outs), mine / seconds if seconds else float("nan")

    def evaluate(self, trainer: L.Trainer, pl_module, stage: str) -> dict[str, float]:
        """Every process generates its share and then scores all of it (the same numbers everywhere,
        so all log them); process 0 writes the files."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "generation_examples"):
            raise UsageError("LMGenerationMetrics needs a data module with generation_examples "
                             "(dbl.data.LM1BDataModule, dbl.data.TextDataModule)")
        # validation prompts come from the validation sentences, test prompts from the test sentences
        prompts, references = dm.generation_examples(self.num_prompts, self.prompt_length, self.continuation_length,
                                                     split="validation" if stage == "val" else "test")
        prompt_texts = [dm.decode(p) for p in prompts.tolist()]
        reference_texts = continuation_texts(dm, prompts.tolist(), references.tolist())
        device = pl_module.device
        judge, judge_tok = load_causal_lm(self.judge, self.judge_kwargs, device)
        if (self.featurizer, self.featurizer_kwargs) == (self.judge, self.judge_kwargs):
            featurizer, feat_tok = judge, judge_tok
        else:
            featurizer, feat_tok = load_causal_lm(self.featurizer, self.featurizer_kwargs, device)
        human_features = text_features(featurizer, feat_tok, [t.strip() for t in reference_texts], self.judge_batch_size)
        metrics = {
            "human_gen_ppl": generative_perplexity(judge, judge_tok, prompt_texts, reference_texts, self.judge_batch_size),
            **{f"human_distinct_{n}": distinct_n(references.tolist(), n) for n in (1, 2, 3)},
            "human_repetition_rate": repetition_rate(references.tolist()),
        }
        records, per_seed = [], []
        for seed in self.seeds:
            continuations, tokens_per_s = self.generate(pl_module, prompts, seed)
            repeated = prompts.repeat_interleave(self.per_prompt, dim=0).tolist()
            texts = continuation_texts(dm, repeated, continuations.tolist())
            context = [t for t in prompt_texts for _ in range(self.per_prompt)]
            features = text_features(featurizer, feat_tok, [t.strip() for t in texts], self.judge_batch_size)
            scores = {
                "gen_ppl": generative_perplexity(judge, judge_tok, context, texts, self.judge_batch_size),
                "mauve": mauve_score(features, human_features, self.scaling, self.num_buckets, seed),
                **{f"distinct_{n}": distinct_n(continuations.tolist(), n) for n in (1, 2, 3)},
                "repetition_rate": repetition_rate(continuations.tolist()),
                "tokens_per_s": tokens_per_s,  # this process's
            }
            per_seed.append(scores)
            metrics.update({f"{k}_seed{seed}": v for k, v in scores.items()})
            for i, text in enumerate(texts):
                p = i // self.per_prompt
                records.append({"seed": seed, "prompt_index": p, "prompt": prompt_texts[p], "continuation": text.strip(),
                                "human_continuation": reference_texts[p].strip()})
        metrics.update({k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]})
        self.last_metrics = metrics
        for key, value in metrics.items():
            pl_module.log(f"{stage}/{key}", value, batch_size=1)
        # named by the model's own training steps (trainer.global_step is 0 in `dbl test`)
        if trainer.is_global_zero:
            self._write(trainer, f"{stage}_step{pl_module.block_steps:07d}", metrics, records)
        return metrics

    def _write(self, trainer: L.Trainer, step: str, metrics: dict, records: list[dict]) -> None:
        root = run_dir(trainer)
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f"{step}_{self.output}", "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        settings = dict(judge=self.judge, featurizer=self.featurizer, num_prompts=self.num_prompts,
                        prompt_length=self.prompt_length, continuation_length=self.continuation_length,
                        continuations_per_prompt=self.per_prompt, mauve_scaling_factor=self.scaling,
                        mauve_num_buckets=self.num_buckets, seeds=self.seeds, sampler=self.sampler)
        (root / f"{step}_generation_metrics.json").write_text(json.dumps({"settings": settings, "metrics": metrics}, indent=2))

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module, "test")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.every_n_validations:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self.evaluate(trainer, pl_module, "val")


class ContinuationWriter(BasePredictionWriter):
    """Writes ``dbl predict``'s continuations of ``predict_file`` prompts as JSONL, in input order,
    and prints them.

    Args:
        output: the JSONL path (``{"prompt", "continuation"}`` per line).
        print_continuations: also print ``prompt => continuation`` lines.
    """

    def __init__(self, output: str = "continuations.jsonl", print_continuations: bool = True):
        super().__init__(write_interval="batch")
        self.output, self.print_continuations = Path(output), print_continuations
        self.rows: dict[int, dict] = {}

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.rows = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        dm = trainer.datamodule
        for index, continuation in zip(batch[1].tolist(), prediction["continuation"].tolist()):
            self.rows[index] = {"prompt": dm.predict_lines[index], "continuation": dm.decode(continuation)}

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output, "w") as f:
            for index in sorted(self.rows):
                f.write(json.dumps(self.rows[index]) + "\n")
                if self.print_continuations:
                    print(f"{self.rows[index]['prompt']} => {self.rows[index]['continuation']}")
