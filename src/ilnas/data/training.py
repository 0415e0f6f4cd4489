"""Data for re-training a cell: the 'all training images -> test split' protocol of the paper.

Two pipelines with one interface (``steps``, ``epoch(e)``, ``test()``): in-memory tasks (CIFAR, the
digits: train + validation splits joined, augmented on the device) and image folders (ImageNet or
any ``imagefolder:<path>`` with train/ and val/, through torchvision's ImageFolder and a DataLoader
with a DistributedSampler, decoded in the workers or on the device). Both shard over ranks like
DistributedSampler.
"""
from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from ilnas.data import augment, device_decode
from ilnas.data.loader import Batch, BatchMaker, ShardedEpochs
from ilnas.config import DataConfig
from ilnas.data.listing import loose_images_hint
from ilnas.data.tasks import Split, create_task, eight_bit, files_digest, image_errors, task_info
from ilnas.errors import IlnasError, RunFailed
from ilnas.fileio import reachable
from ilnas.seeds import derive_seed

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TrainData(Protocol):
    """A training pipeline and what a trained model needs to know of it: the class names in label order,
    the normalisation, and how a test image is sized (shorter side to ``resize``, centre crop of
    ``resolution``)."""

    name: str
    num_classes: int
    in_channels: int
    resolution: int
    steps: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int
    # What a resumed run must find again (provenance.json keeps it): the images of each split, counted, and
    # for a folder that is read as it is trained on, a digest of its files' names and labels
    listing: dict

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The epoch's batches from step ``start`` on: exactly those an epoch begun at step 0 gives from there
        (what continues a checkpoint taken part-way through it)."""

    def test(self) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class Sharding:
    """This process's place: per-rank batch size, rank, world size, and where batches go."""

    batch_size: int
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    seed: int = 0
    max_steps: int | None = None


class InMemoryData:
    def __init__(self, name: str, source: DataConfig, shard: Sharding, cutout: int, dtype: torch.dtype):
        task = create_task(name, source)
        joined = Split(torch.cat([task.train.x, task.val.x]), torch.cat([task.train.y, task.val.y]))
        train = BatchMaker(task, joined, shard.device, dtype, augment=True, cutout=cutout)
        self._test = BatchMaker(task, task.test, shard.device, dtype, augment=False)
        self._epochs = ShardedEpochs(train, shard.batch_size, shard.seed, shard.rank, shard.world, shard.max_steps)
        self.shard = shard
        self.name, self.num_classes = name, task.num_classes
        self.in_channels, self.resolution = task.input_shape[0], task.input_shape[1]
        self.classes, self.mean, self.std, self.resize = task.classes, task.mean, task.std, self.resolution
        self.steps = self._epochs.steps
        self.listing = {"train_images": len(joined.y), "test_images": len(task.test.y),
                        **task.digest}

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        return self._epochs.epoch(epoch, start)

    def test(self) -> Iterator[Batch]:
        return self._test.ordered(self.shard.batch_size, self.shard.rank, self.shard.world)


