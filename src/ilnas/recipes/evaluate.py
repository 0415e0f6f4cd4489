"""Use a trained model: ``evaluate`` it on a task's test split or a folder of labelled images (top-1, top-5,
per-class accuracy, confusion matrix as CSV and PNG), ``predict`` the classes of image files.

Images are prepared as the card says (``ilnas.card.ModelCard``): an in-memory task's test split as its
uint8 tensors, image files scaled to the card's ``resize`` and centre-cropped, then normalised.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from ilnas.card import ModelCard, require_trained_model
from ilnas.errors import IlnasError
from ilnas.fileio import atomic_write_bytes, atomic_write_text, load_json, reachable, require_writable
from ilnas.runs import refuse_among_run_files

if TYPE_CHECKING:  # torch loads once the arguments are checked: a refusal takes no torch start-up (seconds)
    import torch
    from torch import nn

    Labelled = Iterator[tuple[torch.Tensor, torch.Tensor]]  # uint8 images, labels in the model's class indices


@dataclass(frozen=True)
class EvalSet:
    name: str
    size: int
    batches: Labelled


def _class_map(names: Sequence[str], card: ModelCard, where: str) -> list[int]:
    unknown = [n for n in names if n not in card.classes]
    if unknown:
        raise IlnasError(f"{where} has classes the model does not know ({', '.join(unknown[:5])}); its classes: "
                         f"{', '.join(card.classes[:10])}{' ...' if card.num_classes > 10 else ''}")
    return [card.classes.index(n) for n in names]


def _folder_set(folder: Path, card: ModelCard, batch_size: int) -> EvalSet:
    from ilnas.data.listing import class_folders, folder_images

    classes = class_folders(folder)
    if not classes:
        raise IlnasError(f"{folder} holds no class folders (expected <folder>/<class>/<image>, or <folder>/val/...)")
    index = _class_map(classes, card, str(folder))
    items = [(p, index[label]) for p, label in folder_images(folder, classes)]
    if not items:
        raise IlnasError(f"{folder} holds no images")

    def batches() -> Labelled:
        import torch

        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            yield card.read_images([p for p, _ in chunk]), torch.tensor([y for _, y in chunk])
    return EvalSet(str(folder.resolve()), len(items), batches())


def _task_set(task: str, run: Path, card: ModelCard, batch_size: int, data_dir: str | None) -> EvalSet:
    """A task name: in-memory tasks give their test split (with the run's data settings, ``data_dir`` in place of
    its data.data_dir where given), streamed image folders their val/ tree."""
    from ilnas.config import DataConfig, from_dict
    from ilnas.runs import read_config

    if data_dir is not None and (not str(data_dir).strip() or not reachable(data_dir, "--data-dir").is_dir()):
        raise IlnasError(f"--data-dir {data_dir!r} is no directory")
    from ilnas.data.tasks import create_task, task_info

    try:  # the training run's data settings (image size, data_dir), for its own task and others alike
        source = from_dict(DataConfig, read_config(run).get("data", {}), "data.")
    except IlnasError:
        source = DataConfig()
    source = dataclasses.replace(source, tasks=(task,), data_dir=source.data_dir if data_dir is None else data_dir)
    info = task_info(task, source)
    if not info.in_memory:
        val = info.root / "val"
        if not reachable(val, f"{task}'s validation folder").is_dir():  # was a FileNotFoundError's traceback
            where = " (--data-dir DIR reads DIR/imagenet/val)" if task == "imagenet" else ""
            raise IlnasError(f"no validation images of {task}: {val} is no directory{where}")
        return _folder_set(val, card, batch_size)
    t = create_task(task, source)
    if t.input_shape != card.input_size:
        raise IlnasError(f"{task}'s images are {'x'.join(map(str, t.input_shape))}, the model takes "
                         f"{'x'.join(map(str, card.input_size))}")
    import torch

    labels = torch.tensor(_class_map(t.classes, card, task))[t.test.y]

    def batches() -> Labelled:
        for i in range(0, len(labels), batch_size):
            yield t.test.x[i:i + batch_size], labels[i:i + batch_size]
    return EvalSet(f"{task} (test split)", len(labels), batches())


def evaluation_set(data: str, run: Path, card: ModelCard, batch_size: int, data_dir: str | None = None) -> EvalSet:
    """A task name (its test split; ``data_dir``: where its files are, default the run's data.data_dir) or a folder
    of class folders (or a folder holding val/)."""
    from ilnas.data.names import check_data_source

    check_data_source(data)
    path = Path(data)
    if ":" not in data and path.is_dir():
        if data_dir is not None:
            raise IlnasError(f"--data-dir says where a task's files are; --data {data} is a folder of images itself")
        return _folder_set(path / "val" if (path / "val").is_dir() else path, card, batch_size)
    return _task_set(data, run, card, batch_size, data_dir)


def _require_device(device: str | torch.device) -> None:
    """A device asked for by name (cuda, cuda:N, auto) that is not there, refused in one line before any data is
    read. That takes torch: cpu, the default, is not looked at here, so that the data's own refusals need none."""
    if isinstance(device, str) and device != "cpu":
        from ilnas.distributed import pick_device

        pick_device(device)


def _model(run: str | Path, which: str, device: str | torch.device) -> nn.Module:
    """The trained model on ``device``: a torch.device, or its name as the command line takes it (cpu, cuda,
    cuda:N, auto)."""
    from ilnas.distributed import pick_device
    from ilnas.models import load_model

    return load_model(run, which, pick_device(device) if isinstance(device, str) else device)


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return model(model.card.normalize(images.to(device))).float().cpu()


def evaluate(run: str | Path, data: str, which: str = "last", out: str | Path | None = None,
             batch_size: int = 256, device: str | torch.device = "cpu", data_dir: str | None = None) -> dict:
    """Top-1/top-5, per-class accuracy and the confusion matrix (rows: true class, columns: predicted) of
    ``run``'s model on ``data``; written to ``out`` (default <run>/evaluations/<data>-<which>/) as
    evaluation.json, per_class.csv, confusion.csv and confusion.png. Returns evaluation.json's content.
    ``data_dir``: where a task's files are (CIFAR's, ImageNet's), in place of the training run's data.data_dir
    (a relative one is relative to where the training ran)."""
    run = Path(run)
    if out is not None:
        refuse_among_run_files([Path(out) / "evaluation.json"], "--out")
        _refuse_replacing_other_files(Path(out))
    card = require_trained_model(run, which)
    _require_device(device)  # before the data, which a large data set makes long to read
    dataset = evaluation_set(data, run, card, batch_size, data_dir)
    from ilnas.data.names import task_slug

    slug = task_slug(data if ":" in data or not Path(data).is_dir() else Path(data).resolve().name)
    target = Path(out) if out is not None else _default_out(run / "evaluations", f"{slug}-{which}", dataset.name)
    require_writable(target, "the evaluation's folder")  # before the evaluation, which a large data set makes long
    model = _model(run, which, device)
    import torch

    k, n = min(5, card.num_classes), card.num_classes
    confusion = torch.zeros(n, n, dtype=torch.int64)
    top_k = 0
    for images, labels in dataset.batches:
        ranked = _logits(model, images).topk(k, dim=-1).indices
        confusion += torch.bincount(labels * n + ranked[:, 0], minlength=n * n).view(n, n)
        top_k += int((ranked == labels[:, None]).any(-1).sum())
    seen, total = confusion.sum(1).tolist(), int(confusion.sum())
    per_class = {c: int(confusion[i, i]) / seen[i] for i, c in enumerate(card.classes) if seen[i] > 0}
    result = {"run": str(run), "weights": which, "data": dataset.name, "images": total,
              "top1": int(confusion.diagonal().sum()) / total, f"top{k}": top_k / total, "per_class": per_class}
    _write_evaluation(target, result, confusion, card.classes)
    result["out"] = str(target)
    return result


EVALUATION_FILES = ("evaluation.json", "per_class.csv", "confusion.csv", "confusion.png")


def _refuse_replacing_other_files(out: Path) -> None:
    """An evaluation replaces an earlier evaluation's files only: a folder that holds a file of one of their names
    but no evaluation.json of ilnas's keeps it."""
    present = [name for name in EVALUATION_FILES if reachable(out / name, "--out").exists()]
    if present and _evaluated_data(out) is None:
        raise IlnasError(f"--out {out} holds {present[0]} and no earlier ilnas evaluation (its evaluation.json); "
                         f"choose another --out, or remove it")


def _evaluated_data(folder: Path) -> str | None:
    """The data an earlier evaluation in ``folder`` was of; None where it holds none (or one that is unreadable)."""
    try:
        found = load_json((folder / "evaluation.json").read_bytes())
    except (OSError, ValueError):
        return None
    return found.get("data") if isinstance(found, dict) and "top1" in found else None


def _default_out(folder: Path, name: str, data: str) -> Path:
    """``folder/name``, where nothing or an evaluation of the same data is (it is brought up to date); else the
    first of ``name-2``, ``name-3``, ... that is: two folders of one name (``a/val`` and ``b/val``) each keep
    their evaluation instead of the second replacing the first's."""
    for i in itertools.count(1):
        target = folder / (name if i == 1 else f"{name}-{i}")
        found = _evaluated_data(target) if target.exists() else data  # unreadable: no evaluation to keep
        if found == data:
            return target


def _write_evaluation(out: Path, result: dict, confusion: torch.Tensor, classes: Sequence[str]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "evaluation.json", json.dumps(result, indent=1) + "\n")
        atomic_write_text(out / "per_class.csv", _csv([["class", "images", "accuracy"]] + [
            [c, int(confusion[i].sum()), result["per_class"][c]] for i, c in enumerate(classes)
            if c in result["per_class"]]))
        atomic_write_text(out / "confusion.csv", _csv([["true \\ predicted", *classes]] + [
            [c, *confusion[i].tolist()] for i, c in enumerate(classes)]))
        atomic_write_bytes(out / "confusion.png", _confusion_png(confusion, classes))
    except OSError as e:
        raise IlnasError(f"cannot write the evaluation to {out}: {e.strerror or e}") from None


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _confusion_png(confusion: torch.Tensor, classes: Sequence[str]) -> bytes:
    """Row-normalised confusion matrix; class names on the axes up to 40 classes."""
    from matplotlib.figure import Figure

    rates = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    side = min(12.0, 3.0 + 0.35 * n)
    fig = Figure(figsize=(side, side * 0.85))
    ax = fig.add_subplot()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true class")
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center",
                        color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def predict(run: str | Path, images: Sequence[str | Path], top_k: int = 5, which: str = "last",
            device: str | torch.device = "cpu", batch_size: int = 256) -> list[dict]:
    """For each image file: the ``top_k`` classes, by name, with their softmax probabilities. The images are
    read and classified ``batch_size`` at a time, so a long list (a shell glob over a photo folder) takes the
    memory of one batch, not of all its images at once."""
    if top_k < 1 or batch_size < 1:
        raise IlnasError(f"top-k and the batch size must be positive, got {top_k} and {batch_size}")
    card = require_trained_model(run, which)
    _require_device(device)
    missing = [Path(p) for p in images if not reachable(p, "image").is_file()]
    if missing:
        folder = "; it is a folder: `ilnas evaluate RUN --data FOLDER` takes a folder of labelled images, " \
                 "predict takes image files (FOLDER/*.jpg)" if missing[0].is_dir() else ""
        raise IlnasError(f"no image file {missing[0]}{folder}")
    model = _model(run, which, device)
    found = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        probs = _logits(model, card.read_images([Path(p) for p in chunk])).softmax(-1)
        top = probs.topk(min(top_k, card.num_classes), dim=-1)
        found += [{"image": str(p), "top": [{"class": card.classes[int(i)], "probability": float(v)}
                                            for v, i in zip(values, indices)]}
                  for p, values, indices in zip(chunk, top.values, top.indices)]
    return found
