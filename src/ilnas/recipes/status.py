"""Where runs stand: finished, running (and who runs it), failed (its last session's error: a resume most
often fails again), or interrupted (to be resumed); how many epochs
are done, the last epoch's accuracies (and for a search, for how many epochs its cell has not changed), where its
latest checkpoint lies (what a resume continues from, and
what a kill now would lose), how many sessions worked on the run, and for a running one the time its
remaining epochs should take; a sweep's runs not started yet are read from its sweep.json. Reads run
directories only; writes nothing."""
from __future__ import annotations

import collections
import datetime
import time
from pathlib import Path
from typing import Callable, Sequence

from ilnas.errors import IlnasError
from ilnas.fileio import reachable
from ilnas.report.tables import markdown_table
from ilnas.runlock import lock_holder
from ilnas.runs import (PROVENANCE, find_runs, is_finished, latest_checkpoint, read_config, read_json, read_metrics,
                        require_readable_end)
from ilnas.space.genotype import parse_genotype, unchanged_for

RECENT = 5  # epochs whose mean time predicts the remaining ones
FAILURES = ("failed", "crashed")  # a last session that ended so (provenance.json's outcome) failed the run


def run_status(path: Path) -> dict:
    """One run's state (``finished``, ``running``, ``interrupted`` or ``not started``), progress and pace."""
    path = Path(path)
    config = read_config(path)
    kind = config["kind"]
    epochs = [m for m in read_metrics(path, "epoch") if isinstance(m, dict) and m.get("kind") == "epoch"]
    total = _total_epochs(config)
    record = read_json(path, PROVENANCE)
    listed = (record or {}).get("sessions")
    sessions = [s for s in listed if isinstance(s, dict)] if isinstance(listed, list) else []
    try:
        holder = lock_holder(path)
    except OSError as e:  # a lock this user may not open
        holder = f"unknown: its lock cannot be opened ({e.strerror or e})"
    outcome = sessions[-1].get("outcome") if sessions else None  # how the last session ended, where it did
    outcome = outcome if isinstance(outcome, str) else None
    require_readable_end(path)
    state = ("finished" if is_finished(path) else "running" if holder is not None
             else "failed" if outcome and outcome.startswith(FAILURES) else "interrupted" if sessions
             else "not started")
    wall = _wall_seconds(sessions, running=state == "running")
    times = [m["epoch_time"] for m in epochs if isinstance(m.get("epoch_time"), (int, float))][-RECENT:]
    epoch_time = sum(times) / len(times) if times else None
    remaining, at_least = _remaining_seconds(config, epochs, total) if state == "running" else (None, False)
    return {"run": str(path), "kind": "search" if kind == "search" else "training", "state": state,
            "holder": holder if state == "running" else None,
            "outcome": outcome if state in ("failed", "interrupted") else None,
            "epochs_done": len(epochs), "epochs": total,
            "last": _last(epochs[-1]) if epochs else None, "cell_unchanged_epochs": _cell_unchanged(epochs),
            "checkpoint": None if state == "finished" else _checkpoint(path, config), "sessions": len(sessions),
            "resumed": sum(1 for s in sessions if s.get("resumed")), "epoch_seconds": epoch_time,
            "remaining_seconds": remaining, "remaining_at_least": at_least, "wall_seconds": wall, "job": None}


def _wall_seconds(sessions: list[dict], running: bool) -> float | None:
    """The time the run's sessions have taken: each ended one from its start to its end, a running one's last
    session until now; None where a session's times cannot be read (one killed has no end: it is left out)."""
    total = 0.0
    for i, session in enumerate(sessions):
        try:
            start = datetime.datetime.fromisoformat(session["start"])
            end = session.get("end")
            if end is None and not (running and i == len(sessions) - 1):
                continue
            stop = datetime.datetime.fromisoformat(end) if end else datetime.datetime.now(datetime.timezone.utc)
            total += max((stop - start).total_seconds(), 0.0)
        except (KeyError, TypeError, ValueError):  # a hand-edited record
            return None
    return total


def state_in_words(row: dict) -> str:
    """A run's state as a report states it: with who runs it, or how its last session ended."""
    if row["state"] == "failed":
        return row["outcome"]
    detail = row["holder"] or row["outcome"]
    return f"{row['state']} ({detail})" if detail else row["state"]


