"""A stand-in for SLURM's commands on one machine, enough for submitit: ``sbatch`` starts the job script in a
session of its own (it outlives whoever submitted it, as a cluster's job does), ``sacct`` reports the jobs'
states, ``srun`` runs its command with SLURM's output files, ``scontrol requeue`` runs a job's script again
once it has ended, ``scancel`` stops a job. ``install`` puts a stub of each command on the PATH, which calls
``main`` here; the jobs' records live in $FAKE_SLURM_DIR."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FIRST_ID = 1000


def install(bin_dir: Path, state_dir: Path) -> dict[str, str]:
    """The commands in ``bin_dir``; returns the environment that puts them first on the PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in ("sbatch", "sacct", "srun", "scancel", "scontrol"):
        here = str(Path(__file__).parent)
        (bin_dir / name).write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {here!r})\n"
                                    f"import fake_slurm\nfake_slurm.main({name!r}, sys.argv[1:])\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FAKE_SLURM_DIR": str(state_dir)}


def _state() -> Path:
    return Path(os.environ["FAKE_SLURM_DIR"])


def submitted() -> list[str]:
    """The job ids sbatch has given out, in order."""
    return _listed("submitted.txt")


def requeued() -> list[str]:
    """The job ids ``scontrol requeue`` was asked for, in order."""
    return _listed("requeued.txt")


def _listed(name: str) -> list[str]:
    log = _state() / name
    return log.read_text().split() if log.exists() else []


def sbatch(script: str) -> None:
    job = str(FIRST_ID + len(submitted()))
    with open(_state() / "submitted.txt", "a") as f:
        f.write(job + "\n")
    # SLURM keeps its own copy of the batch script: the submitter may move its file as soon as sbatch returns
    # (submitit does, leaving a symlink a moment later), while the job may start at once.
    kept = _state() / f"{job}.sh"
    kept.write_bytes(Path(script).read_bytes())
    env = {**os.environ, "SLURM_JOB_ID": job, "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "localhost"}
    rc, requeue = _state() / f"{job}.rc", _state() / f"{job}.requeue"
    # The job script runs again, under the same id, each time it asked for a requeue before it ended.
    loop = (f'while :; do bash "$0"; code=$?; if [ -e "{requeue}" ]; then rm "{requeue}"; else break; fi; done; '
            f'echo $code > "{rc}.tmp" && mv "{rc}.tmp" "{rc}"')
    proc = subprocess.Popen(["bash", "-c", loop, str(kept)], env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (_state() / f"{job}.pid").write_text(str(proc.pid))
    print(f"Submitted batch job {job}")


def _job_state(job: str) -> str | None:
    rc, pid = _state() / f"{job}.rc", _state() / f"{job}.pid"
    if rc.exists():
        return "COMPLETED" if rc.read_text().strip() == "0" else "FAILED"
    if not pid.exists():
        return None
    try:
        os.kill(int(pid.read_text()), 0)
    except ProcessLookupError:
        return "CANCELLED"
    return "RUNNING"


def sacct(args: list[str]) -> None:
    print("JobID|State|NodeList")
    for flag, value in zip(args, args[1:]):
        if flag == "-j" and _job_state(value):
            print(f"{value}|{_job_state(value)}|localhost")


def srun(args: list[str]) -> None:
    files = {}
    while args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            files[flag] = args.pop(0).replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", "0")
    for flag, fd in (("--output", 1), ("--error", 2)):
        if flag in files:
            os.dup2(os.open(files[flag], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    os.execvp(args[0], args)


def scontrol(args: list[str]) -> None:
    """``scontrol requeue ID`` (what a submitit job runs at its time limit, then exits): noted, so the job
    script starts again once it has ended."""
    if args[0] == "requeue":
        (_state() / f"{args[1]}.requeue").touch()
        with open(_state() / "requeued.txt", "a") as f:
            f.write(args[1] + "\n")


def scancel(args: list[str]) -> None:
    os.killpg(int((_state() / f"{args[0]}.pid").read_text()), 15)


def main(command: str, argv: list[str]) -> None:
    {"sbatch": lambda: sbatch(argv[-1]), "sacct": lambda: sacct(argv), "srun": lambda: srun(argv),
     "scancel": lambda: scancel(argv), "scontrol": lambda: scontrol(argv)}[command]()