class FolderData:
    """ImageNet-style training: RandomResizedCrop + flip (+ colour jitter); test: resize, centre crop.

    Args:
        decode: ``workers`` (PIL decodes and augments in the DataLoader workers) or ``device`` (workers read
            the bytes; decoding and augmentation run on the training device, see device_decode.py).
    """

    def __init__(self, name: str, root: Path, shard: Sharding, resolution: int, color_jitter: bool,
                 workers: int, decode: str = "workers"):
        from ilnas.data.folders import StreamedImageFolder

        for sub in ("train", "val"):
            if not (reachable(root, "image folder") / sub).is_dir():
                raise IlnasError(f"no image folder {root / sub} for task {name} (expected train/ and val/ "
                                 f"with one folder per class)")
        self.resize = round(resolution * 256 / 224)
        self.name, self.in_channels, self.resolution = name, 3, resolution
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.shard, self.workers, self.decode, self.color_jitter = shard, workers, decode, color_jitter
        train_tf, test_tf = self._transforms() if decode == "workers" else (None, None)
        loader = {"loader": read_rgb if decode == "workers" else device_decode.read_encoded}
        try:
            self.train_set = SeededSamples(StreamedImageFolder(root / "train", train_tf, **loader), shard.seed)
            self.test_set = StreamedImageFolder(root / "val", test_tf, **loader)
        except (FileNotFoundError, RuntimeError) as e:
            raise IlnasError(f"cannot read image folder {root}: {e}") from None
        classes = self.train_set.dataset.classes
        if classes != self.test_set.classes:
            raise IlnasError(f"{root}/train and {root}/val hold different class folders"
                             f"{loose_images_hint(root / 'val')}")
        self.num_classes, self.classes = len(classes), tuple(classes)
        self.listing = {"train_images": len(self.train_set), "test_images": len(self.test_set),
                        "files_sha256": files_digest(root, [(folder.samples.paths.tolist(), folder.samples.labels)
                                                            for folder in (self.train_set.dataset, self.test_set)])}
        self.sampler = torch.utils.data.DistributedSampler(self.train_set, num_replicas=shard.world, rank=shard.rank,
                                                           shuffle=True, seed=shard.seed, drop_last=True)
        self.steps = len(self.sampler) // shard.batch_size
        if self.steps == 0:
            raise IlnasError(f"{root}/train has {len(self.train_set)} images, fewer than one global batch of "
                             f"{shard.batch_size * shard.world}")
        if shard.max_steps is not None:
            self.steps = min(self.steps, shard.max_steps)
        self._norm = [torch.tensor(v, device=shard.device)[None, :, None, None] for v in (self.mean, self.std)]

    def _transforms(self):
        from torchvision import transforms as T

        normalize = T.Normalize(self.mean, self.std)
        train_tf = [T.RandomResizedCrop(self.resolution), T.RandomHorizontalFlip()]
        if self.color_jitter:
            train_tf.append(T.ColorJitter(*augment.JITTER))
        test_tf = [T.Resize(self.resize), T.CenterCrop(self.resolution)]
        return T.Compose([*train_tf, T.ToTensor(), normalize]), T.Compose([*test_tf, T.ToTensor(), normalize])

    def _loader(self, dataset, indices: list[int], generator: torch.Generator | None = None
                ) -> torch.utils.data.DataLoader:
        """Batches of ``indices`` in that order (a last short batch only for the test split); ``generator``
        seeds the workers without drawing from the global one."""
        collate = device_decode.collate_encoded if self.decode == "device" else None
        return torch.utils.data.DataLoader(dataset, batch_size=self.shard.batch_size, sampler=indices,
                                           num_workers=self.workers, pin_memory=self.shard.device.type == "cuda",
                                           drop_last=dataset is self.train_set, collate_fn=collate,
                                           generator=generator)

    def _batches(self, loader, finish, first: int = 0) -> Iterator[Batch]:
        """The loader's batches through ``finish(batch, i)`` (``i``: the batch's step, from ``first``) onto the
        device; an unreadable image stops the run, and so does a worker that died (also one killed as the
        loader starts its workers, which ``iter`` reports)."""
        batches = None
        for i in range(first, first + len(loader)):
            try:
                if batches is None:
                    batches = iter(loader)
                yield finish(next(batches), i)
            except StopIteration:
                return
            except image_errors() as e:
                raise RunFailed(f"cannot read an image of {self.name} ({_reason(e)[:240]}); the last checkpoint is "
                                f"kept: repair or remove the file and continue with --resume") from None
            except RuntimeError as e:
                failure = _worker_failure(e, _worker_exits(batches))
                if failure is None:
                    raise
                raise RunFailed(f"{failure}; the last checkpoint is kept: continue with --resume") from None

    def _to_device(self, batch, step: int = 0) -> Batch:
        x, y = batch
        return x.to(self.shard.device, non_blocking=True), y.to(self.shard.device, non_blocking=True)

    def _decoded(self, batch, gen: torch.Generator | None) -> Batch:
        """An encoded batch decoded, augmented (``gen``: training) and normalised on the device."""
        paths, datas, y = batch
        images = device_decode.decode(paths, datas, self.shard.device)
        x = (device_decode.train_images(images, self.resolution, gen, self.color_jitter) if gen is not None
             else device_decode.eval_images(images, self.resize, self.resolution))
        mean, std = self._norm
        return (x - mean) / std, y.to(self.shard.device, non_blocking=True)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        # Every random draw is keyed by (seed, epoch, image) in the workers, or (seed, epoch, rank, step) on the
        # device: the same whichever worker loads an image and wherever the epoch starts.
        self.sampler.set_epoch(epoch)
        self.train_set.epoch = epoch
        bs = self.shard.batch_size
        order = list(self.sampler)[start * bs:self.steps * bs]
        loader = self._loader(self.train_set, order,
                              torch.Generator().manual_seed(derive_seed(self.shard.seed, epoch)))
        if self.decode == "workers":
            return self._batches(loader, self._to_device, start)
        seed, rank = self.shard.seed, self.shard.rank
        return self._batches(loader, lambda batch, step: self._decoded(
            batch, torch.Generator().manual_seed(derive_seed(seed, epoch, rank, step))), start)

    def test(self) -> Iterator[Batch]:
        mine = list(range(self.shard.rank, len(self.test_set), self.shard.world))
        finish = self._to_device if self.decode == "workers" else lambda batch, step: self._decoded(batch, None)
        return self._batches(self._loader(self.test_set, mine), finish)


