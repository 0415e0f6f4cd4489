"""The engine's settings: how the stages are unrolled, coupled and differentiated. Free of torch, so
that configuration can be resolved and checked without it (``ilnas config`` and a refused setting answer
before torch has loaded)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ilnas.errors import IlnasError

HVP_METHODS = ("exact", "fd")  # the mixed Hessian-vector products hvp.py implements
COUPLING_MODES = ("none", "prox", "gd", "copy")  # the couplings coupling.py implements
MAX_COUPLING = 1e30  # 2 * lr * lambda past this overflows a float32 scalar of the step (~3e38)
ALL_ZERO = {"train_weights": "the stages' training losses would be 0, so no weights would train",
            "val_weights": "the architecture's objective would be 0, so nothing would search it"}


@dataclass(frozen=True)
class EngineConfig:
    """Args:
        order: 1 drops the Hessian terms (first-order DARTS), 2 differentiates the unrolled chain.
        hvp: fd (central differences, eps / ||v||) | exact (double backward).
        coupling, lam: how a stage is pulled towards the previous one: prox | gd | copy | none (coupling.py).
        allow_unstable: run coupling gd even where 2 * lr * lam >= 1 (it overshoots).
        update_order: alg1 commits the unrolled weights of the step (paper Algorithm 1); darts updates
            A first, then recomputes the weight step at the new A (official DARTS).
        virtual_momentum: momentum and weight decay enter the virtual step (official DARTS).
        train_weights, val_weights: per-learner loss weights (beta and alpha of Eq. 10; None: all 1).
        batched_sets: at most this many weight sets of one learner evaluated side by side in one pass: the
            stage gradients of its stages, and their finite-difference passes (two per stage), which do not
            depend on each other (every coupling but copy). The same numbers as one pass per set, in fewer,
            larger passes; activation memory grows with the sets of a pass. 1: every pass alone.
    """

    order: int = 2
    hvp: str = "fd"
    fd_eps: float = 0.01
    coupling: str = "prox"
    lam: float = 100.0
    allow_unstable: bool = False
    update_order: str = "alg1"
    virtual_momentum: bool = True
    train_weights: tuple[float, ...] | None = None
    val_weights: tuple[float, ...] | None = None
    batched_sets: int = 8


def check_coupling(name: str, lr: float, lam: float, allow_unstable: bool = False) -> None:
    """Refuse a coupling that is unknown or would not run stably at learning rate ``lr`` and ``lam``."""
    if name not in COUPLING_MODES:
        raise IlnasError(f"unknown coupling {name!r}; choose from {', '.join(COUPLING_MODES)}")
    c = 2.0 * lr * lam
    if name in ("prox", "gd") and c > MAX_COUPLING:
        raise IlnasError(f"coupling {name!r} with 2*lr*lambda = {c:g} overflows float32 arithmetic; "
                         f"for the lambda -> infinity limit use coupling=copy")
    if name == "gd" and c >= 1.0 and not allow_unstable:
        raise IlnasError(f"coupling 'gd' with 2*lr*lambda = {c:g} >= 1 overshoots and diverges; "
                         f"use coupling=prox, a smaller lambda, or allow_unstable=true")


def validate_config(cfg: EngineConfig, num_learners: int, max_lr: float) -> None:
    """Refuse settings the engine cannot run, before any run directory is touched."""
    if cfg.order not in (1, 2):
        raise IlnasError(f"engine.order must be 1 or 2, got {cfg.order}")
    if cfg.update_order not in ("alg1", "darts"):
        raise IlnasError(f"engine.update_order must be alg1 or darts, got {cfg.update_order!r}")
    # the comparisons are written so that NaN (which the Python API can pass; the CLI refuses it) fails them
    if not cfg.lam >= 0:
        raise IlnasError(f"engine.lam (lambda) must be >= 0, got {cfg.lam}")
    if not cfg.fd_eps > 0:
        raise IlnasError(f"engine.fd_eps must be positive, got {cfg.fd_eps}")
    if not math.isfinite(max_lr) or max_lr <= 0:
        raise IlnasError(f"the learning rate must be a positive number, got {max_lr}")
    if isinstance(cfg.batched_sets, bool) or not isinstance(cfg.batched_sets, int) or cfg.batched_sets < 1:
        raise IlnasError(f"engine.batched_sets must be an integer >= 1, got {cfg.batched_sets!r}")
    if cfg.hvp not in HVP_METHODS:
        raise IlnasError(f"unknown hvp {cfg.hvp!r}; choose from {', '.join(HVP_METHODS)}")
    check_coupling(cfg.coupling, max_lr, cfg.lam, cfg.allow_unstable)
    for name in ("train_weights", "val_weights"):
        weights = getattr(cfg, name)
        if weights is not None and len(weights) != num_learners:
            raise IlnasError(f"engine.{name} has {len(weights)} entries for {num_learners} learners")
        if any(not x >= 0 for x in weights or ()):
            raise IlnasError(f"engine.{name} must be >= 0, got {list(weights)}")
        if weights is not None and not any(weights):  # a zero objective: nothing would train (or search) at all
            raise IlnasError(f"engine.{name} are all 0: {ALL_ZERO[name]}; give at least one learner a positive "
                             f"weight")
