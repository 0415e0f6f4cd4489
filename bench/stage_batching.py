"""Benchmark: the S independent stage gradients of one search step (DESIGN Sec. 6), computed one
stage after another (what the engine does now) versus in one torch.func.vmap over stacked weights.

Prints both timings and their ratio, measured side by side in one run, and the largest difference
between the two results, for the stage gradients (weights and head) and for finite-difference-style
passes (the gradient of the architecture only). Run by hand:
    python bench/stage_batching.py [--device cuda] [--paper] [--stages 4]
(--paper: the paper's supernet, 8 cells, C=16, 32x32 RGB, batch 64; default: the demo's). NCHW only:
vmap cannot take channels_last activations.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.func import grad, vmap

from ilnas.search.task_net import FunctionalTaskNet, fresh_parameters
from ilnas.space.supernet import Supernet, init_arch


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--paper", action="store_true")
    p.add_argument("--stages", type=int, default=2, help="stages sharing one learner (M)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    dev = torch.device(a.device)
    in_ch, c, layers, size, batch = (3, 16, 8, 32, 64) if a.paper else (1, 8, 4, 16, 24)
    build = lambda: Supernet(in_ch, c, layers).to(dev)  # noqa: E731
    enc = build()
    head = nn.Linear(enc.out_features, 10).to(dev)
    net = FunctionalTaskNet(enc, head, 10)
    arch = [t.to(dev) for t in init_arch(8, generator=torch.Generator().manual_seed(0))]
    x, y = torch.randn(batch, in_ch, size, size, device=dev), torch.randint(0, 10, (batch,), device=dev)
    ws = [fresh_parameters(build, i) for i in range(a.stages)]
    hs = [fresh_parameters(lambda: nn.Linear(enc.out_features, 10).to(dev), 100 + i) for i in range(a.stages)]

    def loss(a, w, h):
        return net.loss(a, w, h, (x, y))

    def sequential(weights: bool):
        out = []
        for w, h in zip(ws, hs):
            wp, hp = [t.detach().requires_grad_(weights) for t in w], [t.detach().requires_grad_(weights) for t in h]
            ap = [t.detach().requires_grad_(not weights) for t in arch]
            out.append(torch.autograd.grad(loss(ap, wp, hp), wp + hp if weights else ap))
        return out

    w_stacked = [torch.stack(t) for t in zip(*ws)]
    h_stacked = [torch.stack(t) for t in zip(*hs)]
    batched = {True: vmap(lambda w, h: grad(loss, argnums=(1, 2))(arch, w, h)),
               False: vmap(lambda w, h: grad(loss, argnums=0)(arch, w, h))}
    print(f"device {dev}, {'paper' if a.paper else 'demo'} supernet ({layers} cells, C={c}, {size}x{size}, "
          f"batch {batch}), {a.stages} weight sets")
    for weights, label in ((True, "stage gradients (W, H)"), (False, "architecture-only passes")):
        seq, vm = sequential(weights), batched[weights](w_stacked, h_stacked)
        flat = [t for part in vm for t in part] if weights else list(vm)
        diff = max(float((seq[s][i] - flat[i][s]).abs().max()) for s in range(a.stages) for i in range(len(flat)))
        t_seq = timed(lambda: sequential(weights), a.repeats, dev)
        t_vm = timed(lambda: batched[weights](w_stacked, h_stacked), a.repeats, dev)
        print(f"{label:<26} sequential {t_seq * 1e3:8.1f} ms   vmap {t_vm * 1e3:8.1f} ms   "
              f"speed-up {t_seq / t_vm:.2f}x   max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
