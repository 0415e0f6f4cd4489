"""The multi-level engine of interleaving learning (paper Eq. 5-9; docs/design.md Sec. 2).

K learners x M rounds = S stages in interleaving order. Each stage keeps its own weights (W_s, H_s)
and momentum buffers; the architecture A is shared. One ``search_step``:

1. G_s = grad_(W,H) L^tr_s at each stage's own weights (at W_bar_{s-1} under ``copy``);
2. unrolled step W_bar_s = coupling(W_s - eta G_s, W_bar_{s-1}), H_bar_s = H_s - eta grad_H;
3. L^val of the final round's stages at (W_bar_s, H_bar_s);
4. hypergradient through the chain by the adjoint recursion, one mixed HVP per stage;
5. Adam on A and the real SGD updates of every stage.

The engine sees learners only as loss functions of (arch, w, h, batch): it knows nothing of convolutions.
Nor of processes: for data-parallel search the caller passes ``reduce``, the mean over ranks, which is
applied to every gradient that leaves a loss (stage gradients, validation gradients, the weight part of
an HVP, the hypergradient) and to the logged losses. All of them are linear in the loss, so ranks that
each hold a shard of every batch step exactly as one process whose loss is the mean of the shards' losses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ilnas.optim import SGD, Adam
from ilnas.search.config import EngineConfig
from ilnas.search.coupling import COUPLINGS, Coupling, create_coupling
from ilnas.search.hvp import SetsLoss, StageLoss, create_hvp, fd_batched
from ilnas.search.tensors import Tensors, add, axpy, detached, grads, max_abs, norm, scale, sub, zeros_like

Batch = Any
LossFn = Callable[[Tensors, Tensors, Tensors, Batch], torch.Tensor]  # (arch, w, h, batch) -> scalar
# (arch, [w_1..w_S], [h_1..h_S], batch) -> (S,): the loss of several weight sets on one batch in one pass
BatchedLossFn = Callable[[Tensors, Sequence[Tensors], Sequence[Tensors], Batch], torch.Tensor]
Reduce = Callable[[Tensors], Tensors]  # the mean of each tensor over data-parallel ranks


def no_reduce(x: Tensors) -> Tensors:
    """One process: nothing to average."""
    return x


@dataclass(frozen=True)
class Learner:
    """One task as the engine sees it: a name and a loss of (arch, encoder weights, head weights, batch);
    optionally ``losses``, the same loss of several weight sets on one batch, evaluated together (the
    supernet's sets side by side). The engine then batches the passes that do not depend on each other:
    the stage gradients of one learner's stages and their finite-difference passes."""

    name: str
    loss: LossFn
    losses: BatchedLossFn | None = None


@dataclass
class Stage:
    """Persistent state of one stage: its learner, weights and SGD momentum buffers."""

    learner: int
    w: Tensors
    h: Tensors
    buf_w: Tensors | None = None
    buf_h: Tensors | None = None


@dataclass
class SearchState:
    """Everything a search step reads and writes; checkpointed whole."""

    arch: Tensors  # leaf tensors with requires_grad
    arch_optimizer: torch.optim.Optimizer
    stages: list[Stage]
    step: int = 0


def create_state(arch: Tensors, initial: Callable[[int, int], tuple[Tensors, Tensors]], num_learners: int,
                 rounds: int, arch_optimizer: Adam | None = None) -> SearchState:
    """A fresh search state: K * M stages in interleaving order, stage s of learner k starting from
    ``initial(s, k)`` -> (encoder weights, head weights) (cloned); ``arch`` becomes the leaf tensors that
    Adam (``arch_optimizer``, default DARTS's settings) updates."""
    a = arch_optimizer or Adam()
    arch = [t.detach().clone().requires_grad_() for t in arch]
    stages = []
    for s, k in enumerate(stage_learners(list(range(num_learners)), rounds)):
        w, h = initial(s, k)
        stages.append(Stage(k, [t.detach().clone() for t in w], [t.detach().clone() for t in h]))
    return SearchState(arch, torch.optim.Adam(arch, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay), stages)


def stage_learners(order: Sequence[int], rounds: int) -> list[int]:
    """Learner index of each stage in interleaving order: l1..lK, l1..lK, ... (M rounds)."""
    return [k for _ in range(rounds) for k in order]


def final_stages(state: SearchState, num_learners: int) -> list[int]:
    """The last round: the only stages whose validation loss enters the objective."""
    return list(range(len(state.stages) - num_learners, len(state.stages)))


def label_metrics(metrics: dict[str, Any], state: SearchState, names: Sequence[str]) -> dict[str, Any]:
    """``search_step``'s per-stage train losses and per-learner validation losses as mappings named by
    stage (round/learner, e.g. ``r2/digits``) and by learner, so that every value says what it belongs to."""
    k = len(names)
    labels = [f"r{s // k + 1}/{names[st.learner]}" for s, st in enumerate(state.stages)]
    out = {**metrics, "train_loss": dict(zip(labels, metrics["train_loss"]))}
    if "val_loss" in metrics:
        finals = final_stages(state, k)
        out["val_loss"] = {names[state.stages[s].learner]: v for s, v in zip(finals, metrics["val_loss"])}
    return out


# --- one step ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnrolledStage:
    """One stage of the unrolled step: where its gradient was taken, the gradient, the virtual weights."""

    w: Tensors          # the point of G_s: W_s (or W_bar_{s-1} under copy) ...
    h: Tensors          # ... and H_s
    grad_w: Tensors     # G_s, detached
    grad_h: Tensors
    w_bar: Tensors      # W_bar_s, H_bar_s
    h_bar: Tensors
    train_loss: torch.Tensor  # 0-dim, on the device: read once at the end of the step


@dataclass(frozen=True)
class StepRule:
    """What one iteration's arithmetic is fixed by: the engine settings, the SGD being unrolled and
    committed (momentum, weight decay, clipping), this epoch's learning rate eta, the coupling
    and the mean over data-parallel ranks."""

    cfg: EngineConfig
    sgd: SGD
    lr: float
    coupling: Coupling
    reduce: Reduce = no_reduce

    @classmethod
    def create(cls, cfg: EngineConfig, sgd: SGD, lr: float, reduce: Reduce = no_reduce) -> StepRule:
        virtual_wd = sgd.weight_decay if cfg.virtual_momentum else 0.0
        return cls(cfg, sgd, lr, create_coupling(cfg.coupling, lr, cfg.lam, virtual_wd, cfg.allow_unstable), reduce)

    @property
    def virtual_momentum(self) -> float:
        return self.sgd.momentum if self.cfg.virtual_momentum else 0.0

    @property
    def virtual_wd(self) -> float:
        return self.sgd.weight_decay if self.cfg.virtual_momentum else 0.0


def search_step(state: SearchState, learners: Sequence[Learner], train: Sequence[Batch], val: Sequence[Batch],
                cfg: EngineConfig, sgd: SGD, lr: float, update_arch: bool = True,
                reduce: Reduce = no_reduce, sync: bool = True) -> dict[str, Any]:
    """One iteration over all stages; train[k], val[k] are learner k's batches, ``lr`` this epoch's eta
    of ``sgd``. Returns metrics. ``update_arch=False`` is a weight-only step (the warm-up epochs of
    P-DARTS and PC-DARTS). ``reduce``: the mean over data-parallel ranks (see the module docstring).
    ``sync=False``: the losses and the hypergradient's norm stay 0-dim tensors on the device, and the step
    never waits for the device; ``to_host`` brings several steps' values back in one transfer."""
    rule = StepRule.create(cfg, sgd, lr, reduce)
    losses = _stage_losses(state, learners, train, cfg)
    unrolled = unroll(state, losses, rule)
    metrics: dict[str, Any] = {"lr": lr, "arch_updated": update_arch}
    scalars = {"train_loss": [u.train_loss for u in unrolled]}
    # alg1: the weight step belongs to the architecture the iteration began with
    arch0 = [a.detach().clone() for a in state.arch]

    def stage_grads(s: int, w: Tensors, h: Tensors) -> tuple[Tensors, Tensors]:
        """alg1: the unrolled step's gradient, or a fresh one where the commit moved its point (under
        ``copy`` the point is the previous stage's committed weights, which clipping moves off W_bar:
        telling which takes the step's one read from the device per stage)."""
        point = unrolled[s].w
        if w is point or bool(max_abs(sub(w, point)) == 0):
            return unrolled[s].grad_w, unrolled[s].grad_h
        return _gradient(losses.single[s], arch0, w, h, rule.reduce)[1:]

    if update_arch:
        hyper, val_loss = _hypergradient(state, learners, val, losses, unrolled, rule)
        _arch_step(state, hyper)
        scalars.update(val_loss=val_loss, hypergrad_norm=[norm(hyper)])
        if cfg.update_order == "darts":  # the real weight step recomputed at the new A
            stage_grads = _fresh_gradients(state, losses, rule)
    commit(state, stage_grads, rule)
    state.step += 1
    # The losses are averaged over ranks; the hypergradient's norm is already the same on every rank.
    losses_now = torch.stack([v.detach().double() for key, vs in scalars.items() if key != "hypergrad_norm"
                              for v in vs])
    norms = [v.detach().double().reshape(1) for v in scalars.get("hypergrad_norm", [])]
    values = iter(torch.cat([rule.reduce([losses_now])[0], *norms]).unbind())
    metrics.update({k: [next(values) for _ in vs] for k, vs in scalars.items()})
    if "hypergrad_norm" in metrics:
        metrics["hypergrad_norm"] = metrics["hypergrad_norm"][0]
    return to_host([metrics])[0] if sync else metrics


def to_host(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``records`` (metrics, possibly nested in lists and dicts) with every tensor replaced by its
    float: one host synchronisation for all of them."""
    found: list[torch.Tensor] = []
    _map_tensors(list(records), found.append)
    values = iter(torch.stack([t.reshape(()).double() for t in found]).tolist() if found else [])
    return _map_tensors(list(records), lambda t: next(values))


def _map_tensors(x: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(v, fn) for v in x)
    return x


@dataclass(frozen=True)
class StageLosses:
    """L^tr_s of every stage as a function of (arch, w, h), with the learner's weight (beta of Eq. 10), and,
    where the learner can evaluate several weight sets at once, as a function of (arch, ws, hs) -> (S,)."""

    single: list[StageLoss]
    batched: list[SetsLoss | None]
    learner: list[int]
    max_sets: int

    def groups(self, stages: Sequence[int], passes: int = 1) -> list[list[int]]:
        """``stages`` split into groups evaluated together: the stages of one learner with a batched loss,
        at most ``max_sets`` weight sets (``passes`` per stage) per group; the others alone."""
        per_group = _stages_per_group(self.max_sets, passes)
        out: list[list[int]] = []
        for k in dict.fromkeys(self.learner[s] for s in stages):
            mine = [s for s in stages if self.learner[s] == k]
            size = per_group if self.batched[mine[0]] is not None else 1
            out += [mine[i:i + size] for i in range(0, len(mine), size)]
        return out


def _stages_per_group(max_sets: int, passes: int) -> int:
    return max(1, max_sets // passes)


def widest_pass(cfg: EngineConfig, stages_per_learner: int) -> int:
    """The most weight sets one pass of a step evaluates side by side, for learners that take several at once
    (``Learner.losses``, as the supernet does; ``StageLosses.groups``): each set keeps its own activations
    for the pass's backward, so the step holds this many times what one pass of the batch keeps."""
    if cfg.batched_sets < 2:
        return 1
    coupling, widest = COUPLINGS[cfg.coupling], 1
    if not coupling.grad_at_prev:  # the stages' gradients, independent of each other (_gradients)
        widest = min(_stages_per_group(cfg.batched_sets, 1), stages_per_learner)
    if cfg.order == 2 and cfg.hvp == "fd" and not coupling.needs_w_hvp:  # their finite differences (_chain_terms)
        widest = max(widest, 2 * min(_stages_per_group(cfg.batched_sets, 2), stages_per_learner))
    return widest


def _stage_losses(state: SearchState, learners: Sequence[Learner], batches: Sequence[Batch],
                  cfg: EngineConfig) -> StageLosses:
    def weight(k: int) -> float:
        return cfg.train_weights[k] if cfg.train_weights else 1.0

    def single(k: int) -> StageLoss:
        return lambda a, w, h: weight(k) * learners[k].loss(a, w, h, batches[k])

    def batched(k: int) -> SetsLoss | None:
        fn = learners[k].losses
        if fn is None or cfg.batched_sets < 2:
            return None
        return lambda a, ws, hs: weight(k) * fn(a, ws, hs, batches[k])
    ks = [stage.learner for stage in state.stages]
    return StageLosses([single(k) for k in ks], [batched(k) for k in ks], ks, cfg.batched_sets)


def _gradient(loss: StageLoss, arch: Tensors, w: Tensors, h: Tensors,
              reduce: Reduce) -> tuple[torch.Tensor, Tensors, Tensors]:
    """The stage's loss at (arch, w, h) (this rank's) and its weight gradient (averaged over ranks)."""
    wp, hp = detached(w, True), detached(h, True)
    value = loss(detached(arch), wp, hp)
    gw, gh = _split(reduce(grads(value, wp + hp)[0]), len(wp))
    return value.detach(), gw, gh


def _gradients(losses: StageLosses, arch: Tensors, points: dict[int, tuple[Tensors, Tensors]],
               reduce: Reduce) -> dict[int, tuple[torch.Tensor, Tensors, Tensors]]:
    """``_gradient`` of every stage in ``points`` (stage -> (w, h)), the stages of one learner in batched
    passes: the losses of independent weight sets are summed, so one backward gives each set its gradient."""
    out = {}
    for group in losses.groups(list(points)):
        if len(group) == 1:
            out[group[0]] = _gradient(losses.single[group[0]], arch, *points[group[0]], reduce)
            continue
        wps = [detached(points[s][0], True) for s in group]
        hps = [detached(points[s][1], True) for s in group]
        values = losses.batched[group[0]](detached(arch), wps, hps)
        flat = reduce(grads(values.sum(), [t for wp, hp in zip(wps, hps) for t in wp + hp])[0])
        start = 0
        for i, (s, wp, hp) in enumerate(zip(group, wps, hps)):
            gw, gh = _split(flat[start:start + len(wp) + len(hp)], len(wp))
            out[s] = (values[i].detach(), gw, gh)
            start += len(wp) + len(hp)
    return out


def _fresh_gradients(state: SearchState, losses: StageLosses,
                     rule: StepRule) -> Callable[[int, Tensors, Tensors], tuple[Tensors, Tensors]]:
    """update_order=darts: the commit's gradients at the new A. Where each is taken at the stage's own
    weights they are independent and computed together, before the commit moves any stage."""
    if rule.coupling.grad_at_prev:
        return lambda s, w, h: _gradient(losses.single[s], state.arch, w, h, rule.reduce)[1:]
    fresh = _own_gradients(state, losses, rule)
    return lambda s, w, h: fresh[s][1:]


def _own_gradients(state: SearchState, losses: StageLosses,
                   rule: StepRule) -> dict[int, tuple[torch.Tensor, Tensors, Tensors]]:
    """Every stage's gradient at its own weights and the state's A, batched by learner."""
    return _gradients(losses, state.arch, {s: (st.w, st.h) for s, st in enumerate(state.stages)}, rule.reduce)


def _split(x: Tensors, n: int) -> tuple[Tensors, Tensors]:
    return x[:n], x[n:]


def unroll(state: SearchState, losses: StageLosses, rule: StepRule) -> list[UnrolledStage]:
    """Steps 1-2: one virtual SGD step per stage, chained through the coupling. Where each G_s is taken at
    the stage's own weights, the gradients are independent and computed first, in batched passes."""
    out: list[UnrolledStage] = []
    coupling = rule.coupling
    own = {} if coupling.grad_at_prev else _own_gradients(state, losses, rule)
    for s, stage in enumerate(state.stages):
        w = out[-1].w_bar if (coupling.grad_at_prev and s > 0) else stage.w
        value, gw, gh = own[s] if s in own else _gradient(losses.single[s], state.arch, w, stage.h, rule.reduce)
        w_step = _sgd_direction(w, gw, stage.buf_w, rule)
        w_bar = coupling.combine(w_step, w, out[-1].w_bar) if s > 0 else w_step
        h_bar = _sgd_direction(stage.h, gh, stage.buf_h, rule)
        out.append(UnrolledStage(w, stage.h, gw, gh, w_bar, h_bar, value))
    return out


def _sgd_direction(p: Tensors, g: Tensors, buf: Tensors | None, rule: StepRule) -> Tensors:
    """The official DARTS virtual step: p - lr * (momentum * buf + g + wd * p)."""
    d = axpy(rule.virtual_wd, p, g)
    if buf is not None and rule.virtual_momentum:
        d = axpy(rule.virtual_momentum, buf, d)
    return axpy(-rule.lr, d, p)


def hypergradient(state: SearchState, learners: Sequence[Learner], train: Sequence[Batch], val: Sequence[Batch],
                  cfg: EngineConfig, sgd: SGD, lr: float, reduce: Reduce = no_reduce) -> tuple[Tensors, list[float]]:
    """d/dA of sum_{s in F} alpha_k L^val_s through the whole unrolled chain (paper Eq. 5-9), at the
    state's current weights and batches ``train[k]``, ``val[k]``; the state is not changed.
    Returns (hypergradient, the final round's validation losses, this rank's)."""
    rule = StepRule.create(cfg, sgd, lr, reduce)
    losses = _stage_losses(state, learners, train, cfg)
    hyper, val_loss = _hypergradient(state, learners, val, losses, unroll(state, losses, rule), rule)
    return hyper, torch.stack(val_loss).tolist()


def _hypergradient(state: SearchState, learners: Sequence[Learner], val: Sequence[Batch],
                   losses: StageLosses, unrolled: Sequence[UnrolledStage],
                   rule: StepRule) -> tuple[Tensors, list[torch.Tensor]]:
    """Steps 3-4: d/dA of sum_{s in F} alpha_k L^val_s. Returns (hypergradient, val losses as 0-dim tensors)."""
    cfg = rule.cfg
    arch = detached(state.arch, True)
    second = cfg.order == 2
    hyper = zeros_like(arch)
    g_val: dict[int, tuple[Tensors, Tensors]] = {}
    val_loss = []
    for s in final_stages(state, len(learners)):
        k = state.stages[s].learner
        weight = cfg.val_weights[k] if cfg.val_weights else 1.0
        # First order: at the current weights; second order: at the unrolled ones.
        w, h = ((unrolled[s].w_bar, unrolled[s].h_bar) if second else (state.stages[s].w, state.stages[s].h))
        wp, hp = detached(w, second), detached(h, second)
        value = learners[k].loss(arch, wp, hp, val[k])
        if second:
            d_arch, g_wh = grads(weight * value, arch, wp + hp)
            g_val[s] = _split(rule.reduce(g_wh), len(wp))
        else:
            (d_arch,) = grads(weight * value, arch)
        hyper = add(hyper, d_arch)
        val_loss.append(value.detach())
    if second:
        hyper = _chain_terms(hyper, arch, losses, unrolled, g_val, rule)
    return rule.reduce(hyper), val_loss


def _chain_terms(hyper: Tensors, arch: Tensors, losses: StageLosses, unrolled: Sequence[UnrolledStage],
                 g_val: dict[int, tuple[Tensors, Tensors]], rule: StepRule) -> Tensors:
    """Adjoint recursion u_s = 1[s in F] g_s + J^T u_{s+1};  grad_A -= HVP_s((eta_W u_s, eta h_s)).

    Where J needs no HVP (every coupling but copy), every v_s is known before any HVP runs, so with
    finite differences the stages' passes run together (``fd_batched``), the HVPs summed."""
    hvp, coupling, lr = create_hvp(rule.cfg.hvp), rule.coupling, rule.lr
    batch_fd = rule.cfg.hvp == "fd" and not coupling.needs_w_hvp and any(f is not None for f in losses.batched)
    pending: list[tuple[int, Tensors, Tensors]] = []  # (stage, v_w, v_h) of the batched FD passes
    u: Tensors | None = None
    for s in reversed(range(len(unrolled))):
        g, h_adj = g_val.get(s, (None, None))
        if g is not None:
            u = g if u is None else add(u, g)
        if u is None:
            continue  # nothing downstream depends on this stage
        w, h = unrolled[s].w, unrolled[s].h
        w_eta = lr * (coupling.w_scale() if s > 0 else 1.0)
        v_h = scale(lr, h_adj) if h_adj is not None else zeros_like(h)
        want_w = coupling.needs_w_hvp and s > 0
        v_w = scale(w_eta, u)
        if batch_fd:
            pending.append((s, v_w, v_h))
            u = coupling.adjoint(u, None) if s > 0 else None
            continue
        d_arch, d_w = hvp(losses.single[s], arch, w, h, v_w, v_h, want_w, rule.cfg.fd_eps)
        hyper = sub(hyper, d_arch)  # averaged over ranks once, by the caller
        u = coupling.adjoint(u, rule.reduce(d_w) if want_w else d_w) if s > 0 else None
    vs = {s: (v_w, v_h) for s, v_w, v_h in pending}
    for group in losses.groups(sorted(vs), passes=2):
        points = [(unrolled[s].w, unrolled[s].h) for s in group]
        if len(group) == 1 and losses.batched[group[0]] is None:
            d_arch = hvp(losses.single[group[0]], arch, *points[0], *vs[group[0]], False, rule.cfg.fd_eps)[0]
        else:
            d_arch = fd_batched(losses.batched[group[0]], arch, points, [vs[s] for s in group], rule.cfg.fd_eps)
        hyper = sub(hyper, d_arch)
    return hyper


def _arch_step(state: SearchState, hyper: Tensors) -> None:
    for a, g in zip(state.arch, hyper):
        a.grad = g.detach().clone()
    state.arch_optimizer.step()
    state.arch_optimizer.zero_grad(set_to_none=True)


def commit(state: SearchState, stage_grads: Callable[[int, Tensors, Tensors], tuple[Tensors, Tensors]],
           rule: StepRule) -> None:
    """Step 5: the real updates, stage by stage: SGD (momentum, weight decay, gradient clipping)
    on the stage's own loss, then the coupling towards the previous stage's new weights."""
    prev: Tensors | None = None
    coupling = rule.coupling
    for s, stage in enumerate(state.stages):
        w = prev if (coupling.grad_at_prev and s > 0) else stage.w
        gw, gh = _clip(*stage_grads(s, w, stage.h), max_norm=rule.sgd.grad_clip)
        new_w, stage.buf_w = _sgd(w, gw, stage.buf_w, rule)
        stage.h, stage.buf_h = _sgd(stage.h, gh, stage.buf_h, rule)
        stage.w = coupling.combine(new_w, w, prev) if s > 0 else new_w
        stage.w = detached(stage.w)
        prev = stage.w


def _clip(gw: Tensors, gh: Tensors, max_norm: float | None) -> tuple[Tensors, Tensors]:
    """Clip the stage's gradient (encoder and head together) to norm ``max_norm``, as clip_grad_norm_ does
    (factor max_norm / (norm + 1e-6), at most 1), on the device: no host synchronisation."""
    if max_norm is not None:
        factor = (max_norm / (norm(gw + gh) + 1e-6)).clamp(max=1.0)
        return scale(factor, gw), scale(factor, gh)
    return gw, gh


def _sgd(p: Tensors, g: Tensors, buf: Tensors | None, rule: StepRule) -> tuple[Tensors, Tensors]:
    """torch.optim.SGD semantics: buf = momentum * buf + (g + wd * p); p = p - lr * buf."""
    d = axpy(rule.sgd.weight_decay, p, g)
    buf = d if buf is None else axpy(rule.sgd.momentum, buf, d)
    return detached(axpy(-rule.lr, buf, p)), detached(buf)
