"""Image-folder batches decoded and augmented on the training device (``train.decode=device``).

DataLoader workers only read each file's bytes. The main process decodes the whole batch in one call
(TorchCodec's ``decode_jpeg`` where it is installed, ``pip install ilnas[decode]``, else torchvision's, which
torchvision 0.29 deprecates in its favour; both nvJPEG on CUDA, libjpeg-turbo on CPUs) and crops, resizes, flips,
jitters and normalises it on the device. A worker's work per image drops to one file read, so a few
workers feed a GPU that PIL decoding in workers would starve. Files that are not JPEG (PNG, BMP, ...)
and JPEGs the device decoder refuses (CMYK) are decoded by PIL on the CPU.

The augmentation is torchvision's, with every image's draws taken from one generator per
(seed, epoch, rank) so that a resumed epoch repeats an uninterrupted one: RandomResizedCrop (scale
0.08-1, aspect 3/4-4/3, bilinear with antialiasing), a horizontal flip with probability 1/2, and
ColorJitter (``augment.color_jitter``). Test images: the shorter side resized to ``resize``, then the
centre ``resolution`` square, as in the worker pipeline.
"""
from __future__ import annotations

import functools
import io
import math
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ilnas.data import augment
from ilnas.data.tasks import eight_bit, image_errors

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop defaults
ATTEMPTS = 10  # tries at a box inside the image before the centre-crop fallback, as torchvision
JPEG_MAGIC = (0xFF, 0xD8, 0xFF)

Encoded = tuple[str, torch.Tensor]  # a file's path and its bytes (1-D uint8)


def read_encoded(path: str) -> Encoded:
    """The loader of an ImageFolder whose items stay encoded until they reach the device."""
    return path, torch.from_numpy(np.fromfile(path, dtype=np.uint8))


def collate_encoded(items: Sequence[tuple[Encoded, int]]) -> tuple[list[str], list[torch.Tensor], torch.Tensor]:
    return ([path for (path, _), _ in items], [data for (_, data), _ in items],
            torch.tensor([label for _, label in items], dtype=torch.int64))


def is_jpeg(data: torch.Tensor) -> bool:
    return len(data) >= 3 and tuple(data[:3].tolist()) == JPEG_MAGIC


