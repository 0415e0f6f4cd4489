"""What several test modules share: running the CLI, run-directory snapshots, kills, TensorBoard reads, data
files in their real formats, and a tiny float64 search problem with its brute-force hypergradient."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from ilnas.optim import SGD
from ilnas.runs import read_checkpoint
from ilnas.search.engine import EngineConfig, Learner, SearchState, Stage, hypergradient, stage_learners
from ilnas.search.task_net import FunctionalTaskNet, fresh_parameters
from ilnas.space.genotype import Genotype
from ilnas.space.layout import PRIMITIVES, full_edge_ops
from ilnas.space.supernet import Supernet, init_arch

# Short runs skip the end-of-run report (seconds of plotting each); the session fixtures keep it (with_report).
# What torchrun sets beside RANK and WORLD_SIZE: a rank's environment without it is refused.
RENDEZVOUS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
# Four of the eight operations, one of each kind (zero, pool, identity, convolution): a tiny search on them takes
# half the time, and what its tests check (checkpoints, resumes, faults, files) is the same on any set.
FOUR_OP_NAMES = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")
FOUR_OPS = f"space.ops=[{','.join(FOUR_OP_NAMES)}]"
SHORT_SEARCH = ["--no-report", "--set", "space.layers=3", "--set", "space.channels=4", "--set", "search.batch_size=8",
                "--set", "search.steps_per_epoch=3", "--set", "search.eval_batches=2", "--set", FOUR_OPS]
# The finished_run fixture: IL on mnist5k + digits (K=2, M=2), 3 epochs of 2 steps.
SEARCH3 = ["search", "--quiet", *SHORT_SEARCH, "--set", "search.steps_per_epoch=2", "--set", "search.epochs=3"]
TINY_TRAIN = ["--no-report", "--set", "network.layers=3", "--set", "network.channels=4", "--set", "train.batch_size=16",
              "--set", "train.steps_per_epoch=3", "--set", "train.epochs=2", "--quiet"]
# The finished_training fixture: DARTS_V2 re-trained on the digits, 3 cells, C=4, 3 epochs of 3 steps.
TRAIN_ARGS = ["train", "--genotype", "DARTS_V2", "--preset", "eval-digits", *TINY_TRAIN, "--set", "train.epochs=3"]


def folder_training(images: Path, out: Path, batch: int, epochs: int = 1, pipeline: str = "stream") -> list[str]:
    """``ilnas train`` arguments: DARTS_V2 (3 cells, C=4, CIFAR-style) on the image folder ``images`` at 32x32,
    streamed through one DataLoader worker (or, ``pipeline="memory"``, decoded into memory first)."""
    side = (["train.resolution=32", "train.workers=1"] if pipeline == "stream" else
            ["data.folder_pipeline=memory", "data.image_size=32"])
    return ["train", "--genotype", "DARTS_V2", "--preset", "eval-imagefolder", "--set",
            f"data.tasks=[imagefolder:{images}]", "--set", "network.style=cifar", "--set", side[0], "--set", side[1],
            "--set", f"train.batch_size={batch}", *TINY_TRAIN[1:5], "--set", f"train.epochs={epochs}", "--set",
            "optimizer.warmup_epochs=0", "--no-report", "--quiet", "--out", str(out)]


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``name``, a folder that ``build`` fills, built by the first of the session's xdist workers to ask and read by
    the others (a module fixture is otherwise built once per worker). Only for what its tests leave as it is."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # one process: its own folder
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    root = tmp_path_factory.getbasetemp().parent  # one per session, shared by its workers
    out, done = root / name, root / f"{name}.built"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # what a worker that failed to build it left
            out.mkdir()
            build(out)
            done.touch()
    return out


def ranks_stderr(stderr: str) -> str:
    """The end of what a failed torchrun's ranks printed: the launcher's own report of the failure follows it
    and would fill a plain tail."""
    marks = [i for i in (stderr.find("closing signal SIG"), stderr.find("failed (exitcode")) if i >= 0]
    head = stderr[:stderr.rfind("\n", 0, min(marks)) + 1] if marks else stderr
    return head[-3000:]


def ilnas(*args: str, cwd: Path | None = None, wait: bool = True, env: dict | None = None):
    """``python -m ilnas ARGS`` in a subprocess: a CompletedProcess, or the Popen with ``wait=False``."""
    cmd = [sys.executable, "-m", "ilnas", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def call(*argv: str, stdout: io.StringIO | None = None) -> tuple[int, str, str]:
    """``ilnas ARGV`` in this process (what a refusal needs: no process start): (exit code, stdout, stderr).
    ``stdout``: the stream standard output writes to (a fresh one by default)."""
    from ilnas import cli

    out, err = stdout or io.StringIO(), io.StringIO()
    logger = logging.getLogger("ilnas")  # the CLI gives it its console handler and stops its propagation: for
    kept = logger.handlers[:], logger.propagate, logger.level  # this call only, so that caplog sees later records
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:  # argparse
            code = e.code
        finally:
            logger.handlers[:], logger.propagate, logger.level = kept
    return code, out.getvalue(), err.getvalue()


def ilnas_here(*args: str) -> subprocess.CompletedProcess:
    """``ilnas ARGS`` in this process, given back as ``ilnas`` gives it: for commands that only read runs, which
    need no process of their own (and so no second torch start-up)."""
    code, out, err = call(*args)
    return subprocess.CompletedProcess(["ilnas", *args], code, out, err)


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
                pixels[..., c % 3] = 255  # a learnable colour cue
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i}.png")


# --- a tiny float64 search problem, and the brute-force hypergradient it is checked against ---------------

# --- comparing two runs bit for bit (a resumed run against an uninterrupted one) ---------------------

def strip_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k and "hours" not in k} for r in rows]


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def metric_records(run: Path) -> list[dict]:
    return strip_times([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()])


def tb_values(run: Path) -> dict:
    return {tag: values for tag, values in tb_scalars(run).items() if "per_s" not in tag}


def assert_same_tensors(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b


def assert_same_search(a: Path, b: Path) -> None:
    """Bit for bit: weights, optimiser states, alphas, history, metrics, TensorBoard scalars, genotype."""
    ca, cb = read_checkpoint(a / "checkpoint.pt"), read_checkpoint(b / "checkpoint.pt")
    assert_same_tensors(ca["state"], cb["state"])
    assert_same_tensors(ca["progress"]["history"], cb["progress"]["history"])
    ha, hb = np.load(a / "arch_history.npz"), np.load(b / "arch_history.npz")
    assert sorted(ha) == sorted(hb) and all(np.array_equal(ha[k], hb[k]) for k in ha)
    assert not np.array_equal(ha["p0/alphas_normal"][0], ha["p0/alphas_normal"][-1])  # a history, not a copy
    assert metric_records(a) == metric_records(b)
    assert tb_values(a) == tb_values(b)
    assert (a / "genotype.txt").read_text() == (b / "genotype.txt").read_text()
    summaries = [json.loads((run / "summary.json").read_text()) for run in (a, b)]
    assert strip_times(summaries[:1]) == strip_times(summaries[1:])


def assert_same_training(a: Path, b: Path) -> None:
    ca, cb = read_checkpoint(a / "checkpoint.pt"), read_checkpoint(b / "checkpoint.pt")
    assert ca["epoch"] == cb["epoch"]
    assert_same_tensors(ca["model"], cb["model"])
    assert_same_tensors(ca["optimizer"], cb["optimizer"])
    assert metric_records(a) == metric_records(b)
    assert tb_values(a) == tb_values(b)
    ra, rb = (json.loads((r / "result.json").read_text()) for r in (a, b))
    assert {k: v for k, v in ra.items() if "hours" not in k and "per_s" not in k} == \
           {k: v for k, v in rb.items() if "hours" not in k and "per_s" not in k}


def smooth(module: nn.Module) -> nn.Module:
    """Swap every ReLU for SiLU: finite differences need a smooth loss to be checked tightly."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.SiLU())
        else:
            smooth(child)
    return module


