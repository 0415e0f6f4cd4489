"""A run directory: resolved config, metrics log, checkpoints, and the rules that keep it safe.

A finished run (one with ``summary.json`` or ``result.json``) is never overwritten without ``force``; an unfinished one
is continued with ``resume``. Nothing here is written before the caller has validated its inputs.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ilnas.errors import IlnasError
from ilnas.fileio import atomic_torch_save, atomic_write_bytes, atomic_write_text

CONFIG, METRICS, CHECKPOINT = "config.yaml", "metrics.jsonl", "checkpoint.pt"
FINISHED = ("summary.json", "result.json")  # a search ends with the first, a training run with the second


def is_finished(path: Path) -> bool:
    return any((Path(path) / name).is_file() for name in FINISHED)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    # --- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def check(cls, path: Path, resume: bool, force: bool) -> None:
        """Refuse, before anything is written, what would damage an existing run."""
        path = Path(path)
        if resume and force:
            raise IlnasError("--resume and --force exclude each other")
        if resume:
            if not (path / CONFIG).is_file():
                raise IlnasError(f"nothing to resume: {path} holds no {CONFIG}")
            if is_finished(path):
                raise IlnasError(f"{path} holds a finished run; nothing to resume")
            return
        if path.exists() and not path.is_dir():
            raise IlnasError(f"{path} exists and is not a directory")
        if path.is_dir() and any(path.iterdir()) and not force:
            state = "a finished run" if is_finished(path) else "an unfinished run (continue it with --resume)"
            raise IlnasError(f"{path} already holds {state}; pass --force to overwrite it")

    @classmethod
    def create(cls, path: Path, config: dict, force: bool) -> "RunDir":
        path = Path(path)
        if force and path.is_dir():
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        atomic_write_text(path / CONFIG, yaml.safe_dump(config, sort_keys=False))
        return run

    def config(self) -> dict:
        return yaml.safe_load((self.path / CONFIG).read_text())

    # --- metrics -----------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics_lines(self) -> int:
        p = self.path / METRICS
        return sum(1 for _ in open(p)) if p.is_file() else 0

    def truncate_metrics(self, lines: int) -> None:
        """Drop what an interrupted run logged after its last checkpoint."""
        p = self.path / METRICS
        if p.is_file():
            kept = p.read_text().splitlines(keepends=True)[:lines]
            atomic_write_text(p, "".join(kept))

    def read_metrics(self) -> list[dict]:
        p = self.path / METRICS
        return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []

    # --- checkpoints and artefacts ----------------------------------------------------------
    def save_checkpoint(self, payload: dict) -> None:
        atomic_torch_save(payload, self.path / CHECKPOINT)

    def load_checkpoint(self) -> dict | None:
        p = self.path / CHECKPOINT
        if not p.is_file():
            return None
        try:
            return torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:  # a checkpoint is written atomically, so this is outside damage
            raise IlnasError(f"cannot read {p}: {e}") from None

    def save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        """An .npz archive, written atomically."""
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self.path / name, buf.getvalue())

    def finish(self, summary: dict, name: str = FINISHED[0]) -> None:
        """Write the run's final record; from then on the run counts as finished."""
        atomic_write_text(self.path / name, json.dumps(summary, indent=1) + "\n")
