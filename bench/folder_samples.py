"""Benchmark: the memory DataLoader workers copy from an image folder's sample list, for torchvision's list of
(path, label) tuples and for ilnas's packed arrays (``ilnas.data.folders.PackedSamples``), side by side.

ImageNet-sized: 1,281,167 samples with ImageNet-like paths (no files are read: each worker looks up the
samples of one epoch's share, as ImageFolder.__getitem__ does before it opens the file). The workers are
forked by a real DataLoader and kept alive (persistent workers) while their private memory is read from
/proc; the figure is what every worker holds of its own beyond the shared pages, after one epoch. Linux only.

Run by hand:
    python bench/folder_samples.py                  # 8 workers
    python bench/folder_samples.py --workers 16 --samples 200000
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch

from ilnas.data.folders import PackedSamples


class Lookups(torch.utils.data.Dataset):
    """Only the sample lookup of ImageFolder.__getitem__: path and label of item ``i``."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> int:
        path, label = self.samples[index]
        return label + len(path) * 0


def private_mb(pid: int) -> float:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return (fields["Private_Dirty"] + fields["Private_Clean"]) / 1024


def worker_pids() -> list[int]:
    me = os.getpid()
    return [int(c) for t in os.listdir(f"/proc/{me}/task")
            for c in Path(f"/proc/{me}/task/{t}/children").read_text().split()]


def measure(samples, workers: int, batch: int) -> tuple[float, float]:
    loader = torch.utils.data.DataLoader(Lookups(samples), batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=True)
    start = time.perf_counter()
    for _ in loader:
        pass
    seconds = time.perf_counter() - start
    pids = worker_pids()
    per_worker = sum(private_mb(p) for p in pids) / len(pids)
    del loader
    return per_worker, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_281_167)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: meant
    paths = [f"/datasets/imagenet/train/n{c:08d}/n{c:08d}_{i}.JPEG" for i, c in
             ((i, 1440764 + i % 1000) for i in range(args.samples))]
    listed = [(p, i % 1000) for i, p in enumerate(paths)]
    del paths
    variants = {"ImageFolder list": listed, "packed arrays": PackedSamples(listed)}
    print(f"{args.samples} samples, {args.workers} forked workers, one epoch of lookups each")
    print(f"{'samples':<18}{'private MB per worker':>24}{'epoch s':>10}")
    results = {}
    for name, samples in variants.items():
        results[name] = measure(samples, args.workers, args.batch)
        print(f"{name:<18}{results[name][0]:>24.1f}{results[name][1]:>10.2f}", flush=True)
    base, packed = results["ImageFolder list"][0], results["packed arrays"][0]
    print(f"the list costs {base - packed:.1f} MB more per worker ({base / packed:.1f}x); "
          f"{args.workers} workers: {(base - packed) * args.workers / 1024:.2f} GB")


if __name__ == "__main__":
    main()
