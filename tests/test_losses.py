"""dbl.training.losses.linear_cross_entropy against F.cross_entropy of the full logits."""

import pytest
import torch
import torch.nn.functional as F

from dbl.training.losses import default_chunk_size, linear_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")
M, V, D = 7, 11, 5  # 7 rows: chunks of 1 and 7 divide it, 3 and 4 do not, 100 is one short chunk


def case(dtype=torch.float64, bias=False):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(M, D, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(V, D, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=gen, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (M,), generator=gen)
    upstream = torch.randn(M, generator=gen, dtype=dtype)  # a per-row gradient, as a weighted mean makes
    return hidden, weight, b, targets, upstream


def grads(out, inputs, upstream):
    return torch.autograd.grad(out, inputs, upstream)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 100])
def test_equals_cross_entropy_of_full_logits(chunk_size, recompute):
    hidden, weight, _, targets, upstream = case()
    reference = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    out = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, recompute=recompute)
    assert out.dtype == torch.float64 and out.shape == (M,)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    for got, want in zip(grads(out, (hidden, weight), upstream), grads(reference, (hidden, weight), upstream)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("recompute", [True, False])
def test_scale_bias_and_leading_shape(recompute):
    hidden, weight, bias, targets, upstream = case(bias=True)
    scale = torch.tensor(1.7, dtype=torch.float64)
    reference = F.cross_entropy(F.linear(hidden * scale, weight, bias), targets, reduction="none")
    out = linear_cross_entropy(hidden[None], weight, targets[None], scale=scale, bias=bias, chunk_size=3,
                               recompute=recompute)[0]
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    inputs = (hidden, weight, bias)
    for got, want in zip(grads(out, inputs, upstream), grads(reference, inputs, upstream)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_mask_skips_rows():
    hidden, weight, _, targets, upstream = case()
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1])
    reference = F.cross_entropy(hidden @ weight.T, targets, reduction="none") * mask
    out = linear_cross_entropy(hidden, weight, targets, mask=mask, chunk_size=2)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    got, want = grads(out, (hidden, weight), upstream), grads(reference, (hidden, weight), upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    assert (got[0][mask == 0] == 0).all()


def test_frozen_weight_gets_no_gradient():
    hidden, weight, _, targets, upstream = case()
    frozen = weight.detach()
    out = linear_cross_entropy(hidden, frozen, targets, chunk_size=3)
    (got,) = grads(out, (hidden,), upstream)
    (want,) = grads(F.cross_entropy(hidden @ frozen.T, targets, reduction="none"), (hidden,), upstream)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_float32_matches_the_tasks_computation():
    """float32 rows and head, logits cast to float32 (the tasks' ``F.cross_entropy(logits.float(), ...)``)."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 33, 16, generator=gen).requires_grad_()
    weight = (torch.randn(300, 16, generator=gen) * 0.3).requires_grad_()
    targets = torch.randint(0, 300, (2, 33), generator=gen)
    reference = F.cross_entropy(F.linear(hidden * 4.0, weight).flatten(0, 1).float(), targets.flatten(),
                                reduction="none").view(2, 33)
    out = linear_cross_entropy(hidden, weight, targets, scale=4.0, chunk_size=10)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    for got, want in zip(torch.autograd.grad(out.mean(), (hidden, weight)), torch.autograd.grad(reference.mean(), (hidden, weight))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_bad_arguments():
    hidden, weight, _, targets, _ = case()
    with pytest.raises(ValueError, match="leading shapes"):
        linear_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight.T, targets)
    with pytest.raises(ValueError, match="constant"):
        linear_cross_entropy(hidden, weight, targets, scale=torch.tensor(2.0, requires_grad=True))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0)
    assert default_chunk_size(49152) == 341 and default_chunk_size(10**9) == 1


def test_all_rows_masked():
    hidden, weight, _, targets, _ = case()
    out = linear_cross_entropy(hidden, weight, targets, mask=torch.zeros(M))
    assert (out == 0).all()
    out.sum().backward()
    assert hidden.grad is not None and (hidden.grad == 0).all() and weight.grad is None  # no rows: no weight gradient


def test_backward_twice():
    """recompute=True back-propagates any number of times; recompute=False consumes its kept exponentials."""
    hidden, weight, _, targets, upstream = case()
    out = linear_cross_entropy(hidden, weight, targets, chunk_size=3)
    first = torch.autograd.grad(out, hidden, upstream, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(out, hidden, upstream)[0], first, rtol=0, atol=0)
    kept = linear_cross_entropy(hidden, weight, targets, chunk_size=3, recompute=False)
    torch.autograd.grad(kept, hidden, upstream, retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        torch.autograd.grad(kept, hidden, upstream)
