"""Data: CIFAR from tiny files in the real python-batch format, the embedded digit tasks, batching."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ilnas.data.augment import crop
from ilnas.data.loader import BatchMaker
from ilnas.config import DataConfig
from ilnas.data.tasks import create_task
from helpers import under_address_space_limit, write_cifar, write_image_folder
from ilnas.errors import IlnasError


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loads_real_batch_files_and_splits_half_half(tmp_path, name, classes):
    written = write_cifar(tmp_path, name)
    task = create_task(name, DataConfig(data_dir=str(tmp_path), download=False, verify=False))
    assert task.num_classes == classes and task.input_shape == (3, 32, 32)
    assert len(task.train) == len(task.val) == 20 and len(task.test) == 6
    test_data, test_labels = written["test_batch" if name == "cifar10" else "test"]
    # python batches are row-major (3, 32, 32) per image
    assert torch.equal(task.test.x, torch.from_numpy(test_data.reshape(-1, 3, 32, 32)))
    assert task.test.y.tolist() == test_labels
    both = torch.cat([task.train.x, task.val.x]).flatten(1)
    assert len({tuple(r.tolist()[:16]) for r in both}) == 40  # a partition: no image twice


def test_missing_cifar_data_is_a_clear_error(tmp_path):
    with pytest.raises(IlnasError, match="no cifar10 data"):
        create_task("cifar10", DataConfig(data_dir=str(tmp_path), download=False))


def test_embedded_digit_tasks():
    source = DataConfig(image_size=16)
    mnist, digits = create_task("mnist5k", source), create_task("digits", source)
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (2000, 2000, 1000)
    assert (len(digits.train), len(digits.val), len(digits.test)) == (700, 700, 397)
    for t in (mnist, digits):
        assert t.input_shape == (1, 16, 16) and t.num_classes == 10 and not t.flip
        assert set(t.train.y.unique().tolist()) == set(range(10))
        assert t.train.x.dtype == torch.uint8 and t.train.x.max() > 200


def test_digits_are_read_as_scikit_learn_loads_them():
    from sklearn.datasets import load_digits

    from ilnas.data.tasks import digits_table

    images, labels = digits_table()
    reference = load_digits()
    assert np.array_equal(images, reference.data) and np.array_equal(labels, reference.target)
    assert images.shape == (1797, 64) and labels.dtype == np.int64


def test_batches_are_normalised_augmented_and_reproducible():
    task = create_task("digits", DataConfig())
    maker = BatchMaker(task, task.train, torch.device("cpu"), torch.float32, augment=True)
    a = [next(maker.stream(64, seed=3)) for _ in range(2)]
    assert torch.equal(a[0][0], a[1][0]) and torch.equal(a[0][1], a[1][1])
    x, y = next(maker.stream(64, seed=4))
    assert x.shape == (64, 1, 16, 16) and not torch.equal(x, a[0][0])
    assert abs(float(x.mean())) < 0.5
    plain = BatchMaker(task, task.val, torch.device("cpu"), torch.float32, augment=False)
    assert sum(len(b[1]) for b in plain.ordered(100)) == 700


def test_a_ranks_stream_is_its_slice_of_the_global_stream():
    task = create_task("digits", DataConfig())
    maker = BatchMaker(task, task.train, torch.device("cpu"), torch.float32, augment=True, cutout=4)
    whole = maker.stream(24, seed=7)
    ranks = [maker.stream(24, seed=7, rank=r, world=3) for r in range(3)]
    for _ in range(30):  # past the end of a pass (700 // 24 = 29 batches), into the reshuffled next one
        x, y = next(whole)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert all(len(p[1]) == 8 for p in parts)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    gen = torch.Generator().manual_seed(0)
    out = crop(x, 2, torch.randint(0, 5, (2,), generator=gen), torch.randint(0, 5, (2,), generator=gen))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(2):
        assert any(torch.equal(out[n], padded[n, :, i:i + 5, j:j + 5]) for i in range(5) for j in range(5))


@pytest.mark.parametrize("name", ["mnist5k", "digits", "cifar10", "cifar100"])
def test_the_task_registry_states_what_loading_finds(name, tmp_path):
    from helpers import write_cifar
    from ilnas.data.tasks import task_info

    if name.startswith("cifar"):
        write_cifar(tmp_path, name)
    source = DataConfig(data_dir=str(tmp_path), download=False, verify=False, image_size=12)
    info, task = task_info(name, source), create_task(name, source)
    assert info.in_memory and (info.classes, info.channels, info.resolution) == (
        task.num_classes, *task.input_shape[:2])


def test_image_folder_tasks_are_known_without_loading_them(tmp_path):
    from helpers import write_image_folder
    from ilnas.data.tasks import task_info

    write_image_folder(tmp_path / "imgs", classes=("a", "b", "c", "d"))
    name = f"imagefolder:{tmp_path / 'imgs'}"
    info = task_info(name, DataConfig(image_size=24))
    assert info.in_memory and (info.classes, info.channels, info.resolution) == (4, 3, 24)
    streamed = task_info(name, DataConfig(folder_pipeline="stream"))
    assert not streamed.in_memory and streamed.resolution is None and streamed.root == tmp_path / "imgs"
    assert task_info("imagenet", DataConfig(data_dir="/nowhere")).classes == 1000
    with pytest.raises(IlnasError, match="a search needs the images in memory"):
        create_task(name, DataConfig(folder_pipeline="stream"))


def test_an_image_folder_is_decoded_once_into_splits_with_its_own_statistics(tmp_path):
    """train/ halves into the search's train/validation splits with the fixed split seed, val/ is the test
    split; pixels are the shorter side scaled to image_size and the centre square (what predict reads)."""
    from PIL import Image
    from helpers import write_image_folder
    from ilnas.data.tasks import decode_image

    write_image_folder(tmp_path / "imgs", per_class=6)  # 40x48 PNGs, classes cat/dog/eel, 2 per class in val/
    task = create_task(f"imagefolder:{tmp_path / 'imgs'}", DataConfig(image_size=20))
    assert task.classes == ("cat", "dog", "eel") and task.num_classes == 3 and task.input_shape == (3, 20, 20)
    assert (len(task.train), len(task.val), len(task.test)) == (9, 9, 6)
    assert sorted(torch.cat([task.train.y, task.val.y]).tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    xf = task.train.x.double() / 255
    assert np.allclose(task.mean, xf.mean(dim=(0, 2, 3))) and np.allclose(task.std, xf.std(dim=(0, 2, 3)))
    first = tmp_path / "imgs" / "val" / "cat" / "0.png"
    expected = np.asarray(Image.open(first).convert("RGB").resize((24, 20), Image.Resampling.BICUBIC))[:, 2:22]
    assert torch.equal(task.test.x[0], torch.from_numpy(expected.copy()).permute(2, 0, 1))
    assert torch.equal(decode_image(first, 20), task.test.x[0])
    again = create_task(f"imagefolder:{tmp_path / 'imgs'}", DataConfig(image_size=20))
    assert torch.equal(again.train.x, task.train.x)  # the split never depends on anything but the files


def test_an_image_folder_without_val_holds_out_a_fifth_as_its_test_split(tmp_path):
    import shutil

    from helpers import write_image_folder

    write_image_folder(tmp_path / "imgs", per_class=10)
    shutil.rmtree(tmp_path / "imgs" / "val")
    task = create_task(f"imagefolder:{tmp_path / 'imgs'}", DataConfig())
    assert (len(task.train), len(task.val), len(task.test)) == (12, 12, 6)


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "train" / "dog" / "0.png").write_bytes(b"not a png"), "cannot read image"),
    (lambda root: (root / "val" / "fox").mkdir(), "not those of train/"),
    (lambda root: None, "over data.memory_limit_gb"),
    # a class the network would have had an output for, and never a training image of
    (lambda root: [p.rename(p.with_suffix(".txt")) for p in (root / "train" / "eel").iterdir()],
     r"the class folder\(s\) eel in .*train hold no images \(\.bmp, "),
])
def test_a_bad_image_folder_is_refused_in_one_line(tmp_path, damage, message):
    from helpers import write_image_folder

    write_image_folder(tmp_path / "imgs")
    damage(tmp_path / "imgs")
    limit = 1e-6 if "memory" in message else 8.0
    with pytest.raises(IlnasError, match=message):
        create_task(f"imagefolder:{tmp_path / 'imgs'}", DataConfig(memory_limit_gb=limit))


def _listings(root):
    """The in-memory pipeline's listing of train/, and the streamed pipeline's samples (paths, labels)."""
    from ilnas.data.folders import StreamedImageFolder
    from ilnas.data.listing import folder_classes, folder_images

    memory = [(str(p), label) for p, label in folder_images(root / "train", folder_classes(root, "x"))]
    streamed = StreamedImageFolder(root / "train", None, loader=str)
    return memory, [streamed.samples[i] for i in range(len(streamed))]


def test_both_pipelines_list_a_folder_alike_and_as_torchvision_does_a_plain_one(tmp_path):
    """The streamed samples are torchvision's ImageFolder's for a plain folder (a streamed run of an earlier
    version draws the same images), held in numpy arrays."""
    from torchvision import datasets

    from helpers import write_image_folder

    write_image_folder(tmp_path / "imgs", per_class=4)
    memory, streamed = _listings(tmp_path / "imgs")
    assert streamed == memory == datasets.ImageFolder(str(tmp_path / "imgs" / "train")).samples
    assert len(memory) == 12


def test_hidden_files_and_folders_are_neither_images_nor_classes(tmp_path):
    """A file manager's thumbnails in a hidden folder of a class were taken for more of its images (silently,
    at another size), macOS's ._ companion files for images that cannot be read, and Jupyter's checkpoint
    folder for a class without images. Both pipelines and evaluate's folders leave hidden names out."""
    import shutil

    from helpers import write_image_folder

    root = tmp_path / "imgs"
    write_image_folder(root, per_class=4)
    before = _listings(root)
    for split in ("train", "val"):
        (root / split / ".ipynb_checkpoints").mkdir()
        for c in ("cat", "dog", "eel"):
            shutil.copytree(root / split / c, root / split / c / ".thumbnails")
            (root / split / c / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert _listings(root) == before and len(before[0]) == 12
    task = create_task(f"imagefolder:{root}", DataConfig(image_size=16))
    assert task.classes == ("cat", "dog", "eel") and (len(task.train) + len(task.val), len(task.test)) == (12, 6)
    from ilnas.data.listing import class_folders

    assert class_folders(root / "val") == ["cat", "dog", "eel"]


def test_links_to_folders_are_followed_once_and_a_link_back_up_is_refused(tmp_path):
    import shutil

    from helpers import write_image_folder

    root = tmp_path / "imgs"
    write_image_folder(root, per_class=2)
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    shutil.copy(root / "train" / "cat" / "0.png", extra / "more.png")
    (root / "train" / "cat" / "b").symlink_to(extra)  # a folder on another disk, linked in twice
    (root / "train" / "cat" / "a").symlink_to(extra)
    memory, streamed = _listings(root)
    assert streamed == memory and len(memory) == 7
    assert [p for p, _ in memory if "more" in p] == [str(root / "train" / "cat" / "a" / "more.png")]

    (root / "train" / "dog" / "up").symlink_to(root / "train")  # os.walk would take in cat/ and eel/ as dogs
    for listing in (lambda: _listings(root)[0], lambda: _listings(root)[1]):
        with pytest.raises(IlnasError, match=r"dog/up links back to .*/train, a folder that holds the class folder"):
            listing()


def test_a_streamed_class_folder_without_images_is_refused(tmp_path):
    from ilnas.data.folders import StreamedImageFolder

    from helpers import write_image_folder

    write_image_folder(tmp_path / "imgs", per_class=2)
    for image in (tmp_path / "imgs" / "train" / "eel").iterdir():
        image.unlink()
    with pytest.raises(FileNotFoundError, match="no image file in the class folder"):
        StreamedImageFolder(tmp_path / "imgs" / "train", None, loader=str)


def test_16_bit_images_are_scaled_to_8_bits_by_every_reader_not_clipped(tmp_path):
    """PIL's conversion clips a 16-bit image at 255 (nearly white): the in-memory folders and predict
    (decode_image), the streamed folders (read_rgb) and the device pipeline's non-JPEG path read a 16-bit PNG
    of v * 257 as the 8-bit PNG of v, exactly. A floating-point image is refused, naming the file."""
    from PIL import Image

    from ilnas.data.device_decode import decode, read_encoded
    from ilnas.data.tasks import decode_image
    from ilnas.data.training import read_rgb

    pixels = np.random.default_rng(0).integers(0, 256, (12, 12), dtype=np.uint16)
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "8.png")
    Image.fromarray(pixels * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    for read in (lambda p: decode_image(p, 12, channels=1), lambda p: decode_image(p, 12),
                 lambda p: torch.from_numpy(np.asarray(read_rgb(str(p))).copy()),
                 lambda p: decode(*map(list, zip(read_encoded(str(p)))), torch.device("cpu"))[0]):
        eight, sixteen = read(tmp_path / "8.png"), read(tmp_path / "16.png")
        assert torch.equal(eight, sixteen) and int(eight.max()) > 200 and int(eight.min()) < 50
    Image.fromarray(pixels.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(IlnasError, match=r"cannot read image .*float.tif: a floating-point image \(PIL mode F\)"):
        decode_image(tmp_path / "float.tif", 12)


def test_a_channel_that_is_the_same_everywhere_normalises_to_zeros_not_infinities(tmp_path):
    """Two-channel data saved as RGB (blue always 0): std 0 made every input infinite, and a search on it
    stopped as 'diverged' at its first step. Its std is taken as 1; the other channels' are their own."""
    from PIL import Image

    gen = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 1)):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = gen.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                pixels[..., 2] = 0
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    task = create_task(f"imagefolder:{tmp_path}", DataConfig(image_size=16))
    xf = task.train.x.double() / 255
    assert task.mean[2] == 0.0 and task.std[2] == 1.0
    assert np.allclose(task.std[:2], xf.std(dim=(0, 2, 3))[:2]) and min(task.std[:2]) > 0.2
    x, _ = next(BatchMaker(task, task.train, torch.device("cpu"), torch.float32, augment=True).stream(4, seed=0))
    assert torch.isfinite(x).all() and not x[:, 2].any() and x[:, :2].std() > 0.5


