"""What several test modules share: running the CLI, snapshots of run directories, kills, TensorBoard reads."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHORT_SEARCH = ["--set", "space.layers=3", "--set", "space.channels=4", "--set", "search.batch_size=8",
                "--set", "search.steps_per_epoch=3", "--set", "search.eval_batches=2"]
# The finished_run fixture: IL on mnist5k + digits (K=2, M=2), 3 epochs of 2 steps.
SEARCH3 = ["search", "--quiet", *SHORT_SEARCH, "--set", "search.steps_per_epoch=2", "--set", "search.epochs=3"]
TINY_TRAIN = ["--set", "network.layers=3", "--set", "network.channels=4", "--set", "train.batch_size=16",
              "--set", "train.steps_per_epoch=3", "--set", "train.epochs=2", "--quiet"]


def ilnas(*args: str, cwd: Path | None = None, wait: bool = True, env: dict | None = None):
    """``python -m ilnas ARGS`` in a subprocess: a CompletedProcess, or the Popen with ``wait=False``."""
    cmd = [sys.executable, "-m", "ilnas", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.02)


def wait_for_sessions(out: Path, count: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``count`` processes have opened the run (each adds a session to provenance.json)."""
    deadline = time.time() + timeout
    while True:
        try:
            if len(json.loads((out / "provenance.json").read_text())["sessions"]) >= count:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.02)


def session_seconds(run: Path) -> float:
    """How long the run's first process held it, from its provenance."""
    import datetime

    s = json.loads((run / "provenance.json").read_text())["sessions"][0]
    return (datetime.datetime.fromisoformat(s["end"]) - datetime.datetime.fromisoformat(s["start"])).total_seconds()


def kill_after_first_checkpoint(proc: subprocess.Popen, out: Path, finished: str) -> None:
    """SIGKILL ``proc`` as soon as its first checkpoint lands, before the run can finish."""
    wait_for(out / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / finished).exists(), "the run finished before it could be interrupted"


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file under ``run`` (the lock file aside: its holder line changes with every process)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def tb_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run, as TensorBoard shows it (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def write_cifar(root, name: str, per_batch: int = 8, test: int = 6) -> dict:
    """CIFAR-10 (5 data batches + test_batch) or CIFAR-100 (train + test) as pickled dicts, the layout
    torchvision reads (uint8 rows of 3072 = 3 x 32 x 32, labels, a meta file)."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, classes, label_key = root / "cifar-10-batches-py", 10, "labels"
        files = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": test}
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(classes)]})
    else:
        folder, classes, label_key = root / "cifar-100-python", 100, "fine_labels"
        files = {"train": 5 * per_batch, "test": test}
        meta = ("meta", {"fine_label_names": [f"c{i}" for i in range(classes)]})
    folder.mkdir(parents=True)
    written = {}
    for fname, n in files.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, n).tolist()
        with open(folder / fname, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)  # str keys, as the originals load
        written[fname] = (data, labels)
    with open(folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f)
    return written


def write_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 6) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8)
                pixels[..., c] = 255  # a learnable colour cue
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i}.png")
