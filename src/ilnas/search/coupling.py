"""How a stage's unrolled weights are tied to the previous stage's (docs/design.md Sec. 3, paper Eq. 7).

Every mode maps ``stepped`` = W_s - eta * (G_s + ...) and the previous stage's W_prev to W_bar_s, and
says how the chain is differentiated: ``w_scale`` multiplies eta in the W-part of the stage's mixed
Hessian-vector product, ``adjoint`` carries the adjoint u_s back to stage s-1 (J^T u).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ilnas.search.config import check_coupling
from ilnas.search.tensors import Tensors, axpy, scale, sub


@dataclass(frozen=True)
class Coupling:
    """Args: lr (eta), lam (lambda), virtual_wd (the weight decay inside the virtual step).

    Facts of the mode (class attributes, so that a coupling built directly is as right as one from
    ``create_coupling``): ``grad_at_prev``, the stage gradient is taken at W_prev instead of at W_s;
    ``needs_w_hvp``, J contains a Hessian, so the adjoint needs the W-part of the HVP.
    """

    grad_at_prev: ClassVar[bool] = False
    needs_w_hvp: ClassVar[bool] = False

    lr: float
    lam: float
    virtual_wd: float = 0.0

    def combine(self, stepped: Tensors, own: Tensors, prev: Tensors) -> Tensors:
        return stepped

    def w_scale(self) -> float:
        return 1.0

    def adjoint(self, u: Tensors, hvp_w: Tensors | None) -> Tensors | None:
        """J^T u, or None when no adjoint flows back (J = 0)."""
        return None


class NoCoupling(Coupling):
    """lambda = 0: the stages are independent (with one round, the MTL baseline, Eq. 10)."""


class ProxCoupling(Coupling):
    """Exact minimiser of the linearised stage problem: (stepped + 2 eta lam W_prev) / (1 + 2 eta lam)."""

    @property
    def c(self) -> float:
        return 2.0 * self.lr * self.lam

    def combine(self, stepped: Tensors, own: Tensors, prev: Tensors) -> Tensors:
        return scale(1.0 / (1.0 + self.c), axpy(self.c, prev, stepped))

    def w_scale(self) -> float:
        return 1.0 / (1.0 + self.c)

    def adjoint(self, u: Tensors, hvp_w: Tensors | None) -> Tensors:
        return scale(self.c / (1.0 + self.c), u)


class GradientCoupling(Coupling):
    """The paper's Eq. 7 literally: one gradient step on lam * ||W - W_prev||^2 as well; J = 2 eta lam."""

    def combine(self, stepped: Tensors, own: Tensors, prev: Tensors) -> Tensors:
        c = 2.0 * self.lr * self.lam
        return axpy(-c, sub(own, prev), stepped)

    def adjoint(self, u: Tensors, hvp_w: Tensors | None) -> Tensors:
        return scale(2.0 * self.lr * self.lam, u)


class CopyCoupling(Coupling):
    """lam -> infinity: each stage starts from the previous stage's weights; J = (1 - eta wd) I - eta H_WW."""

    grad_at_prev: ClassVar[bool] = True
    needs_w_hvp: ClassVar[bool] = True

    def adjoint(self, u: Tensors, hvp_w: Tensors | None) -> Tensors:
        return axpy(-1.0, hvp_w, scale(1.0 - self.lr * self.virtual_wd, u))


# one class for each of config.COUPLING_MODES, which configuration checks without importing this module
COUPLINGS: dict[str, type[Coupling]] = {"none": NoCoupling, "prox": ProxCoupling, "gd": GradientCoupling,
                                        "copy": CopyCoupling}


def create_coupling(name: str, lr: float, lam: float, virtual_wd: float = 0.0,
                    allow_unstable: bool = False) -> Coupling:
    check_coupling(name, lr, lam, allow_unstable)
    return COUPLINGS[name](lr=lr, lam=lam, virtual_wd=virtual_wd)
