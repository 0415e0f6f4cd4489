"""Sweeps: a grid of searches, each followed by the re-training of its cell on every target task.

A spec (YAML) names a search preset and common overrides, the grid's axes (a setting with a list of
values, or named variants, each a list of overrides), and optionally the re-training. Every cell of the
grid is one directory ``<out>/<cell>/`` holding ``search/`` and ``train-<task>/`` (``train-<task>-<recipe>/``
with training recipes, ``...-seed-<s>/`` with training seeds): ilnas runs made by the ordinary commands, so a
sweep resumes the way a run does (finished runs are skipped, interrupted ones continued with --resume) and
``ilnas compare <out>`` reads it.
Cells run N at a time on this machine (the CPU cores divided between them, one GPU each where there are
GPUs) or as SLURM jobs through submitit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue
from typing import Any, Callable, Iterator

from ilnas.config import load_yaml_file, resolve, to_dict
from ilnas.config.schema import canonical, flat_settings, unused_settings
from ilnas.errors import IlnasError, RunFailed, Stopped
from ilnas.fileio import atomic_write_text, load_json, reachable
from ilnas.runlock import RunLock, holder_pid, local_pid, lock_holder
from ilnas.runs import CONFIG, is_finished, read_config, refuse_inside_a_run, require_readable_end, with_defaults
from ilnas.threads import default_threads

SPEC_KEYS = {"out", "search", "grid", "train", "parallel", "executor", "submitit", "report"}
SEARCH_KEYS, TRAIN_KEYS = ("preset", "set"), ("preset", "tasks", "set", "recipes", "seeds")
TRAINING_SECTIONS = ("train", "network")  # settings of a re-training alone (optimizer and data are both kinds')
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a part of a run directory's name, as written
EXECUTORS = ("local", "submitit")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One ilnas run of a cell: the command's arguments (without --out) and its directory."""

    command: str  # search | train
    args: tuple[str, ...]
    out: Path
    config: dict  # what the run resolves to: a run already there must hold the same


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    labels: dict[str, str]  # axis -> the value or variant name of this cell
    runs: tuple[RunSpec, ...]  # the search first, then its re-trainings


@dataclasses.dataclass(frozen=True)
class Sweep:
    out: Path
    cells: tuple[Cell, ...]
    parallel: int  # cells run at a time on this machine (at most the cells)
    executor: str
    submitit: dict  # AutoExecutor parameters (slurm_partition, timeout_min, ...; cluster: local|slurm; max_num_timeout)


def _list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise IlnasError(f"sweep spec: {where} must be a list of key=value strings")
    return value


def _axes(grid: Any) -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """Each axis as (name, [(label, overrides)]): a setting's values, or named variants."""
    if not isinstance(grid, dict) or not grid:
        raise IlnasError("sweep spec: grid must map axes to values, e.g. search.seed: [0, 1, 2]")
    axes = []
    for axis, values in grid.items():
        if isinstance(values, dict) and values:
            axes.append((axis, [(str(k), _list(v, f"grid.{axis}.{k}")) for k, v in values.items()]))
        elif isinstance(values, list) and values:
            if "." not in axis:
                raise IlnasError(f"sweep spec: axis {axis!r} lists values but is not a setting (section.key); "
                                 f"name variants instead: {axis}: {{name: [key=value, ...]}}")
            axes.append((axis, [(_label(v), [f"{axis}={json.dumps(v)}"]) for v in values]))
        else:
            raise IlnasError(f"sweep spec: grid.{axis} must be a non-empty list of values or mapping of variants")
    for axis, values in axes:
        for key in (o.partition("=")[0].strip() for _, sets in values for o in sets):
            if key.split(".")[0] in TRAINING_SECTIONS:  # else refused as a search's unknown section, no way shown
                raise IlnasError(f"sweep spec: grid.{axis} sets {key}, a re-training setting: the grid's cells are "
                                 f"searches; re-train under several settings with train.recipes")
    return axes


def _label(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _dir_name(labels: dict[str, str]) -> str:
    parts = [f"{axis.split('.')[-1]}-{label}" for axis, label in labels.items()]
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "_".join(parts))


