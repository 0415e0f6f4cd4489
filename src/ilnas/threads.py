"""CPU threads: how many a run's torch operations use (``search.threads`` / ``train.threads``).

More OpenMP threads than cores make a search step many times slower, not faster, so the default is what the
environment grants: ``OMP_NUM_THREADS`` when set (``ilnas sweep`` and ``torchrun`` set it to divide the
cores between processes), else every core this process may run on: those of its CPU affinity, no more than
its cgroup's CPU quota allows (``docker run --cpus=4`` on a 64-core host grants 4, where the affinity shows 64).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from ilnas.cgroups import CGROUP_ROOT, cgroup_folders
from ilnas.ranks import is_main_rank

MAX_THREADS = 4096  # torch takes a C int; no machine has more cores than this


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by its cgroup's CPU quota (rounded up)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1, min(affinity, math.ceil(quota))) if quota else affinity


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, membership: str | None = None) -> float | None:
    """The fewest CPUs' worth of time a cgroup on this process's path up grants it per period (v2 ``cpu.max``:
    "QUOTA PERIOD" or "max PERIOD"; v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, -1: none); None without
    a quota. ``membership``: the text of /proc/self/cgroup."""
    quotas = []
    for folder, v2 in cgroup_folders("cpu", root, membership):
        try:
            if v2:
                quota, period = (folder / "cpu.max").read_text().split()[:2]
            else:
                quota, period = ((folder / name).read_text().strip() for name in ("cpu.cfs_quota_us",
                                                                                 "cpu.cfs_period_us"))
            if int(quota) > 0 and int(period) > 0:
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):  # absent, "max" (no quota), or unreadable
            continue
    return min(quotas) if quotas else None


def default_threads() -> int:
    """``OMP_NUM_THREADS`` where set to a count (its first level where it lists nested ones, "4,2"), else the
    cores available."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and 0 < int(value) <= MAX_THREADS else available_cores()


def set_threads(threads: int | None, setting: str = "threads") -> int:
    """Use ``threads`` (None: ``default_threads()``) for torch's intra-op parallelism; returns the number. More than
    the cores available are used as asked, with a warning that names where they were asked for (``setting``, or
    OMP_NUM_THREADS): such a run is slow, not wrong, and a run copied to a smaller machine should still start."""
    import torch

    n = threads or default_threads()
    cores = available_cores()
    if n > cores and is_main_rank():  # every rank of a job on the machine alike: one says so
        asked = f"{setting}={threads}" if threads else f"OMP_NUM_THREADS={n}"
        logging.getLogger("ilnas").warning(f"{asked} is more than the {cores} core(s) this process may run on: "
                                           f"OpenMP threads beyond the cores make each step many times slower")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
