"""Genotype: the discrete cell a search ends with (DARTS, Liu et al. 2019, Sec. 2.4).

Reads the official string format verbatim (``Genotype(normal=[...], normal_concat=range(2, 6), ...)``,
optionally behind ``NAME =`` or a log line's ``genotype =``) with a restricted evaluator (``ast``,
never ``eval``), writes it back, and round-trips through JSON.
"""
from __future__ import annotations

import ast
import contextlib
import contextvars
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Iterator, Sequence

from ilnas.errors import IlnasError, NotRegistered, positive_integer
from ilnas.fileio import reachable, shortened
from ilnas.space.layout import (NODES, OP_NAME, PRIMITIVES, EdgeOps, checked_edge_ops, known_ops,
                                op_list_fault)

if TYPE_CHECKING:  # reading and comparing cells needs no torch (ilnas compare runs without it)
    import torch

Edge = tuple[str, int]
FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")


@dataclass(frozen=True)
class Genotype:
    """Per node two (op, input) pairs; inputs 0, 1 are the cell inputs, 2.. earlier nodes."""

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self) -> None:
        for cell in ("normal", "reduce"):
            edges, concat = getattr(self, cell), getattr(self, cell + "_concat")
            _check_cell(cell, edges, concat)

    @property
    def nodes(self) -> int:
        return len(self.normal) // 2

    @property
    def choices(self) -> int:
        """The (op, input) choices of its normal and reduction cells: two per node and cell."""
        return len(self.normal) + len(self.reduce)

    def count(self, cell: str, ops: Collection[str]) -> int:
        """How many edges of ``cell`` (normal or reduce) hold one of ``ops``."""
        return sum(op in ops for op, _ in getattr(self, cell))

    def to_string(self) -> str:
        """The official format, as DARTS's search log prints it."""
        def edges(es: tuple[Edge, ...]) -> str:
            return "[" + ", ".join(f"({op!r}, {j})" for op, j in es) + "]"

        def concat(c: tuple[int, ...]) -> str:
            contiguous = list(c) == list(range(c[0], c[-1] + 1))
            return f"range({c[0]}, {c[-1] + 1})" if contiguous else str(list(c))

        return (f"Genotype(normal={edges(self.normal)}, normal_concat={concat(self.normal_concat)}, "
                f"reduce={edges(self.reduce)}, reduce_concat={concat(self.reduce_concat)})")

    def to_dict(self) -> dict:
        return {"normal": [list(e) for e in self.normal], "normal_concat": list(self.normal_concat),
                "reduce": [list(e) for e in self.reduce], "reduce_concat": list(self.reduce_concat)}

    @classmethod
    def from_dict(cls, d: dict) -> "Genotype":
        if not isinstance(d, dict):
            raise IlnasError(f"malformed genotype: expected a mapping with {', '.join(FIELDS)}, got {d!r}"[:160])
        missing = [f for f in FIELDS if f not in d]
        if missing:
            raise IlnasError(f"malformed genotype: missing {', '.join(missing)}")
        try:
            return cls(normal=_edges(d["normal"]), normal_concat=_ints(d["normal_concat"]),
                       reduce=_edges(d["reduce"]), reduce_concat=_ints(d["reduce_concat"]))
        except (TypeError, ValueError, KeyError) as e:
            raise IlnasError(f"malformed genotype: {e}") from None


def _edges(raw: Sequence) -> tuple[Edge, ...]:
    out = []
    for e in raw:
        op, j = e
        if not isinstance(op, str) or isinstance(j, bool) or not isinstance(j, int):
            raise ValueError(f"edge {e!r} is not (op name, input index)")
        out.append((op, j))
    return tuple(out)


def _ints(raw: Sequence) -> tuple[int, ...]:
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in raw) or not raw:
        raise ValueError(f"concat {raw!r} is not a non-empty list of node indices")
    return tuple(raw)


# Set while cells are read from records only to be shown or compared: nothing is built from them.
_NAMES_ONLY = contextvars.ContextVar("ilnas_cells_by_name", default=False)


@contextlib.contextmanager
def cells_by_name() -> Iterator[None]:
    """Within the block, a cell may name an operation no module of this process has registered (one of one's
    own whose plugin is not loaded), by any name an operation may have: ``compare`` and ``plot`` read a run's
    cells to tabulate and draw them, which takes their names, not their code."""
    token = _NAMES_ONLY.set(True)
    try:
        yield
    finally:
        _NAMES_ONLY.reset(token)


