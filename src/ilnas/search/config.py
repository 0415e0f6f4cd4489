"""The engine's settings: how the stages are unrolled, coupled and differentiated. Free of torch, so
that configuration can be resolved and checked without it."""
from __future__ import annotations

from dataclasses import dataclass


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
