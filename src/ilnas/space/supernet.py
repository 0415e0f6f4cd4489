"""The DARTS search space as a module that owns weights but no architecture.

A cell receives its mixing weights as an argument, so one module serves every weight set the
search keeps (``functional_call(supernet, weights, (x, *arch_weights(arch)))``) and knows nothing
about how the architecture is learnt. Two variants of the space are options of the same module:
PC-DARTS (Xu et al., 2020: partial channels through the mixed op, edge normalisation) and P-DARTS
(Chen et al., 2019: a different op subset per edge, dropout after skip-connects).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ilnas.errors import IlnasError, flag, positive_integer
from ilnas.space import grouped
from ilnas.space.grouped import EdgeGroup
from ilnas.space.layout import BUILT_IN_OPS, NODES, EdgeOps, checked_edge_ops, num_edges
from ilnas.space.ops import FactorizedReduce, ReLUConvBN, Zero, create_op
from ilnas.space.sets import cat_channels, shuffle_channels, slice_channels


def reduction_layers(layers: int) -> tuple[int, ...]:
    return (layers // 3, 2 * layers // 3)


def uneven_side(side: int) -> str | None:
    """Why cells cannot take images whose side is ``side`` pixels where they enter them, or None where they can:
    each of the two reduction cells halves the side, and its two paths (a stride-2 operation, and a factorized
    reduction, which drops the first row and column of one of its halves) agree on even sides only."""
    if side % 4 == 0:
        return None
    below = side // 4 * 4
    near = f"{below} or {below + 4}" if below else "4"
    return f"the two reduction cells halve the side twice, which takes a multiple of 4 ({near}), got {side}"


class MixedOp(nn.Module):
    """sum_o w_o * op_o(x) over the candidate ops of one edge.

    With ``partial_channels`` K > 1 (PC-DARTS) only the first C/K channels go through the ops; the
    rest bypass them (max-pooled on reduction edges) and a channel shuffle with K groups follows.
    ``skip_dropout`` (P-DARTS) is the rate of dropout after identity ops, given with every call.
    ``sets``: weight sets side by side along the channels (ilnas/space/sets.py).
    """

    def __init__(self, channels: int, stride: int, primitives: Sequence[str], partial_channels: int = 1,
                 sets: int = 1):
        super().__init__()
        if channels % partial_channels:
            raise IlnasError(f"partial_channels={partial_channels} does not divide {channels} channels")
        self.k, self.stride, self.channels, self.sets = partial_channels, stride, channels, sets
        self.ops = nn.ModuleList(create_op(p, channels // partial_channels, stride, affine=False, sets=sets)
                                 for p in primitives)
        self.names = list(primitives)
        self.identity = [isinstance(op, nn.Identity) for op in self.ops]
        self.relu = nn.ReLU(inplace=False)
        self.from_relu = [getattr(op, "starts_with_relu", False) for op in self.ops]
        # 'none' adds w * 0: exactly nothing to the sum, and nothing to any gradient (an edge of nothing
        # but 'none' keeps it, for the shape of its zeros)
        self.live = [i for i, op in enumerate(self.ops) if not isinstance(op, Zero)] or list(range(len(self.ops)))
        # their weights: a slice (a view) where they are consecutive, as they are in DARTS's op order
        consecutive = self.live == list(range(self.live[0], self.live[-1] + 1))
        self.live_index = slice(self.live[0], self.live[-1] + 1) if consecutive else self.live

    def forward(self, x: torch.Tensor, weights: torch.Tensor, skip_dropout: float = 0.0,
                x_relu: torch.Tensor | None = None) -> torch.Tensor:
        """weights: (O,); ``x_relu``: relu(x) where the caller already has it (it is shared by every op
        that begins with that ReLU)."""
        active, active_relu = self.inputs(x, x_relu)
        terms = [self.ops[i].forward_from_relu(active_relu) if self.from_relu[i] else self.ops[i](active)
                 for i in self.live]
        return self.mix(x, terms, weights, skip_dropout)

    def inputs(self, x: torch.Tensor, x_relu: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the ops read: x (its first C/K channels under PC-DARTS) and its ReLU, where an op needs it."""
        part = self.channels // self.k
        active = x if self.k == 1 else slice_channels(x, 0, part, self.sets)
        if x_relu is None and any(self.from_relu):
            x_relu = self.relu(x)
        active_relu = x_relu if self.k == 1 or x_relu is None else slice_channels(x_relu, 0, part, self.sets)
        return active, active_relu

    def mix(self, x: torch.Tensor, terms: Sequence[torch.Tensor], weights: torch.Tensor,
            skip_dropout: float = 0.0) -> torch.Tensor:
        """The edge's output from its live ops' outputs ``terms`` (in ``self.live`` order) on input ``x``."""
        if skip_dropout > 0:
            terms = [F.dropout(y, skip_dropout, training=self.training) if self.identity[i] else y
                     for i, y in zip(self.live, terms)]
        out = weighted_sum(weights[self.live_index], terms)
        if self.k == 1:
            return out
        bypass = slice_channels(x, self.channels // self.k, self.channels, self.sets)
        if self.stride == 2:
            bypass = F.max_pool2d(bypass, 2, 2)
        return shuffle_channels(cat_channels([out, bypass], self.sets), self.k, self.sets)


_FULL_PRECISION = (torch.float32, torch.float64)


class _WeightedSum(torch.autograd.Function):
    """sum_i w_i * y_i in few operators: one a term forward; backward, where autograd's own would spend a
    multiply on each y_i's gradient and a multiply and a sum on each w_i's, the y_i's gradients come from one
    broadcast multiply, and each w_i's is one dot product, skipped when w needs none (the weight-gradient
    passes). The backward is made of differentiable operators, so double backward (hvp=exact) works."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weights: torch.Tensor, *terms: torch.Tensor) -> torch.Tensor:
        # addcmul: one operator a term (autograd never sees these, so its heavier backward costs nothing).
        # Under bf16 autocast the products are rounded before the sum, as everywhere else: fused, the
        # roundings move and the bf16 hypergradient's measured closeness to the float64 one with them.
        scales = weights.unbind(0)
        out = scales[0] * terms[0]
        fused = out.dtype in _FULL_PRECISION
        for w, y in zip(scales[1:], terms[1:]):
            out = torch.addcmul(out, w, y) if fused else out + w * y
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        # the terms only for the weights' gradient: a pass with A detached keeps no activation alive here
        ctx.save_for_backward(*(inputs if ctx.needs_input_grad[0] else inputs[:1]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, *terms = ctx.saved_tensors
        grad_terms = (grad.unsqueeze(0) * weights.view(-1, *([1] * grad.dim()))).unbind(0)
        grad_weights = torch.stack([_dot(grad, y) for y in terms]) if ctx.needs_input_grad[0] else None
        return (grad_weights, *grad_terms)


def weighted_sum(weights: torch.Tensor, terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i weights[i] * terms[i] (``weights``: (T,)), the mixed op's and PC-DARTS's node sums."""
    return _WeightedSum.apply(weights, *terms)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a * b).sum() in one operator where a and b lie alike in memory (both NCHW or both NHWC): a dot
    product of their memory-order flattenings, which are views. Not in bf16/fp16 (autocast), where a dot
    may accumulate in the low precision and sum() accumulates in float32."""
    if a.shape == b.shape and a.stride() == b.stride() and a.dim() == 4 and a.dtype in _FULL_PRECISION:
        if a.is_contiguous():
            return torch.dot(a.view(-1), b.view(-1))
        if a.is_contiguous(memory_format=torch.channels_last):
            return torch.dot(a.permute(0, 2, 3, 1).reshape(-1), b.permute(0, 2, 3, 1).reshape(-1))
    return (a * b).sum()


class SearchCell(nn.Module):
    """A DARTS cell of ``nodes`` nodes, node i the sum of its MixedOp edges from the cell's two inputs and the
    nodes before it. ``group_edges``: the edges that read one state evaluated together (ilnas/space/grouped.py),
    the same numbers from fewer operator calls; False calls every edge alone."""

    def __init__(self, c_prev_prev: int, c_prev: int, channels: int, reduction: bool, reduction_prev: bool,
                 edge_ops: EdgeOps, partial_channels: int = 1, nodes: int = NODES, sets: int = 1,
                 group_edges: bool = True):
        super().__init__()
        self.reduction = reduction
        self.nodes, self.sets = nodes, sets
        self.preprocess0 = (FactorizedReduce(c_prev_prev, channels, affine=False, sets=sets) if reduction_prev
                            else ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=False, sets=sets))
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=False, sets=sets)
        strides = [2 if reduction and j < 2 else 1 for i in range(nodes) for j in range(2 + i)]
        self.edges = nn.ModuleList(MixedOp(channels, s, ops, partial_channels, sets)
                                   for s, ops in zip(strides, edge_ops))
        self.relu = nn.ReLU(inplace=False)
        self.starts = [i * (i + 3) // 2 for i in range(nodes)]  # node i's first edge: it reads states 0..i+1
        # the edges that read state j: one of each node from node j-1 on (plain lists: no modules of their own)
        self.readers = [[self.starts[i] + j for i in range(max(0, j - 1), nodes)] for j in range(nodes + 1)]
        # whether an op on them begins with a ReLU: the state's ReLU is then computed once, for all of them
        self.reads_relu = [any(f for e in es for f in self.edges[e].from_relu) for es in self.readers]
        self.groups = [EdgeGroup([self.edges[e] for e in es]) for es in self.readers] if group_edges else None

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                edge_weights: torch.Tensor | None = None, skip_dropout: float = 0.0) -> torch.Tensor:
        # weights: (E, O) edges x ops, rows in edge order (node 0's inputs first); edge_weights: (E,)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        # rows by unbind: backward stacks their gradients in one operator (a select each would cost a
        # select_backward and an add per edge)
        rows = weights.unbind(0)
        outputs: list[torch.Tensor | None] = [None] * len(self.edges)  # each edge's, filled as its state is read
        for i in range(self.nodes):
            for j in ((0, 1) if i == 0 else (i + 1,)):  # the states node i is the first to read
                self._read(j, states[j], rows, skip_dropout, outputs)
            inputs = outputs[self.starts[i]:self.starts[i] + 2 + i]
            states.append(sum(inputs[1:], inputs[0]) if edge_weights is None  # not 0 + ...: one operator less
                          else weighted_sum(edge_weights[self.starts[i]:self.starts[i] + 2 + i], inputs))
        return cat_channels(states[2:], self.sets)

    def _read(self, j: int, h: torch.Tensor, rows: Sequence[torch.Tensor], skip_dropout: float,
              outputs: list[torch.Tensor | None]) -> None:
        """The outputs of the edges that read state ``j`` (``h``) into ``outputs``."""
        edges = self.readers[j]
        h_relu = self.relu(h) if self.reads_relu[j] else None
        if self.groups is not None:
            ys = self.groups[j](h, h_relu, [rows[e] for e in edges], skip_dropout)
        else:
            ys = [self.edges[e](h, rows[e], skip_dropout, h_relu) for e in edges]
        for e, y in zip(edges, ys):
            outputs[e] = y


class Supernet(nn.Module):
    """Stem, ``layers`` search cells (reductions at layers//3 and 2*layers//3), global pooling.

    Returns features of size ``out_features``; task heads live outside, one per learner.

    Args:
        in_channels: image channels.
        channels: C, the channels of the first cell's nodes.
        layers: number of cells.
        normal_ops, reduce_ops: per edge, the candidate ops (default: all eight everywhere).
        partial_channels: K of PC-DARTS (1: every channel through every op, plain DARTS).
        stem_multiplier: the stem has stem_multiplier * C channels.
        channels_last: run the cells on NHWC activations (faster convolutions on CPUs; the same function).
        sets: S weight sets evaluated side by side in one pass (``batched``; ilnas/space/sets.py): the input
            is (N, S * in_channels, H, W), the output (N, S, out_features).
        group_edges: each cell's edges that read one state evaluated together (SearchCell); the same function.
            None: ``ilnas.space.grouped.GROUP_EDGES`` (True).
    """

    def __init__(self, in_channels: int = 3, channels: int = 16, layers: int = 8,
                 normal_ops: EdgeOps | None = None, reduce_ops: EdgeOps | None = None,
                 partial_channels: int = 1, stem_multiplier: int = 3, nodes: int = NODES,
                 channels_last: bool = False, sets: int = 1, group_edges: bool | None = None):
        super().__init__()
        in_channels, channels, layers, partial_channels, stem_multiplier, nodes, sets = (
            positive_integer(name, value) for name, value in (
                ("in_channels", in_channels), ("channels", channels), ("layers", layers),
                ("partial_channels", partial_channels), ("stem_multiplier", stem_multiplier), ("nodes", nodes),
                ("sets", sets)))
        channels_last, group_edges = flag("channels_last", channels_last), flag("group_edges", group_edges, none=True)
        group_edges = grouped.GROUP_EDGES if group_edges is None else group_edges
        self.settings = dict(in_channels=in_channels, channels=channels, layers=layers, normal_ops=normal_ops,
                             reduce_ops=reduce_ops, partial_channels=partial_channels,
                             stem_multiplier=stem_multiplier, nodes=nodes, channels_last=channels_last,
                             group_edges=group_edges)
        self.sets = sets
        self._twins: dict[int, Supernet] = {}  # batched(): a plain dict, so that their meta weights stay apart
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.normal_ops = checked_edge_ops(normal_ops, nodes, "normal_ops")
        self.reduce_ops = checked_edge_ops(reduce_ops, nodes, "reduce_ops")
        if len({len(o) for o in self.normal_ops + self.reduce_ops}) != 1:
            raise IlnasError("every edge must have the same number of candidate ops")
        self.nodes = nodes
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(nn.Conv2d(sets * in_channels, sets * c_curr, 3, padding=1, groups=sets, bias=False),
                                  nn.BatchNorm2d(sets * c_curr, track_running_stats=False))
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        cells, reduction_prev = [], False
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            c_curr = c_curr * 2 if reduction else c_curr
            cells.append(SearchCell(c_prev_prev, c_prev, c_curr, reduction, reduction_prev,
                                    self.reduce_ops if reduction else self.normal_ops, partial_channels, nodes, sets,
                                    group_edges))
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, nodes * c_curr
        self.cells = nn.ModuleList(cells)
        self.out_features = c_prev

    def batched(self, sets: int) -> Supernet:
        """The same supernet for ``sets`` weight sets side by side, built without weights of its own (on
        the meta device): it is only ever called with ``functional_call`` and ``stack_sets``' weights.
        Built once for each ``sets`` and kept (the learners that share this supernet share it too); its mode
        follows this supernet's. A subclass is rebuilt as itself, from the same settings."""
        if sets not in self._twins:
            with torch.device("meta"):
                self._twins[sets] = type(self)(**self.settings, sets=sets)
        twin = self._twins[sets]
        if twin.training != self.training:  # a walk over every module: only on a change
            twin.train(self.training)
        return twin

    @property
    def built_in(self) -> bool:
        """Whether every operation is one of ilnas's (none of one's own, whose code may do anything)."""
        return all(op in BUILT_IN_OPS for ops in self.normal_ops + self.reduce_ops for op in ops)

    @property
    def num_ops(self) -> int:
        return len(self.normal_ops[0])

    def forward(self, x: torch.Tensor, normal: torch.Tensor, reduce: torch.Tensor,
                normal_edges: torch.Tensor | None = None, reduce_edges: torch.Tensor | None = None,
                skip_dropout: float = 0.0) -> torch.Tensor:
        """x: (N, C, H, W); normal, reduce: (E, O) mixing weights; *_edges: (E,) edge weights or None;
        skip_dropout: P-DARTS's dropout rate after skip-connects (training mode only).
        Returns (N, out_features), or (N, sets, out_features) for several sets."""
        normal, reduce, normal_edges, reduce_edges = _autocast_weights(x.device.type, normal, reduce, normal_edges,
                                                                       reduce_edges)
        # After the stem too: a one-channel NHWC image is also NCHW-contiguous, and convolutions follow
        # the layout their input suggests.
        s0 = s1 = self.stem(x.contiguous(memory_format=self.memory_format)).contiguous(memory_format=self.memory_format)
        for cell in self.cells:
            w, e = (reduce, reduce_edges) if cell.reduction else (normal, normal_edges)
            s0, s1 = s1, cell(s0, s1, w, e, skip_dropout)
        features = F.adaptive_avg_pool2d(s1, 1).flatten(1)
        return features if self.sets == 1 else features.view(features.shape[0], self.sets, -1)


def _autocast_weights(device_type: str, *weights: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under autocast, the mixing weights in the compute dtype: a float32 weight times a bf16 op output
    would promote every mixed sum (and every next convolution's input) back to float32."""
    if not torch.is_autocast_enabled(device_type):
        return weights
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if w is None else w.to(dtype) for w in weights)


def use_channels_last(setting: bool | None, device: torch.device) -> bool:
    """NHWC where it is measured faster: by default on CPUs (bench/search_step.py), not on CUDA, where it
    has not been measured yet."""
    return setting if setting is not None else torch.device(device).type == "cpu"


def init_arch(num_ops: int, edge_normalization: bool = False, generator: torch.Generator | None = None,
              dtype: torch.dtype | None = None, nodes: int = NODES) -> list[torch.Tensor]:
    """DARTS initialisation, 1e-3 * N(0, 1): alphas (E, O) of the normal and the reduction cell, and
    with edge normalisation (PC-DARTS) betas (E,) of each."""
    e = num_edges(positive_integer("nodes", nodes))
    num_ops = positive_integer("num_ops", num_ops)
    for name, value, kind, label in (("generator", generator, torch.Generator, "torch.Generator"),
                                     ("dtype", dtype, torch.dtype, "torch.dtype")):
        if value is not None and not isinstance(value, kind):  # else torch's TypeError lists randn's signatures
            raise IlnasError(f"init_arch's {name} must be a {label} or None, got {value!r}"[:160])
    if dtype is not None and not dtype.is_floating_point:
        raise IlnasError(f"init_arch's dtype must be a floating dtype, got {dtype}")
    shapes = [(e, num_ops), (e, num_ops)] + ([(e,), (e,)] if edge_normalization else [])
    return [1e-3 * torch.randn(s, generator=generator, dtype=dtype) for s in shapes]


def mixing_weights(alphas: torch.Tensor) -> torch.Tensor:
    """(E, O) logits -> (E, O) per-edge softmax."""
    return F.softmax(alphas, dim=-1)


def edge_weights(betas: torch.Tensor, nodes: int = NODES) -> torch.Tensor:
    """(E,) logits -> (E,) softmax over each node's incoming edges (PC-DARTS edge normalisation)."""
    parts, start = [], 0
    for i in range(nodes):
        parts.append(F.softmax(betas[start:start + 2 + i], dim=-1))
        start += 2 + i
    return torch.cat(parts)


def arch_weights(arch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Architecture logits [alpha_n, alpha_r(, beta_n, beta_r)] -> the supernet's forward arguments."""
    return tuple(mixing_weights(a) for a in arch[:2]) + tuple(edge_weights(b) for b in arch[2:])


def ranking_weights(arch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, O) weights the genotype is derived from: softmax(alpha), times the edge weight under
    edge normalisation (PC-DARTS)."""
    w = arch_weights([a.detach() for a in arch])
    if len(w) == 2:
        return w
    return w[0] * w[2][:, None], w[1] * w[3][:, None]


def alpha_entropy(alphas: torch.Tensor) -> float:
    """Mean per-edge entropy of the softmax (nats): log(O) at start, falls as the search decides."""
    p = mixing_weights(alphas.detach())
    return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
