"""Search-side schedules of the base methods."""
from __future__ import annotations

import math


def skip_dropout_rate(base: float, epoch: int, epochs: int, warmup: int, decay: float = 0.2) -> float:
    """P-DARTS skip-connect dropout within a phase, as in the official code: during the weight-only
    warm-up base * (epochs - epoch - 1) / epochs, afterwards base * exp(-(epoch - warmup) * decay)."""
    if epoch < warmup:
        return base * (epochs - epoch - 1) / epochs
    return base * math.exp(-(epoch - warmup) * decay)
