"""Several weight sets of one network evaluated in one pass, laid side by side along the channels.

With S sets an activation (N, S*C, H, W) holds set s in channels [s*C, (s+1)*C); every convolution is
grouped by set, BatchNorm's per-channel statistics are per set anyway, and pools act per channel, so a
module built with ``sets=S`` computes S independent copies of the one-set module. Its parameters are the
sets' parameters concatenated along dim 0 (``stack_sets``), and its gradients split back the same way
(``unstack_sets``). The few places that move channels around (concatenating node outputs, PC-DARTS's
partial channels and shuffle) go through the helpers below, which keep the sets apart and the memory
layout (NCHW or NHWC) the input had.
"""
from __future__ import annotations

from typing import Sequence

import torch

Tensors = list[torch.Tensor]


def stack_sets(sets: Sequence[Tensors]) -> Tensors:
    """Per-set parameter lists (same order) -> the parameters of the module built with ``sets=S``."""
    return [torch.cat(ts, 0) for ts in zip(*sets)]


def unstack_sets(stacked: Tensors, sets: int) -> list[Tensors]:
    """The inverse of ``stack_sets``: S per-set lists of views."""
    parts = [t.chunk(sets, 0) for t in stacked]
    return [[p[s] for p in parts] for s in range(sets)]


def _nhwc(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _grouped(x: torch.Tensor, sets: int, nhwc: bool) -> tuple[torch.Tensor, int]:
    """x (N, S*C, H, W) as a tensor with a (S, C) pair of dims: (N, H, W, S, C) in NHWC layout (a view of
    an NHWC x), else (N, S, C, H, W). Returns it and the index of the C dim."""
    n, c, h, w = x.shape
    if nhwc:
        return x.permute(0, 2, 3, 1).reshape(n, h, w, sets, c // sets), 4
    return x.reshape(n, sets, c // sets, h, w), 2


def _ungrouped(y: torch.Tensor, dim: int) -> torch.Tensor:
    if dim == 4:
        n, h, w = y.shape[:3]
        return y.reshape(n, h, w, -1).permute(0, 3, 1, 2)
    n, h, w = y.shape[0], y.shape[-2], y.shape[-1]
    return y.reshape(n, -1, h, w)


def cat_channels(parts: Sequence[torch.Tensor], sets: int = 1) -> torch.Tensor:
    """Concatenate along the channels within each set: S sets of (C_1 + C_2 + ...) channels."""
    if sets == 1:
        return torch.cat(list(parts), 1)
    nhwc = _nhwc(parts[0])
    grouped = [_grouped(p, sets, nhwc) for p in parts]
    dim = grouped[0][1]
    return _ungrouped(torch.cat([g for g, _ in grouped], dim), dim)


def slice_channels(x: torch.Tensor, start: int, stop: int, sets: int = 1) -> torch.Tensor:
    """Channels [start, stop) of every set."""
    if sets == 1:
        return x[:, start:stop]
    g, dim = _grouped(x, sets, _nhwc(x))
    return _ungrouped(g.narrow(dim, start, stop - start), dim)


def shuffle_channels(x: torch.Tensor, groups: int, sets: int = 1) -> torch.Tensor:
    """ShuffleNet's channel shuffle within each set: interleave the channels of ``groups`` equal groups."""
    g, dim = _grouped(x, sets, _nhwc(x))
    c = g.shape[dim]
    shape = g.shape[:dim] + (groups, c // groups) + g.shape[dim + 1:]
    return _ungrouped(g.reshape(shape).transpose(dim, dim + 1), dim)
