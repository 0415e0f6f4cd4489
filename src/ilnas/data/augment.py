"""Batched image augmentation on the device: crop, flip, cutout and colour jitter for a whole batch at once.

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

    def take(self, idx: torch.Tensor | slice) -> "AugmentParams":
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


# --- colour jitter: torchvision's ColorJitter with every image's own factors and order -----------------

JITTER = (0.4, 0.4, 0.4, 0.2)  # brightness, contrast, saturation, hue: the DARTS ImageNet recipe's strengths
GRAY = (0.2989, 0.587, 0.114)  # the luma weights of torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class JitterParams:
    factors: torch.Tensor  # (N, 4): brightness, contrast, saturation in [1 - s, 1 + s]; hue shift in [-s, s]
    order: torch.Tensor  # (N, 4): each image's permutation of the four adjustments


def draw_jitter(n: int, gen: torch.Generator, strength: tuple[float, ...] = JITTER) -> JitterParams:
    s = torch.tensor(strength, dtype=torch.float32)
    low = torch.cat([(1 - s[:3]).clamp(min=0), -s[3:]])
    high = torch.cat([1 + s[:3], s[3:]])
    factors = low + (high - low) * torch.rand(n, 4, generator=gen)
    order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1)
    return JitterParams(factors, order)


def _gray(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(GRAY, device=x.device, dtype=x.dtype)[:, None, None]
    return (x * weights).sum(-3, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor[:, None, None, None]
    return (f * x + (1 - f) * other).clamp(0, 1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, hue + shift (mod 1), -> RGB, per image."""
    r, g, b = x.unbind(-3)
    value, low = x.amax(-3), x.amin(-3)
    chroma = value - low
    grey = chroma == 0
    saturation = chroma / torch.where(grey, torch.ones_like(value), value)
    c = torch.where(grey, torch.ones_like(chroma), chroma)
    rc, gc, bc = (value - r) / c, (value - g) / c, (value - b) / c
    hue = torch.where(value == r, bc - gc, torch.where(value == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    hue = torch.remainder(hue / 6.0 + 1.0 + shift[:, None, None], 1.0)
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    sector = sector.long() % 6
    p = (value * (1 - saturation)).clamp(0, 1)
    q = (value * (1 - saturation * frac)).clamp(0, 1)
    t = (value * (1 - saturation * (1 - frac))).clamp(0, 1)
    table = torch.stack([value, q, p, t])  # each channel picks one of these by sector
    picks = torch.tensor([[0, 1, 2, 2, 3, 0], [3, 0, 0, 1, 2, 2], [2, 2, 3, 0, 0, 1]], device=x.device)
    return torch.stack([table.gather(0, picks[ch][sector][None])[0] for ch in range(3)], -3)


_ADJUSTMENTS = (
    lambda x, f: (x * f[:, None, None, None]).clamp(0, 1),  # brightness
    lambda x, f: _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), f),  # contrast
    lambda x, f: _blend(x, _gray(x), f),  # saturation
    _shift_hue,
)


def color_jitter(x: torch.Tensor, p: JitterParams) -> torch.Tensor:
    """Jitter a batch (N, 3, H, W) in [0, 1]: in each of four slots, every image takes the adjustment its
    order names there; images sharing an adjustment in a slot are adjusted together."""
    factors = p.factors.to(x.device)
    for slot in range(4):
        for op, adjust in enumerate(_ADJUSTMENTS):
            idx = torch.nonzero(p.order[:, slot] == op)[:, 0]  # on the host: no device sync
            if len(idx):
                idx = idx.to(x.device)
                x = x.index_copy(0, idx, adjust(x.index_select(0, idx), factors.index_select(0, idx)[:, op]))
    return x
