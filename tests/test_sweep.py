"""ilnas sweep: a 2 x 2 grid of tiny searches, each re-trained; interrupted, resumed, finished cells skipped;
the submitit path through its local executor (a job stopped at its time limit requeued and resumed); bad
specs refused before anything runs."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from helpers import FOUR_OPS, call, ilnas, ilnas_here
from ilnas import runlock
from ilnas.errors import IlnasError
from ilnas.recipes import sweep as sweep_module
from ilnas.recipes.sweep import load_spec, stand_in_cell
from ilnas.runs import is_finished
from ilnas.space.layout import PRIMITIVES

SEARCH_SET = ["space.layers=3", "space.channels=4", "search.batch_size=8", "search.steps_per_epoch=1",
              "search.epochs=2", "search.eval_batches=1", FOUR_OPS]
TRAIN_SET = ["network.layers=3", "network.channels=4", "train.batch_size=8", "train.steps_per_epoch=1",
             "train.epochs=1"]
MTL = ["search.framework=mtl", "search.rounds=1", "engine.coupling=none"]


def _spec(tmp_path, **extra) -> str:
    spec = {"out": str(tmp_path / "sweep"), "search": {"preset": "demo", "set": SEARCH_SET},
            "grid": {"search.seed": [0, 1], "framework": {"il": [], "mtl": MTL}},
            "train": {"preset": "eval-digits", "tasks": ["digits"], "set": TRAIN_SET},
            "parallel": 2, "report": False, **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def _sessions(run) -> list[dict]:
    return json.loads((run / "provenance.json").read_text())["sessions"]


def test_the_grid_is_every_combination_of_its_axes_in_order(tmp_path):
    assert [c.name for c in load_spec(_spec(tmp_path)).cells] == ["seed-0_framework-il", "seed-0_framework-mtl",
                                                                  "seed-1_framework-il", "seed-1_framework-mtl"]


def test_training_seeds_re_train_every_found_cell_once_per_seed_and_task(tmp_path):
    train = {"preset": "eval-digits", "tasks": ["digits", "mnist5k"], "set": TRAIN_SET, "seeds": [0, 7]}
    (cell,) = load_spec(_spec(tmp_path, grid={"search.seed": [3]}, train=train)).cells
    search, *trainings = cell.runs
    assert [r.out.name for r in trainings] == ["train-digits-seed-0", "train-digits-seed-7", "train-mnist5k-seed-0",
                                               "train-mnist5k-seed-7"]
    assert [(r.config["data"]["tasks"], r.config["train"]["seed"]) for r in trainings] == [
        (["digits"], 0), (["digits"], 7), (["mnist5k"], 0), (["mnist5k"], 7)]
    assert all(r.args[r.args.index("--genotype") + 1] == str(search.out) for r in trainings)
    assert "train.seed=7" in trainings[1].args and search.config["search"]["seed"] == 3

def test_training_recipes_re_train_every_found_cell_once_per_recipe_and_compare_gives_each_its_row(tmp_path):
    """train.recipes: the found cell re-trained under named sets of training settings (1 or 2 epochs, two
    learning rates), each in train-<task>-<recipe>[-seed-<s>]/; compare makes one row per recipe."""
    train = {"preset": "eval-digits", "tasks": ["digits"], "set": TRAIN_SET, "seeds": [0, 7],
             "recipes": {"short": [], "long": ["train.epochs=2", "optimizer.lr=0.1"]}}
    spec = _spec(tmp_path, grid={"search.seed": [3]}, train=train)
    search, *trainings = load_spec(spec).cells[0].runs
    assert [r.out.name for r in trainings] == ["train-digits-short-seed-0", "train-digits-short-seed-7",
                                               "train-digits-long-seed-0", "train-digits-long-seed-7"]
    assert [(r.config["train"]["epochs"], r.config["optimizer"]["lr"], r.config["train"]["seed"])
            for r in trainings] == [(1, 0.05, 0), (1, 0.05, 7), (2, 0.1, 0), (2, 0.1, 7)]
    assert all(r.args[r.args.index("--genotype") + 1] == str(search.out) for r in trainings)
    numbered = {3: ["train.epochs=3"], 6: ["train.epochs=6"]}  # YAML's 3: [...]
    numbered = load_spec(_spec(tmp_path, grid={"search.seed": [3]}, train={**train, "recipes": numbered}))
    assert [r.out.name for r in numbered.cells[0].runs[1:3]] == ["train-digits-3-seed-0", "train-digits-3-seed-7"]
    del train["seeds"]  # run: one search, two trainings
    code, _, err = call("sweep", _spec(tmp_path, grid={"search.seed": [3]}, train=train))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "sweep" / "seed-3").iterdir() if p.is_dir()) == [
        "search", "train-digits-long", "train-digits-short"]
    code, out, err = call("compare", str(tmp_path / "sweep"), "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert sorted((row["settings"], row["error_digits"]["n"]) for row in rows) == [
        ("eval:optimizer.lr=0.05, eval:train.epochs=1", 1), ("eval:optimizer.lr=0.1, eval:train.epochs=2", 1)], rows


def test_a_sweep_runs_resumes_after_a_kill_and_skips_finished_cells(tmp_path):
    spec, out = _spec(tmp_path, grid={"search.seed": [0, 1]}), tmp_path / "sweep"
    cells = load_spec(spec).cells
    assert [c.name for c in cells] == ["seed-0", "seed-1"]
    # Interrupt: kill the sweep and its runs as soon as the first search has written a checkpoint.
    proc = subprocess.Popen([sys.executable, "-m", "ilnas", "sweep", spec], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("*/search/checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    record = json.loads((out / "sweep.json").read_text())  # as written when the sweep started: no cell had ended
    assert record["final"] is False and [c["runs"] for c in record["cells"]] == [
        {"search": "pending", "train-digits": "pending"}] * 2
    # status lists the runs still to come from it (the trainings; a search that had not begun, if any)
    rows = {Path(r["run"]).relative_to(out.resolve()): r for r in json.loads(ilnas_here("status", str(out),
                                                                                       "--json").stdout)}
    assert sorted(map(str, rows)) == [f"{c.name}/{run}" for c in cells for run in ("search", "train-digits")]
    assert all(rows[Path(c.name, "train-digits")]["state"] == "not started" for c in cells)
    assert rows[Path(cells[0].name, "train-digits")]["kind"] == "training"

    r = ilnas("sweep", spec)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "sweep.json").read_text())
    assert not summary["failed"] and len(summary["cells"]) == 2
    # a line as each cell is done (in the order the cells end): the search resumed counts as run now
    progress = sorted(re.sub(r"\d+\.\d min", "T min", line) for line in r.stdout.splitlines() if line.startswith("["))
    assert progress == ["[1/2] seed-0: 2 runs finished in T min", "[2/2] seed-1: 2 runs finished in T min"] or \
        progress == ["[1/2] seed-1: 2 runs finished in T min", "[2/2] seed-0: 2 runs finished in T min"], r.stdout
    for cell in cells:
        for run in ("search", "train-digits"):
            assert (out / cell.name / run / ("summary.json" if run == "search" else "result.json")).is_file()
    resumed = [s for c in cells for s in _sessions(out / c.name / "search") if s["resumed"]]
    assert resumed  # the interrupted search was continued, not restarted
    trained = json.loads((out / cells[1].name / "train-digits" / "provenance.json").read_text())
    assert trained["genotype_source"] == str((out / cells[1].name / "search").resolve())
    assert trained["genotype_source_relative"] == "../search"  # what still leads there once the sweep has moved

    r = ilnas_here("sweep", spec)  # everything finished: every run is skipped (in this process: nothing starts)
    assert r.returncode == 0, r.stderr
    assert sorted(line.partition(" ")[2] for line in r.stdout.splitlines() if line.startswith("[")) == [
        "seed-0: finished before (skipped)", "seed-1: finished before (skipped)"]
    # what there is to do, without the commands (--dry-run lists those)
    assert r.stdout.splitlines()[0] == f"2 cells (4 runs, 4 finished) in {out}, 2 at a time (local)"
    assert "ilnas search" not in r.stdout
    again = json.loads((out / "sweep.json").read_text())
    assert all(v == "finished (skipped)" for c in again["cells"] for v in c["runs"].values())

    table = json.loads(ilnas_here("compare", str(out), "--json").stdout)
    assert [(row["framework"], row["seeds"], row["error_digits"]["n"]) for row in table["rows"]] == [("il", 2, 2)]


@pytest.mark.parametrize("signum, code, last", [
    (signal.SIGINT, -signal.SIGINT, "ilnas: interrupted"),  # ended as Python ends a Ctrl-C: shells say 130
    (signal.SIGTERM, 143, "ilnas: stopped by SIGTERM: no further cell starts, and the running ones checkpointed "
                          "their step; run the sweep again to continue")])
def test_an_interrupted_sweep_starts_no_further_cell_and_its_running_search_checkpoints_its_step(
        tmp_path, signum, code, last):
    """Ctrl-C or SIGTERM (the sweep itself a cluster job) to the sweep process alone (say, `kill -INT`): it
    stops its running command with SIGTERM, which checkpoints the step it is on, waits for it, and starts no
    other cell."""
    spec = _spec(tmp_path, grid={"search.seed": [0, 1]}, train=None, parallel=1)
    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "ilnas", "sweep", spec], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,  # Ctrl-C as in a terminal (not ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (out / "seed-0" / "search" / "provenance.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code and stderr.splitlines()[-1] == last, stderr
    assert "ilnas: stopped by SIGTERM after " in (out / "seed-0" / "search.log").read_text()
    assert (out / "seed-0" / "search" / "checkpoint.pt").exists() and not (out / "seed-1").exists()
    assert runlock.lock_holder(out / "seed-0" / "search") is None  # its command has ended: nothing orphaned


def test_sweep_json_records_each_cell_as_it_ends(tmp_path, monkeypatch):
    """Read while the second of two cells runs (one at a time), sweep.json holds the first cell's status and the
    second as pending; at the end both, and "final"."""
    from ilnas.recipes import sweep as sweep_recipe

    sweep, seen = load_spec(_spec(tmp_path, grid={"search.seed": [0, 1]}, train=None, parallel=1)), []

    def run_cell(cell, env, started):
        seen.append(json.loads((sweep.out / "sweep.json").read_text()))
        return {"cell": cell.name, "labels": cell.labels, "runs": {"search": f"finished ({cell.name})"}}
    monkeypatch.setattr(sweep_recipe, "run_cell", run_cell)
    summary = sweep_recipe.run_sweep(sweep)
    assert [(r["final"], [c["runs"]["search"] for c in r["cells"]]) for r in seen] == [
        (False, ["pending", "pending"]), (False, ["finished (seed-0)", "pending"])]
    assert [c["labels"] for c in seen[0]["cells"]] == [{"search.seed": "0"}, {"search.seed": "1"}]
    assert summary == json.loads((sweep.out / "sweep.json").read_text())
    assert summary["final"] is True and [c["runs"]["search"] for c in summary["cells"]] == [
        "finished (seed-0)", "finished (seed-1)"]


def test_a_sweep_cell_whose_finished_search_has_an_unreadable_summary_fails_saying_how_to_mend_it(tmp_path,
                                                                                                   finished_run):
    """Skipped as finished, the cell's re-trainings would run and compare would then refuse the search: the cell
    fails at once instead, starting nothing, with the line that says how to write the summary again."""
    spec, out = _spec(tmp_path, grid={"search.seed": [0]}), tmp_path / "sweep"
    search = out / "seed-0" / "search"
    shutil.copytree(finished_run, search)
    (search / "summary.json").write_text("[]")
    status = sweep_module.run_cell(load_spec(spec).cells[0])
    assert status["runs"] == {"search": f"failed ({search / 'summary.json'} is damaged: it holds a JSON list, not an "
                                        f"object; remove it, and --resume finishes the run again from its last "
                                        f"checkpoint)"}
    assert sorted(p.name for p in (out / "seed-0").iterdir()) == ["search"]


def test_a_sweep_that_cannot_write_its_records_says_so_in_one_line_and_keeps_its_runs(tmp_path, monkeypatch):
    """A full disk: a cell whose log cannot be opened fails with that reason, and a sweep.json that cannot be
    written stops the sweep in one line (exit 3); run again with space, the finished cell is skipped."""
    import errno

    from ilnas.recipes import sweep as sweep_recipe

    spec, out = _spec(tmp_path, grid={"search.seed": [0]}, train=None, parallel=1), tmp_path / "sweep"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(sweep_recipe, "open", full_disk, raising=False)
    status = sweep_recipe.run_cell(load_spec(spec).cells[0])
    assert status["runs"] == {"search": f"failed (cannot write its log {out / 'seed-0' / 'search.log'}: "
                                        f"No space left on device)"}
    monkeypatch.undo()

    real, writes = sweep_recipe.atomic_write_text, []

    def sweep_json_fails_after(n: int):
        def write(path, text):
            if path.name == "sweep.json":
                writes.append(path)
                if len(writes) > n:
                    full_disk()
            real(path, text)
        return write
    monkeypatch.setattr(sweep_recipe, "atomic_write_text", sweep_json_fails_after(0))
    code, _, err = call("sweep", spec)
    assert code == 3 and err == (f"ilnas: error: cannot write {out / 'sweep.json'} (No space left on device); no "
                                 f"cell has started\n"), err
    assert not (out / "seed-0" / "search").exists() and not (out / "sweep.json").exists()
    # the first record written, then none: the one as the cell ends is a warning, the final one the sweep's error
    writes.clear()
    monkeypatch.setattr(sweep_recipe, "atomic_write_text", sweep_json_fails_after(1))
    code, _, err = call("sweep", spec)
    assert code == 3 and err == (f"ilnas: warning: cannot update {out / 'sweep.json'} (No space left on device); the "
                                 f"sweep goes on and writes it when it ends\n"
                                 f"ilnas: error: cannot write {out / 'sweep.json'} (No space left on device); the "
                                 f"cells' runs are kept; run the sweep again to write it\n"), err
    assert is_finished(out / "seed-0" / "search") and len(writes) == 3
    assert json.loads((out / "sweep.json").read_text())["cells"][0]["runs"] == {"search": "pending"}
    monkeypatch.undo()
    code, _, err = call("sweep", spec)
    assert code == 0, err
    assert json.loads((out / "sweep.json").read_text())["cells"][0]["runs"] == {"search": "finished (skipped)"}

def _pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` waits to be delivered to the (stopped) process ``pid``."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("ShdPnd:"))
    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads pending signals from /proc")
@pytest.mark.parametrize("then", ["it ends", "Ctrl-C"])
def test_a_sweep_run_again_while_its_killed_drivers_command_runs_on_waits_for_that_command(tmp_path, then):
    """The driver alone SIGKILLed, its running search goes on (held with SIGSTOP here, so that the new driver
    surely finds it running). The sweep run again waits for it instead of failing the cell on its lock: once
    it has ended, its finished search is skipped. Ctrl-C while waiting passes SIGTERM on to it, which
    checkpoints its step, and the sweep ends without starting it again."""
    spec = _spec(tmp_path, grid={"search.seed": [0]}, train=None, parallel=1)
    search = tmp_path / "sweep" / "seed-0" / "search"
    first = subprocess.Popen([sys.executable, "-m", "ilnas", "sweep", spec], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while (orphan := runlock.holder_pid(search)) is None:
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.01)
    os.kill(orphan, signal.SIGSTOP)
    first.kill()
    first.wait()
    err = tmp_path / "driver.err"
    with open(err, "w") as f:
        second = subprocess.Popen([sys.executable, "-m", "ilnas", "sweep", spec], stdout=subprocess.DEVNULL,
                                  stderr=f, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while "is being worked on by another process (pid " not in err.read_text():
            assert second.poll() is None and time.time() < deadline, err.read_text()
            time.sleep(0.05)
        if then == "Ctrl-C":
            second.send_signal(signal.SIGINT)
            while not _pending(orphan, signal.SIGTERM):  # the driver passes SIGTERM on to the held search
                assert time.time() < deadline, err.read_text()
                time.sleep(0.01)
    finally:
        os.kill(orphan, signal.SIGCONT)
    assert second.wait(timeout=120) == (0 if then == "it ends" else -signal.SIGINT), err.read_text()
    assert runlock.lock_holder(search) is None
    assert len(_sessions(search)) == 1  # the one search, neither restarted nor resumed
    if then == "it ends":
        assert is_finished(search)
        assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["cells"][0]["runs"] == {
            "search": "finished (skipped)"}
    else:
        assert "ilnas: stopped by SIGTERM after " in (search.parent / "search.log").read_text()
        assert not is_finished(search) and err.read_text().splitlines()[-1] == "ilnas: interrupted"

@pytest.mark.parametrize("when", ["running", "starting"])
def test_an_interrupted_sweep_of_local_submitit_jobs_stops_the_running_search_and_ends(tmp_path, when):
    """Ctrl-C to the driver alone, its cells local submitit jobs (what submitit falls back to without SLURM):
    the job's search checkpoints its step and stops, and the driver ends instead of waiting for the job's
    whole run; also where the search is still starting (its process started, its lock not yet taken)."""
    pytest.importorskip("submitit")
    search_set = [s for s in SEARCH_SET if not s.startswith("search.epochs")] + ["search.epochs=500"]
    spec = _spec(tmp_path, executor="submitit", submitit={"cluster": "local"}, grid={"search.seed": [0, 1]},
                 train=None, search={"preset": "demo", "set": search_set}, parallel=1)
    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "ilnas", "sweep", spec], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while (runlock.lock_holder(out / "seed-0" / "search") is None if when == "running" else  # its search runs
           not (out / "seed-0" / "search.log").exists()):  # the job has started its search's process
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    if when == "starting":  # the process is still importing torch: the run's lock is not taken for seconds
        assert runlock.lock_holder(out / "seed-0" / "search") is None
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT and stderr.splitlines()[-1] == "ilnas: interrupted", stderr
    assert "ilnas: stopped by SIGTERM after " in (out / "seed-0" / "search.log").read_text()
    assert runlock.lock_holder(out / "seed-0" / "search") is None and not (out / "seed-1").exists()


def _signal_the_job_once_its_search_has_a_checkpoint(proc, search) -> None:
    """What SLURM does before a time limit or a preemption: USR2 to the job's process (the parent of the
    ilnas process that holds the search's lock), here as soon as the search has a checkpoint."""
    deadline = time.time() + 300
    while not (search / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is not None:  # the job's own logs say why it ended
        logs = {f.name: f.read_text()[-3000:] for f in search.parent.parent.glob("submitit/*_log.*")}
        raise AssertionError((proc.communicate(), logs))
    holder = int(re.match(r"pid (\d+)", (search / ".lock").read_text()).group(1))
    job = int(Path(f"/proc/{holder}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
    os.kill(job, signal.SIGUSR2)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads parent pids from /proc")
@pytest.mark.parametrize("requeues", [None, 0])
def test_a_submitit_job_stopped_by_its_time_limit_is_requeued_and_resumes(tmp_path, requeues):
    pytest.importorskip("submitit")
    settings = {"cluster": "local", "timeout_min": 10, **({} if requeues is None else {"max_num_timeout": requeues})}
    search_set = [s for s in SEARCH_SET if not s.startswith("search.epochs")] + ["search.epochs=3"]
    seeds = [3] if requeues == 0 else [3, 4]  # locally one job at a time (parallel 1), as a local sweep runs
    spec = _spec(tmp_path, executor="submitit", submitit=settings, grid={"search.seed": seeds}, train=None,
                 search={"preset": "demo", "set": search_set}, parallel=1)
    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "ilnas", "sweep", spec], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _signal_the_job_once_its_search_has_a_checkpoint(proc, out / "seed-3" / "search")
    stdout, stderr = proc.communicate(timeout=300)
    cell = json.loads((out / "sweep.json").read_text())["cells"][0]
    status = cell["runs"]["search"]
    assert Path(cell["job_log"]).is_file() and cell["job"] in cell["job_log"]
    if requeues == 0:  # no requeue allowed: the cell fails, in one line, and the sweep says so
        assert proc.returncode == 3 and len(stderr.splitlines()) == 1
        assert "1 of 1 sweep cells failed (first: seed-3, its search failed (job " in stderr
        assert status.startswith("failed (job ") and "timed-out too many times" in status and "_log.err" in status
        assert not (out / "seed-3" / "search" / "summary.json").exists()
        return
    assert proc.returncode == 0, stderr
    assert status == "finished" and json.loads((out / "sweep.json").read_text())["executor"] == "submitit"
    sessions = _sessions(out / "seed-3" / "search")
    assert [s["resumed"] for s in sessions] == [False, True]  # continued from its checkpoint, not restarted
    assert [s["job"]["SUBMITIT_LOCAL_JOB_ID"] for s in sessions] == [cell["job"]] * 2  # the job, requeued
    assert json.loads((out / "seed-3" / "search" / "summary.json").read_text())["steps"] == 3
    # the job's checkpoint stopped its search with SIGTERM, which checkpointed the step it was on
    assert "ilnas: stopped by SIGTERM after " in (out / "seed-3" / "search.log").read_text()
    after = _sessions(out / "seed-4" / "search")
    assert json.loads((out / "sweep.json").read_text())["cells"][1]["runs"] == {"search": "finished"}
    assert after[0]["start"] >= sessions[-1]["end"] and after[0]["job"]["SUBMITIT_LOCAL_JOB_ID"] != cell["job"]


def test_a_second_process_running_the_same_sweep_is_refused(tmp_path):
    """Two drivers of one sweep would each start (or submit) every unfinished cell."""
    spec, out = _spec(tmp_path, grid={"search.seed": [0]}, train=None), tmp_path / "sweep"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ilnas.runlock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        code, _, err = call("sweep", spec)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and err.startswith(f"ilnas: error: {out} is in use by another ilnas process (pid {holder.pid} on ")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no cell started
    assert runlock.lock_holder(out) is None  # the holder gone, the sweep is free


def test_a_cell_directory_holding_another_configuration_is_refused_before_any_cell_runs(tmp_path):
    spec = _spec(tmp_path, grid={"search.seed": [0, 1]}, train=None)
    run = load_spec(spec).cells[1].runs[0]
    run.out.mkdir(parents=True)
    (run.out / "config.yaml").write_text(yaml.safe_dump({**run.config, "search": {**run.config["search"], "seed": 7}}))
    code, _, err = call("sweep", spec)
    assert code == 2 and err == (f"ilnas: error: {run.out} holds a run of another configuration than the sweep's; "
                                 f"move it away or choose another out\n")
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["seed-1"]  # seed-0 did not start


def test_a_slurm_sweep_run_again_after_its_driver_died_waits_for_the_cells_running_job(tmp_path, monkeypatch):
    """SLURM (tests/fake_slurm.py: sbatch, sacct, srun as submitit calls them): the driver dies while its cell's
    job runs (a closed login session); the sweep run again finds that job (submitit/jobs.json) and waits for it
    rather than submitting a second one, and a third run submits nothing for the finished cell. (The job's
    search is held with SIGSTOP until the second driver has decided, so the job surely runs then.)"""
    pytest.importorskip("submitit")
    import fake_slurm

    env = fake_slurm.install(tmp_path / "bin", tmp_path / "slurm")
    for name in ("PATH", "FAKE_SLURM_DIR"):  # for fake_slurm.submitted() and `ilnas status` here
        monkeypatch.setenv(name, env[name])
    spec = _spec(tmp_path, executor="submitit", submitit={"cluster": "slurm"}, grid={"search.seed": [5]},
                 train=None)
    out, record = tmp_path / "sweep" / "seed-5" / "search", tmp_path / "sweep" / "submitit" / "jobs.json"
    sweep = [sys.executable, "-m", "ilnas", "sweep", spec]
    driver = subprocess.Popen(sweep, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "provenance.json").exists():  # the job runs the search
        assert driver.poll() is None and time.time() < deadline, driver.communicate()
        time.sleep(0.05)
    search = int(re.match(r"pid (\d+)", (out / ".lock").read_text()).group(1))
    os.kill(search, signal.SIGSTOP)
    try:
        driver.kill()
        driver.wait()
        assert fake_slurm.submitted() == ["1000"] and not is_finished(out)
        [row] = json.loads(call("status", str(tmp_path / "sweep"), "--json")[1])
        assert (row["state"], row["job"]) == ("running", "1000 RUNNING")
        written = record.stat().st_ino
        driver = subprocess.Popen(sweep, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while record.stat().st_ino == written:  # rewritten (atomically) once the driver has its job
            assert driver.poll() is None and time.time() < deadline, driver.communicate()
            time.sleep(0.05)
    finally:
        os.kill(search, signal.SIGCONT)
    assert driver.wait(timeout=300) == 0, driver.communicate()
    [cell] = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["cells"]
    assert fake_slurm.submitted() == ["1000"] and (cell["job"], cell["runs"]) == ("1000", {"search": "finished"})
    assert [(s["resumed"], s["job"]["SLURM_JOB_ID"]) for s in _sessions(out)] == [(False, "1000")]  # one session

    r = subprocess.run(sweep, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and fake_slurm.submitted() == ["1000"], r.stderr
    [cell] = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["cells"]
    assert cell["runs"] == {"search": "finished (skipped)"}


def test_a_slurm_job_signalled_before_its_end_checkpoints_requeues_itself_and_resumes(tmp_path, monkeypatch):
    """The cluster path of the submitit test above, through submitit's SLURM job environment: USR2 (SLURM's
    warning before a time limit or a preemption) to the job; CellJob.checkpoint stops the search with SIGTERM,
    which checkpoints its step; submitit runs `scontrol requeue` and the job script starts again under the same
    id, skips nothing and resumes the search, and the sweep's driver reports the cell finished."""
    pytest.importorskip("submitit")
    import fake_slurm

    env = fake_slurm.install(tmp_path / "bin", tmp_path / "slurm")
    monkeypatch.setenv("FAKE_SLURM_DIR", env["FAKE_SLURM_DIR"])
    search_set = [s for s in SEARCH_SET if not s.startswith("search.epochs")] + ["search.epochs=3"]
    spec = _spec(tmp_path, executor="submitit", submitit={"cluster": "slurm", "timeout_min": 60},
                 grid={"search.seed": [3]}, train=None, search={"preset": "demo", "set": search_set})
    out = tmp_path / "sweep" / "seed-3" / "search"
    proc = subprocess.Popen([sys.executable, "-m", "ilnas", "sweep", spec], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _signal_the_job_once_its_search_has_a_checkpoint(proc, out)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    [cell] = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["cells"]
    assert (cell["job"], cell["runs"]) == ("1000", {"search": "finished"})
    assert fake_slurm.submitted() == ["1000"] and fake_slurm.requeued() == ["1000"]
    assert [(s["resumed"], s["job"]["SLURM_JOB_ID"]) for s in _sessions(out)] == [(False, "1000"), (True, "1000")]
    assert "ilnas: stopped by SIGTERM after " in (out.parent / "search.log").read_text()
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_a_slurm_job_still_running_a_cell_as_other_settings_made_it_is_refused(tmp_path, monkeypatch):
    """A recorded job is waited for only where it runs the cell the spec makes now: one of an edited spec
    would write the same directories with other settings. A recorded job that has ended is not waited for."""
    pytest.importorskip("submitit")
    import fake_slurm
    from ilnas.recipes.sweep import _earlier_job, _fingerprint, job_states, submitit_executor

    env = fake_slurm.install(tmp_path / "bin", tmp_path / "slurm")
    for name in ("PATH", "FAKE_SLURM_DIR"):
        monkeypatch.setenv(name, env[name])
    spec = _spec(tmp_path, executor="submitit", submitit={"cluster": "slurm"}, grid={"search.seed": [5]}, train=None)
    (tmp_path / "slurm" / "1000.pid").write_text(str(os.getpid()))  # sacct: running
    (tmp_path / "slurm" / "1001.pid").write_text(str(os.getpid()))
    (tmp_path / "slurm" / "1001.rc").write_text("0\n")  # sacct: completed
    (tmp_path / "sweep" / "submitit").mkdir(parents=True)
    (tmp_path / "sweep" / "submitit" / "jobs.json").write_text(json.dumps({"seed-5": {"job": "1000", "cell": "x"}}))
    code, out, _ = call("status", str(tmp_path / "sweep"), "--json")  # a cell whose job has no run yet
    assert code == 0 and [(Path(r["run"]).name, r["state"], r["job"]) for r in json.loads(out)] == [
        ("seed-5", "queued", "1000 RUNNING")]
    assert f"| {(tmp_path / 'sweep' / 'seed-5').resolve()} | - | queued (SLURM job 1000 RUNNING) | 0/? |" in call(
        "status", str(tmp_path / "sweep"))[1]
    code, _, err = call("sweep", spec)
    assert code == 2 and err == ("ilnas: error: sweep cell seed-5: its job 1000, submitted by an earlier run of this "
                                 "sweep with other settings, is still running; wait for it or scancel 1000\n")
    assert fake_slurm.submitted() == [] and not (tmp_path / "sweep" / "seed-5").exists()
    sweep = load_spec(spec)
    executor, cell = submitit_executor(sweep), sweep.cells[0]
    states = job_states(["1000", "1001", "1002"])  # 1002: never submitted
    assert states == {"1000": "RUNNING", "1001": "COMPLETED", "1002": "UNKNOWN"}
    assert _earlier_job(executor, {"job": "1000", "cell": _fingerprint(cell)}, states, cell).job_id == "1000"
    assert _earlier_job(executor, {"job": "1001", "cell": _fingerprint(cell)}, states, cell) is None


@pytest.mark.parametrize("change, message", [
    ({"grid": {}}, "grid must map axes to values"),
    ({"grid": {"framework": [1, 2]}}, "is not a setting (section.key)"),
    ({"grid": {"search.seed": [-1]}}, "sweep cell seed--1: search.seed must be an integer in [0, 2**32)"),
    ({"parallel": 0}, "parallel must be a positive integer"),
    ({"executor": "kubernetes"}, "executor must be local or submitit"),
    ({"colour": 1}, "unknown key 'colour'"),
    ({"executor": "submitit", "submitit": ["slurm"]}, "submitit must be a mapping"),
    ({"executor": "submitit", "submitit": {"max_num_timeout": -1}}, "max_num_timeout must be a non-negative integer"),
    ({"train": {"tasks": ["nope"], "set": TRAIN_SET}}, "training on nope: unknown task"),
    ({"train": {"tasks": "digits", "set": TRAIN_SET}}, "train needs tasks: [task, ...]"),  # not one per letter
    ({"train": {"tasks": ["digits", "cifar10\n"], "set": TRAIN_SET}}, "train.tasks holds 'cifar10\\n', which is no "
                                                                      "task's name"),
    ({"out": 5}, "out must be a directory's path, got 5"),
    ({"out": []}, "out must be a directory's path, got []"),  # not the default in its place
    ({"out": ""}, "out must be a directory's path, got ''"),
    ({"search": {"preset": 3}}, "search.preset must name a preset (see `ilnas presets`), got 3"),
    ({"search": {"preset": None}}, "search.preset must name a preset (see `ilnas presets`), got None"),
    ({"search": []}, "search must be a mapping (preset, set)"),
    ({"train": {"tasks": ["digits"], "preset": ["eval-digits"]}}, "train.preset must name a preset (see `ilnas "
                                                                  "presets`), got ['eval-digits']"),
    ({"executor": "submitit", "submitit": 0}, "submitit must be a mapping"),
    ({"grid": {"engine.lam": [1, 10], "framework": {"il": [], "mtl": MTL}}},
     "cells lam-1_framework-mtl and lam-10_framework-mtl make the same search run (search never reads engine.lam "
     "there); name variants so that it is made once"),
    ({"grid": {"v": {"a": ["engine.lam=1"], "b": ["engine.lam=1.0"]}}},
     "cells v-a and v-b make the same search run (the same settings)"),
    ({"grid": {"v": {"a": ["engine.val_weights=null"], "b": ["engine.val_weights=[1, 1.0]"]}}},
     "cells v-a and v-b make the same search run (engine.val_weights mean the same there, all 1 being the default)"),
    ({"train": {"tasks": ["digits"], "seeds": [0, 0]}}, "train.seeds must be a list of distinct integers"),
    ({"train": {"tasks": ["digits"], "seeds": 3}}, "train.seeds must be a list of distinct integers, got 3"),
    ({"train": {"tasks": ["digits"], "seeds": [1], "set": ["train.seed=2"]}}, "exclude each other"),
    ({"train": {"tasks": ["digits"], "sets": ["train.epochs=1"]}}, "unknown key train.sets; valid: preset, tasks"),
    ({"train": {"tasks": ["digits"], "recipes": {"a": ["optimizer.lr=0.1"], "b": ["optimizer.lr=1e-1"]}}},
     "train-digits-a and train-digits-b of cell seed-0_framework-il are the same training (the same settings)"),
    ({"train": {"tasks": ["digits"], "recipes": {"../up": []}}}, "train.recipes name '../up' is no plain name"),
    ({"train": {"tasks": ["digits"], "recipes": {}}}, "train.recipes must map recipe names to lists"),
    ({"train": {"tasks": ["digits"], "recipes": {"a": "train.epochs=3"}}}, "train.recipes.a must be a list"),
    ({"train": {"tasks": ["digits"], "recipes": {"a": ["train.seed=3"]}, "seeds": [1]}}, "exclude each other"),
    ({"train": {"tasks": ["digits"], "recipes": {"a": ["data.tasks=[mnist5k]"]}}},
     "a data.tasks in train.set or a recipe would train another one in its directory"),
    ({"grid": {"train.epochs": [300, 600]}}, "grid.train.epochs sets train.epochs, a re-training setting: the "
     "grid's cells are searches; re-train under several settings with train.recipes"),
    ({"grid": {"width": {"narrow": ["network.channels=16"]}}}, "grid.width sets network.channels, a re-training"),
    ({"train": {"tasks": ["digits"], "recipes": {"a": ["train.epochs=0"]}}},
     "training on digits (a): train.epochs must be positive"),
    ({"search": {"preset": "demo", "sets": SEARCH_SET}}, "unknown key search.sets; valid: preset, set"),
    ({"grid": {"search.seed": [0, 1], "cell": {"v2": ["genotype=DARTS_V2"]}}},
     "cells seed-0_cell-v2 and seed-1_cell-v2 make the same train run (the same settings)"),
])
def test_a_bad_spec_is_refused_before_anything_runs(tmp_path, change, message):
    with pytest.raises(IlnasError) as e:
        load_spec(_spec(tmp_path, **change))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "sweep").exists()


def test_an_empty_out_is_refused_rather_than_read_as_the_specs(tmp_path):
    with pytest.raises(IlnasError, match="^--out must be a directory's path, got ''$"):
        load_spec(_spec(tmp_path), out="")
    code, _, err = call("sweep", _spec(tmp_path), "--out", "", "--check")
    assert code == 2 and err == "ilnas: error: --out is empty (an unset shell variable?)\n", err


def test_a_cell_whose_directory_name_the_filesystem_cannot_take_is_refused_before_anything_runs(tmp_path):
    """A variant named past NAME_MAX: the sweep made its directory, then met an OSError traceback."""
    spec = _spec(tmp_path, grid={"variant": {"v" * 300: []}}, train=None)
    code, _, err = call("sweep", spec)
    assert code == 2 and "cannot be made (File name too long)" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("content, message", [
    ("out: x\ngrid: [\n", "is not valid YAML: while parsing a flow node"),
    ("a: &a [1, 2]\nb: [*a, *a]\n", "is not valid YAML: YAML aliases (*name) are not accepted"),  # no alias bombs
    ("- 1\n- 2\n", "must hold a mapping (out, search, grid, train, ...)"),
    ("x" * (2**20 + 1), "is larger than 1048576 bytes"),
    (None, "does not exist or is not a file"),
    ("out: x\ngrid: {search.seed: [0, 1]}\ngrid: {search.seed: [2]}\n",
     "is not valid YAML: the key 'grid' is given twice"),
], ids=["syntax", "alias", "list", "too-large", "missing", "key-twice"])
def test_a_spec_file_that_is_no_spec_is_refused_in_one_line(tmp_path, content, message):
    spec = tmp_path / "spec.yaml"
    if content is not None:
        spec.write_text(content)
    code, _, err = call("sweep", str(spec))
    assert code == 2 and err.startswith(f"ilnas: error: sweep spec {spec} {message}") and err.count("\n") == 1, err

def test_more_parallel_slots_than_cells_are_as_many_as_the_cells(tmp_path, monkeypatch):
    """parallel: 10**9 once queued a billion slots (the process ran out of memory). The slots are the cells
    that run at once, and each gets its share of the threads the sweep was given (OMP_NUM_THREADS where set:
    a job script's, a test runner's)."""
    from ilnas.recipes.sweep import slot_env

    sweep = load_spec(_spec(tmp_path, parallel=10**9))
    assert sweep.parallel == len(sweep.cells) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert [slot_env(i, sweep.parallel, 2) for i in range(4)] == [
        {"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": str(i % 2)} for i in range(4)]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert slot_env(0, 2, 0) == {"OMP_NUM_THREADS": "1"}


def test_a_submitit_parameter_it_does_not_know_is_refused_in_one_line(tmp_path):
    pytest.importorskip("submitit")
    r = ilnas_here("sweep", _spec(tmp_path, executor="submitit", submitit={"cluster": "local", "colour": "red"}))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert "submitit settings not accepted (Parameter 'colour'" in r.stderr


def test_submitit_locally_has_no_two_minute_limit_unless_one_is_given(tmp_path):
    pytest.importorskip("submitit")
    from ilnas.recipes.sweep import LOCAL_TIMEOUT_MIN, submitit_executor

    for settings, minutes in (({"cluster": "local"}, LOCAL_TIMEOUT_MIN), ({"cluster": "local", "timeout_min": 7}, 7)):
        sweep = load_spec(_spec(tmp_path, executor="submitit", submitit=settings))
        assert submitit_executor(sweep).parameters["timeout_min"] == minutes


def test_a_cells_progress_line_names_its_first_unfinished_run_or_what_ran_now():
    from ilnas.recipes.sweep import _progress

    def line(runs: dict[str, str], seconds: float = 90.0) -> str:
        return _progress({"cell": "c", "runs": runs}, seconds)

    assert line({"search": "finished (skipped)", "train-digits": "failed (exit 3; see c/train-digits.log)"}) == \
        "its train-digits failed (exit 3; see c/train-digits.log)"
    assert line({"search": "finished (skipped)", "train-digits": "finished"}) == \
        "1 run finished in 1.5 min (1 finished before)"
    assert line({"search": "finished", "train-digits": "finished"}, 30.0) == "2 runs finished in 0.5 min"
    assert line({"search": "finished (skipped)"}) == "finished before (skipped)"


def test_the_command_refuses_a_bad_spec_in_one_line(tmp_path):
    r = ilnas("sweep", _spec(tmp_path, parallel=-3))
    assert r.returncode == 2 and "parallel must be a positive integer" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "sweep").exists()


def test_dry_run_lists_the_cells_and_their_commands(tmp_path):
    r = ilnas_here("sweep", _spec(tmp_path), "--dry-run")
    assert r.returncode == 0 and r.stdout.count("ilnas search") == 4 and r.stdout.count("ilnas train") == 4
    assert r.stdout.startswith(f"4 cells (8 runs, 0 finished) in {tmp_path / 'sweep'}, 2 at a time (local)\n")
    assert not (tmp_path / "sweep").exists()


def test_a_variant_that_names_its_cell_trains_it_without_searching(tmp_path):
    spec = load_spec(_spec(tmp_path, grid={"search.seed": [4, 5], "framework": {"random": ["genotype=random:{seed}"]}}))
    first = spec.cells[0]
    assert [run.command for run in first.runs] == ["train"]
    assert first.runs[0].args[first.runs[0].args.index("--genotype") + 1] == "random:4"
    with pytest.raises(IlnasError, match="needs a train section"):
        load_spec(_spec(tmp_path, grid={"framework": {"random": ["genotype=random:1"]}}, train=None))


def test_a_sweeps_check_checks_every_run_it_can_and_writes_nothing(tmp_path):
    """``ilnas sweep --check``: each search, and each re-training whose cell is already known (a given cell here),
    checked as its cell would start it; a re-training of a cell still to be searched, with a stand-in cell of its
    search's operations, so that what refuses it with any cell (a network too deep for its images) is said before
    the searches run. A run that would be refused makes the sweep's check exit 2 after the others, nothing
    written."""
    grid = {"search.seed": [0], "framework": {"il": [], "random": ["genotype=random:{seed}"]}}
    spec = _spec(tmp_path, grid=grid)
    picked = stand_in_cell(load_spec(spec).cells[0].runs[0].config)  # of the search's four operations
    assert picked == "random:0:none,max_pool_3x3,skip_connect,sep_conv_3x3"
    assert stand_in_cell({"space": {"ops": list(PRIMITIVES)}}) == "random:0"  # the default operations
    r = ilnas_here("sweep", spec, "--check")
    assert r.returncode == 0, r.stderr
    sweep = tmp_path / "sweep"
    assert r.stdout.splitlines()[1:] == [
        f"{sweep / 'seed-0_framework-il' / 'search'}: checked: the run would start "
        f"{sweep / 'seed-0_framework-il' / 'search'}; nothing was written",
        f"{sweep / 'seed-0_framework-il' / 'train-digits'}: with a stand-in cell ({picked}; its own is the one its "
        f"search is to find): checked: the run would start {sweep / 'seed-0_framework-il' / 'train-digits'}; nothing "
        f"was written",
        f"{sweep / 'seed-0_framework-random' / 'train-digits'}: checked: the run would start "
        f"{sweep / 'seed-0_framework-random' / 'train-digits'}; nothing was written"]
    assert not sweep.exists()
    deep = {"preset": "eval-digits", "tasks": ["digits"], "set": [*TRAIN_SET, "network.style=imagenet"]}
    r = ilnas_here("sweep", _spec(tmp_path, grid={**grid, "search.seed": [0, 1]}, train=deep), "--check")
    refusal = "ilnas: error: 16x16 images are too small for the imagenet-style network of 3 cells"
    assert r.returncode == 2 and r.stdout.count(refusal) == 3, r.stdout  # il's once: every cell's is alike
    stand_in = f"train-digits: with a stand-in cell ({picked}; its own is the one its search is to find): "
    assert f"{stand_in}{refusal}" in r.stdout and f"seed-1_framework-il/{stand_in}refused as " \
        f"{sweep / 'seed-0_framework-il' / 'train-digits'} (the same training)\n" in r.stdout, r.stdout
    assert r.stderr == "ilnas: error: 4 of the sweep's runs would be refused (above)\n"
    assert stand_in_cell({"space": {"ops": ["none", "skip_connect", "conv_1x1"]}}) == \
        "random:0:none,skip_connect,conv_1x1"
    r = ilnas_here("sweep", _spec(tmp_path, grid=grid, search={"preset": "demo",
                                                              "set": [*SEARCH_SET, "space.channels=100000"]}),
                   "--check")
    assert r.returncode == 2 and "search: ilnas: error: the supernet's weights (" in r.stdout, r.stdout
    assert r.stderr == "ilnas: error: 1 of the sweep's runs would be refused (above)\n" and not sweep.exists()
    search = sweep / "seed-0_framework-il" / "search"
    for held, code in ((search, 0), (sweep, 2)):  # a run of it worked on elsewhere is waited for; the sweep, refused
        held.mkdir(parents=True, exist_ok=True)
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ilnas.runlock import RunLock; "
                                   "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)",
                                   str(held)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "held\n"
            r = ilnas_here("sweep", spec, "--check")
        finally:
            holder.kill()
            holder.wait()
        assert r.returncode == code, r.stderr
        if code == 0:
            assert f"{search}: not checked: another process works on it (pid {holder.pid} on " in r.stdout, r.stdout
            assert "the sweep would wait for it to end, then skip or continue the run" in r.stdout
        else:
            assert r.stderr.startswith(f"ilnas: error: {sweep} is in use by another ilnas process (pid {holder.pid} ")


def test_a_sweeps_checks_run_parallel_at_a_time_with_their_share_of_the_threads(monkeypatch):
    """Two checks at a time for parallel: 2 (each waits at a barrier only both reach), each with half the threads;
    the outcomes come back in the runs' order, whichever check ends first. No more checks at a time than threads:
    a submitit sweep's parallel counts its jobs on the cluster."""
    lock, now = threading.Lock(), {"running": 0, "most": 0, "gate": threading.Barrier(2, timeout=60).wait}
    seen = []

    def fake_run(argv, capture_output, text, env):
        assert capture_output and text
        with lock:
            seen.append(env["OMP_NUM_THREADS"])
            now["running"] += 1
            now["most"] = max(now["most"], now["running"])
        now["gate"]()
        time.sleep(0.2 if argv[0] == "a" else 0.05)  # the first run's check ends last
        with lock:
            now["running"] -= 1
        refused = argv[0] == "b"
        return subprocess.CompletedProcess(argv, 2 * refused, f"{argv[0]} checked\n", "ilnas: error: b\n")
    monkeypatch.setattr(sweep_module.subprocess, "run", fake_run)

    def checks(runs: list[str], parallel: int) -> list[tuple[bool, str]]:
        seen.clear()
        now["most"] = 0
        return sweep_module._run_checks([[run] for run in runs], parallel)

    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert checks(["a", "b"], 2) == [(False, "a checked"), (True, "ilnas: error: b")]
    assert seen == ["2", "2"] and now["most"] == 2
    now["gate"] = lambda: None
    assert checks(["c"], 4) == [(False, "c checked")] and seen == ["4"]  # parallel above the runs' count
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread: one check at a time, whatever parallel says
    assert checks(["c", "d", "e"], 8) == [(False, f"{run} checked") for run in "cde"]
    assert seen == ["1", "1", "1"] and now["most"] == 1
    assert checks([], 2) == []


def test_a_job_that_ended_without_a_result_is_reported_by_its_state_or_its_own_error():
    """submitit's error for a SLURM job that left no result (its script could not start, it was cancelled, its
    node died) opens with the result's path: the cell's status gives the job's state instead, or the job's own
    exception where its error stream has one."""
    from ilnas.recipes.sweep import _job_failure

    header = ["Job 1000 (task: 0) with path /s/submitit/1000_0_result.pkl", "has not produced any output (state: {})"]
    no_script = "\n".join(header).format("FAILED") + "\nError stream produced:\n" + "-" * 40 + \
        "\nbash: /s/.submission_file_1.sh: No such file or directory\n"
    assert _job_failure(no_script) == "it ended without a result, state FAILED"
    cancelled = "\n".join(header).format("CANCELLED by 0") + "\nNo output/error stream produced ! Check: /s/x.out"
    assert _job_failure(cancelled) == "it ended without a result, state CANCELLED by 0"
    raised = "\n".join(header).format("FAILED") + "\nError stream produced:\nTraceback (most recent call last):\n" \
        '  File "x.py", line 1\nMemoryError: out of host memory\n'
    assert _job_failure(raised) == "MemoryError: out of host memory"


def test_a_sweep_into_a_folder_whose_sweep_json_is_not_a_sweeps_record_keeps_it(tmp_path):
    """``out`` may name a folder of one's own: a sweep.json there that no sweep wrote is not replaced, and
    nothing starts; a run of the sweep, or its --check, says so in one line."""
    spec, out = _spec(tmp_path, grid={"search.seed": [0]}, train=None), tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text('{"my": "notes"}')
    for extra in ([], ["--check"]):
        code, _, err = call("sweep", spec, *extra)
        assert code == 2 and err == (f"ilnas: error: {out / 'sweep.json'} is no ilnas sweep record, and a sweep "
                                     f"writes its record there; choose another out, or move the file\n"), err
    assert (out / "sweep.json").read_text() == '{"my": "notes"}'
    assert sorted(p.name for p in out.iterdir()) in (["sweep.json"], [".lock", "sweep.json"])


def test_a_finished_run_whose_record_is_unreadable_is_not_counted_finished_and_its_whole_cell_is_not_skipped(
        tmp_path, finished_run):
    """Every run of the cell has finished, but the search's summary.json is cut short: --dry-run does not count it
    finished, and the sweep fails the cell with the line that says how to mend it, instead of skipping it."""
    search_set = [s for s in SEARCH_SET if not s.startswith(("search.steps_per_epoch", "search.epochs",
                                                             "search.eval_batches"))]
    spec = _spec(tmp_path, grid={"search.seed": [0]}, train=None, parallel=1,
                 search={"preset": "demo", "set": [*search_set, "search.steps_per_epoch=2", "search.epochs=3",
                                                   "search.eval_batches=2"]})
    search = tmp_path / "sweep" / "seed-0" / "search"
    shutil.copytree(finished_run, search)
    assert ilnas_here("sweep", spec, "--dry-run").stdout.startswith("1 cells (1 runs, 1 finished)")
    (search / "summary.json").write_text('{"genotype": ')
    r = ilnas_here("sweep", spec, "--dry-run")
    assert r.returncode == 0 and r.stdout.startswith("1 cells (1 runs, 0 finished)"), r.stderr
    r = ilnas_here("sweep", spec)
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert r.returncode != 0 and record["failed"] == ["seed-0"], r.stderr
    assert record["cells"][0]["runs"]["search"].startswith(f"failed ({search / 'summary.json'} cannot be read")
    assert record["cells"][0]["runs"]["search"].endswith("remove it, and --resume finishes the run again from its "
                                                         "last checkpoint)")
    assert (search / "summary.json").read_text() == '{"genotype": '
