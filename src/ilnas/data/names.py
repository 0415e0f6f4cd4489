"""The names ``data.tasks`` may hold, known without torch (``ilnas presets`` lists them): the in-memory tasks built
in, then those registered with ``ilnas.register_task``, then the image-folder tasks."""
from __future__ import annotations

import re
from pathlib import Path

from ilnas.errors import NotRegistered
from ilnas.fileio import reachable

BUILT_IN_TASKS = ("cifar10", "cifar100", "mnist5k", "digits")  # held in memory (tasks.py loads each)
FOLDER_TASKS = ("imagenet", "imagefolder")  # read from an ImageFolder tree; imagefolder:<path>
_REGISTERED: dict[str, None] = {}  # every name given to ilnas.register_task, in order


def add_task_name(name: str) -> None:
    _REGISTERED[name] = None


def task_names() -> tuple[str, ...]:
    """Every task a run may name, ``imagefolder:<path>`` for any image folder."""
    return (*sorted(BUILT_IN_TASKS), *(n for n in _REGISTERED if n not in BUILT_IN_TASKS), "imagenet",
            "imagefolder:<path>")


def known_tasks() -> str:
    return ", ".join(task_names())


def check_task_name(name: str) -> None:
    """Refuse a name that is no task, without reading any file (an image folder's path is checked when read)."""
    folder = name.startswith("imagefolder:") and name.split(":", 1)[1].strip()  # a blank path names no folder
    if not _is_named_task(name) and not folder:
        raise NotRegistered(f"unknown task {name!r}; known: {known_tasks()} (one of your own: ilnas.register_task "
                            f"in a module that ILNAS_PLUGINS names)")


def check_data_source(data: str) -> None:
    """Refuse what an evaluation reads (``--data``) where it is neither a folder of images nor a task's name."""
    if ":" in data or reachable(data, "--data").is_dir():
        return  # an image folder task's path is checked when it is read
    if not _is_named_task(data):
        raise NotRegistered(f"--data {data!r} is neither a folder nor a task ({known_tasks()}; one of your own: "
                            f"ilnas.register_task in a module that ILNAS_PLUGINS names)")


def _is_named_task(name: str) -> bool:
    """A task known by its name alone: built in, registered, or ImageNet."""
    return name in BUILT_IN_TASKS or name in _REGISTERED or name == "imagenet"


def task_slug(name: str) -> str:
    """A task name as a file name: ``imagefolder:/data/pets`` -> ``imagefolder-pets``, ``cifar10`` -> ``cifar10``."""
    kind, sep, path = name.partition(":")
    text = f"{kind}-{Path(path.rstrip('/')).name or 'data'}" if sep else name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


CIFAR_SIDE = 32  # CIFAR's images keep their own side: data.image_size does not apply to them
FIXED_SIDE_TASKS = ("cifar10", "cifar100")


def is_streamed(name: str, folder_pipeline: str) -> bool:
    """Whether a task's images are read from their files batch by batch (re-training only, at
    train.resolution) rather than held in memory."""
    return name == "imagenet" or (name.startswith("imagefolder:") and folder_pipeline == "stream")


def side_setting(name: str, folder_pipeline: str) -> str | None:
    """The setting that decides the side of a task's images: train.resolution for a streamed image folder, none
    for CIFAR (32x32 as published), data.image_size for every other task (one's own included)."""
    if is_streamed(name, folder_pipeline):
        return "train.resolution"
    return None if name in FIXED_SIDE_TASKS else "data.image_size"
