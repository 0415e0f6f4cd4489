"""Benchmark: one re-training step (forward, auxiliary loss, backward, SGD) of an evaluation network, with
NCHW and NHWC activations side by side in one run, and on CUDA also with bf16 autocast.

Run by hand:
    python bench/train_step.py                        # CPU: DARTS_V2, 8 cells, C=16, batch 32, 32x32
    python bench/train_step.py --device cuda --paper  # DARTS_V2, 20 cells, C=36, batch 96 (the CIFAR recipe)
    python bench/train_step.py --compile inductor inductor:reduce-overhead   # plus torch.compile (train.compile)
Prints seconds per step and images per second for each variant as it is measured, the speed-up over NCHW
fp32 and on CUDA the peak memory. A compiled variant (NHWC, bf16 on CUDA) also prints its first step, the compilation.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from ilnas import create_model
from ilnas.threads import set_threads


def step_time(args: argparse.Namespace, channels_last: bool, bf16: bool, compile_spec: str | None = None
              ) -> tuple[float, float, float | None]:
    """(median seconds per step, seconds of the first step, peak GiB on CUDA). ``compile_spec``: backend[:mode]
    (train.compile)."""
    dev = torch.device(args.device)
    layers, channels, batch = (20, 36, 96) if args.paper else (8, 16, 32)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(args.genotype, 10, layers=layers, channels=channels, auxiliary=True).to(dev, memory_format=fmt)
    warmups = 1
    if compile_spec is not None:
        backend, _, mode = compile_spec.partition(":")
        model.compile(backend=backend, mode=mode or None)
        warmups = 3  # compilation, then CUDA graphs' recording under reduce-overhead
    opt = torch.optim.SGD(model.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    x = torch.randn(batch, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    rate = torch.tensor(0.1, device=dev)  # a tensor, as the recipe passes it
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(args.repeats + warmups):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with autocast:
            logits, aux = model(x, drop_path_rate=rate)
            loss = F.cross_entropy(logits.float(), y) + 0.4 * F.cross_entropy(aux.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return statistics.median(times[warmups:]), times[0], peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--paper", action="store_true", help="the CIFAR recipe's network and batch (for a GPU)")
    p.add_argument("--genotype", default="DARTS_V2")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", nargs="*", default=[], metavar="BACKEND[:MODE]",
                   help="compiled variants to add, e.g. inductor inductor:reduce-overhead")
    a = p.parse_args()
    threads = set_threads(a.threads)
    batch = 96 if a.paper else 32
    cuda = a.device.startswith("cuda")
    variants = {"NCHW fp32": (False, False, None), "NHWC fp32": (True, False, None)}
    if cuda:
        variants["NHWC bf16"] = (True, True, None)
    for spec in a.compile:
        variants[f"NHWC {'bf16' if cuda else 'fp32'} {spec}"] = (True, cuda, spec)
    print(f"device {a.device}, {threads} CPU thread(s), {a.genotype}, batch {batch}, median of {a.repeats} steps",
          flush=True)
    base = None
    for name, flags in variants.items():
        seconds, first, peak = step_time(a, *flags)
        base = base or seconds
        memory = f"  peak {peak:.2f} GiB" if peak is not None else ""
        compiled = f"  (first step {first:.1f} s)" if flags[2] else ""
        print(f"{name:<10} {seconds:8.3f} s/step  {batch / seconds:8.0f} images/s  speed-up {base / seconds:.2f}x"
              f"{memory}{compiled}", flush=True)


if __name__ == "__main__":
    main()
