"""Will fine-tuning a pretrained decoder fit? ``dbl info``'s table for ``PretrainedCausalLM``.

For the model of the YAML (weights or none: ``meta_device: true`` builds a 7B model's shapes in a
second, nothing allocated) it prints the device memory of one training step of the configured run
and of the usual alternatives, for the data's batch size and sequence length:

- full fine-tuning, next-token, end to end: the plain pretrained model, every weight trains;
- LoRA, next-token, end to end: the same model frozen, adapters on the decoder layers' linear maps;
- AR diffusion, end to end (B = 1): ``ARDiffusionLMModule`` with one block (the noise conditioning
  that ``PretrainedCausalLM`` adds trains too);
- AR diffusion, block-wise B, offloaded: only the active block (its layers, their weights, gradients
  and AdamW moments) and the shared input/output part on the device; the other blocks' weights and
  moments wait in host memory (``offload_inactive``), printed as "host";
- the same with per-block LoRA, when the YAML configures LoRA.

Parameters are counted from the network's own tensors (their shapes: meta tensors count as well).
Bytes: weights and gradients in the weights' dtype; AdamW keeps two moments per trained parameter in
the weights' dtype too (torch's ``exp_avg``/``exp_avg_sq`` are ``zeros_like(param)``); no fp32
master copy (that is ``bf16-mixed`` with fp32 weights: give ``dtype: float32`` for it).

Activations cannot be measured for a model that is not there, so they are computed: the bytes of
the tensors autograd saves for backward (the quantity ``dbl.memory`` measures), term by term, for a
Llama-family layer (RMSNorm, rotary attention through SDPA's fused kernels, SwiGLU MLP: Llama,
Qwen2, Mistral) as ``PretrainedCausalLM`` runs it, per sample, with S rows through the layer (AR
diffusion: S = 2T, the noisy and the clean copy of T tokens; next-token: S = T - 1), n of them noisy,
e bytes per element of the weights' dtype, q/kv the query/key-value widths, i the MLP width, H heads:

    RMSNorm (x2)    4 S h + 4 S           fp32 copy of the input, 1/rms
                    + e S h               its normalised input, if its weight trains
                    + e S h               its output, if a linear map after it keeps its input
    attention       e S (2 q + 2 kv)      q, k (after rotary), v, and the output (o_proj's input); with
                                          grouped key/values kv = q: transformers repeats them for SDPA
                                          with a mask (a view, kv wide, only for a single kv head)
                    + 4 S H               logsumexp of the fused kernel (no S x S matrix)
    SwiGLU MLP      3 e S i               gate (SiLU's input), SiLU(gate) and up (their product's inputs)
                    + e S i               down_proj's input, if it keeps it
    LoRA            e S r per adapted map  the adapter's r-wide hidden
    noise (n > 0)   e S h + e n h + 3 e h  layer input (modulated rows), gated update, modulation vectors

A linear map keeps its input when its weight trains or LoRA adapts it. Per step, not per sample:
the float attention mask (e S^2) and the rotary tables (2 e S head_dim). Per sample outside the
layers: the cross-entropy's float32 log-softmax (4 T V, V the vocabulary; AR diffusion's head runs
``dbl.training.losses.linear_cross_entropy``, which keeps the float32 exponentials, 4 T V, and the
log-sum-exp instead, with D before its scaling, 4 T h, and the targets), the final norm and head
inputs, the token embedding path and the noise embedder. Summed over the layers of the largest
block this is the spec's A L / B; with the state, (4P + A) L / B.

The formula is checked against ``dbl.memory``'s measurement of tiny models, fp32 and bf16, full and
LoRA (``tests/test_finetune_memory.py``: within 1%). It counts what is *saved* for backward: the
step's peak adds transient buffers (the logits before their float copy, the gradients of one layer
during backward, the allocator's slack, the CUDA context); leave 10-20% of headroom.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from dbl.memory import count

WHAT_IF_LORA_RANK = 16  # the LoRA rows' rank when the YAML configures none
WHAT_IF_BLOCKS = 4  # the block-wise rows' B when the YAML trains end to end
LINEAR_MAPS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP32 = 4


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)  # PEFT's LoRA layer wraps the pretrained linear map


@dataclass
class LayerShape:
    """The sizes of a Llama-family decoder layer."""

    hidden: int
    intermediate: int
    heads: int
    q_dim: int
    kv_dim: int
    head_dim: int
    kv_saved_dim: int  # the width of the k and v that SDPA keeps: repeated to q's unless one kv head (a view)


def llama_layer_shape(net: nn.Module) -> LayerShape | None:
    """Sizes of ``net``'s decoder layers if they are Llama-family (Llama, Qwen2, Mistral); None otherwise."""
    layers = getattr(net, "layers", None)
    if not layers or getattr(net, "rotary_emb", None) is None:
        return None
    layer = getattr(layers[0], "layer", None)
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if not all(hasattr(attn, n) for n in LINEAR_MAPS[:4]) or not all(hasattr(mlp, n) for n in LINEAR_MAPS[4:]):
        return None
    if not (hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")):
        return None
    maps = {n: _base(getattr(attn if n in LINEAR_MAPS[:4] else mlp, n)) for n in LINEAR_MAPS}
    if not all(isinstance(m, nn.Linear) for m in maps.values()):
        return None
    heads = net.config.num_attention_heads
    q, kv = maps["q_proj"].out_features, maps["k_proj"].out_features
    return LayerShape(hidden=maps["q_proj"].in_features, intermediate=maps["gate_proj"].out_features, heads=heads,
                      q_dim=q, kv_dim=kv, head_dim=q // heads, kv_saved_dim=kv if kv == q // heads else q)


# -- activations ---------------------------------------------------------------------------------
def layer_activation_bytes(s: LayerShape, rows: int, noisy: int, e: int, trains: str, lora_rank: int = 0,
                           lora_targets: tuple[str, ...] = LINEAR_MAPS) -> int:
    """Bytes one sample saves for backward in one decoder layer (module docstring's formula).

    ``trains``: ``all`` (every weight of the layer trains), ``lora`` (base frozen, adapters on
    ``lora_targets``), ``none`` (all frozen, the input still needs its gradient: the anchor's later layers).
    """
    h, i, S = s.hidden, s.intermediate, rows
    keeps = set(LINEAR_MAPS) if trains == "all" else set(lora_targets) if trains == "lora" else set()
    norm = FP32 * S * h + FP32 * S + (e * S * h if trains == "all" else 0)
    norms = 2 * norm + e * S * h * (bool(keeps & {"q_proj", "k_proj", "v_proj"}) + bool(keeps & {"gate_proj", "up_proj"}))
    attention = e * S * (2 * s.q_dim + 2 * s.kv_saved_dim) + FP32 * S * s.heads
    mlp = e * S * i * (3 + ("down_proj" in keeps))
    lora = e * S * lora_rank * len(lora_targets) if trains == "lora" else 0
    noise = e * S * h + e * noisy * h + 3 * e * h if noisy else 0
    return norms + attention + mlp + lora + noise


def step_constant_bytes(s: LayerShape, rows: int, e: int) -> int:
    """Saved once per forward, whatever the batch: the float attention mask and the rotary cos/sin tables."""
    return e * rows * rows + 2 * e * rows * s.head_dim


@dataclass
class Objective:
    """What one training step runs: ``ar_diffusion`` (``ARDiffusionLMModule``) or ``next_token``."""

    kind: str
    tokens: int  # T, the data's seq_len
    anchor: bool = False  # ARDiffusionLMModule's anchor_weight > 0

    @property
    def rows(self) -> int:
        return 2 * self.tokens if self.kind == "ar_diffusion" else self.tokens - 1

    @property
    def noisy(self) -> int:
        return self.tokens if self.kind == "ar_diffusion" else 0


def io_activation_bytes(net: nn.Module, s: LayerShape, obj: Objective, e: int, shared_trains: bool) -> int:
    """Per sample, outside the decoder layers: embedding, noise embedder, final norm, head, cross-entropy.

    ``shared_trains``: the pretrained embedding, final norm and ``lm_head`` train (not with LoRA)."""
    h, V, T = s.hidden, net.vocab_size, obj.tokens
    if obj.kind == "next_token":
        R = T - 1
        out = 8 * T * shared_trains + 8 * R  # token ids (the embedding's), shifted targets
        out += FP32 * R * h + FP32 * R + 2 * e * R * h * shared_trains  # final norm; its normalised input, head input
        return out + FP32 * R * V + FP32 * R  # float log-softmax, masked NLL
    F = net.noise_embedder.frequency_dim
    out = 8 * T * shared_trains  # token ids (the embedding's)
    out += (e * T * h + 2 * e * T) * shared_trains  # normalised token embeddings (the diffusion's targets)
    out += e * T * h + e * (F + 2 * h) + e * h  # noisy_in's input; noise embedder; the noise embedding
    out += FP32 * (obj.rows if e == FP32 else T) * h + FP32 * T + e * T * h * shared_trains  # final norm
    out += e * T * h  # out's input
    # the head's cross-entropy (dbl.training.losses.linear_cross_entropy, recompute=False, the loss mask's rows):
    # D before its scaling (float32: it mixes the task's float32 noise), the float32 exponentials [T, V] and
    # log-sum-exp, the targets (a new tensor: the masked rows') and the row mask (bool); the loss mask as float
    out += FP32 * T * h + FP32 * T * V + FP32 * T + 8 * T + T + FP32 * T
    return out


def anchor_io_bytes(net: nn.Module, s: LayerShape, obj: Objective, e: int, shared_trains: bool, last: bool) -> int:
    """Per sample, the anchor's head over the clean rows (its later layers are counted as frozen layers)."""
    h, V, T = s.hidden, net.vocab_size, obj.tokens
    # after the last block the final norm's fp32 input is the slice of its output that the diffusion head's
    # final norm keeps already; a float copy of it otherwise
    norm_in = 0 if (last and e == FP32) else T
    out = FP32 * norm_in * h + FP32 * T + 2 * e * T * h * shared_trains
    return out + FP32 * (T - 1) * V + 8 * (T - 1) + FP32 * (T - 1)  # log-softmax, shifted targets, mask


# -- parameters ------------------------------------------------------------------------------------
@dataclass
class ParameterCount:
    """The network's parameters by role (counted from shapes; meta tensors count)."""

    pretrained_shared: int  # embedding, positions, final norm, lm_head (tied: once)
    conditioning_shared: int  # noise embedder, noisy_in, out
    base: list[int]  # per layer, the pretrained layer's own weights
    modulation: list[int]  # per layer, the noise modulation
    adapters: list[int]  # per layer, LoRA adapters (configured, or the what-if rank)
    lora_rank: int
    lora_targets: tuple[str, ...]
    configured_lora: bool

    @property
    def pretrained(self) -> int:
        return self.pretrained_shared + sum(self.base)

    @property
    def conditioning(self) -> int:
        return self.conditioning_shared + sum(self.modulation)


def linear_shapes(layer: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every linear map of a decoder layer (``nn.Linear``, GPT-2's ``Conv1D``), the maps
    that ``PretrainedCausalLM``'s LoRA adapts by default."""
    out = []
    for m in layer.modules():
        if isinstance(m, nn.Linear):
            out.append((m.in_features, m.out_features))
        elif type(m).__name__ == "Conv1D":
            out.append(tuple(m.weight.shape))  # stored [in, out]
    return out


def count_parameters(net: nn.Module, shape: LayerShape | None) -> ParameterCount:
    layers = list(net.layers)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    conditioning = {id(p) for m in (net.noise_embedder, net.noisy_in, net.out) for p in m.parameters()}
    shared = [p for p in net.parameters() if id(p) not in in_layers]
    base, adapters = [], []
    for layer in layers:
        named = list(layer.layer.named_parameters())
        base.append(count(p for n, p in named if "lora_" not in n))
        adapters.append(count(p for n, p in named if "lora_" in n))
    rank = getattr(net, "lora_rank", 0)
    targets = tuple(n for n, m in layers[0].layer.named_modules() if hasattr(m, "lora_A"))
    targets = tuple(sorted({n.rsplit(".", 1)[-1] for n in targets}))
    configured = bool(rank)
    if not configured:
        rank = WHAT_IF_LORA_RANK
        targets = LINEAR_MAPS
        adapters = [sum(rank * (i + o) for i, o in linear_shapes(layer.layer)) for layer in layers]
    return ParameterCount(
        pretrained_shared=count(p for p in shared if id(p) not in conditioning),
        conditioning_shared=count(p for p in shared if id(p) in conditioning),
        base=base, modulation=[count(layer.modulation.parameters()) for layer in layers], adapters=adapters,
        lora_rank=rank, lora_targets=targets, configured_lora=configured,
    )


# -- the rows ---------------------------------------------------------------------------------------
@dataclass
class Setup:
    """One way to train the model."""

    label: str
    objective: str  # ar_diffusion | next_token
    blocks: int  # 1: end to end
    lora: bool
    offload: bool = False
    conditioning: bool = True  # the network holds PretrainedCausalLM's noise conditioning
    bounds: list[tuple[int, int]] = field(default_factory=list)  # layer ranges of the blocks


@dataclass
class Memory:
    trained: int  # parameters that train in one step
    weights: int
    grads: int
    moments: int
    activations: int | None
    host: int

    @property
    def device(self) -> int:
        return self.weights + self.grads + self.moments + (self.activations or 0)


def even_bounds(num_layers: int, blocks: int) -> list[tuple[int, int]]:
    """The default split of ``BlockwiseNetwork``: as equal as possible, earlier blocks one larger."""
    sizes = [num_layers // blocks + (b < num_layers % blocks) for b in range(blocks)]
    starts = [sum(sizes[:b]) for b in range(blocks)]
    return [(a, a + n) for a, n in zip(starts, sizes)]


def estimate(net: nn.Module, counts: ParameterCount, shape: LayerShape | None, setup: Setup, e: int,
             batch: tuple[int, int] | None, anchor: bool = False) -> Memory:
    """Device (and host) bytes of one training step of ``setup``; activations None without a batch or
    for a layer type the formula does not cover."""
    ar = setup.objective == "ar_diffusion"
    L = len(counts.base)
    weight = [counts.base[i] + counts.adapters[i] * setup.lora + counts.modulation[i] * setup.conditioning
              for i in range(L)]
    trains = [(counts.adapters[i] if setup.lora else counts.base[i]) + counts.modulation[i] * ar for i in range(L)]
    weight_shared = counts.pretrained_shared + counts.conditioning_shared * setup.conditioning
    trains_shared = counts.pretrained_shared * (not setup.lora) + counts.conditioning_shared * ar
    bounds = setup.bounds or [(0, L)]
    obj = Objective(setup.objective, batch[1] if batch else 0, anchor and ar)
    mode = "lora" if setup.lora else "all"
    best = None
    for b, (start, end) in enumerate(bounds):
        inside = range(start, end)
        acts = None
        if batch is not None and shape is not None:
            per_layer = layer_activation_bytes(shape, obj.rows, obj.noisy, e, mode, counts.lora_rank, counts.lora_targets)
            per_sample = io_activation_bytes(net, shape, obj, e, not setup.lora) + per_layer * len(inside)
            if obj.kind == "next_token" and setup.lora and start == 0:
                per_sample -= FP32 * obj.rows * (shape.hidden + 1)  # frozen embedding: layer 0's input needs no grad
            constant = step_constant_bytes(shape, obj.rows, e)
            if obj.anchor:
                later = L - end
                per_sample += later * layer_activation_bytes(shape, obj.tokens, 0, e, "none")
                if later and e == FP32:  # the first later layer's fp32 input: kept already (the final norm's)
                    per_sample -= FP32 * obj.tokens * shape.hidden
                per_sample += anchor_io_bytes(net, shape, obj, e, not setup.lora, last=later == 0)
                constant += step_constant_bytes(shape, obj.tokens, e) if later else 0  # the later layers' mask, rotary
            acts = batch[0] * per_sample + constant
        block_trains = sum(trains[i] for i in inside) + trains_shared
        if setup.blocks == 1 or setup.offload:
            on_device = sum(weight[i] for i in inside) + weight_shared
            elsewhere = [i for i in range(L) if i not in inside]
            memory = Memory(block_trains, e * on_device, e * block_trains, 2 * e * block_trains, acts,
                            sum(e * weight[i] + 2 * e * trains[i] for i in elsewhere))
        else:  # every block's weights and AdamW moments stay on the device
            memory = Memory(block_trains, e * (sum(weight) + weight_shared), e * block_trains,
                            2 * e * (sum(trains) + trains_shared), acts, 0)
        if best is None or memory.device > best.device:
            best = memory
    return best


def _gib(n: int | None, unit: int) -> str:
    return "-" if n is None else f"{n / unit:,.2f}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def setups(module) -> list[tuple[Setup, bool]]:
    """The rows: (setup, configured), the configured run's first, then the what-ifs it is not."""
    net = module.network.net
    L = len(net.layers)
    ar = type(module).__name__ == "ARDiffusionLMModule"
    B = module.num_blocks
    lora = bool(getattr(net, "lora_rank", 0))
    offload = bool(getattr(module, "offload_inactive", False))
    r = getattr(net, "lora_rank", 0) or WHAT_IF_LORA_RANK
    wb = B if B > 1 else WHAT_IF_BLOCKS
    bounds = list(module.network.bounds) if B > 1 else even_bounds(L, wb)
    lora_tag = f"LoRA r={r}"
    if ar:
        kind = f"block-wise B = {B}" if B > 1 else "end to end (B = 1)"
        placement = (", offloaded" if offload else ", all blocks resident") if B > 1 else ""
        configured = Setup(f"AR diffusion, {kind}{', ' + lora_tag if lora else ''}{placement}", "ar_diffusion", B, lora,
                           offload and B > 1, bounds=list(module.network.bounds))
    else:
        configured = Setup(f"next-token, end to end{', ' + lora_tag if lora else ''} (with the unused noise "
                           "conditioning)", "next_token", 1, lora)
    what_ifs = [
        Setup("full fine-tuning, next-token, end to end", "next_token", 1, False, conditioning=False),
        Setup(f"{lora_tag}, next-token, end to end", "next_token", 1, True, conditioning=False),
        Setup("AR diffusion, end to end (B = 1)", "ar_diffusion", 1, False),
        Setup(f"AR diffusion, block-wise B = {wb}, offloaded", "ar_diffusion", wb, False, True, bounds=bounds),
    ]
    if lora:
        what_ifs.append(Setup(f"AR diffusion, block-wise B = {wb}, {lora_tag}, offloaded", "ar_diffusion", wb, True, True,
                              bounds=bounds))

    def same(a: Setup, b: Setup) -> bool:
        return (a.objective, a.blocks, a.lora, a.offload, a.conditioning) == (b.objective, b.blocks, b.lora, b.offload,
                                                                                b.conditioning)

    return [(configured, True)] + [(s, False) for s in what_ifs if not same(s, configured)]


def describe(module, batch_shape: tuple[int, int] | None) -> str:
    """The fine-tuning memory table of ``module`` (a task around a ``PretrainedCausalLM``)."""
    net = module.network.net
    dtype = net.embedding.weight.dtype
    e = dtype.itemsize
    shape = llama_layer_shape(net)
    counts = count_parameters(net, shape)
    anchor = bool(getattr(module, "anchor_weight", 0))
    rows_out = [["setup", "trained params", "weights", "grads", "AdamW m+v", "activations", "device total", "host"]]
    results = [(s, c, estimate(net, counts, shape, s, e, batch_shape, anchor)) for s, c in setups(module)]
    unit, unit_name = (2**30, "GiB") if max(m.device + m.host for _, _, m in results) >= 2**30 else (2**20, "MiB")
    for s, configured, m in results:
        rows_out.append([("configured: " if configured else "what if:   ") + s.label, f"{m.trained:,}",
                         _gib(m.weights, unit), _gib(m.grads, unit), _gib(m.moments, unit), _gib(m.activations, unit),
                         _gib(m.device if m.activations is not None else None, unit), _gib(m.host, unit)])
    model_type = getattr(net.config, "model_type", type(net.config).__name__)
    n, t = batch_shape if batch_shape else (None, None)
    lines = [
        f"Fine-tuning memory of one training step ({unit_name}): {model_type}, {len(net.layers)} layers, "
        f"{counts.pretrained:,} pretrained parameters + {counts.conditioning:,} of noise conditioning (AR diffusion only)"
        + (f", LoRA adapters {sum(counts.adapters):,} (r={counts.lora_rank}{'' if counts.configured_lora else ', what if'})"
           if counts.adapters and sum(counts.adapters) else ""),
        f"weights, grads and AdamW's 2 moments in {str(dtype).removeprefix('torch.')} ({e} bytes each); "
        + (f"batch {n} x seq_len {t} (AR diffusion: 2 x {t} rows per layer)" if batch_shape else "no batch_size: activations not estimated"),
    ]
    if shape is None and batch_shape:
        lines.append(f"(activations not estimated: the formula covers Llama-family layers, not {type(net.layers[0].layer).__name__})")
    lines += [_table(rows_out),
              "device total = weights + grads + moments + activations saved for backward (analytic, docs/finetune_memory.md; "
              "leave 10-20% for transient buffers); host = offloaded blocks' weights and moments"]
    if getattr(module.network, "activation_checkpointing", False):
        lines.append("(activation checkpointing is configured: the activations above are without it, an upper bound)")
    return "\n".join(lines)


def is_pretrained_decoder(net: nn.Module) -> bool:
    from dbl.models.pretrained import PretrainedCausalLM

    return isinstance(net, PretrainedCausalLM)


def on_meta_device(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())

