"""A pretrained Hugging Face causal LM as dbl's text network: a drop-in for ``dbl.models.Llama``.

Supported: models whose decoder layers form a list, ``model.model.layers`` (Llama, Qwen2, Mistral,
SmolLM2: rotary positions) or ``model.transformer.h`` (GPT-2: learned positions). The wrapper keeps
the model's own parts (token embedding, positions, decoder layers, final norm, ``lm_head``) and
runs them on the sequence ``[noisy rows ; clean rows]`` of ``dbl.models.llama`` with the same
``ar_diffusion_mask``, ``ARInput`` and ``KVCache``, so ``ARDiffusionLMModule`` and
``NextTokenLMModule`` take it unchanged.

Clean rows go through exactly the pretrained computation: with no noisy rows the output is the
original model's next-token logits. Noisy rows get new parameters only, all of them initialised
so that the pretrained function is intact at the start:

- ``noisy_in``: diffusion space -> hidden space, the identity times the embedding entries' RMS
  (a noisy row enters the layers at a token embedding's scale and, at low noise, in its direction);
- per layer, adaLN-Zero style (shift, scale, gate) from the noise embedding, zero-initialised:
  the noisy rows are modulated before the pretrained layer and its update is gated by 1 + gate,
  so at the start every layer treats a noisy row exactly as it would a token embedding;
- ``out``: final-norm output -> F in the diffusion space, zero-initialised (DiT's zero final
  layer): the first denoised estimate is D = c_skip z.

Block-wise (``chain_clean_stream``, default on), block b's clean rows enter its first layer as the
earlier blocks leave them (``dbl.models.blockwise``), so every block starts from the states it
was pretrained on and the clean path through all blocks is the pretrained model. Off, every block's
clean stream starts again from the token embeddings (the from-scratch models' protocol).

LoRA (``lora_rank`` > 0, through PEFT): adapters on every linear map of the decoder layers; all
pretrained weights are frozen, the adapters and the noise conditioning train. Each block's
adapters live in its layers, so block-wise only the active block's adapters train.

Known limits: sliding-window attention (Mistral, some Qwen2 configs) is not applied (the explicit
mask is full causal), so positions beyond the window are refused; so is final logit soft-capping
(Gemma 2/3). Plain Gemma happens to work (its embedding module scales itself).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dbl.errors import UsageError
from dbl.hub import from_pretrained
from dbl.models.layers import NoiseEmbedder, modulate, sinusoidal_embedding
from dbl.models.llama import ARInput, KVCache, ar_diffusion_mask


@dataclass
class PretrainedContext:
    """What the layers read. Rows ``[0, num_noisy)`` of h are noisy, the rest clean."""

    noisy_cond: torch.Tensor | None  # [N, D] noise embedding; None without noisy rows
    num_noisy: int
    layer_kwargs: dict  # the HF layer's keyword arguments: 4D mask, and RoPE tables where used
    cache: KVCache | None = None
    store: bool = False
    clean_hidden: list | None = None  # see ARInput.clean_hidden


class _CacheView:
    """The one method an HF attention calls on its cache, ``update``, backed by dbl's ``KVCache``.

    HF caches always append; dbl's must not store noisy rows (they change at every solver step),
    so this view returns [past ; new] and stores only the clean rows when asked to.
    """

    def __init__(self, cache: KVCache, layer: nn.Module, num_noisy: int, store: bool):
        self.cache, self.layer, self.num_noisy, self.store = cache, layer, num_noisy, store

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs):
        past = self.cache.get(self.layer)
        if self.store:
            self.cache.append(self.layer, keys[:, :, self.num_noisy:], values[:, :, self.num_noisy:])
        if past is None:
            return keys, values
        return torch.cat([past[0], keys], dim=2), torch.cat([past[1], values], dim=2)


class PretrainedLayer(nn.Module):
    """One pretrained decoder layer; the noisy rows are modulated by their noise level around it."""

    def __init__(self, layer: nn.Module, hidden_size: int):
        super().__init__()
        self.layer = layer
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, h: torch.Tensor, c: PretrainedContext) -> torch.Tensor:
        n = c.num_noisy
        if n:
            shift, scale, gate = self.modulation(c.noisy_cond).chunk(3, dim=-1)
            h = torch.cat([modulate(h[:, :n], shift, scale), h[:, n:]], dim=1)
        cache = _CacheView(c.cache, self, n, c.store) if c.cache is not None else None
        out = self.layer(h, cache=cache, **c.layer_kwargs)
        out = out[0] if isinstance(out, tuple) else out  # older transformers return tuples
        if n:
            noisy = h[:, :n] + (1 + gate.unsqueeze(1)) * (out[:, :n] - h[:, :n])
            out = torch.cat([noisy, out[:, n:]], dim=1)
        return out


def decoder_parts(model: nn.Module) -> dict:
    """The pieces of a causal LM the wrapper runs, or a one-line ``UsageError`` naming its class."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2/3: the head would need it too
        raise UsageError(f"{type(model).__name__} soft-caps its logits, which PretrainedCausalLM does not apply")
    base = getattr(model, "model", None)
    if isinstance(getattr(base, "layers", None), nn.ModuleList) and all(
        hasattr(base, name) for name in ("embed_tokens", "norm", "rotary_emb")
    ):
        return dict(embed=base.embed_tokens, layers=base.layers, norm=base.norm, rotary=base.rotary_emb,
                    wpe=None, drop=None)
    base = getattr(model, "transformer", None)
    if isinstance(getattr(base, "h", None), nn.ModuleList) and all(hasattr(base, n) for n in ("wte", "wpe", "ln_f")):
        return dict(embed=base.wte, layers=base.h, norm=base.ln_f, rotary=None, wpe=base.wpe, drop=base.drop)
    raise UsageError(
        f"{type(model).__name__} is not supported by PretrainedCausalLM: it has neither model.model.{{embed_tokens, "
        "layers, norm, rotary_emb} (Llama, Qwen2, Mistral, SmolLM2) nor model.transformer.{wte, wpe, h, ln_f} (GPT-2)"
    )


