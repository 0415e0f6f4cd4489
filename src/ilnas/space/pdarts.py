"""P-DARTS's progressive rules (Chen et al., 2019) on architecture weights: op pruning between search
phases, and at most ``max_skips`` skip-connects in the final normal cell."""
from __future__ import annotations

import torch

from ilnas.space.genotype import Genotype, derive_genotype
from ilnas.space.supernet import NODES, EdgeOps


def prune_ops(weights: torch.Tensor, edge_ops: EdgeOps, keep: int) -> list[list[str]]:
    """Keep the ``keep`` strongest ops of every edge (``none`` included: it may survive until the
    final genotype, which never uses it). weights: (E, O) mixing weights."""
    order = weights.detach().cpu().argsort(dim=1, descending=True, stable=True)
    return [[ops[int(j)] for j in sorted(row[:keep].tolist())] for ops, row in zip(edge_ops, order)]


def _edge_index(position: int, input_index: int) -> int:
    """Global edge index of the genotype's ``position``-th (op, input) pair."""
    node = position // 2
    return sum(2 + i for i in range(node)) + input_index


def limit_skips(normal: torch.Tensor, reduce: torch.Tensor, normal_ops: EdgeOps, reduce_ops: EdgeOps,
                max_skips: int = 2, nodes: int = NODES) -> Genotype:
    """The DARTS rule, then: while the normal cell holds more than ``max_skips`` skip-connects, the
    chosen skip-connect with the smallest weight is struck from its edge and the cell derived again."""
    w = normal.detach().double().cpu().clone()
    while True:
        genotype = derive_genotype(w, reduce, normal_ops, reduce_ops, nodes)
        skips = [(_edge_index(k, j)) for k, (op, j) in enumerate(genotype.normal) if op == "skip_connect"]
        if len(skips) <= max_skips:
            return genotype
        weakest = min(skips, key=lambda e: float(w[e, list(normal_ops[e]).index("skip_connect")]))
        w[weakest, list(normal_ops[weakest]).index("skip_connect")] = float("-inf")
