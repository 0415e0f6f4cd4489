"""Arithmetic on weight sets held as lists of tensors (one entry per parameter)."""
from __future__ import annotations

import torch

Tensors = list[torch.Tensor]


def axpy(a: float, x: Tensors, y: Tensors) -> Tensors:
    """a * x + y."""
    return [torch.add(yi, xi, alpha=a) for xi, yi in zip(x, y)]


def scale(a: float, x: Tensors) -> Tensors:
    return [a * xi for xi in x]


def norm(x: Tensors) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(xi) for xi in x]))


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
