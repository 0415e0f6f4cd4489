"""A run directory: resolved config, provenance, metrics log, checksummed checkpoints, and the rules
that keep it safe (the format is described in docs/run-directory.md).

- Nothing on disk changes before the caller has validated everything: ``check`` only reads.
- A finished run (``summary.json`` or ``result.json``) is never overwritten without ``force``, and
  ``force`` deletes only a directory that holds an ilnas run.
- One process at a time: ``RunDir.open`` takes an exclusive lock (``.lock``, ilnas/runlock.py) for the life of
  the run.
- Checkpoints hold plain tensors and containers only (loaded with ``weights_only=True``), carry a
  SHA-256 of their bytes and the configuration they were written under; the previous one is kept, and
  a damaged latest checkpoint falls back to it with a one-line warning.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import logging
import math
import operator
import os
import pickle
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import yaml

from ilnas import __version__
from ilnas.config import KINDS, from_dict, to_dict, validate
from ilnas.config.schema import KIND_COMMANDS, KIND_NAMES
from ilnas.errors import IlnasError, NotRegistered, RunFailed, Stopped, allocation_failure, first_line
from ilnas.fileio import (atomic_write_bytes, atomic_write_text, load_json, reachable, require_writable,
                          shortened)
from ilnas.runlock import LOCK, RunLock

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)

CONFIG, METRICS, CHECKPOINT, PREVIOUS = "config.yaml", "metrics.jsonl", "checkpoint.pt", "checkpoint.prev.pt"
PROVENANCE = "provenance.json"
FINISHED = ("summary.json", "result.json")  # a search ends with the first, a training run with the second
MAGIC = b"ilnas-checkpoint-v1\n"  # then the SHA-256 of the payload in hex, a newline, the torch.save bytes


def is_finished(path: Path) -> bool:
    return any((Path(path) / name).is_file() for name in FINISHED)


def require_readable_end(path: Path) -> None:
    """Refuse a finished run whose record of its end (summary.json or result.json) cannot be read as a JSON object,
    in one line that says how to write it again: ``status``, ``--resume`` and a sweep would otherwise take for
    finished a run that ``compare`` refuses."""
    for name in FINISHED:
        record = Path(path) / name
        if record.is_file():
            try:
                read_json(path, name)
            except IlnasError as e:
                raise IlnasError(f"{e}; remove it, and --resume finishes the run again from its last checkpoint") \
                    from None
        elif os.path.lexists(record):  # a directory (or a dangling link): found only once the run had ended again
            raise IlnasError(f"{record} is not a file, where a finished run records its end; remove it, and --resume "
                             f"finishes the run again from its last checkpoint")


def read_config(path: Path) -> dict:
    """config.yaml as a mapping with a known ``kind``, or a one-line error."""
    f = Path(path) / CONFIG
    try:
        data = yaml.safe_load(f.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
        raise IlnasError(f"{f} cannot be read as YAML ({first_line(e)})") from None
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        raise IlnasError(f"{f} is not an ilnas configuration (empty, or no 'kind: search|eval')")
    return data


def with_defaults(config: Any) -> Any:
    """A stored configuration (config.yaml, or a checkpoint's) with each setting it lacks at its default: a run
    written before a setting existed compares equal to the same run as today's schema describes it (a new
    setting's default keeps the old behaviour). Anything the schema refuses is returned as it is."""
    if not isinstance(config, dict) or config.get("kind") not in KINDS:
        return config
    try:
        cfg = from_dict(KINDS[config["kind"]], {k: v for k, v in config.items() if k != "genotype"})
    except IlnasError:
        return config
    return config_dict(cfg, **{k: v for k, v in config.items() if k == "genotype"})


def is_ilnas_run(path: Path) -> bool:
    """A directory an ilnas run made: a config.yaml of a known kind and the provenance.json the run writes right
    after it. A config.yaml alone may be one saved by hand (``ilnas config demo > config.yaml``) in a folder of
    other files, which --force must never empty and no run may take for its own."""
    try:  # the cheap test first: callers ask it of every ancestor of a run directory
        return (Path(path) / PROVENANCE).is_file() and bool(read_config(path))
    except (IlnasError, OSError):  # OSError: a path the filesystem cannot take (ENAMETOOLONG)
        return False


def refuse_inside_a_run(path: Path, what: str) -> None:
    """A run or sweep directory may not be, or lie inside, another run's directory: that run's --force would
    delete it with its own files, compare and status would take it for part of that run, and a name in it
    (a sweep cell's, say) could be one of that run's own. The path is taken as the filesystem takes it: ``..``
    and links resolved (``RUN/../other`` lies beside RUN, not inside it; a link into a run lies inside it)."""
    p = Path(path).resolve()
    for d in (p, *p.parents) if what == "sweep" else p.parents:
        if is_ilnas_run(d):
            where = "is" if d == p else "lies inside"
            raise IlnasError(f"the {what} directory {path} {where} the run directory {d}; choose another --out")


def refuse_among_run_files(paths: Sequence[Path], option: str) -> None:
    """Files a command writes (an export and its card, an evaluation's files) may not land in a run directory's
    top level, beside the run's own config, checkpoints, weights and records: a name there that matched one of
    them (``--out RUN/model.safetensors``, or a card ``RUN/result.json``) would replace it. The folder is the
    one the filesystem writes in (``RUN/export/../model.json`` is RUN's; the file's own name is replaced, not
    followed, where it is a link)."""
    for p in paths:
        folder = Path(p).parent.resolve()
        if is_ilnas_run(folder):
            raise IlnasError(f"{option} {p} lies in run directory {folder}, beside the run's own files; "
                             f"write it in a folder of its own (by default one below the run)")


def _entries(path: Path) -> list[Path]:
    """What a directory holds, the lock file aside."""
    return [p for p in Path(path).iterdir() if p.name != LOCK]


def _start_cut_short(path: Path) -> bool:
    """A run killed as it started (or as --force emptied its directory), before it wrote its provenance.json:
    its lock file, and nothing but a config.yaml and temporary files of that and of provenance.json
    (``RunDir.open``). It holds no run, so it is started over: a requeued job's ``--auto-resume`` would
    otherwise be refused there for ever. A folder that no run has locked is never taken for one."""
    if not (path / LOCK).is_file():
        return False
    temporary = re.compile(rf"\.({re.escape(CONFIG)}|{re.escape(PROVENANCE)})\..+\.tmp")
    if not all(p.is_file() and (p.name == CONFIG or temporary.fullmatch(p.name)) for p in _entries(path)):
        return False  # a folder among them (of any name) is no file a starting run writes: never deleted here
    try:
        return not (path / CONFIG).exists() or bool(read_config(path))
    except IlnasError:
        return False


def check(path: Path, resume: bool, force: bool, kind: str, probe_lock: bool = True) -> None:
    """Refuse, before anything is written, what would damage an existing run or cannot work
    (``probe_lock=False``: the caller holds the lock itself)."""
    path = reachable(path, "run directory")
    if resume and force:
        raise IlnasError("--resume and --force exclude each other")
    try:
        os.path.abspath(path).encode("utf-8")
    except UnicodeEncodeError:  # bytes of another encoding in a name: TensorBoard's writer cannot open it
        raise IlnasError(f"the run directory's path {os.path.abspath(path)!r} is not valid UTF-8; choose another "
                         f"--out") from None
    if path.exists() and not path.is_dir():
        raise IlnasError(f"{path} exists and is not a directory")
    refuse_inside_a_run(path, "run")
    require_writable(path, "run directory")
    if resume:
        if not (path / CONFIG).is_file():
            raise IlnasError(f"nothing to resume: {path} holds no {CONFIG}")
        found = read_config(path)["kind"]
        if not is_ilnas_run(path):
            raise IlnasError(f"nothing to resume: {path} holds a {CONFIG} but no {PROVENANCE}, so no run was made "
                             f"there")
        if found != kind:
            raise IlnasError(f"{path} holds a {KIND_NAMES[found]} run; resume it with `{KIND_COMMANDS[found]} "
                             f"--resume`")
        require_readable_end(path)
        if is_finished(path):
            raise IlnasError(f"{path} holds a finished run; nothing to resume")
    elif path.is_dir() and _entries(path) and not _start_cut_short(path):
        if not is_ilnas_run(path):
            raise IlnasError(f"{path} is not empty and does not hold an ilnas run (no valid {CONFIG} and "
                             f"{PROVENANCE}); ilnas writes only into an empty directory or over its own runs: choose "
                             f"another --out")
        if not force:
            if probe_lock:  # a run another process works on: say so, rather than how to continue or replace it
                RunLock(path).probe()
            state = "a finished run" if is_finished(path) else "an unfinished run (continue it with --resume)"
            raise IlnasError(f"{path} already holds {state}; pass --force to overwrite it")
    if path.is_dir() and probe_lock:
        RunLock(path).probe()


def auto_resume(path: Path, kind: str, config: dict) -> str:
    """What ``--auto-resume`` does with ``path``: "start" where it holds no run yet (``check`` still refuses a
    directory that is not empty), "resume" where it holds this configuration's run unfinished, "finished"
    where it holds it finished. A run of another kind or configuration there is refused."""
    path = Path(path)
    if not is_ilnas_run(path):
        return "start"  # check() then refuses a directory that holds anything
    stored = with_defaults(read_config(path))
    if stored["kind"] != kind:
        raise IlnasError(f"{path} holds a {KIND_NAMES[stored['kind']]} run, not a {KIND_NAMES[kind]} run")
    if stored != config:
        raise IlnasError(f"{path} holds a run of another configuration (first difference at "
                         f"{_first_difference(stored, config)}); --auto-resume continues only the run its command "
                         f"line describes: choose another --out, or replace the run with --force")
    require_readable_end(path)
    return "finished" if is_finished(path) else "resume"


def resume_config(path: Path, kind: str) -> Any:
    """The run's validated configuration, for --resume (a training run's genotype is in genotype.json)."""
    check(path, resume=True, force=False, kind=kind)
    data = {k: v for k, v in read_config(path).items() if k != "genotype"}
    try:
        cfg = from_dict(KINDS[kind], data)
        validate(cfg)
    except NotRegistered as e:  # code of one's own the run uses, whose plugin is not loaded: no invalid file
        raise NotRegistered(f"{Path(path) / CONFIG}: {e}") from None
    except IlnasError as e:
        raise IlnasError(f"{Path(path) / CONFIG} is not a valid configuration: {e}") from None
    return cfg


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- provenance ----------------------------------------------------------------------------------

def _git_commit() -> str | None:
    """The commit of the ilnas source tree, when it runs from a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


# Which scheduler job, array task and torchrun restart a session ran as, where set: the trail of a run that
# was requeued or restarted.
JOB_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
                 "TORCHELASTIC_RESTART_COUNT", "SUBMITIT_LOCAL_JOB_ID")


def provenance_session(resumed: bool, device: torch.device | None = None) -> dict:
    """Who worked on the run and how; ``world_size``: the torchrun ranks (a resume may use another count);
    ``device``: what computed (a CPU and its thread count, or a GPU's model), where the run says."""
    import torch

    where = {} if device is None else {"device": device_name(device), "threads": torch.get_num_threads()}
    return {"start": _now(), "end": None, "resumed": resumed, "command": list(sys.argv), "pid": os.getpid(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")), **where,
            "job": {k: os.environ[k] for k in JOB_VARIABLES if k in os.environ},
            "host": socket.gethostname(), "ilnas": __version__, "git_commit": _git_commit(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


# --- strict JSON -----------------------------------------------------------------------------------

def strict_json(value: Any) -> Any:
    """NaN and infinities become null, so every line of metrics.jsonl is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


# --- the run directory -------------------------------------------------------------------------------

@contextlib.contextmanager
def out_of_memory(settings: str, error: type[IlnasError] = IlnasError, then: str = "") -> Iterator[None]:
    """A failed allocation, of device memory or of the host's (a supernet or batch far too large for the
    machine), as one line that names the ``settings`` to lower."""
    try:
        yield
    except RuntimeError as e:
        failure = allocation_failure(e)
        if failure is None:
            raise
        raise error(f"{failure}; lower {settings}{then}") from None


EVENTS = "TensorBoard events (tb/)"


class Events:
    """A SummaryWriter whose failed writes are one line (``RunFailed``), as every other write of a run. They
    happen in its thread and surface at its next call: a full disk would otherwise end the run in a traceback
    (two: the thread's own as well). One that surfaces only as the writer closes, when the run has written
    everything else, is a warning."""

    def __init__(self, writer, run: "RunDir"):
        self._writer, self._run, self._failed = writer, run, False
        self._excepthook = threading.excepthook
        threading.excepthook = self._quiet_writer_thread

    def _quiet_writer_thread(self, args) -> None:
        if not type(args.thread).__module__.startswith("tensorboard."):  # TensorBoard's is raised again here
            self._excepthook(args)

    def close(self) -> None:
        try:
            self._writer.close()
        except OSError as e:
            if not self._failed:
                print(f"ilnas: warning: the TensorBoard events in {self._run.path / 'tb'} may lack the run's last "
                      f"values ({e.strerror or e})", file=sys.stderr)
        finally:
            threading.excepthook = self._excepthook

    def __getattr__(self, name: str):
        method = getattr(self._writer, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            try:
                with self._run._writing(EVENTS):
                    return method(*args, **kwargs)
            except RunFailed:
                self._failed = True
                raise
        return call


EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")


def after_earlier_events(folder: Path, longest: float = 2.0) -> None:
    """Return once a new TensorBoard event file in ``folder`` sorts after those there. TensorBoard reads a run's
    files in name order, which begins with the second each was opened, then the pid as text: a session resumed
    within the second the earlier one opened its file (torchrun restarting a rank at once, the Python API
    resuming in the same process) may sort first, and the earlier session's steps after the checkpoint, read
    after the purge, would then stand. At most ``longest`` seconds (a clock set back is not waited out)."""
    seconds = [int(m.group(1)) for p in folder.glob("events.out.tfevents.*") if (m := EVENT_FILE.match(p.name))]
    deadline = time.monotonic() + longest
    while seconds and int(time.time()) <= max(seconds) and time.monotonic() < deadline:
        time.sleep(0.02)


class RunDir:
    """An open run: holds the lock until ``close``; every write failure becomes one line (``RunFailed``)."""

    def __init__(self, path: Path, kind: str, config: dict):
        self.path, self.kind, self.config = Path(path), kind, config
        self._lock = RunLock(self.path)

    @classmethod
    def open(cls, path: Path, kind: str, config: dict, resume: bool, force: bool,
             provenance: dict | None = None, device: torch.device | None = None) -> "RunDir":
        """Lock ``path`` and start (or, with ``resume``, continue) the run. Call only after every input
        has been validated: with ``force`` this is where the old run is deleted. ``device`` (and the threads
        set for it) go into the session's record, and a resume on another is warned of."""
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise IlnasError(f"cannot create run directory {path}: {e.strerror or e}") from None
        run = cls(path, kind, config)
        run._lock.acquire()
        try:
            # Again, under the lock: another process may have been first.
            check(path, resume, force, kind, probe_lock=False)
            with run._writing("the run's files"):
                if resume:
                    for tmp in path.glob(".*.tmp"):  # half-written files of a killed process; we hold the lock
                        tmp.unlink()
                    run._drop_damaged_checkpoint()
                else:  # check() made sure this is an ilnas run, or one cut short as it started
                    # provenance.json last and config.yaml replaced: a kill part-way leaves a run --force
                    # takes again, or a start cut short (_start_cut_short), never a folder of neither
                    for entry in sorted(_entries(path), key=lambda e: e.name == PROVENANCE):
                        if entry.name == CONFIG:
                            continue
                        if entry.is_dir() and not entry.is_symlink():
                            shutil.rmtree(entry)
                        else:
                            entry.unlink()
                    atomic_write_text(path / CONFIG, yaml.safe_dump(config, sort_keys=False))
                run._add_session(resume, provenance or {}, device)
        except BaseException:
            run.close()
            raise
        return run

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb) -> None:
        try:
            if error is not None:
                self._end_session(session_outcome(error))
        finally:
            self.close()

    def _end_session(self, outcome: str) -> None:
        """Record how this session ended, where it did not finish the run: what ``ilnas status`` tells a run that
        failed (resuming it fails again, most often) from one that was stopped or killed. Best effort: the
        failure may be the disk's own."""
        p = self.path / PROVENANCE
        with contextlib.suppress(OSError, IlnasError):
            record = _read_provenance(p)
            if record["sessions"] and record["sessions"][-1].get("end") is None:
                record["sessions"][-1].update(end=_now(), outcome=outcome)
                atomic_write_text(p, json.dumps(record, indent=1) + "\n")

    def out_of_memory(self, batch_setting: str) -> contextlib.AbstractContextManager:
        """Out of memory part-way: one line that names the setting to lower."""
        return out_of_memory(batch_setting, RunFailed, " and continue with --resume (the last checkpoint is intact)")

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if not os.path.isdir(self.path):  # deleted or moved by hand while the run ran: nothing to resume here
                raise RunFailed(f"the run directory {self.path} was removed while the run ran, so {what} cannot "
                                f"be written; start the run again") from None
            kept = " the last checkpoint is intact;" if (self.path / CHECKPOINT).exists() else ""
            raise RunFailed(f"cannot write {what} in {self.path} ({e.strerror or e});{kept} fix this and continue "
                            f"with --resume") from None

    def _drop_damaged_checkpoint(self) -> None:
        """A resumed run continues from the previous checkpoint when the latest is damaged; remove the
        damaged one so that the next save does not keep it as the fallback."""
        latest = self.path / CHECKPOINT
        if latest.exists() and (self.path / PREVIOUS).exists():
            try:
                read_checkpoint(latest, verify_only=True)
            except IlnasError:
                latest.unlink()

    def _add_session(self, resumed: bool, extra: dict, device: torch.device | None) -> None:
        p = self.path / PROVENANCE
        record = _read_provenance(p) if resumed else {"sessions": []}
        record.update(extra)
        session, sessions = provenance_session(resumed, device), record["sessions"]
        if resumed and sessions:
            _warn_of_changes(sessions[-1], session)
        sessions.append(session)
        atomic_write_text(p, json.dumps(record, indent=1) + "\n")

    def tensorboard(self, purge_step: int | None) -> "Events":
        """The run's TensorBoard writer (``tb/``), dropping events after ``purge_step`` (those a resumed run
        logged after its checkpoint)."""
        from torch.utils.tensorboard import SummaryWriter

        with self._writing(EVENTS):
            after_earlier_events(self.path / "tb")
            return Events(SummaryWriter(str(self.path / "tb"), purge_step=purge_step), self)

    # --- metrics -----------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        with self._writing(METRICS), open(self.path / METRICS, "a") as f:
            f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")

    def metrics_lines(self) -> int:
        p = self.path / METRICS
        return sum(1 for _ in open(p)) if p.is_file() else 0

    def truncate_metrics(self, lines: int) -> None:
        """Drop what an interrupted run logged after its last checkpoint."""
        p = self.path / METRICS
        if p.is_file():
            kept = p.read_text().splitlines(keepends=True)[:lines]
            with self._writing(METRICS):
                atomic_write_text(p, "".join(kept))

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.path)

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, payload: dict) -> None:
        """Atomically, with a checksum and the run's configuration; the previous one is kept."""
        import torch

        buf = io.BytesIO()
        torch.save({"kind": self.kind, "config": self.config, **payload}, buf)
        data = buf.getvalue()
        blob = MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data
        with self._writing("the checkpoint"):
            atomic_write_bytes(self.path / CHECKPOINT, blob, keep_previous=self.path / PREVIOUS)

    # --- artefacts -------------------------------------------------------------------------
    def save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        """An .npz archive, written atomically."""
        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        with self._writing(name):
            atomic_write_bytes(self.path / name, buf.getvalue())

    def save_genotype(self, genotype: Any) -> None:
        """genotype.json and genotype.txt (the official string form)."""
        self.write_text("genotype.json", json.dumps(genotype.to_dict(), indent=1) + "\n")
        self.write_text("genotype.txt", genotype.to_string() + "\n")

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        with self._writing(name):
            atomic_write_bytes(self.path / name, data)

    def finish(self, summary: dict, name: str = FINISHED[0]) -> None:
        """Write the run's final record; from then on the run counts as finished."""
        p = self.path / PROVENANCE
        with self._writing(PROVENANCE):
            record = _read_provenance(p)
            if record["sessions"]:
                record["sessions"][-1].update(end=_now(), outcome="finished")
            atomic_write_text(p, json.dumps(record, indent=1) + "\n")
        self.write_text(name, json.dumps(strict_json(summary), indent=1, allow_nan=False) + "\n")


# What a resumed session may run under otherwise than the run's last one, and still continue it: the software
# whose kernels and random streams the run's numbers come from.
SOFTWARE = ("torch", "cuda", "ilnas")


def device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda: <the GPU's model>``: what decides how a kernel rounds."""
    import torch

    return f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def _warn_of_changes(last: dict, now: dict) -> None:
    """A resume on another rank count or other software continues the run, but not as an uninterrupted run
    would have gone on: say so, once, naming what changed."""
    before = last.get("world_size", 1)
    if before != now["world_size"]:
        log.warning(f"resuming on {now['world_size']} rank(s) a run whose last session ran on {before}: "
                    f"BatchNorm normalises each rank's slice of the batch, so from here on the run will not "
                    f"repeat an uninterrupted one exactly")
    changed = [f"{key} {last[key]} -> {now[key]}" for key in SOFTWARE
               if isinstance(last.get(key), str) and isinstance(now[key], str) and last[key] != now[key]]
    if changed:
        log.warning(f"resuming a run under other software than its last session ({', '.join(changed)}): kernels "
                    f"and random streams may differ between versions, so from here on the run may not repeat an "
                    f"uninterrupted one exactly")
    if "device" not in last or "device" not in now:  # a session from before these were recorded, or none given
        return
    if last["device"] != now["device"]:
        log.warning(f"resuming on {now['device']} a run whose last session ran on {last['device']}: kernels round "
                    f"differently, so from here on the run will not repeat an uninterrupted one exactly")
    elif now["device"] == "cpu" and last.get("threads") != now["threads"]:
        log.warning(f"resuming on {now['threads']} CPU thread(s) a run whose last session used {last.get('threads')}: "
                    f"sums split otherwise between threads round otherwise, so from here on the run will not repeat "
                    f"an uninterrupted one exactly (OMP_NUM_THREADS={last.get('threads')} would)")


def session_outcome(error: BaseException) -> str:
    """How a session that raised ``error`` ended, as provenance.json records it: ``stopped by SIGTERM after ...``
    (a stop signal, with its checkpoint), ``stopped: another rank ...`` (its own error is that rank's to say,
    and may not come again), ``failed: ...`` (divergence, a failed write: ``RunFailed``), ``interrupted`` (a
    second Ctrl-C) or ``crashed: ...`` (anything else)."""
    from ilnas.distributed import lost_peer

    text = first_line(error)
    if isinstance(error, Stopped):
        return text
    if lost_peer(error):
        return "stopped: another rank of this job is gone (it failed or was stopped: its own message says why)"
    if isinstance(error, IlnasError):
        return f"failed: {text}"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"crashed: {type(error).__name__}: {text}"


def _read_provenance(p: Path) -> dict:
    """provenance.json as a mapping whose "sessions" is a list of mappings. Damage (an unreadable file, JSON
    of another shape, sessions that are no mappings) is dropped, not trusted: the record is the run's
    history, and a run does not stop over it."""
    try:
        record = load_json(p.read_text()) if p.is_file() else {}
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict):
        record = {}
    sessions = record.get("sessions")
    record["sessions"] = [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []
    return record


def latest_checkpoint(path: Path) -> tuple[dict | None, Path | None, str | None]:
    """The run's latest intact checkpoint (None before the first), its file, and where that is the previous
    one, why the latest is not (a kill while it was written leaves the previous one whole)."""
    latest, previous = Path(path) / CHECKPOINT, Path(path) / PREVIOUS
    if not latest.exists():  # none yet, or caught between a save's two renames: then the previous is the latest
        return (read_checkpoint(previous), previous, None) if previous.exists() else (None, None, None)
    try:
        return read_checkpoint(latest), latest, None
    except IlnasError as e:
        if not previous.exists():
            raise
        return read_checkpoint(previous), previous, str(e)


def load_checkpoint(path: Path, kind: str, config: dict) -> dict | None:
    """The run's latest intact checkpoint (None before the first), refused unless it was written by a
    ``kind`` run under ``config``. Reads only: call it before anything is written."""
    path = Path(path)
    payload, _, damage = latest_checkpoint(path)
    if payload is None:
        return None
    if damage:
        print(f"ilnas: warning: {damage}; continuing from the previous checkpoint {PREVIOUS}", file=sys.stderr,
              flush=True)
    if payload.get("kind") != kind:
        found = KIND_NAMES.get(payload.get("kind"), repr(payload.get("kind")))
        raise IlnasError(f"the checkpoint in {path} belongs to a {found} run, not to this {KIND_NAMES[kind]} run; "
                         f"it cannot be resumed")
    if with_defaults(payload.get("config")) != config:
        key = _first_difference(with_defaults(payload.get("config")), config)
        raise IlnasError(f"{path / CONFIG} differs from the configuration its checkpoint was written with "
                         f"(first at {key}); restore it, or start a new run with --force")
    return payload


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """The run directories named, and those found below any other directory named (e.g. a sweep's, or a
    project's). A run directory holds the config.yaml and the provenance.json a run writes: a config.yaml
    alone is one saved by hand (``ilnas config demo > config.yaml``), not a run, and its folder is searched
    for runs like any other. (Whether they can be read is for the reader to say, in one line.)"""
    runs: list[Path] = []
    for p in (reachable(p, "run path") for p in paths):
        if holds_run_files(p):
            runs.append(p)
        elif p.is_dir():
            runs += sorted(c.parent for c in p.rglob(PROVENANCE) if holds_run_files(c.parent))
        else:
            raise IlnasError(f"{p} is neither a run directory nor a directory of runs")
    if not runs:
        raise IlnasError(f"no ilnas runs in {', '.join(map(str, paths))}")
    return list(dict.fromkeys(r.resolve() for r in runs))


def holds_run_files(path: Path) -> bool:
    """The files that make a directory a run's (``is_ilnas_run`` also reads its config.yaml)."""
    return (path / CONFIG).is_file() and (path / PROVENANCE).is_file()


def read_json(path: Path, name: str) -> dict | None:
    """A run's JSON file (summary.json, result.json, provenance.json) or None where it is absent."""
    f = Path(path) / name
    if not f.is_file():
        return None
    try:
        record = load_json(f.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IlnasError(f"{f} cannot be read as JSON ({first_line(e)})") from None
    if not isinstance(record, dict):
        raise IlnasError(f"{f} is damaged: it holds a JSON {type(record).__name__}, not an object")
    return record


def read_record(path: Path, name: str, fields: dict[str, type]) -> dict | None:
    """``read_json``, and refused in one line where one of ``fields`` is missing or of another type (float: a
    finite number; int: an integer) - a damaged or hand-edited file."""
    record = read_json(path, name)
    for key, kind in fields.items() if record is not None else ():
        value = record.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = (number and math.isfinite(value) if kind is float else
              number and float(value).is_integer() if kind is int else isinstance(value, kind))
        if not ok:
            wanted = {float: "a finite number", int: "an integer", str: "a string"}.get(kind, kind.__name__)
            raise IlnasError(f"{Path(path) / name} is damaged: its {key!r} is {json.dumps(value)}, where {wanted} "
                             f"belongs")
    return record


def read_metrics(path: Path, kind: str | None = None) -> list[dict]:
    """The run's metrics records (``kind``: only those of that kind, e.g. "epoch": the other lines are not
    parsed). A last line cut short by a kill is left out; any other damage is refused in one line."""
    p = Path(path) / METRICS
    lines = p.read_text(errors="replace").splitlines() if p.is_file() else []
    wanted = f'"kind": "{kind}"' if kind else ""  # as RunDir.log's json.dumps spaces it
    records = []
    for i, line in enumerate(lines):
        if wanted not in line:
            continue
        try:
            record = load_json(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise IlnasError(f"{p} line {i + 1} is not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise IlnasError(f"{p} line {i + 1} is damaged: a JSON {type(record).__name__}, not an object")
        records.append(record)
    return records


def read_checkpoint(path: Path, verify_only: bool = False) -> dict | None:
    """A checkpoint's payload after its checksum is verified; plain data only (``weights_only=True``).
    ``verify_only``: check the checksum and return None."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise IlnasError(f"cannot read {path} ({e.strerror or e})") from None
    head, _, rest = blob.partition(b"\n")
    digest, _, data = rest.partition(b"\n")
    if head + b"\n" != MAGIC:
        raise IlnasError(f"{path} is not an ilnas checkpoint (or was written by an older version)")
    if hashlib.sha256(data).hexdigest().encode() != digest:
        raise IlnasError(f"{path} is damaged (checksum mismatch)")
    if verify_only:
        return None
    import torch  # here: reading a run's records (status, compare) needs no torch

    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise IlnasError(f"{path} cannot be loaded: it holds pickled objects other than tensors and plain "
                         f"containers, which could run code") from None
    except Exception as e:  # the checksum held, so this is a foreign or hand-made file
        raise IlnasError(f"{path} cannot be loaded ({first_line(e)})") from None
    if not isinstance(payload, dict):
        raise IlnasError(f"{path} is not an ilnas checkpoint")
    return payload


def _first_difference(a: Any, b: Any) -> str:
    """The dotted key of two configurations' first difference."""
    return _where_differ(a, b, operator.eq, into_lists=False)[0]


def _where_differ(a: Any, b: Any, same: Callable[[Any, Any], bool], where: str = "",
                  into_lists: bool = True) -> tuple[str, Any, Any]:
    """Where two JSON-like values first differ by ``same`` (``key.key[index]``), and their values there."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if not same(a.get(key), b.get(key)):
                return _where_differ(a.get(key), b.get(key), same, f"{where}.{key}" if where else str(key), into_lists)
    if into_lists and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if not same(x, y):
                return _where_differ(x, y, same, f"{where}[{i}]", into_lists)
    return where or "the top level", a, b


def _alike(a: Any, b: Any) -> bool:
    """Equal, floats to 1e-9 relative: another torch may sum the statistics in another order (1e-16 apart),
    while one image more or less moves them by far more."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_alike(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_alike(x, y) for x, y in zip(a, b))
    return a == b


def _shared(a: Any, b: Any) -> tuple[Any, Any]:
    """``a`` and ``b`` with their mappings cut, at every depth, to the keys both hold: a record written by
    another version may have a field more or less, which is no difference in the data."""
    if isinstance(a, dict) and isinstance(b, dict):
        pairs = {k: _shared(a[k], b[k]) for k in a if k in b}
        return {k: x for k, (x, _) in pairs.items()}, {k: y for k, (_, y) in pairs.items()}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = [_shared(x, y) for x, y in zip(a, b)]
        return [x for x, _ in pairs], [y for _, y in pairs]
    return a, b


def require_same_data(path: Path, name: str, now: Any) -> None:
    """A resumed run must read the data it started on. ``now`` is (the data's part of) what it is about to write
    to ``name`` (the search's tasks.json, a training's model.json) from the data found now; the file a session
    wrote before holds the same from the data found then. Images added to or removed from a folder since, a folder by the same
    relative name under another working directory, or another copy of a data set would change the splits, the
    normalisation or the classes under a run that goes on as if nothing happened. A file that is not there yet
    (a run killed right at its start), or cannot be read, holds nothing against it."""
    try:
        then = load_json((Path(path) / name).read_text())
    except (OSError, ValueError):
        return
    then, now = _shared(then, load_json(json.dumps(now)))  # now as the file will hold it: lists, not tuples
    if not _alike(then, now):
        where, old, new = _where_differ(then, now, _alike)
        raise IlnasError(f"{path} was started on other data than it would resume on ({name} {where}: "
                         f"{shortened(repr(old))} then, {shortened(repr(new))} now); restore the data it started "
                         f"on (a relative path is read from the directory the command runs in), or start a new run")


def config_dict(cfg: Any, **extra: Any) -> dict:
    """The mapping a run stores as config.yaml (and in each checkpoint)."""
    return {**to_dict(cfg), **extra}
