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
