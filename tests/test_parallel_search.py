"""Data-parallel search under torchrun (gloo on CPU): ranks hold bit-identical architectures and weights, and
their steps equal one process whose loss averages the ranks' slices of each batch (BatchNorm statistics are
per slice, as with DistributedDataParallel); a 2-rank CLI search runs end to end and refuses bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (RENDEZVOUS, SHORT_SEARCH, assert_same_search, built_once, ilnas, ilnas_here, metric_records,
                     ranks_stderr, rel_error)
from ilnas.runs import read_checkpoint
from ilnas.search.engine import Learner, search_step
from parallel_cases import CASES, STEPS, problem

TESTS = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def torchrun(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def sliced(learner: Learner) -> Learner:
    """One process that normalises each half of a batch on its own: what two ranks compute together."""
    def loss(a, w, h, batch):
        x, y = batch
        n = len(y) // 2
        return 0.5 * (learner.loss(a, w, h, (x[:n], y[:n])) + learner.loss(a, w, h, (x[n:], y[n:])))
    return Learner(learner.name, loss)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    def build(out: Path) -> None:
        r = torchrun(str(TESTS / "parallel_worker.py"), str(out))
        assert r.returncode == 0, ranks_stderr(r.stderr)

    out = built_once(tmp_path_factory, "ranks", build)
    return [torch.load(out / f"rank{i}.pt", weights_only=True) for i in (0, 1)]


def test_replica_divergence_sees_one_rank_drift(ranks):
    assert ranks[0]["drift"] == ranks[1]["drift"] == pytest.approx(1e-3)


def test_validation_accuracy_dealt_over_ranks_equals_one_process(ranks):
    whole, dealt = ranks[0]["accuracy"]
    assert ranks[1]["accuracy"] == (whole, dealt)
    assert dealt == whole and 0.0 < whole < 1.0


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_hold_identical_replicas_equal_to_one_process(ranks, case):
    r0, r1 = ranks[0][case], ranks[1][case]
    for a, b in zip(r0["arch"] + sum(r0["w"], []) + sum(r0["h"], []), r1["arch"] + sum(r1["w"], []) + sum(r1["h"], [])):
        assert torch.equal(a, b)  # bit for bit
    assert r0["metrics"] == r1["metrics"]
    assert r0["divergence"] == r1["divergence"] == 0.0

    cfg, sgd, lr = CASES[case]
    p = problem()
    learners = [sliced(learner) for learner in p.learners]
    metrics = [search_step(p.state, learners, p.train, p.val, cfg, sgd, lr) for _ in range(STEPS)]
    assert rel_error(r0["arch"], [a.detach() for a in p.state.arch]) < 1e-12
    assert not torch.equal(r0["arch"][0], problem().state.arch[0].detach())  # the steps moved A
    for s, st in enumerate(p.state.stages):
        assert rel_error(r0["w"][s], st.w) < 1e-12 and rel_error(r0["h"][s], st.h) < 1e-12
    for got, want in zip(r0["metrics"], metrics):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-12)
        assert got.get("val_loss") == pytest.approx(want.get("val_loss"), rel=1e-12)
        assert got.get("hypergrad_norm") == pytest.approx(want.get("hypergrad_norm"), rel=1e-10)


MICRO = ["search", "--quiet", "--preset", "darts2nd-cifar10", "--set", "data.tasks=[digits]", *SHORT_SEARCH,
         "--set", "search.epochs=2", "--set", "search.steps_per_epoch=2"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """An uninterrupted two-rank search."""
    def build(runs: Path) -> None:
        r = torchrun("-m", "ilnas", *MICRO, "--out", str(runs / "two"))
        assert r.returncode == 0, ranks_stderr(r.stderr)
        assert r.stdout.count("genotype = Genotype(") == 1  # rank 0 speaks

    return built_once(tmp_path_factory, "two-ranks", build) / "two"


def test_two_rank_cli_search_runs_the_same_global_batches(two_ranks, tmp_path):
    one = ilnas_here(*MICRO, "--out", str(tmp_path / "one"))  # one thread, as each rank
    assert one.returncode == 0, one.stderr
    summary = json.loads((two_ranks / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    steps = [[r for r in metric_records(run) if r["kind"] == "step"] for run in (tmp_path / "one", two_ranks)]
    assert len(steps[0]) == len(steps[1]) == 4
    # Step 1 starts from the same weights on the same global batch; only BatchNorm's statistics differ
    # (per half-batch on two ranks).
    for name, loss in steps[0][0]["train_loss"].items():
        assert abs(steps[1][0]["train_loss"][name] - loss) < 0.1 * loss


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def test_a_killed_two_rank_search_resumes_bit_exact(two_ranks, tmp_path):
    """One rank killed after the first epoch's checkpoint; torchrun (--max-restarts 1) restarts both with the
    same command line, which --auto-resume continues. (`torchrun ... --resume` after a stop: the next test.)"""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*TORCHRUN, "--max-restarts", "1", "-m", "ilnas", *MICRO, "--out", str(out), "--auto-resume"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists():  # the end of epoch 1
        assert proc.poll() is None and time.time() < deadline, ranks_stderr(proc.stderr.read().decode())
        time.sleep(0.01)
    os.kill(descendants(proc.pid)[-1], signal.SIGKILL)  # a rank (in a session of its own)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, ranks_stderr(err.decode())
    assert_same_search(two_ranks, out)
    sessions = json.loads((out / "provenance.json").read_text())["sessions"]
    assert [(s["resumed"], s["world_size"]) for s in sessions] == [(False, 2), (True, 2)]
    assert [s["job"]["TORCHELASTIC_RESTART_COUNT"] for s in sessions] == ["0", "1"]


def test_a_terminated_two_rank_search_stops_both_ranks_at_one_step_and_resumes_bit_exact(two_ranks, tmp_path):
    """SIGTERM to torchrun (a cluster's notice), which passes it on to its ranks: they agree to stop after
    the same step, rank 0 checkpoints it with both ranks' generators, and `torchrun ... --resume` repeats the
    uninterrupted run."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*TORCHRUN, "-m", "ilnas", *MICRO, "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "provenance.json").exists():
        assert proc.poll() is None and time.time() < deadline, ranks_stderr(proc.stderr.read().decode())
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert err.decode().count("ilnas: stopped by SIGTERM after step 1 of 2 of epoch 1") == 1, ranks_stderr(err.decode())
    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert ckpt["progress"]["epoch_steps"] == 1 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["cpu"], ckpt["rng"][1]["cpu"])  # each rank's own dropout stream
    r = torchrun("-m", "ilnas", "search", "--resume", "--quiet", "--no-report", "--out", str(out))
    assert r.returncode == 0, ranks_stderr(r.stderr)
    assert_same_search(two_ranks, out)


