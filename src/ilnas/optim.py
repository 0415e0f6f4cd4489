"""The optimiser settings that search and re-training share, and their per-epoch learning rates.

Learning rates are computed per epoch explicitly (no scheduler objects to checkpoint). Nothing here
imports torch: configuration resolution uses these types without it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "linear", "step")
# The settings of its own that each schedule reads (lr_at); the others are the other schedules'.
SCHEDULE_SETTINGS = {"cosine": {"lr_min"}, "linear": {"warmup_epochs"}, "step": {"step_size", "gamma"}}


@dataclass(frozen=True)
class SGD:
    """SGD with momentum, weight decay and gradient-norm clipping, and its learning-rate schedule.

    Args:
        schedule: cosine (to lr_min) | linear (``warmup_epochs`` of linear warm-up, then linear decay
            to 0: the ImageNet recipe) | step (times ``gamma`` every ``step_size`` epochs).
        grad_clip: the largest gradient norm (None: no clipping).
    """

    lr: float = 0.025
    lr_min: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: int = 0
    step_size: int = 1
    gamma: float = 0.97
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float | None = 5.0

    def lr_at(self, epoch: int, epochs: int) -> float:
        """The learning rate of ``epoch`` (0-based) in a run of ``epochs``."""
        if self.schedule == "cosine":  # CosineAnnealingLR(T_max=epochs, eta_min=lr_min)
            return self.lr_min + (self.lr - self.lr_min) * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0
        if self.schedule == "linear":
            if epoch < self.warmup_epochs:
                return self.lr * (epoch + 1) / self.warmup_epochs
            return self.lr * (1.0 - epoch / epochs)
        return self.lr * self.gamma ** (epoch // self.step_size)  # StepLR


@dataclass(frozen=True)
class Adam:
    """The architecture optimiser (DARTS: lr 3e-4, betas (0.5, 0.999), weight decay 1e-3)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 1e-3