def load_spec(path: str | Path, out: str | None = None) -> Sweep:
    """Read and check a spec, and resolve every run of every cell: a bad spec is refused before any run."""
    p = Path(path)
    spec = load_yaml_file(p, "sweep spec", "a mapping (out, search, grid, train, ...)")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise IlnasError(f"sweep spec: unknown key {sorted(unknown)[0]!r}; valid: {', '.join(sorted(SPEC_KEYS))}")
    where, out = ("--out", out) if out is not None else ("sweep spec: out", spec.get("out"))
    out = f"runs/sweep-{p.stem}" if out is None else out
    if not isinstance(out, str) or not out.strip():  # not the default in its place: a slip, like [] or 0
        raise IlnasError(f"{where} must be a directory's path, got {out!r}")
    root = reachable(out, "sweep directory")
    refuse_inside_a_run(root, "sweep")
    search, train = spec.get("search", {}), spec.get("train")
    search = {} if search is None else search
    if not isinstance(search, dict):
        raise IlnasError("sweep spec: search must be a mapping (preset, set)")
    if set(search) - set(SEARCH_KEYS):  # a typo (sets:) would have run every cell without its overrides
        raise IlnasError(f"sweep spec: unknown key search.{sorted(set(search) - set(SEARCH_KEYS))[0]}; valid: "
                         f"{', '.join(SEARCH_KEYS)}")
    parallel, executor, report = spec.get("parallel", 1), spec.get("executor", "local"), spec.get("report", True)
    if not isinstance(report, bool):
        raise IlnasError(f"sweep spec: report must be true or false, got {report!r}")
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise IlnasError(f"sweep spec: parallel must be a positive integer, got {parallel!r}")
    if executor not in EXECUTORS:
        raise IlnasError(f"sweep spec: executor must be {' or '.join(EXECUTORS)}, got {executor!r}")
    cells = []
    axes, preset = _axes(spec.get("grid")), _preset(search, "search", "demo")
    for combo in itertools.product(*(values for _, values in axes)):
        labels = {axis: label for (axis, _), (label, _) in zip(axes, combo)}
        overrides = _list(search.get("set"), "search.set") + [o for _, sets in combo for o in sets]
        cells.append(_cell(root, labels, preset, overrides, train, report))
    if len({c.name for c in cells}) != len(cells):
        raise IlnasError("sweep spec: two cells get the same directory name; give variants distinct names")
    outs = [run.out for c in cells for run in c.runs]
    if len(set(outs)) != len(outs):  # a task whose name ends as another's recipe begins: digits + x-y, digits-x + y
        twice = next(o for o in outs if outs.count(o) > 1)
        raise IlnasError(f"sweep spec: two runs get the directory {twice}; give the recipes other names")
    _refuse_repeats(cells)
    # More slots than cells would only divide the cores into shares nobody uses.
    return Sweep(root, tuple(cells), min(parallel, len(cells)), executor, _submitit_settings(spec.get("submitit")))


def _refuse_repeats(cells: list[Cell]) -> None:
    """Two cells whose runs would compute the same numbers (they differ only in settings those runs never read,
    e.g. engine.lam of an MTL search) are one run made twice, and would stand in compare as two results."""
    seen: dict[str, tuple[Cell, RunSpec, dict]] = {}
    for cell in cells:
        for run in cell.runs:
            settings, unused = flat_settings(run.config), unused_settings(run.config)
            genotype = run.args[run.args.index("--genotype") + 1] if "--genotype" in run.args else None
            used = {k: v for k, v in flat_settings(canonical(run.config)).items() if k not in unused}
            key = json.dumps([run.command, genotype, used], sort_keys=True, default=str)
            if key in seen:
                first, first_run, first_settings = seen[key]
                differ = sorted(k for k in settings.keys() | first_settings.keys()
                                if settings.get(k) != first_settings.get(k))
                never, alike = [k for k in differ if k in unused], [k for k in differ if k not in unused]
                reasons = []
                if never:
                    reasons.append(f"{run.command} never reads {', '.join(never)} there")
                if alike:
                    reasons.append(f"{', '.join(alike)} mean the same there, all 1 being the default")
                why = "; ".join(reasons) or "the same settings"
                if first is cell:  # two recipes of one cell's re-training
                    raise IlnasError(f"sweep spec: {first_run.out.name} and {run.out.name} of cell {cell.name} are the "
                                     f"same training ({why}); give the recipes settings that differ")
                raise IlnasError(f"sweep spec: cells {first.name} and {cell.name} make the same {run.command} run "
                                 f"({why}); name variants so that it is made once")
            seen[key] = cell, run, settings


def _preset(section: dict, name: str, default: str) -> str:
    """A section's preset, a name (which one is checked as the cells resolve): a number or a list had ended the
    sweep in a traceback."""
    preset = section.get("preset", default)
    if not isinstance(preset, str) or not preset.strip():
        raise IlnasError(f"sweep spec: {name}.preset must name a preset (see `ilnas presets`), got {preset!r}")
    return preset


def _submitit_settings(value: Any) -> dict:
    settings = {} if value is None else value
    if not isinstance(settings, dict):
        raise IlnasError("sweep spec: submitit must be a mapping of AutoExecutor parameters")
    requeues = settings.get("max_num_timeout", 0)
    if not isinstance(requeues, int) or isinstance(requeues, bool) or requeues < 0:
        raise IlnasError(f"sweep spec: submitit.max_num_timeout must be a non-negative integer, got {requeues!r}")
    return dict(settings)


def _resolved(preset: str, overrides: list[str], kind: str, where: str):
    """The configuration a run will have, its tasks known: refused here rather than when the run starts."""
    from ilnas.data.names import check_task_name

    try:
        cfg = resolve(preset, None, overrides, kind)
        for task in cfg.data.tasks:
            check_task_name(task)
            if task.startswith("imagefolder:"):  # its classes are counted in its files now (tasks.py loads torch)
                from ilnas.data.tasks import task_info

                task_info(task, cfg.data)
    except IlnasError as e:
        raise IlnasError(f"{where}: {e}") from None
    return cfg


