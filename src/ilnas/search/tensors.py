"""Arithmetic on weight sets held as lists of tensors (one entry per parameter).

Every operation is one ``torch._foreach_*`` call on the whole list: on a GPU a few fused kernels instead
of one launch per parameter (a supernet has hundreds), which is most of what a search step launches."""
from __future__ import annotations

import torch

Tensors = list[torch.Tensor]


def axpy(a: float | torch.Tensor, x: Tensors, y: Tensors) -> Tensors:
    """a * x + y; ``a`` a number or a 0-dim tensor (read on the device: no host synchronisation)."""
    if not y:
        return []
    if isinstance(a, torch.Tensor):
        return list(torch._foreach_add(y, torch._foreach_mul(x, a)))
    return list(torch._foreach_add(y, x, alpha=a))


def add(x: Tensors, y: Tensors) -> Tensors:
    return list(torch._foreach_add(x, y)) if x else []


def sub(x: Tensors, y: Tensors) -> Tensors:
    return list(torch._foreach_sub(x, y)) if x else []


def scale(a: float | torch.Tensor, x: Tensors) -> Tensors:
    """a * x; ``a`` a number or a 0-dim tensor (read on the device: no host synchronisation)."""
    return list(torch._foreach_mul(x, a)) if x else []


def norm(x: Tensors) -> torch.Tensor:
    """The 2-norm of the whole set."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(x)))


def max_abs(x: Tensors) -> torch.Tensor:
    """The largest magnitude in the set (NaN where there is one); unlike the 2-norm, 0 only for all zeros."""
    return torch.stack(torch._foreach_norm(x, float("inf"))).max()


def detached(x: Tensors, requires_grad: bool = False) -> Tensors:
    return [xi.detach().requires_grad_(requires_grad) for xi in x]


def zeros_like(x: Tensors) -> Tensors:
    return [torch.zeros_like(xi) for xi in x]


def grad(output: torch.Tensor, inputs: Tensors, **kwargs) -> Tensors:
    """torch.autograd.grad with zeros for inputs the output does not use (e.g. the normal-cell
    alphas of a supernet that is all reduction cells)."""
    out = torch.autograd.grad(output, inputs, allow_unused=True, **kwargs)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(out, inputs)]


def grads(output: torch.Tensor, *groups: Tensors, **kwargs) -> list[Tensors]:
    """``grad`` with respect to several weight sets in one backward pass, returned one list per set."""
    flat = grad(output, [t for g in groups for t in g], **kwargs)
    out, start = [], 0
    for g in groups:
        out.append(flat[start:start + len(g)])
        start += len(g)
    return out