def linear_maps(layer: nn.Module) -> list[str]:
    """Names of the linear maps in a decoder layer: ``nn.Linear``, and GPT-2's ``Conv1D``."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in layer.named_modules()
                   if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})


def add_lora(layers: nn.ModuleList, rank: int, alpha: float, dropout: float, targets: list[str] | None) -> None:
    """Inject PEFT LoRA adapters, in place, into the linear maps of ``layers``."""
    if rank < 0:
        raise UsageError(f"lora_rank must be >= 0, got {rank}")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UsageError("lora_rank > 0 needs PEFT: pip install peft") from None
    available = linear_maps(layers[0])
    targets = list(targets or available)
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise UsageError(f"lora_target_modules {unknown} are not linear maps of the decoder layer; choose from {available}")
    gpt2_style = any(type(m).__name__ == "Conv1D" for m in layers[0].modules())
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        fan_in_fan_out=gpt2_style)
    inject_adapter_in_model(config, layers)


def merge_lora(module: nn.Module) -> None:
    """In place: every PEFT adapter layer in ``module`` merged into its base layer, which replaces it."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without PEFT there are no adapters
        return
    for name, child in list(module.named_modules()):
        if isinstance(child, BaseTunerLayer) and name:
            child.merge()
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, attr, child.get_base_layer())


def model_from_config(name_or_path: str | None, config: dict | None, gguf_file: str | None, dtype: torch.dtype,
                      attn_implementation: str) -> nn.Module:
    """A causal LM built from its configuration alone, weights freshly initialised (under
    ``torch.device("meta")``: shapes only, nothing allocated). ``config``: the Hugging Face config given
    inline (with ``model_type``); otherwise ``name_or_path``'s ``config.json`` (or GGUF header)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config is not None:
        config = dict(config)
        model_type = config.pop("model_type", None)
        if not model_type:
            raise UsageError("config needs model_type (e.g. llama, qwen2, mistral, gpt2)")
        try:
            config = AutoConfig.for_model(model_type, **config)
        except (ValueError, KeyError) as err:
            raise UsageError(f"config: {str(err).splitlines()[0][:200]}") from None
    else:
        config = from_pretrained(AutoConfig.from_pretrained, name_or_path, "causal LM config",
                                 **({"gguf_file": gguf_file} if gguf_file else {}))
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def _on_meta_device_if_asked(init):
    """Run ``__init__`` under ``torch.device("meta")`` when called with ``meta_device=True``, so that the
    pretrained parts and the new ones alike are shapes without storage."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        meta = signature.bind(self, *args, **kwargs).arguments.get("meta_device", False)
        with torch.device("meta") if meta else contextlib.nullcontext():
            init(self, *args, **kwargs)

    return wrapped


