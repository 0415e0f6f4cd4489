"""Image folders decoded and augmented on the device (train.decode=device) against torchvision's own
transforms, the worker pipeline, and the run directory's guarantees."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from ilnas.data import augment, device_decode
from ilnas.data.training import FolderData, Sharding
from helpers import ilnas

CPU = torch.device("cpu")


def write_jpeg_folder(root: Path, classes=("a", "b", "c"), per_class: int = 6, val: int = 2) -> None:
    """Blocky images (JPEG-friendly) of assorted sizes; one PNG and one greyscale JPEG per class and split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(50, 120, 2)
                blocks = rng.random((h // 8 + 1, w // 8 + 1, 3)) * 0.5
                blocks[..., c % 3] += 0.5  # a learnable colour cue
                pixels = (np.kron(blocks, np.ones((8, 8, 1)))[:h, :w] * 255).astype(np.uint8)
                img = Image.fromarray(pixels)
                if i == 0:
                    img.save(root / split / name / f"{i}.png")
                else:
                    (img.convert("L") if i == 1 else img).save(root / split / name / f"{i}.jpg", quality=95)


def test_colour_jitter_equals_torchvision_applied_image_by_image():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(24, 3, 10, 12, generator=gen)
    x[0] = 0.5  # grey: hue undefined
    x[1, :, :, :6] = 1.0  # saturated highlights
    p = augment.draw_jitter(24, gen)
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for i in range(len(x)):
        y = x[i]
        for op in p.order[i].tolist():
            y = adjust[op](y, float(p.factors[i, op]))
        expected.append(y)
    assert (augment.color_jitter(x, p) - torch.stack(expected)).abs().max() < 1e-5
    assert sorted(p.order[5].tolist()) == [0, 1, 2, 3]
    assert p.factors[:, :3].min() >= 0.6 and p.factors[:, :3].max() <= 1.4 and p.factors[:, 3].abs().max() <= 0.2


def test_crop_boxes_follow_random_resized_crop():
    gen = torch.Generator().manual_seed(1)
    n, (h, w) = 4000, (300, 400)
    top, left, bh, bw = device_decode.crop_boxes(torch.tensor([[h, w]] * n), gen).T.double()
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    share, log_ratio = bh * bw / (h * w), torch.log(bw / bh)
    assert share.min() > 0.07 and log_ratio.abs().max() < math.log(4 / 3) + 0.05
    torch.manual_seed(1)  # torchvision draws from the global generator
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float64)
    ref_share, ref_log_ratio = ref[:, 2] * ref[:, 3] / (h * w), torch.log(ref[:, 3] / ref[:, 2])
    assert abs(share.mean() - ref_share.mean()) < 0.02 and abs(log_ratio.mean() - ref_log_ratio.mean()) < 0.02
    assert abs((top / (h - bh + 1)).mean() - 0.5) < 0.02  # offsets uniform over the room left
    # No draw fits a sliver: torchvision's centre crop with the aspect ratio clamped, exactly.
    for size in ((1000, 10), (10, 1000)):
        fallback = T.RandomResizedCrop.get_params(torch.zeros(3, *size), [0.08, 1.0], [3 / 4, 4 / 3])
        assert device_decode.crop_boxes(torch.tensor([size]), gen)[0].tolist() == list(fallback)


def test_eval_images_are_torchvisions_resize_and_centre_crop():
    gen = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, size, generator=gen, dtype=torch.uint8) for size in
              ((3, 50, 70), (3, 90, 61), (3, 40, 40))]
    out = device_decode.eval_images(images, 37, 32)
    expected = torch.stack([TF.center_crop(TF.resize(im.float(), 37, antialias=True), [32, 32]) for im in images])
    assert out.shape == (3, 3, 32, 32) and (out - expected / 255).abs().max() < 1e-5


def test_batched_decode_reads_jpeg_png_and_greyscale_like_pil_and_names_a_damaged_file(tmp_path):
    from PIL import Image

    write_jpeg_folder(tmp_path, classes=("a",), per_class=4, val=0)
    paths = sorted(str(p) for p in (tmp_path / "train" / "a").iterdir())
    encoded = [device_decode.read_encoded(p) for p in paths]
    images = device_decode.decode(paths, [d for _, d in encoded], CPU)
    for path, image in zip(paths, images):
        with Image.open(path) as img:
            expected = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
        assert image.dtype == torch.uint8 and image.shape == expected.shape
        assert (image.int() - expected.int()).abs().float().mean() < 1.0  # two JPEG decoders: rounding apart
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(paths[1]).read_bytes()[:40])  # a JPEG cut short
    with pytest.raises(OSError, match="broken.jpg"):
        device_decode.decode([*paths, str(broken)], [*(d for _, d in encoded), device_decode.read_encoded(broken)[1]],
                             CPU)


