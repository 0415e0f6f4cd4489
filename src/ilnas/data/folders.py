"""Image folders streamed from disk (``data.folder_pipeline=stream``, ImageNet): torchvision's ImageFolder
over ilnas's own listing of the folder, with its samples packed into two numpy arrays.

A DataLoader worker forked from the training process shares its memory until it writes to it, and merely
reading a Python object writes its reference count: over an epoch every worker touches every page of an
ImageFolder's list of (path, label) tuples and so ends up with a private copy of it (85 MB for ImageNet's
1.28 M images, per worker: 8 ranks of 8 workers hold 5.4 GB of copies). A numpy array has no object per
item, so the workers keep sharing it; workers started by forkserver or spawn (Python 3.14's default,
macOS, Windows) receive the arrays as two buffers instead of a pickled list.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torchvision import datasets

from ilnas.data.listing import class_folders, folder_images


class PackedSamples:
    """(path, label) pairs held in a bytes array and an int64 array; indexing gives ``(str, int)`` as
    ImageFolder's list does."""

    def __init__(self, samples: Sequence[tuple[str, int]]):
        self.paths = np.array([os.fsencode(path) for path, _ in samples], dtype=bytes)
        self.labels = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return os.fsdecode(self.paths[index]), int(self.labels[index])


class StreamedImageFolder(datasets.ImageFolder):
    """ImageFolder listing ``root`` by ``ilnas.data.listing.folder_images`` (the in-memory pipeline's order and
    suffixes; links to folders followed, each folder once); a class folder without images is refused, as
    ImageFolder refuses it."""

    def __init__(self, root: str | Path, transform: Callable | None, loader: Callable):
        super().__init__(str(root), transform, loader=loader)
        self.samples = self.imgs = PackedSamples(self.samples)
        self.targets = self.samples.labels

    def find_classes(self, directory) -> tuple[list[str], dict[str, int]]:
        classes = class_folders(Path(directory))  # hidden folders are no classes
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, *args, **kwargs) -> list[tuple[str, int]]:
        classes = sorted(class_to_idx, key=class_to_idx.get)
        samples = [(str(path), label) for path, label in folder_images(Path(directory), classes)]
        empty = sorted(set(classes) - {classes[label] for _, label in samples})
        if empty:
            raise FileNotFoundError(f"found no image file in the class folder(s) {', '.join(empty[:5])} of {directory}")
        return samples