class PretrainedCausalLM(nn.Module):
    """A Hugging Face causal LM with dbl's block-wise interface (``layers``, ``embed``, ``head``).

    Args:
        name_or_path: a local directory or a hub id (none with ``config``).
        gguf_file: a GGUF file in that directory/repo (needs the ``gguf`` package).
        dtype: the weights' dtype, e.g. ``float32``, ``bfloat16``.
        attn_implementation: ``sdpa`` or ``eager`` (both honour the explicit mask).
        frequency_dim: sinusoidal features of the noise embedder.
        chain_clean_stream: block b > 0 reads the clean rows as blocks 0..b-1 leave them (no
            gradient), not the token embeddings; the pretrained function stays one chain.
        lora_rank: r of LoRA adapters on the decoder layers' linear maps; 0: no LoRA, every weight trains.
        lora_alpha: LoRA scaling numerator (the update is alpha / r * B A); default 2 r.
        lora_dropout: dropout on the adapters' input.
        lora_target_modules: names of the layers' linear maps to adapt; default all of them.
        load_weights: false builds the architecture from ``name_or_path``'s ``config.json`` alone, with
            freshly initialised weights, for trained weights to be loaded into (``dbl.load_exported``).
        config: the Hugging Face config inline (a mapping with ``model_type``, e.g. a 7B Llama's sizes)
            instead of ``name_or_path``: no file at all; the weights are freshly initialised.
        meta_device: build on the meta device from the config alone: shapes, no weights read or
            allocated, so ``dbl info`` can account for a model this machine cannot hold; fit,
            validate, test and predict refuse such a network.
    """

    @_on_meta_device_if_asked
    def __init__(
        self,
        name_or_path: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        frequency_dim: int = 256,
        chain_clean_stream: bool = True,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        load_weights: bool = True,
        config: dict | None = None,
        meta_device: bool = False,
    ):
        super().__init__()
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise UsageError(f"dtype must name a torch dtype (float32, bfloat16, float16), got {dtype!r}")
        from transformers import AutoModelForCausalLM

        kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation)
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        if (name_or_path is None) == (config is None):
            raise UsageError("give one of name_or_path (a directory or hub id) and config (the model's config inline)")
        try:  # dbl.hub turns a missing file into one line; transformers says "no model here" with a ValueError
            if load_weights and not meta_device and config is None:
                model = from_pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, "causal LM", **kwargs)
            else:
                model = model_from_config(name_or_path, config, gguf_file, torch_dtype, attn_implementation)
        except UsageError:
            raise
        except ValueError as err:
            raise UsageError(f"cannot load causal LM {name_or_path!r}: {str(err).splitlines()[0]}") from None
        parts = decoder_parts(model)
        self.config = model.config  # a plain attribute: the HF model object itself is not kept
        # Registered one by one (not the HF model whole): the layers must live only under `layers`,
        # or BlockwiseNetwork would count them among the shared input/output parameters.
        self.embedding, self.norm, self.lm_head = parts["embed"], parts["norm"], model.get_output_embeddings()
        self.rotary_emb, self.wpe, self.drop = parts["rotary"], parts["wpe"], parts["drop"]
        self.vocab_size, self.hidden_size = self.embedding.num_embeddings, self.embedding.embedding_dim
        # Sliding-window attention is not built into the mask: refuse positions it would cut (embed).
        window, types = getattr(self.config, "sliding_window", None), getattr(self.config, "layer_types", None)
        self.sliding_window = window if window and (types is None or "sliding_attention" in types) else None
        d = self.hidden_size
        self.chained_clean_stream = chain_clean_stream  # read by BlockwiseNetwork and the generator
        self.lora_rank = lora_rank
        if lora_rank:
            for p in model.parameters():
                p.requires_grad_(False)
            add_lora(parts["layers"], lora_rank, lora_alpha or 2 * lora_rank, lora_dropout, lora_target_modules)
        self.layers = nn.ModuleList(PretrainedLayer(layer, d) for layer in parts["layers"])
        self.noise_embedder = NoiseEmbedder(d, frequency_dim)
        self.noisy_in = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        with torch.no_grad():
            rms = self.embedding.weight.float().pow(2).mean().sqrt()
            self.noisy_in.weight.copy_(torch.eye(d) * rms)
            self.noisy_in.bias.zero_()
            self.out.weight.zero_()
            self.out.bias.zero_()
        for module in (self.noise_embedder, self.noisy_in, self.out, *(layer.modulation for layer in self.layers)):
            module.to(torch_dtype)
        self.train()  # from_pretrained leaves its modules in eval mode; a new nn.Module starts in train mode

    # -- the clean path as a plain transformers model ----------------------------------------------
    def to_causal_lm(self) -> nn.Module:
        """The clean path alone as a new ``AutoModelForCausalLM`` of ``self.config`` (no dbl code needed
        to run it), on this wrapper's device and dtype: copies of the embedding, positions, decoder
        layers (LoRA adapters merged into the base weights), final norm and ``lm_head``; the noise
        conditioning is left out. Its logits are this wrapper's clean-row logits, ``head(layers(embed))``.
        """
        import copy

        from transformers import AutoModelForCausalLM

        weight = self.embedding.weight
        model = AutoModelForCausalLM.from_config(
            self.config, dtype=weight.dtype, attn_implementation=getattr(self.config, "_attn_implementation", None))
        parts = decoder_parts(model)
        names = {id(m): name for name, m in model.named_modules()}
        state = {}
        for mine, theirs in (("embedding", parts["embed"]), ("wpe", parts["wpe"]), ("norm", parts["norm"]),
                             ("lm_head", model.get_output_embeddings())):
            if theirs is not None:
                state.update({f"{names[id(theirs)]}.{k}": v for k, v in getattr(self, mine).state_dict().items()})
        for i, layer in enumerate(self.layers):
            layer = copy.deepcopy(layer.layer)
            merge_lora(layer)
            state.update({f"{names[id(parts['layers'])]}.{i}.{k}": v for k, v in layer.state_dict().items()})
        model.load_state_dict(state, strict=True)
        model.tie_weights()
        return model.to(weight.device).eval()

    # -- the token table (the diffusion's targets) -----------------------------------------------
    def token_table(self) -> torch.Tensor:
        """[V, D] the L2-normalised rows of the input embedding (tied or not)."""
        return F.normalize(self.embedding.weight, dim=-1)

    def token_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embedding(tokens), dim=-1)

    def denoised_logits(self, denoised: torch.Tensor) -> torch.Tensor:
        """Logits of a denoised estimate D (rows of norm <= 1) through the pretrained ``lm_head``.

        The head was trained on the final norm's output, whose norm is about ||gamma|| (its weight:
        gamma * x / rms(x)). D is scaled by that scalar, not by gamma elementwise, to keep its
        direction: with a tied head the logits are then ||gamma|| ||e_j|| cos(e_j, D), peaked at
        the token D points to. The scale is detached: the CE must not retune the pretrained norm
        as a temperature. The norm's bias (GPT-2) is left out: it adds an offset independent of D.
        For an untied head lm_head(e_k) need not peak at k; the (trainable, shared) head must learn it.
        """
        weight, bias, scale = self.denoised_head()
        # D mixes the task's float32 noise with the network's output: back to the head's dtype (bfloat16 weights)
        return F.linear((denoised * scale).to(weight.dtype), weight, bias)

    def denoised_head(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | float]:
        """(weight, bias, scale) of ``denoised_logits``: logits = F.linear(D * scale, weight, bias), scale detached."""
        gamma = getattr(self.norm, "weight", None)
        scale = gamma.detach().float().norm() if gamma is not None else self.hidden_size**0.5
        return self.lm_head.weight, self.lm_head.bias, scale

    # -- block-wise interface ----------------------------------------------------------------
    def embed(
        self, x: torch.Tensor | None, c_noise: torch.Tensor | None, cond: ARInput
    ) -> tuple[torch.Tensor, PretrainedContext]:
        """h = [noisy rows ; clean rows] and the context; the same contract as ``Llama.embed``."""
        rows, positions, noisy = [], [], []
        past = cond.cache.length if cond.cache is not None else 0
        device = self.embedding.weight.device
        if x is not None:
            if c_noise is None:
                raise ValueError("noisy rows need c_noise")
            rows.append(self.noisy_in(x.to(self.noisy_in.weight.dtype)))
            positions.append(torch.arange(x.shape[1], device=device) + cond.noisy_start)
            noisy.append(torch.ones(x.shape[1], dtype=torch.bool, device=device))
        if cond.tokens is not None and cond.tokens.shape[1]:
            m = cond.tokens.shape[1]
            rows.append(self.embedding(cond.tokens))  # the model's own, unnormalised embedding
            positions.append(torch.arange(m, device=device) + past)
            noisy.append(torch.zeros(m, dtype=torch.bool, device=device))
        if not rows:
            raise ValueError("embed needs noisy rows or clean tokens")
        if cond.store and x is not None:
            raise ValueError("only clean rows can be stored in the cache; call with x=None to extend the prefix")
        last = max(past + (cond.tokens.shape[1] if cond.tokens is not None else 0),
                   cond.noisy_start + (x.shape[1] if x is not None else 0)) - 1  # on the host: no device sync
        if self.sliding_window is not None and last >= self.sliding_window:
            raise UsageError(f"position {last} is beyond the sliding window ({self.sliding_window}) of "
                             f"{type(self.config).__name__}, which this wrapper does not apply; use shorter sequences")
        h, q_pos, q_noisy = torch.cat(rows, dim=1), torch.cat(positions), torch.cat(noisy)
        if self.wpe is not None:  # GPT-2: learned positions added to the input, then its dropout
            h = self.drop(h + self.wpe(q_pos))
        if cond.store and cond.cache is not None:
            cond.cache.length += h.shape[1]
        k_pos = torch.cat([torch.arange(past, device=device), q_pos])
        k_noisy = torch.cat([torch.zeros(past, dtype=torch.bool, device=device), q_noisy])
        allowed = ar_diffusion_mask(q_pos, q_noisy, k_pos, k_noisy)
        # additive float mask [1, 1, S, P + S]: eager attention adds it, sdpa takes it as given
        mask = torch.zeros(allowed.shape, dtype=h.dtype, device=device).masked_fill(~allowed, torch.finfo(h.dtype).min)
        layer_kwargs = {"attention_mask": mask[None, None]}
        if self.rotary_emb is not None:
            layer_kwargs["position_ids"] = q_pos[None]
            layer_kwargs["position_embeddings"] = self.rotary_emb(h, q_pos[None])
        noisy_cond = None
        if x is not None:  # sinusoidal features are float32; match the model's dtype
            features = sinusoidal_embedding(c_noise, self.noise_embedder.frequency_dim).to(h.dtype)
            noisy_cond = self.noise_embedder.mlp(features)
        n = x.shape[1] if x is not None else 0
        return h, PretrainedContext(noisy_cond, n, layer_kwargs, cond.cache, cond.store, cond.clean_hidden)

    def head(self, h: torch.Tensor, c: PretrainedContext) -> torch.Tensor:
        """Noisy rows present: their raw output F [N, n, D] (diffusion space). Otherwise: the
        pretrained next-token logits [N, m, V] of the clean rows."""
        if c.clean_hidden is not None:
            c.clean_hidden.append(h[:, c.num_noisy:])
        if c.num_noisy:
            return self.out(self.norm(h[:, : c.num_noisy]))
        return self.lm_head(self.norm(h))