DATA_CHANGES = {"train.resolution": 40, "train.color_jitter": True, "train.workers": 2, "train.decode": "device",
                "train.cutout": 2, "data.image_size": 24, "data.folder_pipeline": "stream",
                "data.memory_limit_gb": 1.0}


@pytest.mark.parametrize("preset, task, unread, read", [
    ("eval-digits", "mnist5k", {"train.resolution", "train.color_jitter", "train.workers", "train.decode",
                                "data.folder_pipeline"}, "data.image_size"),
    ("eval-cifar10", "cifar10", {"train.resolution", "train.color_jitter", "train.workers", "train.decode",
                                 "data.folder_pipeline", "data.memory_limit_gb", "data.image_size"}, "train.cutout"),
    ("eval-folder", "folder", {"train.resolution", "train.color_jitter", "train.workers", "train.decode"},
     "data.image_size"),
    ("eval-imagefolder", "folder", {"train.cutout", "data.image_size", "data.memory_limit_gb"}, "train.resolution"),
], ids=["digits", "cifar", "folder-in-memory", "folder-streamed"])
def test_the_data_settings_a_re_training_never_reads_change_no_batch_and_one_it_reads_does(
        tmp_path, preset, task, unread, read):
    """What config.schema.unused_settings calls unread among the data and pipeline settings (a --set of it is warned
    of, compare pools runs over it, a sweep refuses cells that differ only in it): the training and test batches
    with it changed are the same, bit for bit; ``read`` changed changes them (the comparison can fail)."""
    from ilnas.config import resolve, to_dict
    from ilnas.config.schema import unused_settings
    from ilnas.data.training import Sharding, create_train_data

    if task == "cifar10":
        write_cifar(tmp_path, "cifar10")
    elif task == "folder":
        write_image_folder(tmp_path / "folder")
        task = f"imagefolder:{tmp_path / 'folder'}"
    base = [f"data.tasks=[{task}]", f"data.data_dir={tmp_path}", "data.verify=false", "train.workers=0",
            "train.resolution=32"]

    def batches(*change: str) -> list[torch.Tensor]:
        cfg = resolve(preset, kind="eval", overrides=[*base, *change])
        t = cfg.train
        data = create_train_data(cfg.data.tasks[0], cfg.data, Sharding(4, seed=3), cutout=t.cutout,
                                 resolution=t.resolution, color_jitter=t.color_jitter, workers=t.workers,
                                 decode=t.decode)
        return [*next(iter(data.epoch(0))), *next(iter(data.test()))]

    data_rules = {k for k in unused_settings(to_dict(resolve(preset, kind="eval", overrides=base)))
                  if k.split(".")[0] in ("data", "train")}
    assert data_rules == unread and read not in data_rules
    first = batches()
    for key in sorted(unread) + [read]:
        changed = batches(f"{key}={DATA_CHANGES[key]}")
        same = all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, changed, strict=True))
        assert same == (key != read), f"{key} changed: the same batches {same}"


