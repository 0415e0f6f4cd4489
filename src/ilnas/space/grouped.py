"""The edges of a search cell that read one state, evaluated together: each operation called once for all of them.

A state feeds up to four edges (a cell's two inputs feed every node), and each edge holds its own copy of every
candidate operation. Edge by edge, an operation runs once per edge. Here an operation with weights runs once for
the edges that hold it, as the module built for ``sets`` times as many weight sets (ilnas/space/sets.py): the
edges' weights concatenated along dim 0, the input repeated along the channels, each edge's output a block of
the result's channels. A pool (with its non-affine BatchNorm) is a function of the input alone: it runs once and
every edge reads its output. Grouped convolutions and per-channel BatchNorm keep the copies apart, so every edge
computes the numbers it computes alone; a pass calls a fraction of the operators (on a GPU, launches them).
Operations of one's own and identities are called edge by edge.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ilnas.space.layout import BUILT_IN_OPS
from ilnas.space.ops import create_op

# Whether supernets built without a say (``Supernet(group_edges=None)``) group their edges: benchmarks set it
# False to measure a pass edge by edge.
GROUP_EDGES = True

Slots = list[tuple[nn.Module, str]]
Repeat = Callable[[bool, int], torch.Tensor]  # (from relu, copies) -> the input (or its ReLU) repeated


def _slots(module: nn.Module) -> Slots:
    """Where each parameter of ``module`` lives (its owner and name), in ``named_parameters`` order."""
    owners = dict(module.named_modules())
    return [(owners[path.rpartition(".")[0]], path.rpartition(".")[2]) for path, _ in module.named_parameters()]


class _Once:
    """One operation called once, its output read by every edge that holds it: the operation of one edge, or one
    whose output depends on its input alone (``input_only``: the pools, 'none')."""

    def __init__(self, op: nn.Module, from_relu: bool):
        self.op, self.from_relu = op, from_relu

    def __call__(self, x: torch.Tensor, x_relu: torch.Tensor | None, copies: int, repeat: Repeat,
                 weights: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        return [self.op.forward_from_relu(x_relu) if self.from_relu else self.op(x)] * copies


class _Stacked:
    """One operation with weights called once for the ``len(ops)`` edges that hold it: the module built for that
    many times the sets, on the meta device (it owns no weights), given the edges' weights concatenated along dim 0
    for the call, as ``torch.func.functional_call`` gives a module its weights."""

    def __init__(self, module: nn.Module, ops: Sequence[nn.Module], from_relu: bool):
        self.module, self.ops, self.from_relu = module, ops, from_relu
        self.slots = _slots(module)
        self.empty = [getattr(owner, attr) for owner, attr in self.slots]
        self.shapes = [w.shape for w in self.empty]
        self.edge_slots = [_slots(op) for op in ops]

    def edge_weights(self) -> list[torch.Tensor]:
        """The edges' weights as the call takes them: each parameter's, edge after edge."""
        return [getattr(o, a) for p in range(len(self.slots)) for o, a in (slots[p] for slots in self.edge_slots)]

    def __call__(self, x: torch.Tensor, x_relu: torch.Tensor | None, copies: int, repeat: Repeat,
                 weights: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``weights``: the module's, stacked (else concatenated here from ``edge_weights``)."""
        if self.module.training != self.ops[0].training:
            self.module.train(self.ops[0].training)
        if weights is None:
            ws, e = self.edge_weights(), len(self.ops)
            weights = [torch.cat(ws[p * e:(p + 1) * e]) for p in range(len(self.slots))]
        for (owner, attr), w in zip(self.slots, weights):
            owner._parameters[attr] = w
        try:
            xs = repeat(self.from_relu, copies)
            y = self.module.forward_from_relu(xs) if self.from_relu else self.module(xs)
        finally:  # the module keeps no reference to this call's weights
            for (owner, attr), w in zip(self.slots, self.empty):
                owner._parameters[attr] = w
        return list(y.split(y.shape[1] // copies, 1))


def _stacked_weights(calls: Sequence[_Stacked]) -> dict[_Stacked, list[torch.Tensor]]:
    """Every call's stacked weights from one concatenation of all their edges' weights, flattened: concatenating
    along dim 0 lays a parameter's edges one after another in memory, so each stacked weight is a view of the
    result (one operator for a state's operations where a concatenation a parameter took a dozen)."""
    parts = [w for call in calls for w in call.edge_weights()]
    if len({(w.dtype, w.device) for w in parts}) != 1:
        return {}  # none, or of several kinds: each call concatenates its own
    flat = torch.cat([w.reshape(-1) for w in parts])
    shapes = [shape for call in calls for shape in call.shapes]
    views = iter(v.view(shape) for v, shape in zip(flat.split([shape.numel() for shape in shapes]), shapes))
    return {call: [next(views) for _ in call.shapes] for call in calls}


def _kinds(module: nn.Module) -> list[type]:
    return [type(m) for m in module.modules()]


class EdgeGroup:
    """The MixedOps ``edges`` of one cell that read the same state (ilnas/space/supernet.py), and what calls each
    of their live operations: once for every edge that holds it where it can (above), else edge by edge. Planned
    at the first call, from the modules as they are then: an edge whose operation was changed after it was built
    (its ReLUs swapped for another activation, say) has it called alone."""

    def __init__(self, edges: Sequence[nn.Module]):
        self.edges = list(edges)
        self.calls: list[tuple[list[tuple[int, int]], _Once | _Stacked]] | None = None

    def _plan(self) -> list[tuple[list[tuple[int, int]], _Once | _Stacked]]:
        holders: dict[str, list[tuple[int, int]]] = {}  # op name -> (edge position, op index) of each holder
        for p, edge in enumerate(self.edges):
            for i in edge.live:
                holders.setdefault(edge.names[i], []).append((p, i))
        calls = []
        for name, held in holders.items():
            ops = [self.edges[p].ops[i] for p, i in held]
            edge = self.edges[held[0][0]]
            from_relu = edge.from_relu[held[0][1]]
            together = len(held) > 1 and name in BUILT_IN_OPS and not isinstance(ops[0], nn.Identity) and all(
                _kinds(op) == _kinds(ops[0]) for op in ops)
            if together and getattr(ops[0], "input_only", False) and not any(True for _ in ops[0].parameters()):
                calls.append((held, _Once(ops[0], from_relu)))
                continue
            if together:
                with torch.device("meta"):
                    module = create_op(name, edge.channels // edge.k, edge.stride, False, edge.sets * len(held))
                if _kinds(module) == _kinds(ops[0]):
                    calls.append((held, _Stacked(module, ops, from_relu)))
                    continue
            calls += [([h], _Once(op, from_relu)) for h, op in zip(held, ops)]
        return calls

    def __call__(self, x: torch.Tensor, x_relu: torch.Tensor | None, rows: Sequence[torch.Tensor],
                 skip_dropout: float = 0.0) -> list[torch.Tensor]:
        """Each edge's output for the input ``x`` (``x_relu``: its ReLU), edge p mixing by ``rows[p]``."""
        if self.calls is None:
            self.calls = self._plan()
        active, active_relu = self.edges[0].inputs(x, x_relu)
        repeated: dict[tuple[bool, int], torch.Tensor] = {}

        def repeat(from_relu: bool, copies: int) -> torch.Tensor:
            if (from_relu, copies) not in repeated:  # NHWC stays NHWC: cat follows its inputs' layout
                repeated[from_relu, copies] = torch.cat([active_relu if from_relu else active] * copies, 1)
            return repeated[from_relu, copies]

        weights = _stacked_weights([call for _, call in self.calls if isinstance(call, _Stacked)])
        terms: list[dict[int, torch.Tensor]] = [{} for _ in self.edges]
        for held, call in self.calls:
            for (p, i), y in zip(held, call(active, active_relu, len(held), repeat, weights.get(call))):
                terms[p][i] = y
        return [edge.mix(x, [t[i] for i in edge.live], w, skip_dropout)
                for edge, t, w in zip(self.edges, terms, rows)]
