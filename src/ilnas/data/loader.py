"""Batches cut from in-memory uint8 splits, augmented and normalised on the device.

``BatchMaker`` serves the search: endless shuffled streams, each a pure function of its seed, so a
resumed run draws exactly the batches an uninterrupted one would. ``ShardedEpochs`` serves training:
DistributedSampler semantics (one global permutation per epoch, rank r takes every world-th index)
with every sample's augmentation drawn per epoch, so N ranks see the same images as one process.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ilnas.data import augment
from ilnas.data.tasks import Split, Task
from ilnas.errors import IlnasError
from ilnas.seeds import derive_seed

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchMaker:
    """Turns index sets of one split into normalised (x, y) batches on ``device``.

    Args:
        augment: crop (task.crop_padding) and flip (task.flip) as in the DARTS search.
        cutout: side of the cutout square (0: off), applied after normalisation.
    """

    def __init__(self, task: Task, split: Split, device: torch.device, dtype: torch.dtype, augment: bool,
                 cutout: int = 0):
        self.task, self.augment, self.cutout = task, augment, cutout
        self.x, self.y = split.x.to(device), split.y.to(device)
        self.mean = torch.tensor(task.mean, device=device, dtype=dtype)[None, :, None, None]
        self.std = torch.tensor(task.std, device=device, dtype=dtype)[None, :, None, None]
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.y)

    def draw(self, n: int, gen: torch.Generator) -> augment.AugmentParams:
        if not self.augment:
            return augment.AugmentParams()
        return augment.draw(n, tuple(self.x.shape[2:]), self.task.crop_padding, self.task.flip, self.cutout, gen)

    def batch(self, idx: torch.Tensor, params: augment.AugmentParams) -> Batch:
        idx = idx.to(self.x.device)
        x = augment.apply(self.x[idx].to(self.dtype) / 255.0, params, self.task.crop_padding)
        x = augment.apply_cutout((x - self.mean) / self.std, params, self.cutout)
        return x, self.y[idx]

    def stream(self, batch_size: int, seed: int, rank: int = 0, world: int = 1, skip: int = 0) -> Iterator[Batch]:
        """Endless shuffled batches of ``batch_size`` (reshuffled at every pass), determined by ``seed``. With
        ``world`` ranks, this rank's contiguous slice of each of those batches (``distributed.shard``'s), and
        only that slice is augmented: every rank draws the whole batch's indices and augmentation (cheap) from
        the same stream, so the slices are exactly those of one process's batches. ``skip``: the stream from
        its batch ``skip`` on (the first ones' draws made, their images left alone)."""
        if len(self) < batch_size:
            raise IlnasError(f"task {self.task.name} has {len(self)} images in a split, fewer than "
                             f"the batch size {batch_size}")
        share = batch_size // world
        mine = slice(rank * share, (rank + 1) * share)
        gen = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(len(self), generator=gen)
            for i in range(0, len(self) - batch_size + 1, batch_size):
                params = self.draw(batch_size, gen)
                if skip:
                    skip -= 1
                    continue
                yield self.batch(perm[i:i + batch_size][mine], params.take(mine))

    def ordered(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """Every image once (this rank's share: indices rank, rank + world, ...), unaugmented."""
        idx = torch.arange(rank, len(self), world)
        for i in range(0, len(idx), batch_size):
            yield self.batch(idx[i:i + batch_size], augment.AugmentParams())


class ShardedEpochs:
    """Training epochs over a BatchMaker for one rank of ``world``; ``batch_size`` is per rank."""

    def __init__(self, maker: BatchMaker, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 max_steps: int | None = None):
        self.maker, self.batch_size, self.seed, self.rank, self.world = maker, batch_size, seed, rank, world
        self.steps = len(maker) // (batch_size * world)
        if self.steps == 0:
            raise IlnasError(f"task {maker.task.name} has {len(maker)} training images, fewer than one "
                             f"global batch of {batch_size * world}")
        if max_steps is not None:
            self.steps = min(self.steps, max_steps)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The epoch's batches from step ``start`` on."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        perm = torch.randperm(len(self.maker), generator=gen)
        params = self.maker.draw(len(self.maker), gen)  # every sample's draw, whichever rank takes it
        mine = perm[:self.steps * self.batch_size * self.world][self.rank::self.world]
        for i in range(start, self.steps):
            idx = mine[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.maker.batch(idx, params.take(idx))