def _cell(root: Path, labels: dict[str, str], preset: str, overrides: list[str], train: Any, report: bool) -> Cell:
    """A cell's runs: its search and the re-training of the found cell; a variant that names a cell
    (``genotype=SPEC``, ``{seed}`` standing for the cell's search.seed, e.g. random:{seed}) skips the search."""
    name = _dir_name(labels)
    where = f"sweep cell {name}"
    given = [o.partition("=")[2] for o in overrides if o.startswith("genotype=")]
    overrides = [o for o in overrides if not o.startswith("genotype=")]
    cfg = _resolved(preset, overrides, "search", where)
    search_out = root / name / "search"
    flags = () if report else ("--no-report",)
    runs = [RunSpec("search", (*flags, "--preset", preset, *(a for o in overrides for a in ("--set", o))), search_out,
                    to_dict(cfg))]
    genotype = str(search_out)
    if given:
        from ilnas.space.genotype import load_genotype

        genotype, runs = given[-1].replace("{seed}", str(cfg.search.seed)), []
        try:
            load_genotype(genotype)
        except IlnasError as e:
            raise IlnasError(f"{where}: {e}") from None
        if train is None:
            raise IlnasError(f"{where}: a variant that names its cell (genotype=...) needs a train section")
    if train is not None:
        from ilnas.data.names import task_slug

        tasks = train.get("tasks") if isinstance(train, dict) else None
        if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)):
            raise IlnasError("sweep spec: train needs tasks: [task, ...] (and optionally preset, set, recipes, seeds)")
        odd = next((t for t in tasks if not t.strip() or not t.isprintable()), None)
        if odd is not None:  # a line break or tab would split the messages and directory names that carry it
            raise IlnasError(f"sweep spec: train.tasks holds {odd!r}, which is no task's name")
        unknown = set(train) - set(TRAIN_KEYS)
        if unknown:
            raise IlnasError(f"sweep spec: unknown key train.{sorted(unknown)[0]}; valid: {', '.join(TRAIN_KEYS)}")
        common = _list(train.get("set"), "train.set")
        recipes = _train_recipes(train.get("recipes"))
        if any(o.partition("=")[0].strip() == "data.tasks" for sets in (common, *recipes.values()) for o in sets):
            raise IlnasError("sweep spec: train.tasks names the tasks a cell is re-trained on; a data.tasks in "
                             "train.set or a recipe would train another one in its directory")
        seeds = _train_seeds(train.get("seeds"), [common, *recipes.values()])
        preset = _preset(train, "train", "eval-digits")
        for task, (recipe, recipe_sets), seed in itertools.product(train["tasks"], recipes.items(), seeds):
            seed_sets = [f"train.seed={seed}"] if seed is not None else []
            sets = [f"data.tasks=[{task}]", *common, *recipe_sets, *seed_sets]
            tcfg = _resolved(preset, sets, "eval", f"{where}, training on {task}" + (f" ({recipe})" if recipe else ""))
            folder = "-".join(["train", task_slug(task), *([recipe] if recipe else []),
                               *([f"seed-{seed}"] if seed is not None else [])])
            runs.append(RunSpec("train", (*flags, "--genotype", genotype, "--preset", preset,
                                          *(a for o in sets for a in ("--set", o))), root / name / folder,
                                to_dict(tcfg)))
    return Cell(name, labels, tuple(runs))


def _train_recipes(value: Any) -> dict[str, list[str]]:
    """The re-training recipes of every found cell (train.recipes: name -> overrides, each cell re-trained once per
    recipe and task, in train-<task>-<name>/), or {"": []}: the training preset and train.set alone."""
    if value is None:
        return {"": []}
    if not isinstance(value, dict) or not value:
        raise IlnasError("sweep spec: train.recipes must map recipe names to lists of key=value strings, e.g. "
                         "{short: [train.epochs=300], long: [train.epochs=600]}")
    recipes = {}
    for name, sets in value.items():
        name = str(name) if isinstance(name, int) and not isinstance(name, bool) else name  # YAML's 300: [...]
        if not isinstance(name, str) or not RECIPE_NAME.fullmatch(name):
            raise IlnasError(f"sweep spec: train.recipes name {name!r} is no plain name (letters, digits, '.', "
                             f"'_' and '-'; part of its runs' directory names)"[:200])
        recipes[name] = _list(sets, f"train.recipes.{name}")
    return recipes


def _train_seeds(value: Any, overrides: list[list[str]]) -> list[int | None]:
    """The training seeds of every found cell (train.seeds: each cell re-trained once per seed, task and recipe,
    in train-<task>[-<recipe>]-seed-<s>/), or [None]: once, at the seed the training's settings give.
    ``overrides``: train.set and each recipe's, where a train.seed would contradict the seeds."""
    if value is None:
        return [None]
    if not (isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and len(set(value)) == len(value)):
        raise IlnasError(f"sweep spec: train.seeds must be a list of distinct integers, got {value!r}"[:200])
    if any(o.partition("=")[0].strip() == "train.seed" for sets in overrides for o in sets):
        raise IlnasError("sweep spec: train.seeds and a train.seed in train.set or a recipe exclude each other")
    return list(value)


def command(run: RunSpec) -> list[str]:
    """The ilnas command that starts ``run``, or continues it where its directory holds it already
    (--auto-resume); a directory holding another configuration is refused here, before the cell runs."""
    if (reachable(run.out, "run directory") / CONFIG).is_file():
        found = {k: v for k, v in with_defaults(read_config(run.out)).items() if k != "genotype"}
        if found != run.config:
            raise IlnasError(f"{run.out} holds a run of another configuration than the sweep's; move it away or "
                             f"choose another out")
    return [sys.executable, "-m", "ilnas", run.command, "--quiet", "--out", str(run.out), *run.args, "--auto-resume"]