def _check_cell(cell: str, edges: tuple[Edge, ...], concat: tuple[int, ...]) -> None:
    if not edges or len(edges) % 2:
        raise IlnasError(f"malformed genotype: {cell} cell has {len(edges)} edges; need two per node")
    nodes = len(edges) // 2
    known = known_ops()
    for k, (op, j) in enumerate(edges):
        if op == "none":
            raise IlnasError(f"malformed genotype: the {cell} cell holds 'none', which no derived cell keeps")
        if op not in known and not (_NAMES_ONLY.get() and OP_NAME.fullmatch(op)):
            raise NotRegistered(f"unknown operation {op!r} in the {cell} cell; known: "
                                f"{', '.join(p for p in known if p != 'none')} (one of your own: ilnas.register_op "
                                f"in a module that ILNAS_PLUGINS names)")
        if not 0 <= j < 2 + k // 2:
            raise IlnasError(f"malformed genotype: {cell} edge {k} of node {k // 2} takes input {j}, "
                             f"which does not exist yet")
    if any(not 0 <= i < 2 + nodes for i in concat):
        raise IlnasError(f"malformed genotype: {cell}_concat {list(concat)} names a missing node")


# --- the official string format, read without eval -------------------------------------------

MAX_NODES = 64  # far beyond any DARTS-family cell; bounds what a hostile range() can allocate


def _literal(node: ast.AST, field: str) -> object:
    """A field's value: Python literals and range(...) only, nothing evaluated."""
    try:
        return _range(node) if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "range" \
            else ast.literal_eval(node)
    except ValueError as e:
        if not str(e).startswith("malformed node"):
            raise
        raise ValueError(f"{field} is no literal (lists of (op, input) pairs and range(...) are read, nothing is "
                         f"evaluated): {ast.unparse(node)[:60]}") from None


def _range(node: ast.Call) -> list[int]:
    args = [ast.literal_eval(a) for a in node.args]
    if node.keywords or not 1 <= len(args) <= 3 or any(isinstance(a, bool) or not isinstance(a, int) for a in args):
        raise ValueError("range takes one to three integers")
    r = range(*args)
    if len(r) > MAX_NODES + 2:
        raise ValueError(f"range of {len(r)} nodes is beyond any cell")
    return list(r)


def parse_genotype(text: str) -> Genotype:
    """Parse ``[NAME =] Genotype(...)``, as in genotypes.py files and DARTS search logs."""
    match = re.search(r"Genotype\s*\(", text)
    if match is None:
        raise IlnasError(f"not a genotype (expected 'Genotype(normal=..., ...)'): {text[:60]!r}")
    try:
        call = ast.parse(text[match.start():].strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise IlnasError(f"malformed genotype: not a valid Genotype(...) expression: {text[:60]!r}") from None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "Genotype"):
        raise IlnasError("malformed genotype: expected a single Genotype(...) call")
    if len(call.args) > len(FIELDS):
        raise IlnasError("malformed genotype: too many positional arguments")
    try:
        fields = {name: _literal(a, name) for name, a in zip(FIELDS, call.args)}
        for kw in call.keywords:
            if kw.arg not in FIELDS:
                raise ValueError(f"unknown field {kw.arg!r}")
            fields[kw.arg] = _literal(kw.value, kw.arg)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        raise IlnasError(f"malformed genotype: {e}"[:200]) from None
    return Genotype.from_dict(fields)


def derive_genotype(normal: torch.Tensor, reduce: torch.Tensor, normal_ops: EdgeOps | None = None,
                    reduce_ops: EdgeOps | None = None, nodes: int = NODES) -> Genotype:
    """The DARTS rule on (E, O) mixing weights: per node the two incoming edges whose strongest
    non-``none`` op is strongest, each with that op. ``*_ops`` name each edge's columns (default:
    the eight primitives on every edge)."""
    nodes = positive_integer("nodes", nodes)
    return Genotype(normal=derive_cell(normal, checked_edge_ops(normal_ops, nodes, "normal_ops"), nodes, "normal"),
                    normal_concat=tuple(range(2, 2 + nodes)),
                    reduce=derive_cell(reduce, checked_edge_ops(reduce_ops, nodes, "reduce_ops"), nodes, "reduce"),
                    reduce_concat=tuple(range(2, 2 + nodes)))


def derive_cell(weights: torch.Tensor, edge_ops: EdgeOps, nodes: int = NODES, name: str = "weights"
                ) -> tuple[Edge, ...]:
    import torch

    shape = (len(edge_ops), len(edge_ops[0]))
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != shape:
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise IlnasError(f"{name} must be a tensor of shape {shape} (edges x candidate operations), got {got}")
    w = weights.detach().double().cpu()  # (E, O)
    if torch.isnan(w).any() or (w == float("inf")).any():  # -inf strikes an op out (limit_skips)
        raise IlnasError(f"{name} holds NaN or +inf: no cell can be derived from them")
    usable = torch.tensor([[op != "none" for op in ops] for ops in edge_ops])
    w = w.masked_fill(~usable, float("-inf"))
    chosen, start = [], 0
    for i in range(nodes):
        rows = w[start:start + 2 + i]
        strength = rows.max(dim=1).values.tolist()
        for j in sorted(range(2 + i), key=lambda j: -strength[j])[:2]:
            chosen.append((edge_ops[start + j][int(rows[j].argmax())], j))
        start += 2 + i
    return tuple(chosen)