def status(paths: Sequence[str | Path]) -> list[dict]:
    """The state of every run named or found below the directories named (a sweep's, say); a run whose
    files cannot be read is listed as such, and the others still are. In a SLURM sweep each unfinished run
    also names its cell's job and the job's state, and a cell whose job has not started a run yet is a row
    of its own (``queued``). A sweep's run that has not started yet is a row too (``not started``: one its
    sweep.json lists, where no run directory is yet)."""
    paths = [reachable(p, "run path") for p in paths]
    jobs, planned = _sweep_jobs(paths), _sweep_runs(paths)
    try:
        runs = find_runs(paths)
    except IlnasError:
        if not (jobs or planned) or not all(Path(p).is_dir() for p in paths):
            raise
        runs = []  # every cell of the sweep still queued, or the sweep just started
    rows = []
    for run in runs:
        try:
            rows.append(run_status(run))
        except IlnasError as e:
            rows.append(_row(str(run), f"unreadable: {e}"))
    for cell, (job, state) in jobs.items():
        mine = [r for r in rows if Path(r["run"]).parent == cell]
        for r in mine:
            r["job"] = None if r["state"] == "finished" else f"{job} {state}"
        if not mine:
            rows.append({**_row(str(cell), "queued"), "job": f"{job} {state}"})
    listed = {Path(r["run"]) for r in rows}
    rows += [{**_row(str(run), "not started"), "kind": "search" if run.name == "search" else "training"}
             for run in planned if run not in listed and run.parent not in listed]
    return rows


def _sweep_runs(paths: Sequence[Path]) -> list[Path]:
    """The runs that the sweeps among ``paths`` are to run, as their sweep.json lists them (none where it is
    missing or cannot be read: a sweep of an older ilnas wrote it only at its end)."""
    runs = []
    for p in paths:
        try:
            record = read_json(p, "sweep.json") if p.is_dir() else None
        except IlnasError:  # torn or hand-edited: the runs on disk are still listed
            record = None
        cells = (record or {}).get("cells")
        for cell in cells if isinstance(cells, list) else []:
            if isinstance(cell, dict) and isinstance(cell.get("cell"), str) and isinstance(cell.get("runs"), dict):
                runs += [(p / cell["cell"] / run).resolve() for run in cell["runs"]]
    return runs


def _row(run: str, state: str) -> dict:
    return {"run": run, "kind": "-", "state": state, "holder": None, "outcome": None, "epochs_done": 0,
            "epochs": None, "last": None, "cell_unchanged_epochs": None, "checkpoint": None, "sessions": 0,
            "resumed": 0, "epoch_seconds": None, "remaining_seconds": None, "remaining_at_least": False,
            "wall_seconds": None, "job": None}


def sweep_outlook(paths: Sequence[str | Path], rows: list[dict]) -> list[str]:
    """For each sweep among ``paths`` that runs its cells here (executor local) and has not ended (its sweep.json
    not final): the time its runs still to run should take, ``parallel`` at a time. A running run counts its own
    estimate; one not started, the mean time of the sweep's finished runs of its kind (search or training); an
    interrupted one, that share of it its epochs left. A lower bound ("at least") where a kind has no finished
    run yet. A cell's search and trainings run one after the other, so it is never less than the longest run."""
    lines = []
    for p in map(Path, paths):
        try:
            record = read_json(p, "sweep.json") if p.is_dir() else None
        except IlnasError:
            record = None
        if not record or record.get("final") is not False or record.get("executor") != "local":
            continue
        parallel = record.get("parallel")
        parallel = parallel if isinstance(parallel, int) and not isinstance(parallel, bool) and parallel > 0 else 1
        mine = [r for r in rows if Path(r["run"]).resolve().is_relative_to(p.resolve())]
        left = _time_left(mine)
        if left is None:
            continue
        work, longest, at_least, runs = left
        lines.append(f"{p}: {runs} runs to go, {'at least ' if at_least else 'about '}"
                     f"{_duration(max(work / parallel, longest))} at {parallel} at a time")
    return lines


