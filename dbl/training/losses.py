"""Cross-entropy of a linear head, computed a chunk of rows at a time (no Lightning here).

``linear_cross_entropy(hidden, weight, targets)`` equals
``F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="none")`` (logits in float32,
as the tasks compute them) without holding the [M, V] logits of all rows at once: the rows go
through the head ``chunk_size`` at a time, the forward keeps only each row's log-sum-exp, and the
backward recomputes each chunk's logits to form its gradient (the "cut cross-entropy" idea of
Wijmans et al. 2024 and Liger's fused linear cross-entropy, both Triton kernels for GPUs; this one
is plain PyTorch and runs anywhere). Peak memory of the head drops from a few [M, V] float32
tensors (logits, log-softmax, their gradients) to one [chunk_size, V] block.

The price is one more [M, D] x [D, V] product (the recomputation): four instead of three. With
``recompute=False`` the forward keeps the rows' [M, V] float32 exponentials instead (one such
tensor, where the unfused head holds two to four at its peak) and the backward turns them into the
gradient in place: three products, as the unfused head (so its backward runs once).

Exactness: the logits of a chunk are computed exactly as ``F.linear`` computes them (in the
weight's dtype, or autocast's), converted to float32, and the cross-entropy is the log-softmax's
``(max - logit_t) + log(sum(exp(logits - max)))``. Gradients are accumulated over chunks in
float32. ``tests/test_losses.py`` checks values and gradients against ``F.cross_entropy``.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 64 * 2**20  # one chunk's float32 logits; 64 MiB: 341 rows of a 49,152-token vocabulary


def default_chunk_size(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's float32 logits take about ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * vocab_size))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would multiply in: autocast's if it is on, else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision products, the products' own dtype above that (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[c, V] logits of the (already scaled, compute-dtype) rows ``x``, in float32 or wider."""
    out = torch.nn.functional.linear(x, weight, bias)
    return out.to(_accumulation_dtype(out.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, chunk_size, recompute):
        dtype = _compute_dtype(hidden, weight)
        device = hidden.device.type
        m = hidden.shape[0]
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        acc = _accumulation_dtype(dtype)
        ce = torch.empty(m, dtype=acc, device=hidden.device)
        # per row: the log-sum-exp of its logits (recompute) or the sum of exp(logits - max) (kept exps)
        norm = torch.empty(m, dtype=acc, device=hidden.device)
        exps = None if recompute else torch.empty(m, weight.shape[0], dtype=acc, device=hidden.device)
        with torch.autocast(device, enabled=False):
            for start in range(0, m, chunk_size):
                rows = slice(start, start + chunk_size)
                x = hidden[rows] * scale if scale is not None else hidden[rows]
                logits = _chunk_logits(x.to(dtype), w, b)
                top = logits.amax(dim=1, keepdim=True)
                shifted = logits.sub_(top)  # logits - max, in place: log_softmax's own order of operations
                target = shifted.gather(1, targets[rows, None]).squeeze(1)
                exp = shifted.exp_() if exps is None else torch.exp(shifted, out=exps[rows])
                total = exp.sum(dim=1)
                log_sum = total.log()
                ce[rows] = log_sum - target
                norm[rows] = log_sum + top.squeeze(1) if exps is None else total
        ctx.save_for_backward(hidden, weight, bias, targets, norm, exps)
        ctx.scale, ctx.chunk_size, ctx.dtype, ctx.consumed = scale, chunk_size, dtype, False
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        if ctx.consumed:  # checked first: autograd would refuse the saved tensors with a vaguer message
            raise RuntimeError("linear_cross_entropy(recompute=False) turns its kept exponentials into the gradient "
                               "in place, so its backward runs once; use recompute=True to back-propagate twice")
        hidden, weight, bias, targets, norm, exps = ctx.saved_tensors
        ctx.consumed = exps is not None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        scale, chunk_size, dtype = ctx.scale, ctx.chunk_size, ctx.dtype
        device = hidden.device.type
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        acc = _accumulation_dtype(dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None  # the first chunk's product, then accumulated in place
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        grad_ce = grad_ce.to(acc)
        with torch.autocast(device, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                x = (hidden[rows] * scale if scale is not None else hidden[rows]).to(dtype)
                g = grad_ce[rows]
                # d CE / d logits = (softmax - one_hot(target)) x the incoming gradient of each row
                if exps is None:  # recompute the chunk's softmax from its logits and the saved log-sum-exp
                    p = _chunk_logits(x, w, b).sub_(norm[rows, None]).exp_().mul_(g[:, None])
                else:  # the kept exp(logits - max), divided by their sum here
                    p = exps[rows].mul_((g / norm[rows])[:, None])
                p[torch.arange(p.shape[0], device=p.device), targets[rows]] -= g
                d = p.to(dtype)
                if need_hidden:
                    gh = d @ w
                    grad_hidden[rows] = (gh * scale if scale is not None else gh).to(hidden.dtype)
                if need_weight:
                    if grad_weight is None:
                        grad_weight = (d.t() @ x).to(acc)
                    elif dtype == acc:
                        grad_weight.addmm_(d.t(), x)
                    else:
                        grad_weight += (d.t() @ x).to(acc)
                if need_bias:
                    grad_bias += p.sum(dim=0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scale: float | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    recompute: bool = True,
) -> torch.Tensor:
    """Per-row cross-entropy of the logits ``F.linear(hidden * scale, weight, bias)`` against ``targets``.

    Args:
        hidden: [..., D] rows (any leading shape).
        weight: [V, D] the head's weight (an ``nn.Linear``'s, or a tied embedding table).
        targets: [...] token ids, the leading shape of ``hidden``.
        scale: a constant multiplying ``hidden`` before the head (a float or a tensor without
            gradient: no gradient flows to it).
        bias: [V] or None.
        mask: [...] rows to compute; the others get cross-entropy 0 and no gradient, and their
            logits are never formed (a loss mask's zeros). None: every row.
        chunk_size: rows per chunk; default about 64 MiB of float32 logits per chunk.
        recompute: recompute each chunk's logits in backward (memory: one chunk's logits) or keep
            the [M, V] float32 exponentials from the forward (one fewer matrix product; backward once).

    Returns:
        [...] cross-entropy in float32 (float64 for float64 inputs), equal to
        ``F.cross_entropy(F.linear(hidden * scale, weight, bias).float(), targets, reduction="none")``,
        with its gradients for ``hidden``, ``weight`` and ``bias`` (only those that require one are computed).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)}: leading shapes differ")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [V, {hidden.shape[-1]}]")
    if torch.is_tensor(scale):
        if scale.requires_grad:
            raise ValueError("scale is a constant here: detach it (no gradient flows to it)")
        if scale.numel() != 1:
            raise ValueError(f"scale must be a scalar, got shape {tuple(scale.shape)}")
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    shape = targets.shape
    rows, tokens = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if mask is not None:
        if mask.shape != shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the targets' shape {tuple(shape)}")
        keep = mask.reshape(-1) != 0
        ce = _LinearCrossEntropy.apply(rows[keep], weight, bias, tokens[keep], scale, chunk_size, recompute)
        return ce.new_zeros(tokens.shape[0]).masked_scatter(keep, ce).view(shape)
    return _LinearCrossEntropy.apply(rows, weight, bias, tokens, scale, chunk_size, recompute).view(shape)
