"""The shape of the DARTS search space, without torch: the candidate operations in alpha column order, the
intermediate nodes of a cell, and its edges and their names; and the evaluation networks' styles. What reads cells
without building one (a genotype, ``ilnas compare``) needs only this."""
from __future__ import annotations

import re
from typing import Sequence

from ilnas.errors import IlnasError
from ilnas.fileio import shortened

# Order matters: it is the column order of the alphas and of the official genotypes.
PRIMITIVES: tuple[str, ...] = (
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
    "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
)
# Two more of the official DARTS code's operations, outside its search space: choices for a space of one's own
# (space.ops).
EXTRA_OPS: tuple[str, ...] = ("sep_conv_7x7", "conv_7x1_1x7")
BUILT_IN_OPS = PRIMITIVES + EXTRA_OPS
_REGISTERED: dict[str, None] = {}  # every name given to ilnas.space.ops.register_op, in order
# Without weights: the ops a collapsing DARTS search piles onto the normal cell (skip-connects above all).
PARAMETER_FREE = frozenset({"max_pool_3x3", "avg_pool_3x3", "skip_connect"})
NODES = 4  # intermediate nodes per cell
EdgeOps = Sequence[Sequence[str]]  # per edge, the candidate ops (alpha column order)


def known_ops() -> tuple[str, ...]:
    """Every operation a search space (space.ops) or a genotype may name: DARTS's eight, the extra built-in ones,
    then those registered with ``ilnas.register_op``. Known without torch: a genotype is read without it."""
    return tuple(dict.fromkeys((*BUILT_IN_OPS, *_REGISTERED)))


def op_list_fault(ops: Sequence[str]) -> tuple[str, str] | None:
    """What is wrong with a list of operations to draw cells from, first found: ("unknown", op), ("twice", op) or
    ("only none", ""); None where nothing is."""
    known = known_ops()
    unknown = [op for op in ops if op not in known]
    twice = [op for i, op in enumerate(ops) if op in ops[:i]]
    if unknown or twice:
        return ("unknown", unknown[0]) if unknown else ("twice", twice[0])
    return ("only none", "") if all(op == "none" for op in ops) else None


def add_op_name(name: str) -> None:
    _REGISTERED[name] = None


# What a task or a network style of one's own may be called: it is written in configurations and file names.
REGISTRY_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
OP_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # an operation's: a genotype's string form quotes it as it is
# The evaluation networks a re-training may build (network.style): the two built in, then those registered with
# ilnas.register_network. Known without torch, as a configuration is checked without it.
NETWORK_STYLES: tuple[str, ...] = ("cifar", "imagenet")
_STYLES: dict[str, None] = {}


def known_styles() -> tuple[str, ...]:
    return (*NETWORK_STYLES, *_STYLES)


def add_style_name(name: str) -> None:
    _STYLES[name] = None


def num_edges(nodes: int = NODES) -> int:
    """Edges of a cell: node i has i + 2 inputs (the two cell inputs and earlier nodes)."""
    return sum(2 + i for i in range(nodes))


def node_name(index: int) -> str:
    """A cell input's name as in the DARTS paper's figures: c_{k-2}, c_{k-1}, then intermediate nodes 0, 1, ..."""
    return ("c_{k-2}", "c_{k-1}")[index] if index < 2 else str(index - 2)


def edge_names(nodes: int = NODES) -> list[str]:
    """Each edge in alpha row order, named by its endpoints: "c_{k-2} -> 0", ..., "2 -> 3"."""
    return [f"{node_name(j)} -> {i}" for i in range(nodes) for j in range(2 + i)]


def full_edge_ops(primitives: Sequence[str] = PRIMITIVES, nodes: int = NODES) -> list[list[str]]:
    return [list(primitives) for _ in range(num_edges(nodes))]


def checked_edge_ops(given: EdgeOps | None, nodes: int, name: str) -> list[list[str]]:
    """``given`` (per edge of a ``nodes``-node cell, its candidate operations' names; None: the eight primitives on
    every edge) as lists, refused in one line where it is not one non-empty list of names per edge."""
    if given is None:
        return full_edge_ops(nodes=nodes)
    edges = num_edges(nodes)

    def listed(value: object) -> bool:
        return isinstance(value, Sequence) and not isinstance(value, str)
    if listed(given) and len(given) != edges:
        got = f"{len(given)} edges"
    elif not listed(given) or not all(listed(edge) and edge and all(isinstance(op, str) for op in edge)
                                      for edge in given):
        got = shortened(repr(given), 120)
    else:
        return [list(edge) for edge in given]
    raise IlnasError(f"{name} must list, for each of the {edges} edges of a {nodes}-node cell, its candidate "
                     f"operations' names, got {got}")
