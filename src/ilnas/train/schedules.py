"""Learning-rate schedules, computed per epoch explicitly (no scheduler objects to checkpoint)."""
from __future__ import annotations

import math

from ilnas.errors import IlnasError


def cosine(epoch: int, epochs: int, lr: float, lr_min: float = 0.0) -> float:
    """CosineAnnealingLR(T_max=epochs, eta_min=lr_min) at ``epoch`` (DARTS search and CIFAR training)."""
    return lr_min + (lr - lr_min) * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0


def linear_warmup(epoch: int, epochs: int, lr: float, warmup: int) -> float:
    """lr * (e + 1) / warmup for the first ``warmup`` epochs, then lr * (1 - e / epochs) (ImageNet recipe)."""
    if epoch < warmup:
        return lr * (epoch + 1) / warmup
    return lr * (1.0 - epoch / epochs)


def step(epoch: int, lr: float, step_size: int, gamma: float) -> float:
    """StepLR: lr * gamma ** (epoch // step_size) (official DARTS ImageNet: step 1, gamma 0.97)."""
    return lr * gamma ** (epoch // step_size)


def learning_rate(schedule: str, epoch: int, epochs: int, lr: float, lr_min: float = 0.0, warmup: int = 0,
                  step_size: int = 1, gamma: float = 0.97) -> float:
    if schedule == "cosine":
        return cosine(epoch, epochs, lr, lr_min)
    if schedule == "linear":
        return linear_warmup(epoch, epochs, lr, warmup)
    if schedule == "step":
        return step(epoch, lr, step_size, gamma)
    raise IlnasError(f"unknown schedule {schedule!r}; choose cosine, linear or step")
