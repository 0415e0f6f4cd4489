"""Mixed Hessian-vector products  d/d(A, W) [ grad_{(W,H)} L(A, W, H) . v ]  (DARTS Eq. 7-8).

Two methods with one signature, kept in a registry: central finite differences as in the official
DARTS architect (eps = 0.01 / ||v||, first-order passes only) and the exact double-backward product.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ilnas.errors import IlnasError
from ilnas.search.tensors import Tensors, axpy, detached, grads, norm, scale, sub

StageLoss = Callable[[Tensors, Tensors, Tensors], torch.Tensor]  # (arch, w, h) -> scalar
SetsLoss = Callable[[Tensors, Sequence[Tensors], Sequence[Tensors]], torch.Tensor]  # (arch, ws, hs) -> (S,)
HVPResult = tuple[Tensors, Tensors | None]  # (A-part, W-part or None)
HVP = Callable[..., HVPResult]
HVPS: dict[str, HVP] = {}  # one for each of config.HVP_METHODS, which configuration checks without this module


def register_hvp(fn: HVP) -> HVP:
    HVPS[fn.__name__] = fn
    return fn


def create_hvp(name: str) -> HVP:
    if name not in HVPS:
        raise IlnasError(f"unknown hvp {name!r}; choose from {', '.join(sorted(HVPS))}")
    return HVPS[name]


@register_hvp
def fd(loss: StageLoss, arch: Tensors, w: Tensors, h: Tensors, v_w: Tensors, v_h: Tensors,
       want_w: bool, eps: float = 0.01) -> HVPResult:
    """(grad L(p + r v) - grad L(p - r v)) / 2r with r = eps / ||v||, p = (W, H).

    r stays a tensor on the device (no host synchronisation). For v = 0 the clamped norm makes r huge but
    finite, the two points coincide with p, and the difference is exactly zero. The two passes run
    without autocast: cast to bf16, W +- r v would mostly round back to W."""
    r = _radius(v_w + v_h, eps)

    def grads_at(sign: float) -> list[Tensors]:
        wp = detached(axpy(sign * r, v_w, w), requires_grad=want_w)
        hp = axpy(sign * r, v_h, h)
        with torch.autocast(w[0].device.type, enabled=False):
            return grads(loss(arch, wp, hp), arch, wp if want_w else [])

    d_arch, d_w = (scale(0.5 / r, sub(plus, minus)) for plus, minus in zip(grads_at(1.0), grads_at(-1.0)))
    return d_arch, (d_w if want_w else None)


def _radius(v: Tensors, eps: float) -> torch.Tensor:
    vnorm = norm(v)
    return eps / vnorm.clamp_min(torch.finfo(vnorm.dtype).tiny)


def fd_batched(losses: SetsLoss, arch: Tensors, points: Sequence[tuple[Tensors, Tensors]],
               vs: Sequence[tuple[Tensors, Tensors]], eps: float = 0.01) -> Tensors:
    """The sum over several stages of ``fd``'s architecture part, with every stage's two passes evaluated
    as weight sets of one batched pass: the gradient of sum_s (L_s(p_s + r_s v_s) - L_s(p_s - r_s v_s)) / 2r_s
    is the sum of the stages' central differences. ``points``: (W, H) per stage; ``vs``: (v_W, v_H)."""
    ws, hs, scales = [], [], []
    for (w, h), (v_w, v_h) in zip(points, vs):
        r = _radius(v_w + v_h, eps)
        for sign in (1.0, -1.0):
            ws.append(axpy(sign * r, v_w, w))
            hs.append(axpy(sign * r, v_h, h))
            scales.append(sign / (2.0 * r))
    with torch.autocast(arch[0].device.type, enabled=False):
        values = losses(arch, ws, hs)
    (d_arch,) = grads((values * torch.stack(scales)).sum(), arch)
    return d_arch


@register_hvp
def exact(loss: StageLoss, arch: Tensors, w: Tensors, h: Tensors, v_w: Tensors, v_h: Tensors,
          want_w: bool, eps: float = 0.0) -> HVPResult:
    """Double backward: grad_(A, W) of <grad_(W,H) L, v>. ``eps`` is unused (one signature)."""
    wp, hp = detached(w, requires_grad=True), detached(h, requires_grad=True)
    g = torch.autograd.grad(loss(arch, wp, hp), wp + hp, create_graph=True)
    dot = sum((gi * vi).sum() for gi, vi in zip(g, v_w + v_h))
    d_arch, d_w = grads(dot, arch, wp if want_w else [])
    return d_arch, (d_w if want_w else None)
