"""The base methods as strategies of the one search recipe: what phases a search runs, the
skip-connect dropout of each epoch, how the candidate ops change between phases, and the rule that
turns the last phase's architecture weights into the final genotype.

DARTS (and PC-DARTS, which is DARTS on a partial-channel space with edge normalisation) runs one
phase. P-DARTS (Chen et al., 2019) runs several, each a fresh, deeper supernet with fewer candidate
ops per edge; between phases every edge keeps its strongest ops; the final normal cell holds at most
``max_skips`` skip-connects.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ilnas.config import PDartsConfig, SearchRunConfig
from ilnas.space.genotype import Genotype, derive_genotype
from ilnas.space.layout import NODES, EdgeOps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    """One supernet of the search: its depth, candidate ops per edge and base skip-connect dropout."""

    layers: int
    ops_per_edge: int
    skip_dropout: float = 0.0


class Darts:
    """One phase on the configured supernet (``num_ops`` candidate ops an edge); the genotype by the DARTS rule."""

    def __init__(self, layers: int, num_ops: int):
        self.phases = [Phase(layers, num_ops)]

    def skip_dropout(self, phase: int, epoch: int, epochs: int, warmup: int) -> float:
        return self.phases[phase].skip_dropout

    def next_ops(self, weights: torch.Tensor, edge_ops: EdgeOps, phase: int) -> EdgeOps:
        """The candidate ops of phase ``phase`` from the weights the previous phase ended with."""
        return prune_ops(weights, edge_ops, self.phases[phase].ops_per_edge)

    def final_genotype(self, normal: torch.Tensor, reduce: torch.Tensor, normal_ops: EdgeOps,
                       reduce_ops: EdgeOps) -> Genotype:
        return derive_genotype(normal, reduce, normal_ops, reduce_ops)


class PDarts(Darts):
    """The phases of the ``pdarts`` settings, skip-connect dropout decayed within each phase, and at most
    ``max_skips`` skip-connects in the final normal cell."""

    def __init__(self, settings: PDartsConfig):
        self.settings = settings
        self.phases = [Phase(*x) for x in zip(settings.layers, settings.ops_per_edge, settings.skip_dropout)]

    def skip_dropout(self, phase: int, epoch: int, epochs: int, warmup: int) -> float:
        """As in the official code: during the weight-only warm-up base * (epochs - epoch - 1) / epochs,
        afterwards base * exp(-(epoch - warmup) * decay)."""
        base = self.phases[phase].skip_dropout
        if epoch < warmup:
            return base * (epochs - epoch - 1) / epochs
        return base * math.exp(-(epoch - warmup) * self.settings.dropout_decay)

    def final_genotype(self, normal: torch.Tensor, reduce: torch.Tensor, normal_ops: EdgeOps,
                       reduce_ops: EdgeOps) -> Genotype:
        return limit_skips(normal, reduce, normal_ops, reduce_ops, self.settings.max_skips)


METHODS: dict[str, Callable[[SearchRunConfig], Darts]] = {  # one for each of config's SEARCH_METHODS
    "darts": lambda cfg: Darts(cfg.space.layers, len(cfg.space.ops)),
    "pdarts": lambda cfg: PDarts(cfg.pdarts),
}


def create_method(cfg: SearchRunConfig) -> Darts:
    return METHODS[cfg.search.method](cfg)


def prune_ops(weights: torch.Tensor, edge_ops: EdgeOps, keep: int) -> list[list[str]]:
    """Keep the ``keep`` strongest ops of every edge (``none`` included: it may survive until the
    final genotype, which never uses it). weights: (E, O) mixing weights."""
    order = weights.detach().cpu().argsort(dim=1, descending=True, stable=True)
    return [[ops[int(j)] for j in sorted(row[:keep].tolist())] for ops, row in zip(edge_ops, order)]


def _edge_index(position: int, input_index: int) -> int:
    """Global edge index of the genotype's ``position``-th (op, input) pair."""
    node = position // 2
    return sum(2 + i for i in range(node)) + input_index


def _replaceable(w: torch.Tensor, edge_ops: EdgeOps, edge: int, nodes: int) -> bool:
    """Whether striking ``edge``'s skip-connect leaves its node two edges with an op other than ``none``: its
    own next op, or two other edges (derive_cell then never picks the struck one, whose strength is -inf)."""
    if set(edge_ops[edge]) - {"none", "skip_connect"}:
        return True
    start = 0
    for node in range(nodes):
        if edge < start + 2 + node:
            break
        start += 2 + node
    others = [k for k in range(start, start + 2 + node) if k != edge and any(
        op != "none" and w[k, o] > float("-inf") for o, op in enumerate(edge_ops[k]))]
    return len(others) >= 2


def limit_skips(normal: torch.Tensor, reduce: torch.Tensor, normal_ops: EdgeOps, reduce_ops: EdgeOps,
                max_skips: int = 2, nodes: int = NODES) -> Genotype:
    """The DARTS rule, then: while the normal cell holds more than ``max_skips`` skip-connects, the
    chosen skip-connect with the smallest weight is struck from its edge and the cell derived again: its
    edge takes its next op, or, where it has none but ``none`` left (``pdarts.ops_per_edge`` ending at 2),
    its node takes another edge. Where neither can be (a node whose edges hold nothing else), the cell keeps
    the skip-connect, with a warning."""
    w = normal.detach().double().cpu().clone()
    while True:
        genotype = derive_genotype(w, reduce, normal_ops, reduce_ops, nodes)
        skips = [(_edge_index(k, j)) for k, (op, j) in enumerate(genotype.normal) if op == "skip_connect"]
        if len(skips) <= max_skips:
            return genotype
        replaceable = [e for e in skips if _replaceable(w, normal_ops, e, nodes)]
        if not replaceable:
            log.warning(f"the final normal cell keeps {len(skips)} skip-connects, more than pdarts.max_skips="
                        f"{max_skips}: nothing but none was left to take their place")
            return genotype
        weakest = min(replaceable, key=lambda e: float(w[e, list(normal_ops[e]).index("skip_connect")]))
        w[weakest, list(normal_ops[weakest]).index("skip_connect")] = float("-inf")