def test_torchcodec_and_torchvision_decode_the_same_pixels(tmp_path, monkeypatch):
    """The batched decode prefers TorchCodec's decoder and falls back to torchvision's where TorchCodec is missing
    or does not load; both give the same images."""
    try:
        import torchcodec.decoders  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:  # missing, or built for another torch or CUDA than this one
        pytest.skip(f"TorchCodec does not load here: {str(e).splitlines()[0]}")
    write_jpeg_folder(tmp_path, classes=("a",), per_class=4, val=0)
    datas = [device_decode.read_encoded(str(p))[1] for p in sorted((tmp_path / "train" / "a").iterdir())]
    datas = [d for d in datas if device_decode.is_jpeg(d)]  # the folder holds a PNG too
    device_decode.jpeg_batch_decoder.cache_clear()
    try:
        codec = device_decode.jpeg_batch_decoder(CPU)
        monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # its import now fails
        device_decode.jpeg_batch_decoder.cache_clear()
        fallback = device_decode.jpeg_batch_decoder(CPU)
    finally:
        device_decode.jpeg_batch_decoder.cache_clear()
    assert codec.func is not device_decode._torchvision_decode and fallback.func is device_decode._torchvision_decode
    pairs = list(zip(codec(datas), fallback(datas)))
    assert len(pairs) >= 2 and all(a.shape[0] == 3 and torch.equal(a, b) for a, b in pairs)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    write_jpeg_folder(root)
    return root


def test_device_decoding_matches_the_worker_pipeline_and_repeats_per_epoch(jpeg_folder):
    workers = FolderData("f", jpeg_folder, Sharding(4), 48, True, 0, "workers")
    device = FolderData("f", jpeg_folder, Sharding(4), 48, True, 0, "device")
    assert (device.steps, device.classes, device.resize) == (workers.steps, workers.classes, workers.resize)
    std = torch.tensor(device.std)[None, :, None, None]
    (xw, yw), (xd, yd) = [[torch.cat(t) for t in zip(*data.test())] for data in (workers, device)]
    assert torch.equal(yw, yd) and xd.shape == (6, 3, 48, 48)
    # PIL's and torch's antialiased bilinear resize agree to rounding; PIL rounds to uint8
    assert ((xw - xd) * std).abs().mean() < 0.5 / 255 and ((xw - xd) * std).abs().max() < 2.5 / 255
    first, again, other = (list(device.epoch(e)) for e in (0, 0, 1))
    assert len(first) == device.steps == 18 // 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0])
    x = torch.cat([b[0] for b in first]) * std + torch.tensor(device.mean)[None, :, None, None]
    assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6 and x.std() > 0.05


def test_two_ranks_share_the_test_split_and_the_training_images(jpeg_folder):
    one = FolderData("f", jpeg_folder, Sharding(4), 32, False, 0, "device")
    ranks = [FolderData("f", jpeg_folder, Sharding(2, rank, 2), 32, False, 0, "device") for rank in (0, 1)]
    labels = lambda batches: sorted(torch.cat([y for _, y in batches]).tolist())  # noqa: E731
    assert labels(one.test()) == labels([*ranks[0].test(), *ranks[1].test()])
    assert labels(one.epoch(3)) == labels([*ranks[0].epoch(3), *ranks[1].epoch(3)])


def test_training_with_device_decoding_and_an_unreadable_file(tmp_path, jpeg_folder):
    common = ["train", "--genotype", "PC_DARTS_image", "--preset", "eval-imagefolder", "--quiet",
              "--set", "train.resolution=64", "--set", "train.decode=device", "--set", "network.auxiliary=false",
              "--set", "train.workers=1", "--set", "train.epochs=1", "--set", "optimizer.warmup_epochs=0",
              "--set", "network.layers=3", "--set", "network.channels=8", "--set", "train.batch_size=6"]
    r = ilnas(*common, "--set", f"data.tasks=[imagefolder:{jpeg_folder}]", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    epoch = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["images"] == 18 and 0.0 <= epoch["test_top1"] <= 1.0
    write_jpeg_folder(tmp_path / "bad")
    (tmp_path / "bad" / "train" / "b" / "3.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    r = ilnas(*common, "--set", f"data.tasks=[imagefolder:{tmp_path / 'bad'}]", "--out", str(tmp_path / "bad-run"))
    assert r.returncode == 3 and "cannot read an image of imagefolder:" in r.stderr and "3.jpg" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad-run" / "result.json").exists()
