"""Image folders listed without torch: the class folders of a split (<split>/<class>/<image>), their image files
in a fixed order, and what refuses a folder (a class name that is no label text, a link back up the tree,
images outside any class folder). Both pipelines (in memory and streamed) and ``evaluate`` list folders by these,
and ``evaluate`` refuses a folder it cannot use before torch loads."""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Sequence

from ilnas.errors import IlnasError
from ilnas.fileio import reachable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def folder_classes(root: Path, name: str) -> list[str]:
    """The class folders of <root>/train, sorted like torchvision's ImageFolder (their label order)."""
    train = reachable(root, "image folder") / "train"
    if not train.is_dir():
        raise IlnasError(f"no image folder {train} for task {name} (expected train/ and optionally val/, with one "
                         f"folder per class)")
    classes = class_folders(train)
    if len(classes) < 2:
        raise IlnasError(f"{train} holds {len(classes)} class folder(s); a task needs at least two")
    for c in classes:
        _require_label_text(c, train)
    return classes


def _require_label_text(name: str, folder: Path) -> None:
    """A class folder's name becomes the class's label in tasks.json, model.json, exports and predictions:
    it must be UTF-8 text that keeps to one line."""
    bad = {unicodedata.category(ch) for ch in name} & {"Cs", "Cc"}  # undecodable bytes, control characters
    if bad:
        what = "is not UTF-8" if "Cs" in bad else "holds a control character (a tab or line break, say)"
        raise IlnasError(f"the class folder {os.fsencode(name)!r} in {folder} {what}; its name is the class's "
                         f"label in the model's files and output: rename it")


def class_folders(split: Path) -> list[str]:
    """The names of the class folders in ``split``, sorted; hidden ones (a name starting with ".": Jupyter's
    .ipynb_checkpoints, say) are no classes."""
    return sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_images(split: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """(file, label) of every image under <split>/<class>/, in a fixed order (by path within a class); refuses
    other class folders. Both pipelines, in memory and streamed, list a folder by this."""
    found = class_folders(split)
    if found != list(classes):
        raise IlnasError(f"{split} holds the class folders {found[:6]}, not those of train/ ({list(classes)[:6]})"
                         f"{loose_images_hint(split)}")
    return [(p, label) for label, c in enumerate(classes) for p in _image_files(split / c)]


def loose_images_hint(split: Path) -> str:
    """Where ``split`` holds images outside any class folder, what to make of them: ImageNet's validation
    images come as one flat folder, their labels in the devkit."""
    try:
        loose = sum(1 for p in Path(split).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError:
        return ""
    return (f"; its {loose} images lie in no class folder, as ImageNet's validation images come: sort them into "
            f"one folder per class (torchvision.datasets.ImageNet(root, split='val') does so from the devkit)"
            if loose else "")


def _image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``, sorted, through symbolic links to folders as well (a data set pieced
    together from several disks), each real folder read once. A link to a folder above (or at) ``folder`` is
    refused: it would give the class its sibling classes' images, and repeat them under ever longer paths
    (without end, where two such links loop). Hidden files and folders are left out: a file manager's or a NAS's
    thumbnails (.thumbnails/, .@__thumb/) would be taken for more images of the class, and macOS's ._ files
    beside each image (a copy from a Mac's disk) are not images at all."""
    top, seen, files = os.path.realpath(folder), set(), []
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if root != str(folder) and (top == real or top.startswith(real.rstrip(os.sep) + os.sep)):
            raise IlnasError(f"{root} links back to {real}, a folder that holds the class folder {folder}: remove "
                             f"the link")
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        # hidden folders left out; sorted: which of two links to one folder reads it is the same in every run
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root, n) for n in names
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES]
    return sorted(p for p in files if p.is_file())
