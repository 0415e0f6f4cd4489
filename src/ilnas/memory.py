"""A run's weights against the memory it may use, before any of them exist.

A supernet or network far too wide for the machine does not fail in one allocation: it is built one layer
at a time, each allocation succeeds, and the process grows until the kernel's out-of-memory killer ends it
(or the machine stalls in swap). So the recipes count the weights first, on the meta device, and refuse a
run whose weights alone, in the copies it certainly holds at once, exceed the memory of its device: on a CPU
the host's RAM and swap, capped by the limits of the process's cgroups (a container's ``--memory``); on CUDA
the device's total memory. Once the module is built, what one pass of the batch keeps for its backward is
added (measured on passes of two and four images). Only what certainly coexists is counted, so passing the
check promises nothing; failing it means the run cannot work.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ilnas.cgroups import CGROUP_ROOT, cgroup_folders
from ilnas.errors import IlnasError, allocation_failure

# cgroup v2 files, and cgroup v1's (under memory/), that hold a limit; "max" or a huge number: none
CGROUP_LIMITS = (("memory.max", "memory.swap.max"), ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"))


def parameter_count(build: Callable[[], nn.Module]) -> int:
    """The parameters of the module ``build()`` returns, built on the meta device: no memory, no random draws."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def _meminfo() -> dict[str, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split() for line in lines)
    return {f[0].rstrip(":"): int(f[1]) * 1024 for f in fields if len(f) >= 2 and f[1].isdigit()}


def _read_limit(path: Path) -> int | None:
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    return int(value) if value.isdigit() and int(value) < 2 ** 60 else None


def cgroup_limit(swap: int, root: Path = CGROUP_ROOT, membership: str | None = None) -> int | None:
    """The smallest memory limit of this process's cgroup and its ancestors (v2 or v1), swap included: the
    cgroup's own swap limit where it sets one, else ``swap`` (the host's); None without a limit.
    ``membership``: the text of /proc/self/cgroup."""
    limits = []
    for folder, v2 in cgroup_folders("memory", root, membership):
        ram_file, swap_file = CGROUP_LIMITS[0 if v2 else 1]
        ram, more = _read_limit(folder / ram_file), _read_limit(folder / swap_file)
        if ram is None:
            continue
        if v2:  # memory.swap.max is swap beside RAM
            limits.append(ram + (swap if more is None else more))
        else:  # memory.memsw.limit_in_bytes is RAM and swap together
            limits.append(ram + swap if more is None else more)
    return min(limits) if limits else None


def memory_total(device: torch.device) -> int | None:
    """The bytes a process may hold on ``device``, or None where that is not known (MPS, say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type != "cpu":
        return None
    info = _meminfo()
    swap = info.get("SwapTotal", 0)
    host = info["MemTotal"] + swap if "MemTotal" in info else _physical_memory()
    return min((b for b in (host, cgroup_limit(swap)) if b is not None), default=None)


def _physical_memory() -> int | None:
    """RAM where there is no /proc/meminfo (macOS, say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def require_memory(need: int, device: torch.device, what: str, settings: str) -> None:
    """Refuse a run whose ``what`` (the copies of its weights it must hold at once) take ``need`` bytes in each
    process, more than ``device`` has. On a CPU the ranks torchrun started on this machine share its memory."""
    total = memory_total(device)
    ranks = _local_ranks() if device.type == "cpu" else 1
    if total is not None and need * ranks > total:
        where = "this machine's memory" if device.type == "cpu" else f"the memory of {device}"
        each = f" in each of {ranks} ranks on this machine" if ranks > 1 else ""
        raise IlnasError(f"{what} take {need / 1e9:.1f} GB{each}, more than the {total / 1e9:.1f} GB of {where}; "
                         f"lower {settings}")


def _local_ranks() -> int:
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def require_fit(weights: str, weight_bytes: int, device: torch.device, settings: str, activations: int = 0,
                kept: str = "") -> None:
    """Refuse a run whose ``weights`` (their copies held at once, ``weight_bytes`` in all) and ``activations``
    (what its widest pass keeps for its backward, ``saved_activation_bytes``; 0: not yet known), that pass
    described by ``kept`` ("what one pass of 96 images keeps for its backward"), cannot fit on ``device``."""
    what = weights + (f" and {kept} ({activations / 1e9:.2f} GB)" if activations else " alone")
    require_memory(weight_bytes + activations, device, what, settings)


def require_search_memory(one: int, stages: int, device: torch.device, settings: str, activations: int = 0,
                          kept: str = "") -> None:
    """``require_fit`` for a search, ``one`` the bytes of one copy of its supernet's weights: every step holds the
    module's weights and, for each stage, its weights, their gradient and their virtual step (the engine's
    unroll), 1 + 3 * stages copies, while it takes its widest pass."""
    require_fit(f"the supernet's weights ({one / 1e9:.2f} GB a copy; the module's and, for each of {stages} "
                f"stage(s), its weights, gradient and virtual step at once)", (1 + 3 * stages) * one, device,
                settings, activations, kept)


MEASURED_SIDE = 64  # larger images are measured at this side, their activations scaled by their pixels


def saved_activation_bytes(forward: Callable[[int, int], object], batch: int, side: int) -> int:
    """The bytes autograd keeps for the backward of one forward pass of ``batch`` images of ``side`` x ``side``, from
    passes of two and of four images (``forward(n, s)``: n images of side s; BatchNorm in training mode needs two):
    half their difference is what each image adds (the weights a pass keeps are the same at any batch, and not
    counted). Images larger than MEASURED_SIDE are measured at that side and scaled by their pixels: every layer
    keeps its pixels times its channels (a stride-2 layer rounds its side up, the scaled bytes down; the few bytes
    an image that do not grow with it, its pooled features and logits, are scaled up: a supernet's come within a
    thousandth); measured at their own size, four images of 512x512 took the check itself past a 24 GB machine.
    A network that cannot take the smaller side (one of one's own, say) is measured at its own."""
    small = min(side, MEASURED_SIDE)
    try:
        each = _per_image(lambda n: forward(n, small))
    except Exception as e:
        if small == side or allocation_failure(e) is not None:
            raise
        each, small = _per_image(lambda n: forward(n, side)), side
    return each * batch * side * side // (small * small)


def _per_image(forward: Callable[[int], object]) -> int:
    return max(_saved_bytes(lambda: forward(4)) - _saved_bytes(lambda: forward(2)), 0) // 2


def _saved_bytes(forward: Callable[[], object]) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()  # views of one tensor share it: counted once
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())