def check_sweep(sweep: Sweep) -> tuple[list[str], int]:
    """Every run of the sweep checked as its cell would start it (``--check``: nothing written), ``parallel`` at a
    time (at most one per core), each with its share of the CPU threads, in this process's environment otherwise:
    a line per run, in the sweep's order, and how many would be refused. A re-training of a cell its search has not
    found yet is checked with a stand-in cell (``stand_in_cell``): what refuses it there (its data, a network too
    deep for its images, ...) refuses it with any cell, bar the memory its cell needs; each such training once (a
    grid's cells differ in their searches only: their re-trainings of a task alike). A run another process works
    on is not checked (the sweep would wait for it). Refused at once where another process runs the sweep itself,
    as the sweep would be."""
    if sweep.out.is_dir():
        RunLock(sweep.out).probe()
    _refuse_a_record_not_ours(sweep.out)
    # (prefix, then a line of its own, or the check that decides it and whether that check is another run's)
    entries: list[tuple[str, str | int, bool]] = []
    checks: list[tuple[Path, list[str]]] = []  # each run's directory and command, its cell's stand-in given
    first_check: dict[tuple[str, ...], int] = {}  # a stand-in's training -> the check of its first run
    for cell in sweep.cells:
        search = cell.runs[0] if cell.runs[0].command == "search" else None
        for run in cell.runs:
            args, prefix, stands_in = run.args, f"{run.out}: ", False
            at = args.index("--genotype") + 1 if "--genotype" in args else None
            if search is not None and at is not None and args[at] == str(search.out) and \
                    not _finished_run(search.out):
                if (run.out / CONFIG).is_file():  # begun with a cell the search has since dropped (--force)
                    entries.append((prefix, "not checked: its cell is the one its search is to find", False))
                    continue
                stand_in, stands_in = stand_in_cell(search.config), True
                args = (*args[:at], stand_in, *args[at + 1:])
                prefix += f"with a stand-in cell ({stand_in}; its own is the one its search is to find): "
            holder = lock_holder(run.out)
            if holder is not None:
                entries.append((f"{run.out}: ", f"not checked: another process works on it ({holder}); the sweep "
                                                f"would wait for it to end, then skip or continue the run", False))
                continue
            if stands_in and args in first_check:  # the grid sets searches only: each task re-trained alike
                entries.append((prefix, first_check[args], True))
                continue
            if stands_in:
                first_check[args] = len(checks)
            entries.append((prefix, len(checks), False))
            checks.append((run.out, [*command(dataclasses.replace(run, args=args)), "--check"]))
    outcomes = _run_checks([argv for _, argv in checks], sweep.parallel)
    lines, refused = [], 0
    for prefix, what, repeated in entries:
        if isinstance(what, str):
            lines.append(prefix + what)
            continue
        no, said = outcomes[what]
        refused += no
        lines.append(prefix + (f"{'refused' if no else 'checked'} as {checks[what][0]} (the same training)"
                               if repeated else said))
    return lines, refused


def _run_checks(commands: list[list[str]], parallel: int) -> list[tuple[bool, str]]:
    """Each ``--check`` command, ``parallel`` processes at a time but no more than this process has threads
    (``OMP_NUM_THREADS`` or its cores: a submitit sweep's ``parallel`` counts cluster jobs, not this host's
    cores), each with its share of them: whether it would refuse its run, and the last line it said. A Ctrl-C
    starts no further check."""
    if not commands:
        return []
    workers = min(parallel, len(commands), default_threads())
    env = {**os.environ, **slot_env(0, workers, gpus=0)}

    def check(argv: list[str]) -> tuple[bool, str]:
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        said = (done.stdout if done.returncode == 0 else done.stderr).strip().splitlines()
        return done.returncode != 0, said[-1] if said else f"exit code {done.returncode}"

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(pool.map(check, commands))
    finally:
        pool.shutdown(cancel_futures=True)


def stand_in_cell(search_config: dict) -> str:
    """The cell a re-training is checked with before its search has found one: a random cell (``random:0``) of the
    search's operations, so that a re-training that needs them (operations of one's own) is checked as it will
    run."""
    from ilnas.space.genotype import PRIMITIVES

    ops = tuple(search_config["space"]["ops"])
    return "random:0" if ops == PRIMITIVES else f"random:0:{','.join(ops)}"


def describe_sweep(sweep: Sweep, commands: bool = True) -> str:
    """How many cells and runs the sweep has, and how many of the runs have finished; with ``commands``, every cell
    and the commands its runs start with (what --dry-run prints)."""
    runs = [run for cell in sweep.cells for run in cell.runs]
    done = sum(_finished_run(run.out) for run in runs)
    lines = [f"{len(sweep.cells)} cells ({len(runs)} runs, {done} finished) in {sweep.out}, {sweep.parallel} at a "
             f"time ({sweep.executor})"]
    for cell in sweep.cells if commands else ():
        lines.append(f"{cell.name}:")
        lines += ["  ilnas " + shlex.join([run.command, "--out", str(run.out), *run.args]) for run in cell.runs]
    return "\n".join(lines) + "\n"


def _finished_run(path: Path) -> bool:
    """Whether the run at ``path`` has finished and its record of the end can be read: a run whose record cannot
    is no finished run, and its cell fails saying how to mend it (run_cell). False also where the path cannot be
    looked up (run_sweep refuses that in one line)."""
    try:
        require_readable_end(path)
        return is_finished(path)
    except (OSError, IlnasError):
        return False