class SeededSamples(torch.utils.data.Dataset):
    """A dataset whose random transforms draw from the global generator seeded by (seed, epoch, index) for
    each sample, then put back: an image gets the same augmentation in whichever worker loads it."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.epoch, index))
            return self.dataset[index]


def create_train_data(name: str, source: DataConfig, shard: Sharding, *, cutout: int = 0, resolution: int = 224,
                      color_jitter: bool = False, workers: int = 4, decode: str = "workers",
                      dtype: torch.dtype = torch.float32) -> TrainData:
    """Any task of ``task_info``: in-memory tasks (train + validation joined) or image-folder trees."""
    info = task_info(name, source)
    if info.in_memory:
        if cutout >= info.resolution:  # a square centred mid-image would cover all of it: blank images, labelled
            raise IlnasError(f"train.cutout={cutout} is not smaller than the {info.resolution}x{info.resolution} "
                             f"images of {name}: its square would erase whole images; keep it below the side (the "
                             f"CIFAR recipe: 16 on 32x32)")
        return InMemoryData(name, source, shard, cutout, dtype)
    return FolderData(name, info.root, shard, resolution, color_jitter, workers, decode)


def read_rgb(path: str):
    """An image file as an 8-bit RGB PIL image (``eight_bit``: torchvision's loader clips 16-bit ones), its error
    naming the file: from a DataLoader worker, only the text arrives."""
    from PIL import Image

    try:
        with open(path, "rb") as f, Image.open(f) as img:
            return eight_bit(img, "RGB")
    except image_errors() as e:
        raise OSError(f"{path}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}") from None


def _worker_exits(batches) -> set[int]:
    """The non-zero exit codes of the loader's workers that have ended (minus a signal's number: killed by it),
    from torch's iterator, which keeps its worker processes in ``_workers``; none where it has not started them."""
    codes = (getattr(w, "exitcode", None) for w in getattr(batches, "_workers", ()))
    return {code for code in codes if isinstance(code, int) and code != 0}


def _worker_failure(e: RuntimeError, exits: set[int] = frozenset()) -> str | None:
    """What the DataLoader's error says of its workers, with what to change; None for any other error.
    ``exits``: how its dead workers ended (``_worker_exits``). Torch reports a dead worker either by the signal
    that killed it or only as "exited unexpectedly" (whichever of its checks sees the death first); the exit
    code then tells a full /dev/shm (SIGBUS, writing a batch there) and the out-of-memory killer (SIGKILL) apart
    from the rest."""
    text = str(e)
    if "DataLoader worker" not in text:  # the main process's own error (decoding on the device, say)
        return None
    if "shared memory" in text or -signal.SIGBUS in exits:  # the allocation failed, or a worker died of SIGBUS
        reason = _reason(e)[:160] + ("" if "shared memory" in text else ", of SIGBUS")
        return (f"the DataLoader workers ran out of shared memory ({reason}; {_shm()}), through which "
                f"their batches reach the main process: give /dev/shm more room (a container: docker run "
                f"--shm-size=16g) or lower train.workers or train.batch_size")
    if not re.match(r"DataLoader worker \(pid", text):
        return None
    died = text.strip().splitlines()[0].rstrip(". ")[:160]
    if "exited unexpectedly" in died and exits and -signal.SIGKILL not in exits:
        return f"a DataLoader worker died ({died}, {', '.join(map(_exit_text, sorted(exits)))})"
    if "signal: Killed" in died or "exited unexpectedly" in died:  # SIGKILL, as torch sees it first or later
        return (f"a DataLoader worker died ({died}; the kernel's out-of-memory killer stops workers so, most "
                f"often): lower train.workers or train.batch_size")
    return f"a DataLoader worker died ({died})"


def _exit_text(code: int) -> str:
    if code > 0:
        return f"with exit code {code}"
    try:
        return f"of {signal.Signals(-code).name}"
    except ValueError:
        return f"of signal {-code}"


def _shm() -> str:
    """How large /dev/shm is and how much of it is free, where the system says."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return "no /dev/shm"
    free, size = (n * st.f_frsize / 2**20 for n in (st.f_bavail, st.f_blocks))
    return f"/dev/shm: {free:.1f} MiB free of {size:.1f} MiB"


def _reason(e: BaseException) -> str:
    """An exception's message; for one raised again from a DataLoader worker, the original's (the last line
    of the worker's traceback that its text carries)."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return lines[-1].split(": ", 1)[-1] if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0] \
        else lines[0]
