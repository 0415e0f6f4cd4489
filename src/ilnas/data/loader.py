"""Batches cut from in-memory uint8 splits, augmented and normalised on the device in one op each.

A stream is a pure function of its seed: the search seeds each (epoch, task, split) stream itself,
so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from ilnas.data.tasks import Split, Task
from ilnas.errors import IlnasError

Batch = tuple[torch.Tensor, torch.Tensor]


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of a zero-padded batch (N, C, H, W), in one gather."""
    n, c, h, w = x.shape
    xp = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (n, 1), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (n, 1), generator=gen).to(x.device)
    rows = (oy + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (ox + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, x.flip(-1), x)


class BatchMaker:
    """Turns index sets of one task split into normalised (x, y) batches on ``device``."""

    def __init__(self, task: Task, split: Split, device: torch.device, dtype: torch.dtype, augment: bool):
        self.task, self.augment = task, augment
        self.x, self.y = split.x.to(device), split.y.to(device)
        self.mean = torch.tensor(task.mean, device=device, dtype=dtype)[None, :, None, None]
        self.std = torch.tensor(task.std, device=device, dtype=dtype)[None, :, None, None]
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor, gen: torch.Generator) -> Batch:
        idx = idx.to(self.x.device)
        x = self.x[idx].to(self.dtype) / 255.0
        if self.augment and self.task.crop_padding:
            x = random_crop(x, self.task.crop_padding, gen)
        if self.augment and self.task.flip:
            x = random_flip(x, gen)
        return (x - self.mean) / self.std, self.y[idx]

    def stream(self, batch_size: int, seed: int) -> Iterator[Batch]:
        """Endless shuffled batches (reshuffled at every pass), determined by ``seed``."""
        if len(self) < batch_size:
            raise IlnasError(f"task {self.task.name} has {len(self)} images in a split, fewer than "
                             f"the batch size {batch_size}")
        gen = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(len(self), generator=gen)
            for i in range(0, len(self) - batch_size + 1, batch_size):
                yield self.batch(perm[i:i + batch_size], gen)

    def ordered(self, batch_size: int) -> Iterator[Batch]:
        """Every image once, in order, without augmentation (evaluation)."""
        gen = torch.Generator()
        for i in range(0, len(self), batch_size):
            yield self.batch(torch.arange(i, min(i + batch_size, len(self))), gen)