def run_cell(cell: Cell, slot_env: dict[str, str] | None = None,
             started: Callable[[subprocess.Popen, Path], None] | None = None) -> dict:
    """The cell's runs in order (the search, then each re-training), each started, resumed or skipped, in
    this process's environment plus ``slot_env``. Returns the cell's status; a failed run stops the cell (its
    log names why). ``started(process, run directory)`` hears of each run's process as it starts, and of a
    run held by another process (``HeldElsewhere``), which is waited for first."""
    env = {**os.environ, **(slot_env or {})}
    status = {"cell": cell.name, "labels": cell.labels, "runs": {}}
    for run in cell.runs:
        key = run.out.name
        holder = lock_holder(run.out)
        if holder is not None:
            held = HeldElsewhere(run.out, holder)
            if started is not None:  # before the line below: a stop that follows it finds the process to pass on to
                started(held, run.out)
            print(f"ilnas: sweep cell {cell.name}: {key} is being worked on by another process ({holder}); waiting "
                  f"for it to end", file=sys.stderr, flush=True)
            if not held.wait():
                status["runs"][key] = "stopped (the sweep was stopped while another process held the run)"
                break
        if is_finished(run.out):
            try:  # a finished run whose record cannot be read would stop compare: the cell fails, saying so
                require_readable_end(run.out)
            except IlnasError as e:
                status["runs"][key] = f"failed ({e})"
                break
            status["runs"][key] = "finished (skipped)"
            continue
        log = run.out.parent / f"{key}.log"
        try:
            run.out.parent.mkdir(parents=True, exist_ok=True)
            f = open(log, "ab")
        except OSError as e:
            status["runs"][key] = f"failed (cannot write its log {log}: {e.strerror or e})"
            break
        with f:
            proc = subprocess.Popen(command(run), stdout=f, stderr=subprocess.STDOUT, env=env)
            if started is not None:
                started(proc, run.out)
            rc = proc.wait()
        status["runs"][key] = "finished" if rc == 0 else f"failed (exit {rc}; see {log})"
        if rc != 0:
            break
    return status