def _time_left(rows: list[dict]) -> tuple[float, float, bool, int] | None:
    """(seconds of work left, the longest run's, whether that is a lower bound, runs to go) over a sweep's rows;
    None where none is to go."""
    timed = collections.defaultdict(list)
    for r in rows:
        if r["state"] == "finished" and r["wall_seconds"] is not None:
            timed[r["kind"]].append(r["wall_seconds"])
    mean = {kind: sum(t) / len(t) for kind, t in timed.items()}
    estimates, at_least = [], False
    for r in rows:
        if r["state"] == "running":
            estimate = r["remaining_seconds"]
            at_least |= r["remaining_at_least"]
        elif r["state"] in ("not started", "interrupted"):
            done = r["epochs_done"] / r["epochs"] if r["state"] == "interrupted" and r["epochs"] else 0.0
            estimate = mean[r["kind"]] * max(1.0 - done, 0.0) if r["kind"] in mean else None
        else:
            continue
        at_least |= estimate is None
        estimates.append(estimate or 0.0)
    return (sum(estimates), max(estimates), at_least, len(estimates)) if estimates else None


def _remaining_seconds(config: dict, epochs: list[dict], total: int | None) -> tuple[float | None, bool]:
    """What the epochs still to run should take, and whether that is only a lower bound. A training's epochs
    take the mean time of its recent ones. A search's epochs differ: a weight-only warm-up epoch skips the
    architecture step (the costlier part of a step), and a P-DARTS phase's passes grow with its cells times
    its candidate operations per edge. So each remaining epoch takes the recent pace of its own kind per unit of
    that size; a kind with no epoch yet takes the other's, and where the architecture epochs take the warm-up's
    pace, the estimate is a lower bound."""
    if total is None:
        return None, False
    timed = [m for m in epochs if isinstance(m.get("epoch_time"), (int, float))]
    left = range(len(epochs), total)
    try:
        shape = _epoch_shape(config)
        if shape is not None:
            return _weighted(shape, timed, left)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError):  # a hand-edited config.yaml or metrics
        pass
    times = [m["epoch_time"] for m in timed][-RECENT:]
    return (sum(times) / len(times) * len(left) if times else None), False


