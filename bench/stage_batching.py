"""Benchmark: S independent passes of one learner's stages (docs/design.md, batched passes), three ways
side by side in one run: one stage after another (engine.batched_sets=1), one torch.func.vmap over stacked
weights, and the weight sets side by side along the channels in one grouped pass (``FunctionalTaskNet.losses``,
what the engine does by default).

Prints the timings, each one's speed-up over the sequential passes and the relative difference from them,
for the stage gradients (weights and head) and for finite-difference-style passes (the gradient of the
architecture only, summed over the sets as the engine sums them). Run by hand:
    python bench/stage_batching.py [--device cuda] [--paper] [--stages 4] [--channels-last]
(--paper: the paper's supernet, 8 cells, C=16, 32x32 RGB, batch 64; default: the demo's). vmap cannot take
channels_last activations, so --channels-last leaves it out.
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
    p.add_argument("--channels-last", action="store_true", help="NHWC activations (no vmap column)")
    a = p.parse_args()
    dev = torch.device(a.device)
    in_ch, c, layers, size, batch = (3, 16, 8, 32, 64) if a.paper else (1, 8, 4, 16, 24)
    build = lambda: Supernet(in_ch, c, layers, channels_last=a.channels_last).to(dev)  # noqa: E731
    enc = build()
    head = nn.Linear(enc.out_features, 10).to(dev)
    net = FunctionalTaskNet(enc, head, 10)
    arch = [t.to(dev) for t in init_arch(8, generator=torch.Generator().manual_seed(0))]
    gen = torch.Generator().manual_seed(0)  # the same batch every run: its rel diffs depend on it
    x = torch.randn(batch, in_ch, size, size, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
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

    def side_by_side(weights: bool) -> list[torch.Tensor]:
        """One grouped pass; per set (W, H) gradients, or the architecture gradient summed over the sets."""
        wp = [[t.detach().requires_grad_(weights) for t in w] for w in ws]
        hp = [[t.detach().requires_grad_(weights) for t in h] for h in hs]
        ap = [t.detach().requires_grad_(not weights) for t in arch]
        values = net.losses(ap, wp, hp, (x, y))
        return list(torch.autograd.grad(values.sum(), [t for w, h in zip(wp, hp) for t in w + h] if weights else ap))

    w_stacked = [torch.stack(t) for t in zip(*ws)]
    h_stacked = [torch.stack(t) for t in zip(*hs)]
    vmapped = {True: vmap(lambda w, h: grad(loss, argnums=(1, 2))(arch, w, h)),
               False: vmap(lambda w, h: grad(loss, argnums=0)(arch, w, h))}
    print(f"device {dev}, {'paper' if a.paper else 'demo'} supernet ({layers} cells, C={c}, {size}x{size}, "
          f"batch {batch}, {'NHWC' if a.channels_last else 'NCHW'}), {a.stages} weight sets")
    for weights, label in ((True, "stage gradients (W, H)"), (False, "architecture-only passes")):
        seq = sequential(weights)
        # the sequential results in the others' order: every set's tensors in turn, or the sum over sets
        expected = [t for part in seq for t in part] if weights else [sum(ts) for ts in zip(*seq)]
        t_seq = timed(lambda: sequential(weights), a.repeats, dev)
        row = f"{label:<26} sequential {t_seq * 1e3:8.1f} ms"
        if not a.channels_last:
            vm = vmapped[weights](w_stacked, h_stacked)
            per_set = [[t[s] for part in vm for t in part] for s in range(a.stages)] if weights else \
                [[t[s] for t in vm] for s in range(a.stages)]
            got = [t for part in per_set for t in part] if weights else [sum(ts) for ts in zip(*per_set)]
            t_vm = timed(lambda: vmapped[weights](w_stacked, h_stacked), a.repeats, dev)
            row += f"   vmap {t_vm * 1e3:8.1f} ms ({t_seq / t_vm:.2f}x, rel diff {rel_diff(got, expected):.1e})"
        got = side_by_side(weights)
        t_sets = timed(lambda: side_by_side(weights), a.repeats, dev)
        row += f"   sets {t_sets * 1e3:8.1f} ms ({t_seq / t_sets:.2f}x, rel diff {rel_diff(got, expected):.1e})"
        print(row)


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all the tensors. (Per tensor, float32 gradients that nearly cancel, or that a
    max-pool routes by a near-tie, differ by up to 1e-1 between any two summation orders, NCHW and NHWC
    one pass per set included; float64 agrees to 1e-14, tests/test_batched.py.)"""
    return float(torch.cat([(x - y).flatten() for x, y in zip(a, b)]).norm() / torch.cat([y.flatten() for y in b]).norm())


if __name__ == "__main__":
    main()
