"""Benchmark: the dilated depthwise convolutions of the DARTS space, torch's route vs ilnas's, side by side.

For each shape (a supernet's dil_conv_3x3 / dil_conv_5x5 at the CPU and the paper's configurations, with
one and with two weight sets side by side), the time of a forward, of the input gradient and of a whole
forward + backward (input and weight gradients) through ``F.conv2d`` and through
ilnas's route (``ilnas.space.depthwise.routed_conv``), the best of ``--rounds`` rounds of ``--iters`` calls
each, and the ratio. The network takes the routes on CPUs only; ``--device cuda`` measures whether they would
pay there. Run by hand:
    OMP_NUM_THREADS=2 python bench/depthwise.py [--layout nchw|nhwc] [--threads N] [--device cuda]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ilnas.space.depthwise import route_for, routed_conv
from ilnas.threads import set_threads

SHAPES = [  # (batch, channels, side, kernel, stride): dilation 2, "same" padding
    (16, 8, 16, 3, 1), (16, 8, 16, 5, 1), (16, 16, 16, 5, 2), (16, 32, 4, 5, 1), (16, 64, 4, 3, 1),
    (24, 32, 16, 5, 2), (24, 64, 8, 3, 2), (64, 16, 32, 3, 1), (64, 16, 32, 5, 1), (64, 32, 32, 5, 2),
    (64, 64, 8, 5, 1),
]


def best_ms(fn: Callable[[], object], iters: int, rounds: int, dev: torch.device) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, (time.perf_counter() - t0) / iters * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=["nchw", "nhwc"], default="nhwc")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    set_threads(args.threads)
    dev = torch.device(args.device)
    fmt = torch.channels_last if args.layout == "nhwc" else torch.contiguous_format
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.layout}, {where}; ms (torch's / ilnas's = ratio)")
    print(f"{'N,C,HxW,k,stride':<20}{'forward':>22}{'input grad':>22}{'fwd+bwd':>22}")
    for n, c, side, k, stride in SHAPES:
        route = route_for(k, stride, k - 1, 2)
        x = torch.randn(n, c, side, side, device=dev).contiguous(memory_format=fmt).requires_grad_()
        w = torch.randn(c, 1, k, k, device=dev, requires_grad=True)
        routes = {"torch": lambda x, w: F.conv2d(x, w, None, stride, k - 1, 2, c),
                  "ilnas": lambda x, w: routed_conv(x, w, route, k - 1, 2)}
        upstream = torch.randn_like(routes["torch"](x, w))
        cells = []
        for measure in (lambda f: (lambda: f(x.detach(), w.detach())),
                        lambda f: (lambda: torch.autograd.grad(f(x, w.detach()), x, upstream)),
                        lambda f: (lambda: torch.autograd.grad(f(x, w), (x, w), upstream))):
            old, new = (best_ms(measure(routes[r]), args.iters, args.rounds, dev) for r in ("torch", "ilnas"))
            cells.append(f"{old:.3f}/{new:.3f}={old / new:.1f}x")
        print(f"{f'{n},{c},{side}x{side},{k},{stride}':<20}" + "".join(f"{cell:>22}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
