"""Benchmark: images per second through the image-folder training pipeline, decoded by PIL in the
DataLoader workers (train.decode=workers) and on the device (train.decode=device), side by side in one run.

Writes a synthetic JPEG folder of ImageNet-sized photos (about 500x375, quality 90) to a temporary
directory, then takes one epoch of ImageNet-recipe batches (RandomResizedCrop 224, flip, colour jitter,
normalisation) onto the device with each pipeline. No network runs: this is the input pipeline's ceiling.

Run by hand:
    python bench/folder_pipeline.py                              # CPU, 2 workers
    python bench/folder_pipeline.py --device cuda --workers 8    # nvJPEG on the GPU
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ilnas.data.training import FolderData, Sharding


def write_photos(root: Path, images: int, classes: int = 4) -> None:
    """Smooth random fields with fine noise: JPEG sizes near real photos' (about 100 KB at 500x375)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        split = "val" if (i // classes) % 8 == 7 else "train"
        folder = root / split / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (375, 500) if i % 3 else (500, 333)
        coarse = rng.random((h // 25 + 2, w // 25 + 2, 3))
        field = np.kron(coarse, np.ones((25, 25, 1)))[:h, :w] * 200 + rng.random((h, w, 3)) * 55
        Image.fromarray(field.astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


def images_per_second(root: Path, decode: str, args: argparse.Namespace) -> float:
    device = torch.device(args.device)
    data = FolderData("bench", root, Sharding(args.batch_size, device=device), 224, True, args.workers, decode)
    for _ in data.epoch(0):  # warm-up: worker start, decoder and kernel initialisation
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, seen = time.perf_counter(), 0
    for x, _ in data.epoch(1):
        seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--root", type=Path, default=None, help="write (and keep) the folder here, not in a temp dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        write_photos(root, args.images)
        print(f"{args.images} JPEGs, batch {args.batch_size}, {args.workers} workers, device {args.device}")
        rates = {decode: images_per_second(root, decode, args) for decode in ("workers", "device")}
    for decode, rate in rates.items():
        print(f"decode={decode:8s} {rate:8.1f} images/s  ({rate / rates['workers']:.2f}x)")


if __name__ == "__main__":
    main()
