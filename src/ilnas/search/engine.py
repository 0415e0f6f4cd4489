"""The multi-level engine of interleaving learning (paper Eq. 5-9; docs/design.md Sec. 2).

K learners x M rounds = S stages in interleaving order. Each stage keeps its own weights (W_s, H_s)
and momentum buffers; the architecture A is shared. One ``search_step``:

1. G_s = grad_(W,H) L^tr_s at each stage's own weights (at W_bar_{s-1} under ``copy``);
2. unrolled step W_bar_s = coupling(W_s - eta G_s, W_bar_{s-1}), H_bar_s = H_s - eta grad_H;
3. L^val of the final round's stages at (W_bar_s, H_bar_s);
4. hypergradient through the chain by the adjoint recursion, one mixed HVP per stage;
5. Adam on A and the real SGD updates of every stage.

The engine sees learners only as loss functions of (arch, w, h, batch): it knows nothing of convolutions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ilnas.errors import IlnasError
from ilnas.search.coupling import Coupling, create_coupling
from ilnas.search.hvp import StageLoss, create_hvp
from ilnas.search.tensors import Tensors, axpy, detached, grad, norm, zeros_like

Batch = Any
LossFn = Callable[[Tensors, Tensors, Tensors, Batch], torch.Tensor]  # (arch, w, h, batch) -> scalar


@dataclass(frozen=True)
class Learner:
    """One task as the engine sees it: a name and a loss of (arch, encoder weights, head weights, batch)."""

    name: str
    loss: LossFn


@dataclass(frozen=True)
class EngineConfig:
    """Args:
        order: 1 drops the Hessian terms (first-order DARTS), 2 differentiates the unrolled chain.
        hvp: 'fd' (central differences, eps / ||v||) or 'exact' (double backward).
        coupling, lam: how a stage is pulled towards the previous one (see coupling.py).
        update_order: 'alg1' commits the unrolled weights of the step (paper Algorithm 1);
            'darts' updates A first, then recomputes the weight step at the new A (official DARTS).
        virtual_momentum: momentum and weight decay enter the virtual step (official DARTS).
        train_weights, val_weights: per-learner loss weights (beta and alpha of Eq. 10).
    """

    order: int = 2
    hvp: str = "fd"
    fd_eps: float = 0.01
    coupling: str = "prox"
    lam: float = 100.0
    allow_unstable: bool = False
    update_order: str = "alg1"
    virtual_momentum: bool = True
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float | None = 5.0
    train_weights: tuple[float, ...] | None = None
    val_weights: tuple[float, ...] | None = None


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


def stage_learners(order: Sequence[int], rounds: int) -> list[int]:
    """Learner index of each stage in interleaving order: l1..lK, l1..lK, ... (M rounds)."""
    return [k for _ in range(rounds) for k in order]


def final_stages(state: SearchState, num_learners: int) -> list[int]:
    """The last round: the only stages whose validation loss enters the objective."""
    return list(range(len(state.stages) - num_learners, len(state.stages)))


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
    train_loss: float


def search_step(state: SearchState, learners: Sequence[Learner], train: Sequence[Batch],
                val: Sequence[Batch], cfg: EngineConfig, lr: float, update_arch: bool = True) -> dict[str, Any]:
    """One iteration over all stages; train[k], val[k] are learner k's batches. Returns metrics.
    ``update_arch=False`` is a weight-only step (the warm-up epochs of P-DARTS and PC-DARTS)."""
    coupling = create_coupling(cfg.coupling, lr, cfg.lam, _virtual_wd(cfg), cfg.allow_unstable)
    losses = _stage_losses(state, learners, train, cfg)
    unrolled = unroll(state, losses, coupling, cfg, lr)
    metrics: dict[str, Any] = {"train_loss": [u.train_loss for u in unrolled], "lr": lr,
                               "arch_updated": update_arch}
    # alg1: the weight step belongs to the architecture the iteration began with
    arch0 = [a.detach().clone() for a in state.arch]

    def grads(s: int, w: Tensors, h: Tensors) -> tuple[Tensors, Tensors]:
        """alg1: the unrolled step's gradient, or a fresh one where the commit moved its point (under
        ``copy`` the point is the previous stage's committed weights, which clipping moves off W_bar)."""
        point = unrolled[s].w
        if w is point or all(torch.equal(a, b) for a, b in zip(w, point)):
            return unrolled[s].grad_w, unrolled[s].grad_h
        return _gradient(losses[s], arch0, w, h)[1:]

    if update_arch:
        hyper, val_loss = _hypergradient(state, learners, val, losses, unrolled, coupling, cfg, lr)
        _arch_step(state, hyper)
        metrics.update(val_loss=val_loss, hypergrad_norm=float(norm(hyper)))
        if cfg.update_order == "darts":  # the real weight step recomputed at the new A
            grads = lambda s, w, h: _gradient(losses[s], state.arch, w, h)[1:]  # noqa: E731
    commit(state, grads, coupling, cfg, lr)
    state.step += 1
    return metrics