def test_a_rank_that_fails_alone_leaves_one_line_from_each_rank_and_the_run_resumable(tmp_path):
    """Rank 1 fails in the second epoch (its own error, say a lost device); rank 0, which holds the run, meets
    only a broken collective: each says so in one line, no traceback, and the run keeps its epoch checkpoint."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAIL_RANK": "1", "FAIL_STEP": "3"}
    r = subprocess.run([*TORCHRUN, str(TESTS / "failing_rank.py"), *MICRO, "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    lines = [line for line in r.stderr.splitlines() if line.startswith(("ilnas:", "[rank"))]
    assert r.returncode != 0 and sorted(lines) == [
        "ilnas: error: rank 0 of 2 stopped: another rank of this job is gone (it failed or was stopped: its own "
        "message says why)",
        "ilnas: error: rank 1 cannot go on (a fault made for this test)"], ranks_stderr(r.stderr)
    [row] = json.loads(ilnas_here("status", str(out), "--json").stdout)
    assert row["state"] == "interrupted" and row["checkpoint"]["epochs"] == 1  # unlocked, ready for --resume
    assert row["outcome"].startswith("stopped: another rank of this job is gone")  # not a failure of its own


def test_only_a_broken_collective_counts_as_a_gone_peer(monkeypatch):
    """Any other error of a rank keeps its traceback (a bug must not read as a neighbour's failure)."""
    from ilnas.distributed import lost_peer

    def raised(e: Exception) -> Exception:
        try:
            raise e
        except Exception as caught:
            return caught

    transport = raised(RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1"))
    assert not lost_peer(transport)  # one process: no peers
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert lost_peer(transport) and lost_peer(raised(torch.distributed.DistBackendError("NCCL watchdog")))
    assert not lost_peer(raised(RuntimeError("mat1 and mat2 shapes cannot be multiplied")))
    assert not lost_peer(raised(ValueError("Connection closed by peer")))


@pytest.mark.parametrize("args, message", [
    (["--set", "search.batch_size=9", "--out", "__OUT__"], "search.batch_size=9 is not divisible by the 2 ranks"),
    ([], "under torchrun every rank must name the same run directory: pass --out DIR"),
])
def test_bad_parallel_input_is_one_line_and_exit_2(tmp_path, args, message):
    args = [a.replace("__OUT__", str(tmp_path / "run")) for a in args]
    r = ilnas(*MICRO, *args, cwd=tmp_path, env={"WORLD_SIZE": "2", "RANK": "0", **RENDEZVOUS})
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


STOP_CYCLES = """
import datetime, sys, torch, torch.distributed as dist
from ilnas import distributed
rank, port = int(sys.argv[1]), int(sys.argv[2])
store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=datetime.timedelta(seconds=60))
process = distributed.Process(rank, 2, rank, torch.device("cpu"))
for cycle in range(40):
    dist.init_process_group("gloo", store=dist.PrefixStore(f"cycle-{cycle}", store), rank=rank, world_size=2)
    for _ in range(3):
        distributed.all_sum([1.0, 2.0], process)
    distributed.closing_barrier(process)  # as a run ends
    distributed.stop()
print("stopped 40 times")
"""


def test_ranks_that_end_a_run_together_tear_the_process_group_down_without_hanging():
    """All-reduces, the closing barrier and stop(), 40 times over, in two processes. Gloo's destructor held
    the GIL while joining a worker that needed it to free a finished all-reduce's tensor: with torch 2.4.1 one
    rank hung for ever within 20 cycles (and once at the end of a two-rank training), unless the closing barrier
    first gives the workers a moment without the GIL."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, "-c", STOP_CYCLES, str(rank), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=60) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert all(p.returncode == 0 and "stopped 40 times" in out for p, (out, _) in zip(ranks, outs)), outs