class HeldElsewhere:
    """A run of the sweep that another process is working on: say, the command of an earlier run of the sweep
    whose driver was killed, still running on. ``wait`` waits for it to end, after which the run is skipped
    (finished) or resumed (interrupted) as any other. A stop of the sweep is passed on to that process where
    it runs on this host (it checkpoints its step and ends), and the run is then not started again."""

    POLL_S = 1.0

    def __init__(self, out: Path, holder: str):
        """``holder``: the lock's line as read (the process named there is the one a stop is passed on to)."""
        self.out, self.stopped = out, False
        self.pid = local_pid(holder) or 0  # 0: on another host (no such process here)

    def poll(self) -> int | None:
        return None if lock_holder(self.out) is not None else 0

    def send_signal(self, signum: int) -> None:
        self.stopped = True
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def wait(self) -> bool:
        """Until the run is free (True), or, stopped, until the process on this host has ended (False)."""
        while lock_holder(self.out) is not None and not (self.stopped and not self.pid):
            time.sleep(self.POLL_S)
        return not self.stopped


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def slot_env(slot: int, parallel: int, gpus: int) -> dict[str, str]:
    """The environment variables of slot ``slot`` of ``parallel``: its share of the CPU threads this process
    may use (``OMP_NUM_THREADS`` where set, say by a job script or a test runner, else its cores; oversubscribed
    OpenMP threads make a search step many times slower), and its own GPU where there are GPUs."""
    env = {"OMP_NUM_THREADS": str(max(1, default_threads() // parallel))}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


def _in_slots(sweep: Sweep, run: Callable[..., dict], ended: Callable[[dict], None]) -> list[dict]:
    """``run(cell, env, started)`` for every cell, ``parallel`` at a time on this machine, each in the
    environment of its slot (its share of the cores, its GPU); ``ended(status)`` as each cell ends. Interrupted
    (Ctrl-C) or terminated (SIGTERM: the sweep itself a cluster job at its time limit), no further cell starts
    and the running commands are stopped with SIGTERM, each after the step it is on, with a checkpoint; the
    sweep waits for them."""
    gpus = _gpus()
    slots: Queue = Queue()
    for i in range(sweep.parallel):
        slots.put(i)
    running: dict[int, Any] = {}  # slot -> what runs there now (a Popen, a HeldElsewhere, a local job's commands)
    done, stopping, printing = itertools.count(1), threading.Event(), threading.Lock()

    def one(cell: Cell) -> dict:
        slot, t0 = slots.get(), time.monotonic()
        try:
            status = run(cell, slot_env(slot, sweep.parallel, gpus), lambda proc, out: running.update({slot: proc}))
        finally:
            slots.put(slot)
        with printing:
            if not stopping.is_set():  # a run the stop ended is no failure to report
                print(f"[{next(done)}/{len(sweep.cells)}] {cell.name}: {_progress(status, time.monotonic() - t0)}",
                      flush=True)
                ended(status)
        return status

    pool = ThreadPoolExecutor(max_workers=sweep.parallel)
    try:
        with _terminated_as_stopped():
            return list(pool.map(one, sweep.cells))
    except (KeyboardInterrupt, Stopped):
        stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # one that had Ctrl-C too just notes it: the same stop
        raise
    finally:
        pool.shutdown(wait=True)


def _progress(status: dict, seconds: float) -> str:
    """One line on a cell just done: its first run that did not finish and why, else how many of its runs
    finished now and in what time, and how many had finished before."""
    runs = status["runs"]
    unfinished = next(((run, why) for run, why in runs.items() if not why.startswith("finished")), None)
    if unfinished is not None:
        return f"its {unfinished[0]} {unfinished[1]}"
    skipped = sum(why == "finished (skipped)" for why in runs.values())
    if skipped == len(runs):
        return "finished before (skipped)"
    ran = len(runs) - skipped
    return (f"{ran} run{'s' * (ran > 1)} finished in {seconds / 60:.1f} min" +
            (f" ({skipped} finished before)" if skipped else ""))


@contextlib.contextmanager
def _terminated_as_stopped() -> Iterator[None]:
    """SIGTERM to this process raises ``Stopped`` in it (the main thread's wait), as Ctrl-C raises
    KeyboardInterrupt; elsewhere than in the main thread, nothing changes."""
    def stop(signum: int, frame) -> None:
        raise Stopped(f"stopped by {signal.Signals(signum).name}: no further cell starts, and the running ones "
                      f"checkpointed their step; run the sweep again to continue", signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_sweep(sweep: Sweep) -> dict:
    """Run every cell (N at a time, or through submitit); write ``<out>/sweep.json``; return it. A run directory
    that holds another configuration is refused first, before any cell runs or any job is submitted, and so
    is a second process running the same sweep (it would start or submit every unfinished cell again)."""
    for cell in sweep.cells:
        for run in cell.runs:
            command(run)
    try:
        sweep.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IlnasError(f"cannot create the sweep directory {sweep.out} ({e.strerror or e})") from None
    lock = RunLock(sweep.out)
    lock.acquire()
    try:
        _refuse_a_record_not_ours(sweep.out)
        return _run_cells(sweep)
    finally:
        lock.release()


def _record(path: Path, content: dict, consequence: str) -> None:
    """Write one of the sweep's records, or stop the sweep in one line that says what its loss means."""
    try:
        atomic_write_text(path, json.dumps(content, indent=1) + "\n")
    except OSError as e:
        raise RunFailed(f"cannot write {path} ({e.strerror or e}); {consequence}") from None


def _refuse_a_record_not_ours(out: Path) -> None:
    """``<out>/sweep.json`` is replaced only where it is an earlier ilnas sweep's record: a file of that name that
    is not (notes of one's own in the folder ``out`` names) is kept, and the sweep refused."""
    path = out / "sweep.json"
    if not path.exists():
        return
    try:
        found = load_json(path.read_bytes())
    except (OSError, ValueError):
        found = None
    if not (isinstance(found, dict) and isinstance(found.get("cells"), list) and "final" in found):
        raise IlnasError(f"{path} is no ilnas sweep record, and a sweep writes its record there; choose another out, "
                         f"or move the file")


class SweepRecord:
    """``<out>/sweep.json`` as the sweep goes: written as it starts (each cell finished before, or pending), again
    as each cell ends, and once more at the end with ``"final": true``. A sweep stopped or killed midway so leaves
    the cells it got through, with their labels, for ``ilnas compare`` and analysis scripts to read. The first and
    the final record must be written; one in between that cannot be is a warning (once), and the sweep goes on."""

    def __init__(self, sweep: Sweep):
        self.sweep, self.t0, self.lock, self.warned = sweep, time.time(), threading.Lock(), False
        self.statuses = {cell.name: _skipped(cell) if _finished(cell) else
                         {"cell": cell.name, "labels": cell.labels, "runs": {run.out.name: "pending" for run in
                                                                            cell.runs}} for cell in sweep.cells}

    @property
    def path(self) -> Path:
        return self.sweep.out / "sweep.json"

    def summary(self, final: bool) -> dict:
        statuses = list(self.statuses.values())
        return {"out": str(self.sweep.out), "final": final, "cells": statuses, "parallel": self.sweep.parallel,
                "executor": self.sweep.executor, "wall_seconds": time.time() - self.t0,
                "failed": [s["cell"] for s in statuses if any(v.startswith("failed") for v in s["runs"].values())]}

    def start(self) -> None:
        _record(self.path, self.summary(False), "no cell has started")

    def ended(self, status: dict) -> None:
        with self.lock:
            self.statuses[status["cell"]] = status
            try:
                atomic_write_text(self.path, json.dumps(self.summary(False), indent=1) + "\n")
            except OSError as e:
                if not self.warned:
                    print(f"ilnas: warning: cannot update {self.path} ({e.strerror or e}); the sweep goes on and "
                          f"writes it when it ends", file=sys.stderr, flush=True)
                self.warned = True

    def finish(self, statuses: list[dict]) -> dict:
        self.statuses = {s["cell"]: s for s in statuses}
        summary = self.summary(True)
        _record(self.path, summary, "the cells' runs are kept; run the sweep again to write it")
        return summary


def _run_cells(sweep: Sweep) -> dict:
    record = SweepRecord(sweep)
    record.start()
    statuses = _submitit(sweep, record.ended) if sweep.executor == "submitit" else \
        _in_slots(sweep, run_cell, record.ended)
    summary = record.finish(statuses)
    if summary["failed"]:
        cell = next(s for s in statuses if s["cell"] == summary["failed"][0])
        run, why = next((run, v) for run, v in cell["runs"].items() if v.startswith("failed"))
        raise RunFailed(f"{len(summary['failed'])} of {len(statuses)} sweep cells failed (first: {cell['cell']}, "
                        f"its {run} {why}); run the sweep again to continue")
    return summary


class CellJob:
    """A cell as a submitit job that survives its time limit and preemption: submitit calls ``checkpoint``
    on the signal SLURM sends before it stops the job (USR2), and requeues what it returns, the same cell.
    ``checkpoint`` first stops the running ilnas command with SIGTERM, which checkpoints the step it is on
    (ilnas/stopping.py), and waits for it; the requeued job's run_cell skips the finished runs and resumes
    the interrupted one from there."""

    def __init__(self, cell: Cell, slot_env: dict[str, str] | None = None):
        self.cell, self.slot_env = cell, slot_env
        self._running: tuple[subprocess.Popen, Path] | None = None  # this job's, never pickled

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_running": None}

    def __call__(self) -> dict:
        return run_cell(self.cell, self.slot_env, lambda proc, out: setattr(self, "_running", (proc, out)))

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        if self._running is not None:
            stop_and_wait(*self._running)
        return DelayedSubmission(CellJob(self.cell, self.slot_env))


STOP_WAIT_S = 60.0  # how long a job's checkpoint waits for its ilnas command to stop (SLURM warns 90 s ahead)


def stop_and_wait(proc: subprocess.Popen, out: Path, timeout: float = STOP_WAIT_S) -> None:
    """SIGTERM to an ilnas command, then wait until it has checkpointed and exited. It is not reaped here
    (this runs in a signal handler while run_cell waits for it), so "exited" is read from /proc (a zombie),
    or where there is none, from its run's lock."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while not _exited(proc.pid, out) and time.monotonic() < deadline:
        time.sleep(0.1)


def _exited(pid: int, out: Path) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:  # gone, or a system without /proc
        return Path("/proc/self").exists() or lock_holder(out) is None
    except (OSError, IndexError):
        return lock_holder(out) is None


# submitit's local executor stops a job after timeout_min=2 unless told otherwise: far too short for a search.
LOCAL_TIMEOUT_MIN = 30 * 24 * 60


def submitit_executor(sweep: Sweep):
    """The AutoExecutor of the sweep's ``submitit`` settings: SLURM where it is available, else (or with
    ``cluster: local``) submitit's local executor, there without a time limit unless ``timeout_min`` is given.
    ``max_num_timeout``: how often a job stopped by its time limit is requeued (submitit's default 3)."""
    try:
        import submitit
    except ImportError:
        raise IlnasError("executor submitit needs the submitit package: pip install 'ilnas[sweep]'") from None
    params = dict(sweep.submitit)
    cluster = params.pop("cluster", None)
    most = params.pop("max_num_timeout", None)
    requeues = {} if most is None else {"slurm_max_num_timeout": most, "local_max_num_timeout": most}
    try:
        executor = submitit.AutoExecutor(folder=str(sweep.out / "submitit"), cluster=cluster, **requeues)
        if executor.cluster == "local":
            params.setdefault("timeout_min", LOCAL_TIMEOUT_MIN)
        executor.update_parameters(**params)
    except (TypeError, ValueError, NameError) as e:  # NameError: a parameter submitit does not know
        raise IlnasError(f"sweep spec: submitit settings not accepted ({str(e).splitlines()[0]})") from None
    return executor


def _submitit(sweep: Sweep, ended: Callable[[dict], None]) -> list[dict]:
    """One job per unfinished cell. A job stopped at its time limit or preempted is requeued (CellJob); one that
    fails or is not requeued again becomes its cell's failed status. submitit's local executor would start every
    job at once: there, ``parallel`` jobs run at a time, each with its share of the cores, as the local sweep's.
    On SLURM the cells' jobs are recorded (``submitit/jobs.json``), and a sweep run again, its driver gone (a
    closed login session), waits for a cell's job still queued or running instead of submitting another."""
    executor = submitit_executor(sweep)
    if executor.cluster == "local":
        submitting = threading.Lock()

        def one(cell: Cell, env: dict[str, str], started) -> dict:  # the jobs outlive this process by design
            if _finished(cell):
                return _skipped(cell)
            with submitting:
                job = executor.submit(CellJob(cell, env))
            started(_CommandsOfJob(job, cell), None)
            return _job_status(job, cell)
        return _in_slots(sweep, one, ended)
    recorded = _recorded_jobs(sweep.out)
    unfinished = [cell for cell in sweep.cells if not _finished(cell)]
    states = job_states([recorded[c.name]["job"] for c in unfinished if c.name in recorded]) \
        if executor.cluster == "slurm" else {}
    jobs = {cell.name: _earlier_job(executor, recorded.get(cell.name), states, cell) for cell in unfinished}
    for cell in unfinished:
        jobs[cell.name] = jobs[cell.name] or executor.submit(CellJob(cell))
        recorded[cell.name] = {"job": jobs[cell.name].job_id, "cell": _fingerprint(cell)}
        _record(sweep.out / "submitit" / JOBS, recorded, "the jobs submitted so far run on, but a sweep run again "
                "will not know them")
    statuses = []
    for cell in sweep.cells:  # in order: a cell that ends before the one waited for is recorded after it
        statuses.append(_job_status(jobs[cell.name], cell) if cell.name in jobs else _skipped(cell))
        ended(statuses[-1])
    return statuses


class _CommandsOfJob:
    """What ``_in_slots`` stops on Ctrl-C or SIGTERM for a cell that runs as a local submitit job: the job's
    ilnas commands, found through the lock of the cell's run in progress (a submitit job's own process ignores
    SIGTERM, and waiting for it to end could take the whole run). A command still starting, which holds no lock
    yet, and any the job starts after it, get the signal as soon as they take theirs, until the job ends."""

    def __init__(self, job, cell: Cell):
        self.job, self.cell = job, cell
        self._stopping: threading.Thread | None = None

    def poll(self) -> int | None:
        return 0 if self.job.done() else None

    def send_signal(self, signum: int) -> None:
        if self._stopping is None:
            self._stopping = threading.Thread(target=self._signal_until_done, args=(signum,), daemon=True,
                                              name="ilnas-sweep-stop")
            self._stopping.start()

    def _signal_until_done(self, signum: int) -> None:
        signalled: set[int] = set()
        while not self.job.done():
            for run in self.cell.runs:
                pid = holder_pid(run.out)
                if pid is not None and pid not in signalled:
                    signalled.add(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signum)
            time.sleep(0.1)


JOBS = "jobs.json"  # in <out>/submitit: each cell's latest SLURM job
# sacct states of a job that will still run its cell (a requeued job keeps its id)
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
               "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}


def _finished(cell: Cell) -> bool:
    return all(_finished_run(run.out) for run in cell.runs)


def _skipped(cell: Cell) -> dict:
    return {"cell": cell.name, "labels": cell.labels, "runs": {run.out.name: "finished (skipped)" for run in cell.runs}}


def _recorded_jobs(out: Path) -> dict[str, dict]:
    """The job of each cell an earlier run of the sweep submitted (none where the record is missing or torn)."""
    try:
        recorded = load_json((out / "submitit" / JOBS).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {k: v for k, v in recorded.items() if isinstance(v, dict) and isinstance(v.get("job"), str)}


def _fingerprint(cell: Cell) -> str:
    """What a cell's job runs: its runs' commands, directories and configurations."""
    runs = [[run.command, list(run.args), str(run.out), run.config] for run in cell.runs]
    return hashlib.sha256(json.dumps(runs, sort_keys=True).encode()).hexdigest()


def job_states(job_ids: list[str]) -> dict[str, str]:
    """The state sacct gives each SLURM job, in one call ("UNKNOWN" where it cannot tell: no sacct, say)."""
    if not job_ids:
        return {}
    from submitit.slurm.slurm import SlurmInfoWatcher

    watcher = SlurmInfoWatcher()
    for job_id in job_ids:
        watcher.register_job(job_id)
    watcher.update()
    return {job_id: (watcher.get_state(job_id, mode="cache").split() or ["UNKNOWN"])[0].upper()  # "CANCELLED by 9"
            for job_id in job_ids}


def recorded_job_states(out: Path) -> dict[str, tuple[str, str]]:
    """Each cell of the sweep in ``out`` with a recorded SLURM job: (the job, its state); {} where it has none."""
    recorded = _recorded_jobs(Path(out))
    if not recorded:
        return {}
    try:
        states = job_states([entry["job"] for entry in recorded.values()])
    except ImportError:  # submitit gone since: the jobs' states cannot be asked
        states = {}
    return {cell: (entry["job"], states.get(entry["job"], "UNKNOWN")) for cell, entry in recorded.items()}


def _earlier_job(executor, entry: dict | None, states: dict[str, str], cell: Cell):
    """The cell's SLURM job from an earlier run of the sweep where it is still queued or running (``states``:
    ``job_states`` of the recorded jobs), else None; refused where that job runs the cell as other settings
    made it (it would write the cell's directories)."""
    if entry is None or executor.cluster != "slurm" or states.get(entry["job"]) not in LIVE_STATES:
        return None
    from submitit import SlurmJob

    state = states[entry["job"]]
    if entry.get("cell") != _fingerprint(cell):
        raise IlnasError(f"sweep cell {cell.name}: its job {entry['job']}, submitted by an earlier run of this sweep "
                         f"with other settings, is still {state.lower()}; wait for it or scancel {entry['job']}")
    return SlurmJob(folder=executor.folder, job_id=entry["job"])


def _job_status(job, cell: Cell) -> dict:
    """The cell's status from its job: what run_cell returned, or, where the job failed or was stopped for
    good, its finished runs and the first unfinished one marked failed with the job's reason."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    where = {"job": job.job_id, "job_log": str(job.paths.stderr)}
    try:
        return {**job.result(), **where}
    except (FailedJobError, UncompletedJobError) as e:
        reason = f"failed (job {job.job_id}: {_job_failure(str(e))}; see {job.paths.stderr})"
    runs: dict[str, str] = {}
    for run in cell.runs:
        runs[run.out.name] = "finished" if is_finished(run.out) else reason
        if not is_finished(run.out):
            break
    return {"cell": cell.name, "labels": cell.labels, "runs": runs, **where}


def _job_failure(message: str) -> str:
    """One line of a submitit error: the job's own last exception line where it carries a traceback
    (header, trace, where the logs are), else the job's state where it ended without a result, else its
    first line."""
    lines = [line for line in message.splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Exit|Interrupt)\b", line)]
    state = re.search(r"has not produced any output \(state: ([^)]*)\)", message)
    if not raised and state:
        return f"it ended without a result, state {state.group(1)}"
    return (raised[-1] if raised else lines[0] if lines else "no reason given")[:300].rstrip(".")