def _virtual_wd(cfg: EngineConfig) -> float:
    return cfg.weight_decay if cfg.virtual_momentum else 0.0


def _stage_losses(state: SearchState, learners: Sequence[Learner], batches: Sequence[Batch],
                  cfg: EngineConfig) -> list[StageLoss]:
    """L^tr_s as a function of (arch, w, h), with the learner's weight (beta of Eq. 10)."""
    def bind(k: int) -> StageLoss:
        weight = cfg.train_weights[k] if cfg.train_weights else 1.0
        return lambda a, w, h: weight * learners[k].loss(a, w, h, batches[k])
    return [bind(stage.learner) for stage in state.stages]


def _gradient(loss: StageLoss, arch: Tensors, w: Tensors, h: Tensors) -> tuple[float, Tensors, Tensors]:
    wp, hp = detached(w, True), detached(h, True)
    value = loss(detached(arch), wp, hp)
    g = torch.autograd.grad(value, wp + hp)
    return float(value.detach()), list(g[:len(w)]), list(g[len(w):])


def unroll(state: SearchState, losses: Sequence[StageLoss], coupling: Coupling, cfg: EngineConfig,
           lr: float) -> list[UnrolledStage]:
    """Steps 1-2: one virtual SGD step per stage, chained through the coupling."""
    out: list[UnrolledStage] = []
    wd, mom = _virtual_wd(cfg), (cfg.momentum if cfg.virtual_momentum else 0.0)
    for s, stage in enumerate(state.stages):
        w = out[-1].w_bar if (coupling.grad_at_prev and s > 0) else stage.w
        value, gw, gh = _gradient(losses[s], state.arch, w, stage.h)
        w_step = _sgd_direction(w, gw, stage.buf_w, mom, wd, lr)
        w_bar = coupling.combine(w_step, w, out[-1].w_bar) if s > 0 else w_step
        h_bar = _sgd_direction(stage.h, gh, stage.buf_h, mom, wd, lr)
        out.append(UnrolledStage(w, stage.h, gw, gh, w_bar, h_bar, value))
    return out


def _sgd_direction(p: Tensors, g: Tensors, buf: Tensors | None, momentum: float, wd: float,
                   lr: float) -> Tensors:
    """The official DARTS virtual step: p - lr * (momentum * buf + g + wd * p)."""
    d = [gi + wd * pi for gi, pi in zip(g, p)]
    if buf is not None and momentum:
        d = axpy(momentum, buf, d)
    return axpy(-lr, d, p)


def hypergradient(state: SearchState, learners: Sequence[Learner], train: Sequence[Batch], val: Sequence[Batch],
                  cfg: EngineConfig, lr: float) -> tuple[Tensors, list[float]]:
    """d/dA of sum_{s in F} alpha_k L^val_s through the whole unrolled chain (paper Eq. 5-9), at the
    state's current weights and batches ``train[k]``, ``val[k]``; the state is not changed.
    Returns (hypergradient, the final round's validation losses)."""
    coupling = create_coupling(cfg.coupling, lr, cfg.lam, _virtual_wd(cfg), cfg.allow_unstable)
    losses = _stage_losses(state, learners, train, cfg)
    unrolled = unroll(state, losses, coupling, cfg, lr)
    return _hypergradient(state, learners, val, losses, unrolled, coupling, cfg, lr)


def _hypergradient(state: SearchState, learners: Sequence[Learner], val: Sequence[Batch],
                   losses: Sequence[StageLoss], unrolled: Sequence[UnrolledStage], coupling: Coupling,
                   cfg: EngineConfig, lr: float) -> tuple[Tensors, list[float]]:
    """Steps 3-4: d/dA of sum_{s in F} alpha_k L^val_s. Returns (hypergradient, val losses)."""
    final = final_stages(state, len(learners))
    arch = detached(state.arch, True)
    second = cfg.order == 2
    hyper = zeros_like(arch)
    g_val: dict[int, tuple[Tensors, Tensors]] = {}
    val_loss = []
    for s in final:
        k = state.stages[s].learner
        weight = cfg.val_weights[k] if cfg.val_weights else 1.0
        # First order: at the current weights; second order: at the unrolled ones.
        w, h = ((unrolled[s].w_bar, unrolled[s].h_bar) if second else (state.stages[s].w, state.stages[s].h))
        wp, hp = detached(w, second), detached(h, second)
        value = learners[k].loss(arch, wp, hp, val[k])
        grads = grad(weight * value, arch + (wp + hp if second else []))
        hyper = [a + b for a, b in zip(hyper, grads[:len(arch)])]
        g_val[s] = (list(grads[len(arch):len(arch) + len(w)]), list(grads[len(arch) + len(w):]))
        val_loss.append(float(value.detach()))
    if second:
        hyper = _chain_terms(hyper, arch, losses, unrolled, g_val, coupling, cfg, lr)
    return hyper, val_loss