def with_report(args: list[str]) -> list[str]:
    """The same command, writing plots/ and report.html at its end."""
    return [a for a in args if a != "--no-report"]


@dataclass
class Problem:
    state: SearchState
    learners: list[Learner]
    train: list
    val: list


class SmoothSupernet(Supernet):
    """The supernet with SiLU for every ReLU (its batched twin too)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        smooth(self)


def make_problem(K: int = 2, M: int = 2, classes=(3, 4), seed: int = 0, smooth_ops: bool = False,
                 momentum_buffers: bool = True, partial_channels: int = 1, edge_normalization: bool = False,
                 batched: bool = True, primitives: tuple[str, ...] = PRIMITIVES, nodes: int = 2) -> Problem:
    """A 3-cell, C=2 supernet (C=4 with partial channels) on 8x8 one-channel images, float64, random data, on
    ``primitives`` (all eight by default; ``smooth_ops`` leaves max pooling out).
    ``batched``: the learners can evaluate several weight sets in one pass (the engine's batched path).
    ``nodes``: intermediate nodes a cell (2: five edges). The engine never sees the cell's shape, and the
    hypergradient through DARTS's 14-edge cell costs three to four times as long on a CPU, per operation called."""
    dtype = torch.float64
    primitives = [p for p in primitives if p != "max_pool_3x3"] if smooth_ops else primitives
    ops = full_edge_ops(primitives, nodes)

    def build_encoder() -> Supernet:
        return (SmoothSupernet if smooth_ops else Supernet)(1, 2 * partial_channels, 3, ops, ops,
                                                             partial_channels, nodes=nodes).to(dtype)

    gen = torch.Generator().manual_seed(seed)
    encoder = build_encoder()
    head_builders = [lambda c=c: nn.Linear(encoder.out_features, c).to(dtype) for c in classes[:K]]
    nets = [FunctionalTaskNet(encoder, hb(), c) for hb, c in zip(head_builders, classes)]
    learners = [Learner(f"task{k}", net.loss, net.losses if batched else None) for k, net in enumerate(nets)]
    stages = []
    for s, k in enumerate(stage_learners(list(range(K)), M)):
        w = fresh_parameters(build_encoder, 100 * seed + s)
        h = fresh_parameters(head_builders[k], 100 * seed + 50 + s)
        bufs = ([0.1 * torch.randn(x.shape, generator=gen, dtype=dtype) for x in w],
                [0.1 * torch.randn(x.shape, generator=gen, dtype=dtype) for x in h]) if momentum_buffers else (None, None)
        stages.append(Stage(k, w, h, *bufs))
    arch = [(a * 300).requires_grad_() for a in init_arch(len(primitives), edge_normalization, gen, dtype, nodes)]
    adam = torch.optim.Adam(arch, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)

    def batch(c: int):
        return (torch.randn(6, 1, 8, 8, generator=gen, dtype=dtype), torch.randint(0, c, (6,), generator=gen))

    return Problem(SearchState(arch, adam, stages), learners, [batch(c) for c in classes[:K]],
                   [batch(c) for c in classes[:K]])


def brute_force(p, cfg: EngineConfig, lr: float, sgd: SGD = SGD()) -> list[torch.Tensor]:
    """d/dA sum_{s in F} L^val_s(W_bar_s(A), H_bar_s(A)) with every step kept in the graph."""
    arch = [a.detach().requires_grad_() for a in p.state.arch]
    c = 2 * lr * cfg.lam
    wd, mu = sgd.weight_decay, sgd.momentum
    prev, bars = None, []
    for s, st in enumerate(p.state.stages):
        k = st.learner
        w = prev if cfg.coupling == "copy" and s > 0 else [x.detach().requires_grad_() for x in st.w]
        h = [x.detach().requires_grad_() for x in st.h]
        g = torch.autograd.grad(p.learners[k].loss(arch, w, h, p.train[k]), w + h, create_graph=True)
        w_step = [x - lr * (mu * b + gi + wd * x) for x, b, gi in zip(w, st.buf_w, g[:len(w)])]
        h_bar = [x - lr * (mu * b + gi + wd * x) for x, b, gi in zip(h, st.buf_h, g[len(w):])]
        if s > 0 and cfg.coupling == "prox":
            w_step = [(x + c * q) / (1 + c) for x, q in zip(w_step, prev)]
        if s > 0 and cfg.coupling == "gd":
            w_step = [x - c * (o - q) for x, o, q in zip(w_step, w, prev)]
        prev = w_step
        bars.append((w_step, h_bar))
    K = len(p.learners)
    total = sum(p.learners[p.state.stages[s].learner].loss(arch, *bars[s], p.val[p.state.stages[s].learner])
                for s in range(len(bars) - K, len(bars)))
    return list(torch.autograd.grad(total, arch))


def engine_hypergradient(p, cfg: EngineConfig, lr: float, sgd: SGD = SGD()) -> list[torch.Tensor]:
    return hypergradient(p.state, p.learners, p.train, p.val, cfg, sgd, lr)[0]


@torch.no_grad()
def rel_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = torch.cat([(x - y).flatten() for x, y in zip(a, b)]).norm()
    return float(num / torch.cat([y.flatten() for y in b]).norm())


def listed_the_other_way(genotype: Genotype) -> Genotype:
    """``genotype`` with each node's two edges listed in the other order: the same cell, written otherwise."""
    def swap(edges):
        return tuple(e for i in range(0, len(edges), 2) for e in reversed(edges[i:i + 2]))
    return Genotype(swap(genotype.normal), genotype.normal_concat, swap(genotype.reduce), genotype.reduce_concat)


def under_address_space_limit(gigabytes: int) -> Callable[[], None]:
    """A ``preexec_fn`` that caps the process's address space: what it allocates beyond fails, in one allocation,
    instead of filling the machine."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (gigabytes * 2 ** 30,) * 2)
    return limit