def random_genotype(seed: int, nodes: int = NODES, space: Sequence[str] = PRIMITIVES) -> Genotype:
    """A cell drawn uniformly from the DARTS space, or another (``space``: the candidate ops, as space.ops lists
    them), the random-search control: per node two distinct inputs among the cell inputs and earlier nodes,
    each with an op other than ``none``."""
    rng = random.Random(seed)
    ops = [p for p in space if p != "none"]

    def cell() -> list[Edge]:
        return [(rng.choice(ops), j) for i in range(nodes) for j in sorted(rng.sample(range(2 + i), 2))]
    concat = tuple(range(2, 2 + nodes))
    return Genotype(tuple(cell()), concat, tuple(cell()), concat)


def _random_space(listed: str | None) -> tuple[str, ...]:
    """The operations after random:SEED: (comma-separated, as space.ops lists them; none may be among them)."""
    if listed is None:
        return PRIMITIVES
    ops = tuple(op.strip() for op in listed.split(","))
    if fault := op_list_fault(ops):
        kind, op = fault
        why = {"unknown": f"{shortened(repr(op))} is unknown", "twice": f"{op!r} is named twice"}.get(
            kind, "only none is named")
        raise IlnasError(f"random:SEED:OPS draws from the operations OPS (comma-separated, each once, one other than "
                         f"none): {why}; known: {', '.join(known_ops())}")
    return ops


def shared_choices(a: Genotype, b: Genotype, cells: Sequence[str] = ("normal", "reduce")) -> int:
    """How many of the (op, input) choices of ``a`` ``b`` makes too, out of ``a.choices`` (two per node of each of
    ``cells``): node by node, a node's two edges compared as a multiset, since they are summed and the order a
    genotype lists them in means nothing (a search lists the stronger first, a random cell the lower input)."""
    if a.nodes != b.nodes:
        raise IlnasError(f"cells of {a.nodes} and {b.nodes} nodes cannot be compared choice by choice")
    shared = 0
    for cell in cells:
        ea, eb = getattr(a, cell), getattr(b, cell)
        shared += sum(sum((Counter(ea[i:i + 2]) & Counter(eb[i:i + 2])).values()) for i in range(0, len(ea), 2))
    return shared


def unchanged_for(cells: Sequence[Genotype]) -> int:
    """How many of ``cells`` (a search's epochs, in order), counted back from the last, are the last one's cell,
    choice for choice (shared_choices); 0 for none."""
    n = 1 if cells else 0
    while n < len(cells) and shared_choices(cells[-1 - n], cells[-1]) == cells[-1].choices:
        n += 1
    return n


# --- the zoo and the ways a user names a genotype ----------------------------------------------

def zoo() -> dict[str, Genotype]:
    """The published genotypes (DARTS V1/V2, P-DARTS, PC-DARTS), by their official names."""
    text = resources.files("ilnas.space").joinpath("zoo.txt").read_text()
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, literal = line.partition("=")
            out[name.strip()] = parse_genotype(literal)
    return out


def _genotype_file(path: Path, text: str) -> Genotype:
    if path.suffix != ".json":
        return parse_genotype(text)
    try:
        return Genotype.from_dict(json.loads(text))
    except (json.JSONDecodeError, RecursionError) as e:
        raise IlnasError(f"{path} is not valid JSON: {e}") from None


def load_genotype(spec: str | os.PathLike | Genotype) -> Genotype:
    """A zoo name, ``random:SEED`` (a cell drawn uniformly from the DARTS space) or ``random:SEED:OP,OP,...`` (from
    the space of those operations), a genotype.json, a search run directory, a text file (as a string or a path),
    or a literal; a Genotype is returned as it is."""
    if isinstance(spec, Genotype):
        return spec
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise IlnasError(f"a genotype is given by a name, a path or a Genotype(...) literal, got {type(spec).__name__}")
    spec = spec.strip()
    known = zoo()
    if spec in known:
        return known[spec]
    if drawn := re.fullmatch(r"random:(\d{1,10})(?::(.*))?", spec, re.DOTALL):
        return random_genotype(int(drawn[1]), space=_random_space(drawn[2]))
    if "Genotype" in spec:
        return parse_genotype(spec)
    if "\x00" in spec:
        raise IlnasError("a genotype name or path cannot hold a NUL byte")
    path = reachable(spec, "genotype")
    if path.is_dir():
        path = path / "genotype.json"
        if not path.is_file():
            raise IlnasError(f"{spec} holds no genotype.json (has its search finished an epoch?)")
    if path.is_file():
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as e:
            raise IlnasError(f"cannot read {path} ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise IlnasError(f"{path} is not UTF-8 text") from None
        try:
            return _genotype_file(path, text)
        except NotRegistered as e:  # a cell of operations of one's own: the file is fine, the plugin not loaded
            raise NotRegistered(f"{path}: {e}") from None
    if "/" in spec or spec.endswith((".json", ".txt")):  # meant as a path: say what is missing
        raise IlnasError(f"genotype {shortened(spec)}: no such file or run directory")
    raise IlnasError(f"unknown genotype {shortened(repr(spec))}: not a zoo name ({', '.join(sorted(known))}), "
                     f"random:SEED, a file, a run directory or a Genotype(...) literal")