def _chain_terms(hyper: Tensors, arch: Tensors, losses: Sequence[StageLoss], unrolled: Sequence[UnrolledStage],
                 g_val: dict[int, tuple[Tensors, Tensors]], coupling: Coupling, cfg: EngineConfig,
                 lr: float) -> Tensors:
    """Adjoint recursion u_s = 1[s in F] g_s + J^T u_{s+1};  grad_A -= HVP_s((eta_W u_s, eta h_s))."""
    hvp = create_hvp(cfg.hvp)
    u: Tensors | None = None
    for s in reversed(range(len(unrolled))):
        g, h_adj = g_val.get(s, (None, None))
        if g is not None:
            u = g if u is None else [a + b for a, b in zip(u, g)]
        if u is None:
            continue  # nothing downstream depends on this stage
        w, h = unrolled[s].w, unrolled[s].h
        w_eta = lr * (coupling.w_scale() if s > 0 else 1.0)
        v_h = [lr * x for x in h_adj] if h_adj is not None else zeros_like(h)
        want_w = coupling.needs_w_hvp and s > 0
        d_arch, d_w = hvp(losses[s], arch, w, h, [w_eta * x for x in u], v_h, want_w, cfg.fd_eps)
        hyper = [a - b for a, b in zip(hyper, d_arch)]
        u = coupling.adjoint(u, d_w) if s > 0 else None
    return hyper


def _arch_step(state: SearchState, hyper: Tensors) -> None:
    for a, g in zip(state.arch, hyper):
        a.grad = g.detach().clone()
    state.arch_optimizer.step()
    state.arch_optimizer.zero_grad(set_to_none=True)


def commit(state: SearchState, grads: Callable[[int, Tensors, Tensors], tuple[Tensors, Tensors]],
           coupling: Coupling, cfg: EngineConfig, lr: float) -> None:
    """Step 5: the real updates, stage by stage: SGD (momentum, weight decay, gradient clipping)
    on the stage's own loss, then the coupling towards the previous stage's new weights."""
    prev: Tensors | None = None
    for s, stage in enumerate(state.stages):
        w = prev if (coupling.grad_at_prev and s > 0) else stage.w
        gw, gh = grads(s, w, stage.h)
        gw, gh = _clip(gw + gh, cfg.grad_clip, len(gw))
        new_w, stage.buf_w = _sgd(w, gw, stage.buf_w, cfg, lr)
        stage.h, stage.buf_h = _sgd(stage.h, gh, stage.buf_h, cfg, lr)
        stage.w = coupling.combine(new_w, w, prev) if s > 0 else new_w
        stage.w = detached(stage.w)
        prev = stage.w


def _clip(g: Tensors, max_norm: float | None, split: int) -> tuple[Tensors, Tensors]:
    if max_norm is not None:
        total = float(norm(g))
        if total > max_norm:
            g = [x * (max_norm / (total + 1e-6)) for x in g]
    return g[:split], g[split:]


def _sgd(p: Tensors, g: Tensors, buf: Tensors | None, cfg: EngineConfig, lr: float) -> tuple[Tensors, Tensors]:
    """torch.optim.SGD semantics: buf = momentum * buf + (g + wd * p); p = p - lr * buf."""
    d = [gi + cfg.weight_decay * pi for gi, pi in zip(g, p)]
    buf = d if buf is None else axpy(cfg.momentum, buf, d)
    return detached(axpy(-lr, buf, p)), detached(buf)


def validate_config(cfg: EngineConfig, num_learners: int, max_lr: float) -> None:
    """Refuse settings the engine cannot run, before any run directory is touched."""
    if cfg.order not in (1, 2):
        raise IlnasError(f"order must be 1 or 2, got {cfg.order}")
    if cfg.update_order not in ("alg1", "darts"):
        raise IlnasError(f"update_order must be 'alg1' or 'darts', got {cfg.update_order!r}")
    if cfg.lam < 0:
        raise IlnasError(f"lambda must be >= 0, got {cfg.lam}")
    create_hvp(cfg.hvp)
    create_coupling(cfg.coupling, max_lr, cfg.lam, 0.0, cfg.allow_unstable)
    for name, weights in (("train_weights", cfg.train_weights), ("val_weights", cfg.val_weights)):
        if weights is not None and len(weights) != num_learners:
            raise IlnasError(f"{name} has {len(weights)} entries for {num_learners} learners")