def _weighted(shape: tuple[int, int, Callable[[int], float]], timed: list[dict], left: range
              ) -> tuple[float | None, bool]:
    per_phase, warmup, size = shape
    pace = {}
    for warm in (True, False):
        recent = [m["epoch_time"] / size(int(m.get("phase") or 0)) for m in timed
                  if (m.get("arch_updated") is False) == warm][-RECENT:]
        pace[warm] = sum(recent) / len(recent) if recent else None
    if pace[True] is None and pace[False] is None:
        return None, False
    at_least = pace[False] is None and any(i % per_phase >= warmup for i in left)
    pace = {warm: pace[warm] if pace[warm] is not None else pace[not warm] for warm in pace}
    return sum(pace[i % per_phase < warmup] * size(i // per_phase) for i in left), at_least


def _epoch_shape(config: dict) -> tuple[int, int, Callable[[int], float]] | None:
    """A search's epochs per phase, warm-up epochs per phase, and each phase's size (cells times candidate
    operations per edge, relative); None for a training."""
    if config["kind"] != "search":
        return None
    search, pdarts = config["search"], config["pdarts"]
    if search["method"] != "pdarts":
        return int(search["epochs"]), int(search["warmup_epochs"]), lambda phase: 1.0
    sizes = [int(cells) * int(ops) for cells, ops in zip(pdarts["layers"], pdarts["ops_per_edge"])]
    return int(search["epochs"]), int(search["warmup_epochs"]), lambda phase: sizes[min(phase, len(sizes) - 1)] / \
        sizes[0]


def _sweep_jobs(paths: Sequence[str | Path]) -> dict[Path, tuple[str, str]]:
    """Each cell directory of the SLURM sweeps named (directories holding submitit/jobs.json): its recorded job
    and the job's state as sacct gives it."""
    from ilnas.recipes.sweep import JOBS, recorded_job_states

    jobs: dict[Path, tuple[str, str]] = {}
    for p in map(Path, paths):
        if (p / "submitit" / JOBS).is_file():
            jobs.update({(p / cell).resolve(): found for cell, found in recorded_job_states(p).items()})
    return jobs


def _total_epochs(config: dict) -> int | None:
    """All the epochs the run's configuration asks for; None where config.yaml does not say (hand-edited)."""
    try:
        if config["kind"] != "search":
            return int(config["train"]["epochs"])
        phases = len(config["pdarts"]["layers"]) if config["search"]["method"] == "pdarts" else 1
        return int(config["search"]["epochs"]) * phases
    except (KeyError, TypeError, ValueError):
        return None


def _checkpoint(path: Path, config: dict) -> dict | None:
    """Where the run's latest intact checkpoint lies: epochs completed (over all P-DARTS phases) and steps of the
    next one, which file holds it (the previous one where the latest is damaged) and how old it is."""
    try:
        payload, file, damage = latest_checkpoint(path)
        if payload is None or file is None:
            return None
        if payload.get("kind") == "search":
            prog = payload["progress"]
            epochs = prog["phase"] * int(config["search"]["epochs"]) + prog["epoch"]
            steps = prog["epoch_steps"]
        else:
            epochs, steps = payload["epoch"], (payload.get("within_epoch") or {}).get("steps", 0)
        age = max(time.time() - file.stat().st_mtime, 0.0)
    except (IlnasError, OSError, KeyError, TypeError, ValueError) as e:
        return {"unreadable": str(e) if isinstance(e, IlnasError) else f"{type(e).__name__}: {e}"}
    return {"epochs": int(epochs), "steps": int(steps), "file": file.name, "damaged_latest": damage,
            "age_seconds": age}


def _checkpoint_cell(ckpt: dict | None) -> str:
    if ckpt is None:
        return "-"
    if "unreadable" in ckpt:
        return "unreadable"
    where = f"{ckpt['epochs']} ep" + (f" + {ckpt['steps']} steps" if ckpt["steps"] else "")
    return f"{where}, {_duration(ckpt['age_seconds'])} ago" + (" (previous file)" if ckpt["damaged_latest"] else "")


def _last(epoch: dict) -> str:
    """The last epoch's accuracies: a search's validation accuracy per task, a training's test top-1."""
    if isinstance(epoch.get("val_acc"), dict):
        return "val acc " + " ".join(f"{task} {acc:.3f}" for task, acc in epoch["val_acc"].items()
                                     if isinstance(acc, (int, float)))
    top1 = epoch.get("test_top1")
    return f"test top-1 {top1:.3f}" if isinstance(top1, (int, float)) else "-"


def _cell_unchanged(epochs: list[dict]) -> int | None:
    """For how many of its last epochs (over P-DARTS phases too) a search's cell has been the one it has now; None
    for a training, or where an epoch's cell cannot be read."""
    try:
        cells = [parse_genotype(m["genotype"]) for m in epochs if "genotype" in m]
    except (IlnasError, TypeError):
        return None
    return unchanged_for(cells) or None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h"


def table(rows: list[dict]) -> str:
    """A Markdown table, one row per run; below it, the process of each running one and why each failed one
    stopped."""
    cells = []
    for r in rows:
        sessions = f"{r['sessions']}" + (f" ({r['resumed']} resumed)" if r["resumed"] else "")
        total = r["epochs"] if r["epochs"] is not None else "?"
        state = r["state"] + (f" (SLURM job {r['job']})" if r.get("job") else "")
        last = (r["last"] or "-") + (f"; same cell {r['cell_unchanged_epochs']} ep" if r.get("cell_unchanged_epochs")
                                     else "")
        cells.append([r["run"], r["kind"], state, f"{r['epochs_done']}/{total}", last,
                      _checkpoint_cell(r["checkpoint"]), sessions, _duration(r["epoch_seconds"]),
                      ("≥ " if r["remaining_at_least"] else "") + _duration(r["remaining_seconds"])])
    lines = markdown_table(["run", "kind", "state", "epochs", "last epoch", "checkpoint", "sessions", "epoch time",
                            "remaining"], cells)
    if len(rows) > 1:  # a sweep's runs, say: how far it has come
        states = collections.Counter(r["state"] for r in rows)
        lines += ["", f"{len(rows)} runs: " + ", ".join(f"{n} {state}" for state, n in states.most_common())]
    notes = [f"{r['run']}: {r['holder']}" for r in rows if r["holder"]]
    notes += [f"{r['run']}: {r['outcome']}" for r in rows if r["state"] == "failed"]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
