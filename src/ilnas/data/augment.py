"""Batched image augmentation on the device: crop, flip and cutout for a whole batch in one op each.

Random draws are separated from their application, so a pipeline can draw the parameters of every
sample of an epoch at once (then sample i is augmented the same way whatever rank or batch it lands
in) or draw them per batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample draws; each field is (N,) or None when that augmentation is off."""

    oy: torch.Tensor | None = None  # crop offsets in [0, 2 * padding]
    ox: torch.Tensor | None = None
    flip: torch.Tensor | None = None  # bool
    cy: torch.Tensor | None = None  # cutout centres in [0, H), [0, W)
    cx: torch.Tensor | None = None

    def take(self, idx: torch.Tensor) -> "AugmentParams":
        return AugmentParams(*(None if t is None else t[idx] for t in (self.oy, self.ox, self.flip, self.cy, self.cx)))


def draw(n: int, size: tuple[int, int], padding: int, flip: bool, cutout: int,
         gen: torch.Generator) -> AugmentParams:
    h, w = size
    off = (lambda: torch.randint(0, 2 * padding + 1, (n,), generator=gen)) if padding else (lambda: None)
    return AugmentParams(
        oy=off(), ox=off(),
        flip=(torch.rand(n, generator=gen) < 0.5) if flip else None,
        cy=torch.randint(0, h, (n,), generator=gen) if cutout else None,
        cx=torch.randint(0, w, (n,), generator=gen) if cutout else None,
    )


def crop(x: torch.Tensor, padding: int, oy: torch.Tensor, ox: torch.Tensor) -> torch.Tensor:
    """Per-sample window of the zero-padded batch (N, C, H, W), in one gather."""
    n, c, h, w = x.shape
    dev = x.device
    xp = F.pad(x, (padding,) * 4)
    rows = (oy.to(dev)[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (N, 1, H, 1)
    cols = (ox.to(dev)[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (N, 1, 1, W)
    return xp[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
              rows, cols]


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)


def cutout(x: torch.Tensor, size: int, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """Zero a size x size square centred at (cy, cx), clipped at the border (DeVries & Taylor, 2017)."""
    _, _, h, w = x.shape
    dev = x.device
    r = torch.arange(h, device=dev)[None, :]
    c = torch.arange(w, device=dev)[None, :]
    in_rows = (r >= (cy.to(dev)[:, None] - size // 2)) & (r < (cy.to(dev)[:, None] + size - size // 2))  # (N, H)
    in_cols = (c >= (cx.to(dev)[:, None] - size // 2)) & (c < (cx.to(dev)[:, None] + size - size // 2))  # (N, W)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(hole, 0.0)


def apply(x: torch.Tensor, p: AugmentParams, padding: int) -> torch.Tensor:
    """Crop and flip ``x`` in [0, 1]; cutout belongs after normalisation (``apply_cutout``)."""
    if p.oy is not None:
        x = crop(x, padding, p.oy, p.ox)
    if p.flip is not None:
        x = flip(x, p.flip)
    return x


def apply_cutout(x: torch.Tensor, p: AugmentParams, size: int) -> torch.Tensor:
    return cutout(x, size, p.cy, p.cx) if p.cy is not None else x