def test_normalisation_statistics_are_exact_and_taken_without_a_float_copy_of_the_images():
    """Each channel's mean and std from its histogram, counted a chunk at a time: the float64 statistics to 1e-13
    (their own rounding), a constant channel's std 1, and 0.6 GB of images under a 5 GB address-space limit (torch
    maps 3.3 GB), where float64 copies of them took 17 GB a gigabyte."""
    from ilnas.data.tasks import _stats

    x = torch.randint(0, 256, (500, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x[:, 2] = 9
    mean, std = _stats(x)
    xf = x.double() / 255
    assert np.allclose(mean, xf.mean(dim=(0, 2, 3)).tolist(), rtol=1e-13, atol=0)
    assert np.allclose(std[:2], xf.std(dim=(0, 2, 3))[:2].tolist(), rtol=1e-13, atol=0) and std[2] == 1.0
    assert _stats(x[:1, :, :1, :1]) == (tuple(v / 255 for v in x[0, :, 0, 0].tolist()), (1.0, 1.0, 1.0))
    script = ("import torch; from ilnas.data.tasks import _stats; "
              "x = torch.arange(256, dtype=torch.uint8).repeat(600 * 2 ** 20 // 256).view(-1, 3, 256, 256); "
              "print(_stats(x))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       preexec_fn=under_address_space_limit(5))
    assert r.returncode == 0, r.stderr[-300:]
    assert eval(r.stdout) == ((0.5,) * 3, (pytest.approx(0.2898, abs=1e-4),) * 3)


def test_images_resized_a_chunk_at_a_time_are_those_resized_at_once(monkeypatch):
    import torch.nn.functional as F

    from ilnas.data import tasks

    x = torch.randint(0, 256, (37, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    whole = F.interpolate(x.float(), size=(20, 20), mode="bilinear", antialias=True, align_corners=False)
    monkeypatch.setattr(tasks, "RESIZE_BYTES", 4 * 3 * (144 + 400) * 5)  # 5 images a chunk: 8 chunks
    assert torch.equal(tasks._resize_uint8(x, 20), whole.round().clamp(0, 255).to(torch.uint8))


def test_digits_too_large_for_the_memory_limit_are_refused_before_they_are_resized():
    with pytest.raises(IlnasError, match=r"^digits takes 1\.9 GB held in memory at 1024x1024, over "
                                         r"data\.memory_limit_gb=1; lower data\.image_size or raise the limit$"):
        create_task("digits", DataConfig(image_size=1024, memory_limit_gb=1))
