"""The names ``data.tasks`` may hold, known without torch (``ilnas presets`` lists them): the in-memory tasks built
in, then those registered with ``ilnas.register_task``, then the image-folder tasks."""
from __future__ import annotations

BUILT_IN_TASKS = ("cifar10", "cifar100", "mnist5k", "digits")  # held in memory (tasks.py loads each)
FOLDER_TASKS = ("imagenet", "imagefolder")  # read from an ImageFolder tree; imagefolder:<path>
_REGISTERED: dict[str, None] = {}  # every name given to ilnas.register_task, in order


def add_task_name(name: str) -> None:
    _REGISTERED[name] = None


def task_names() -> tuple[str, ...]:
    """Every task a run may name, ``imagefolder:<path>`` for any image folder."""
    return (*sorted(BUILT_IN_TASKS), *(n for n in _REGISTERED if n not in BUILT_IN_TASKS), "imagenet",
            "imagefolder:<path>")
