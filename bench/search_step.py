"""Benchmark: one search step of DARTS-1st, DARTS-2nd, MTL (K=2) and IL (K=2, M=2), side by side in one run.

Every framework runs the same engine on the same supernet and random batches (``ilnas.SupernetSearch``);
the table gives the time per step (median of ``--repeats`` after a warm-up) of each variant, its ratio to
this run's first variant's DARTS-2nd step, and on CUDA the peak memory. Variants: "eager" runs every pass
alone (``engine.batched_sets=1``), the others batch the independent passes of one task's stages (the
default); NCHW or NHWC activations (``Supernet(channels_last=...)``; NHWC is the CPU default); bf16 autocast
(``search.amp``); the dilated convolutions through torch's convolution or through their routes
(``ilnas.space.depthwise``: the CPU default, off on GPUs) on every device. ``--ops`` adds the operators one
step dispatches, a device-independent measure of what a launch-bound GPU step costs.
Run by hand:
    python bench/search_step.py                     # the CPU configuration: batch 16, C=8, 5 cells, 16x16, 1 channel
    python bench/search_step.py --device cuda --paper   # the paper's: batch 64, C=16, 8 cells, 32x32 RGB
    python bench/search_step.py --variants "NCHW eager" NCHW   # a subset of the variants (the first is the base)
Set OMP_NUM_THREADS (or --threads) to the cores you mean to use.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ilnas import SGD, EngineConfig, SpaceConfig, SupernetSearch
from ilnas.space import depthwise, grouped
from ilnas.threads import set_threads

DEFAULT_ROUTE_DEVICES = depthwise.ROUTE_DEVICES

FRAMEWORKS = {  # name: (tasks, rounds, engine)
    "DARTS-1st": (1, 1, EngineConfig(order=1, coupling="none")),
    "DARTS-2nd": (1, 1, EngineConfig(order=2, coupling="none")),
    "MTL (K=2)": (2, 1, EngineConfig(order=2, coupling="none")),
    "IL (K=2, M=2)": (2, 2, EngineConfig(order=2, coupling="prox", lam=100.0)),
}
VARIANTS = {"NCHW eager": {"channels_last": False, "batched_sets": 1},
            "NHWC eager": {"channels_last": True, "batched_sets": 1},
            "NCHW": {"channels_last": False}, "NHWC": {"channels_last": True},
            "NHWC bf16": {"channels_last": True, "amp": True},
            # the dilated convolutions through torch's own convolution everywhere, or through their routes
            # (ilnas.space.depthwise, the CPU default) on every device
            "NHWC torch-dilated": {"channels_last": True, "route_devices": ()},
            "NHWC routed-dilated": {"channels_last": True, "route_devices": ("cpu", "cuda")},
            # every edge of a cell called alone (ilnas.space.grouped: the edges that read one state together)
            "NHWC edge-by-edge": {"channels_last": True, "group_edges": False},
            "NCHW edge-by-edge": {"channels_last": False, "group_edges": False}}


def step_time(name: str, args: argparse.Namespace, variant: dict) -> tuple[float, float | None]:
    tasks, rounds, engine = FRAMEWORKS[name]
    variant = dict(variant)
    engine = dataclasses.replace(engine, batched_sets=variant.pop("batched_sets", engine.batched_sets))
    depthwise.ROUTE_DEVICES = variant.pop("route_devices", DEFAULT_ROUTE_DEVICES)
    grouped.GROUP_EDGES = variant.pop("group_edges", True)
    dev = torch.device(args.device)
    in_ch, c, layers, side, batch = (3, 16, 8, 32, 64) if args.paper else (1, 8, 5, 16, 16)
    gen = torch.Generator().manual_seed(0)
    heads = {f"task{k}": (lambda width: nn.Linear(width, 10)) for k in range(tasks)}
    search = SupernetSearch(heads, in_ch, space=SpaceConfig(channels=c, layers=layers), rounds=rounds,
                            engine=engine, sgd=SGD(lr=0.025, momentum=0.9, weight_decay=3e-4), device=dev,
                            **variant)

    def batches() -> dict:
        return {t: (torch.randn(batch, in_ch, side, side, generator=gen).to(dev),
                    torch.randint(0, 10, (batch,), generator=gen).to(dev)) for t in heads}
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(args.repeats + 1):  # the first is a warm-up
        train, val = batches(), batches()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        search.step(train, val)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    ops = None
    if args.ops:
        train, val = batches(), batches()
        with OpCount() as count:
            search.step(train, val)
        ops = count.ops
    return statistics.median(times), peak, ops


class OpCount(TorchDispatchMode):
    """Operators dispatched that do work (views and allocations left out): what a GPU launches, one or
    more kernels each, and so what a launch-bound step's time follows."""

    NO_WORK = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
               "lift_fresh", "set_", "resize_", "_local_scalar_dense"}

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in self.NO_WORK:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--paper", action="store_true", help="the paper's search configuration (for a GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ops", action="store_true", help="also count the operators one step dispatches (thousands)")
    p.add_argument("--only", nargs="*", choices=list(FRAMEWORKS), help="a subset of the frameworks")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                   help="a subset of the variants (the first is the ratios' base)")
    a = p.parse_args()
    threads = set_threads(a.threads)
    print(f"device {a.device}, {threads} CPU thread(s), {'paper' if a.paper else 'CPU'} configuration, "
          f"median of {a.repeats} steps; 'x D2' = seconds / this run's {a.variants[0]} DARTS-2nd step")
    rows: dict[str, list] = {}
    for name in a.only or FRAMEWORKS:
        for v in a.variants:  # each figure as it comes: a run cut short by a time limit keeps what it measured
            rows.setdefault(name, []).append(step_time(name, a, VARIANTS[v]))
            seconds, peak, ops = rows[name][-1]
            print(f"  {name}, {v}: {seconds:.3f} s/step" + (f", peak {peak:.2f} GiB" if peak is not None else "")
                  + (f", {ops / 1000:.1f}k operators" if ops is not None else ""), flush=True)
    base = rows["DARTS-2nd"][0][0] if "DARTS-2nd" in rows else None
    print(f"{'framework':<15} " + " ".join(f"{v + ' s':>12} {'x D2':>6}" for v in a.variants) + f" {'peak GiB':>16}"
          + (f" {'kops':>16}" if a.ops else ""))
    for name, cells in rows.items():
        times = " ".join(f"{t:>12.3f} {t / base if base else float('nan'):>6.2f}" for t, _, _ in cells)
        memory = "/".join(f"{peak:.2f}" for _, peak, _ in cells) if cells[0][1] is not None else "-"
        ops = " " + f"{'/'.join(f'{n / 1000:.1f}' for _, _, n in cells):>16}" if a.ops else ""
        print(f"{name:<15} {times} {memory:>16}{ops}")


if __name__ == "__main__":
    main()
