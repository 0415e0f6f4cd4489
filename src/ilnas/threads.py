"""CPU threads: how many a run's torch operations use (``search.threads`` / ``train.threads``).

More OpenMP threads than cores make a search step many times slower, not faster, so the default is what the
environment grants: ``OMP_NUM_THREADS`` when set (``ilnas sweep`` and ``torchrun`` set it to divide the
cores between processes), else every core this process may run on.
"""
from __future__ import annotations

import os

MAX_THREADS = 4096  # torch takes a C int; no machine has more cores than this


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and 0 < int(value) <= MAX_THREADS else available_cores()


def set_threads(threads: int | None) -> int:
    """Use ``threads`` (None: ``default_threads()``) for torch's intra-op parallelism; returns the number."""
    import torch

    n = threads or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
