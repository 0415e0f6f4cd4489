"""The DARTS search space as a module that owns weights but no architecture.

A cell receives its mixing weights as an argument, so one module serves every weight set the
search keeps (``functional_call(supernet, weights, (x, arch))``) and knows nothing about how the
architecture is learnt.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ilnas.space.ops import PRIMITIVES, FactorizedReduce, ReLUConvBN, create_op

NODES = 4  # intermediate nodes per cell


def num_edges(nodes: int = NODES) -> int:
    """Edges of a cell: node i has i + 2 inputs (the two cell inputs and earlier nodes)."""
    return sum(2 + i for i in range(nodes))


def reduction_layers(layers: int) -> tuple[int, ...]:
    return (layers // 3, 2 * layers // 3)


class MixedOp(nn.Module):
    """sum_o w_o * op_o(x) over the candidate ops of one edge."""

    def __init__(self, channels: int, stride: int, primitives: Sequence[str]):
        super().__init__()
        self.ops = nn.ModuleList(create_op(p, channels, stride, affine=False) for p in primitives)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # weights: (O,)
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class SearchCell(nn.Module):
    def __init__(self, c_prev_prev: int, c_prev: int, channels: int, reduction: bool,
                 reduction_prev: bool, primitives: Sequence[str], nodes: int = NODES):
        super().__init__()
        self.reduction = reduction
        self.nodes = nodes
        self.preprocess0 = (FactorizedReduce(c_prev_prev, channels, affine=False) if reduction_prev
                            else ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=False))
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(
            MixedOp(channels, 2 if reduction and j < 2 else 1, primitives)
            for i in range(nodes) for j in range(2 + i)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # weights: (E, O) edges x ops, rows in edge order (node 0's inputs first)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.nodes):
            node = sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(node)
        return torch.cat(states[2:], dim=1)


class Supernet(nn.Module):
    """Stem, ``layers`` search cells (reductions at layers//3 and 2*layers//3), global pooling.

    Returns features of size ``out_features``; task heads live outside, one per learner.

    Args:
        in_channels: image channels.
        channels: C, the channels of the first cell's nodes.
        layers: number of cells.
        primitives: candidate ops per edge, in alpha column order.
        stem_multiplier: the stem has stem_multiplier * C channels.
    """

    def __init__(self, in_channels: int = 3, channels: int = 16, layers: int = 8,
                 primitives: Sequence[str] = PRIMITIVES, stem_multiplier: int = 3, nodes: int = NODES):
        super().__init__()
        self.primitives = tuple(primitives)
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c_curr, track_running_stats=False))
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        cells, reduction_prev = [], False
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            c_curr = c_curr * 2 if reduction else c_curr
            cells.append(SearchCell(c_prev_prev, c_prev, c_curr, reduction, reduction_prev,
                                    self.primitives, nodes))
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, nodes * c_curr
        self.cells = nn.ModuleList(cells)
        self.out_features = c_prev

    def forward(self, x: torch.Tensor, normal: torch.Tensor, reduce: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W); normal, reduce: (E, O) mixing weights. Returns (N, out_features)."""
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, reduce if cell.reduction else normal)
        return F.adaptive_avg_pool2d(s1, 1).flatten(1)


def init_alphas(edges: int, ops: int, generator: torch.Generator | None = None,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DARTS initialisation: 1e-3 * N(0, 1) logits for the normal and the reduction cell."""
    return tuple(1e-3 * torch.randn(edges, ops, generator=generator, dtype=dtype) for _ in range(2))


def mixing_weights(alphas: torch.Tensor) -> torch.Tensor:
    """(E, O) logits -> (E, O) per-edge softmax."""
    return F.softmax(alphas, dim=-1)


def alpha_entropy(alphas: torch.Tensor) -> float:
    """Mean per-edge entropy of the softmax (nats): log(O) at start, falls as the search decides."""
    p = mixing_weights(alphas.detach())
    return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