def decode(paths: Sequence[str], datas: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Encoded images -> (3, H, W) uint8 tensors on ``device``. The JPEGs go through one batched decode;
    the rest, and every JPEG of a batch the batched decode refuses, through PIL one by one.
    Raises OSError naming the file that no decoder can read."""
    images: list[torch.Tensor | None] = [None] * len(datas)
    jpeg = [i for i, data in enumerate(datas) if is_jpeg(data)]
    if jpeg:
        try:
            decoded = jpeg_batch_decoder(device)([datas[i] for i in jpeg])
            for i, image in zip(jpeg, decoded):
                images[i] = image
        except RuntimeError:  # one damaged or CMYK file fails the whole call: PIL sorts them out below
            pass
    return [image if image is not None else _decode_with_pil(path, data).to(device, non_blocking=True)
            for path, data, image in zip(paths, datas, images)]


@functools.cache
def jpeg_batch_decoder(device: torch.device) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """JPEG bytes -> (3, H, W) uint8 RGB images on ``device``, in one call: TorchCodec's ``decode_jpeg`` where
    it is installed and decodes on this device, else torchvision's (the same libjpeg-turbo / nvJPEG decoders
    and the same pixels; torchvision 0.29 deprecates its own in favour of TorchCodec's). One tiny JPEG is
    decoded to find out: a TorchCodec built without CUDA would otherwise fail every batch over to PIL."""
    try:
        from torchcodec.decoders import decode_jpeg

        decode_jpeg([_tiny_jpeg()], mode="RGB", device=device)
    except (ImportError, OSError, RuntimeError):  # not installed, built for another torch, or not for this device
        return functools.partial(_torchvision_decode, device=device)
    return functools.partial(decode_jpeg, mode="RGB", device=device)


def _torchvision_decode(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision >= 0.29 flags its decoders as moving to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def _tiny_jpeg() -> torch.Tensor:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _decode_with_pil(path: str, data: torch.Tensor) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            pixels = np.asarray(eight_bit(img, "RGB"), dtype=np.uint8).copy()
    except image_errors() as e:
        raise OSError(f"{path}: {str(e).splitlines()[0][:120]}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def crop_boxes(sizes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop's boxes for images of ``sizes`` (N, 2) = (height, width): (N, 4) = (top, left,
    height, width). Per image, the first of ATTEMPTS draws (area share uniform in SCALE, log aspect ratio
    uniform in log RATIO) that fits, else the centre crop with the aspect ratio clamped to RATIO."""
    n = len(sizes)
    height, width = sizes[:, :1].double(), sizes[:, 1:].double()
    area = height * width * torch.empty(n, ATTEMPTS, dtype=torch.float64).uniform_(*SCALE, generator=gen)
    log_ratio = torch.empty(n, ATTEMPTS, dtype=torch.float64).uniform_(math.log(RATIO[0]), math.log(RATIO[1]),
                                                                      generator=gen)
    w = torch.round(torch.sqrt(area * torch.exp(log_ratio)))
    h = torch.round(torch.sqrt(area / torch.exp(log_ratio)))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(1, keepdim=True)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top = torch.floor(torch.rand(n, dtype=torch.float64, generator=gen) * (height[:, 0] - h + 1))
    left = torch.floor(torch.rand(n, dtype=torch.float64, generator=gen) * (width[:, 0] - w + 1))
    fallback = _centre_boxes(height[:, 0], width[:, 0])
    found = fits.any(1)[:, None]
    return torch.where(found, torch.stack([top, left, h, w], 1), fallback).long()


def _centre_boxes(height: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    ratio = width / height
    h = torch.where(ratio < RATIO[0], torch.round(width / RATIO[0]), height)
    w = torch.where(ratio > RATIO[1], torch.round(height * RATIO[1]), width)
    return torch.stack([torch.div(height - h, 2, rounding_mode="floor"),
                        torch.div(width - w, 2, rounding_mode="floor"), h, w], 1)


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, h, w) uint8 -> (1, 3, *size) float in [0, 255]: bilinear with antialiasing, like torchvision's
    tensor resize."""
    return F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)


def train_images(images: Sequence[torch.Tensor], resolution: int, gen: torch.Generator,
                 jitter: bool) -> torch.Tensor:
    """Decoded images -> the augmented batch (N, 3, resolution, resolution) in [0, 1]."""
    boxes = crop_boxes(torch.tensor([tuple(image.shape[1:]) for image in images]), gen).tolist()
    x = torch.cat([_resize(image[:, t:t + h, l:l + w], (resolution, resolution))
                   for image, (t, l, h, w) in zip(images, boxes)]) / 255.0
    x = augment.flip(x, torch.rand(len(images), generator=gen) < 0.5)
    return augment.color_jitter(x, augment.draw_jitter(len(images), gen)) if jitter else x


def eval_images(images: Sequence[torch.Tensor], resize: int, resolution: int) -> torch.Tensor:
    """Decoded images -> (N, 3, resolution, resolution) in [0, 1]: the shorter side to ``resize``, then the
    centre square (torchvision's Resize(resize) and CenterCrop(resolution))."""
    out = []
    for image in images:
        h, w = image.shape[1:]
        short, long = min(h, w), max(h, w)
        scaled = (resize, int(resize * long / short))
        size = scaled if h <= w else scaled[::-1]
        top, left = int(round((size[0] - resolution) / 2.0)), int(round((size[1] - resolution) / 2.0))
        out.append(_resize(image, size)[..., top:top + resolution, left:left + resolution])
    return torch.cat(out) / 255.0

