"""Fault injection: hostile inputs, damaged files, concurrent processes, divergence, full disks and SIGKILL
at random points. Every refusal is one line on stderr with a non-zero exit and leaves the run untouched;
every interrupted run resumes to exactly the files of an uninterrupted one."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import pty
import random
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml

from helpers import (FOUR_OPS, SEARCH3, SHORT_SEARCH, TRAIN_ARGS, assert_same_search, assert_same_training, call,
                     folder_training, ilnas, ilnas_here, read_lines, snapshot, wait_for_sessions, write_cifar,
                     write_image_folder)
from ilnas import runlock, runs
from ilnas.config import resolve
from ilnas.errors import IlnasError, RunFailed
from ilnas.recipes import search as search_recipe
from ilnas.runs import MAGIC, PREVIOUS, check, read_checkpoint, read_config, refuse_inside_a_run
from ilnas.space.supernet import MixedOp

# A single-task search on the digits, two steps an epoch: cheap enough to run several times in one test.
MICRO = ["search", "--quiet", "--preset", "darts2nd-cifar10", "--set", "data.tasks=[digits]", *SHORT_SEARCH,
         "--set", "search.steps_per_epoch=2", "--set", "search.eval_batches=1", "--set", "search.epochs=3"]
# P-DARTS in two phases of three steps, skip-connect dropout in the second; a checkpoint after every step.
TINY_PDARTS = ["space.layers=3", "space.channels=4", "search.batch_size=8", "search.steps_per_epoch=3",
               "search.eval_batches=1", "search.epochs=2", "search.warmup_epochs=1", "pdarts.layers=[3, 4]",
               FOUR_OPS, "pdarts.ops_per_edge=[4, 3]", "pdarts.skip_dropout=[0.0, 0.4]",
               "search.checkpoint_minutes=1e-9"]
GENOTYPE_OK = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat={c}, "
               "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])")


def assert_refused(argv: list[str], message: str, untouched: list[Path], code: int = 2) -> str:
    before = [snapshot(p) if p.is_dir() else (p.read_bytes() if p.exists() else None) for p in untouched]
    rc, _, err = call(*argv)
    assert rc == code, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    after = [snapshot(p) if p.is_dir() else (p.read_bytes() if p.exists() else None) for p in untouched]
    assert after == before
    return err


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "micro"
    rc, _, err = call(*MICRO, "--out", str(out))
    assert rc == 0, err
    return out


def unfinished_copy(run: Path, dest: Path) -> Path:
    """A copy of a finished run with its final record removed: a run that --resume accepts."""
    shutil.copytree(run, dest)
    for name in ("summary.json", "result.json"):
        (dest / name).unlink(missing_ok=True)
    return dest


# --- configuration values that must be refused before the finished run is touched (with --force) --------

BAD_SETTINGS = [
    ("arch_optimizer.lr=-1", "arch_optimizer.lr must be positive"),
    ("arch_optimizer.betas=[1.5,0.999]", "arch_optimizer.betas must both lie in [0, 1)"),
    ("search.seed=100000000000000000000", "search.seed must be an integer in [0, 2**32)"),
    ("search.seed=-1", "search.seed must be an integer in [0, 2**32)"),
    ("optimizer.lr=.nan", "optimizer.lr must be a finite number"),
    ("engine.lam=.nan", "engine.lam must be a finite number"),
    ("optimizer.lr=.inf", "optimizer.lr must be a finite number"),
    ("optimizer.lr=1e400", "optimizer.lr must be a finite number"),
    ("engine.fd_eps=0", "engine.fd_eps must be positive"),
    ("optimizer.grad_clip=-1", "optimizer.grad_clip must be positive"),
    ("optimizer.momentum=-0.5", "optimizer.momentum must lie in [0, 1)"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay must be >= 0"),
    ("arch_optimizer.weight_decay=-1", "arch_optimizer.weight_decay must be >= 0"),
    ("optimizer.lr_min=1", "optimizer.lr_min must lie in [0, lr]"),
    ("search.device=tpu", "search.device must be auto, cpu, cuda or cuda:N"),
    ("search.dtype=float16", "search.dtype must be float32 or float64"),
    ("engine.val_weights=[-1,1]", "engine.val_weights must be >= 0"),
    # a zero objective ran a whole search and printed a cell nothing had searched
    ("engine.val_weights=[0,0]", "engine.val_weights are all 0: the architecture's objective would be 0, so nothing "
                                 "would search it"),
    ("engine.train_weights=[0,0]", "engine.train_weights are all 0: the stages' training losses would be 0"),
    ("engine.train_weights=[1]", "train_weights has 1 entries for 2 learners"),
    ("engine.train_weights=[&a 1, *a]", "not valid YAML"),
    ("data.image_size=100000", "data.image_size must lie in [8, 1024]"),
    ("data.tasks=[no_such_task]", "unknown task 'no_such_task'"),
    ("data.tasks=['imagefolder: ']", "unknown task 'imagefolder: '"),  # a blank path: "no image folder  /train"
    ("data.data_dir=", "data.data_dir is empty; name the folder of the data sets (default: data)"),  # not here
    ("search.batch_size=100000", "fewer than search.batch_size=100000"),
    ("space.partial_channels=3", "space.partial_channels must be >= 1 and divide"),
    ("search.lam=10", "config key 'search.lam' is now 'engine.lam'"),
    ("kind=[]", "kind must be one of search, eval, got []"),
    # past float32's range a step scalar raised an overflow traceback; 2*lr*lam = 2e32 (lam = 100) likewise
    ("optimizer.weight_decay=1e308", "optimizer.weight_decay must be a finite number of at most 1e+30 in size"),
    ("optimizer.lr=1e30", "2*lr*lambda = 2e+32 overflows float32 arithmetic; for the lambda -> infinity limit use "
                          "coupling=copy"),
    # a typo's worth: the supernet or the stage chain filled the host's memory until the kernel killed it
    ("space.layers=99999999999", "space.layers must be at most 1000, got 99999999999"),
    # a supernet of two cells (both reduction cells) searched a normal cell nothing trained
    ("space.layers=2", "space.layers must be at least 3, got 2: with fewer cells the supernet has no normal cell"),
    ("search.rounds=20000", "search.rounds must be at most 100, got 20000"),
    ("pdarts.layers=[5,11,1700]", "pdarts.layers must be at most 1000, got 1700"),
    ("search.threads=99999999999", "search.threads must be at most 4096"),  # torch.set_num_threads overflowed
    # so did a supernet too wide for the memory (each allocation succeeded), here refused before it is built
    ("space.channels=100000", "of this machine's memory; lower space.channels or space.layers"),
    # past torch's 64-bit sizes: the weights' count stopped in an overflow's traceback
    ("space.channels=99999999999999999999", "space.channels must be at most 1048576, got 99999999999999999999"),
    ("space.stem_multiplier=99999999999999999999", "space.stem_multiplier must be at most 64, got 9999999999"),
]


@pytest.mark.parametrize("setting, message", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_a_bad_search_setting_never_deletes_the_run_it_would_replace(finished_run, setting, message):
    assert_refused(["search", "--out", str(finished_run), "--force", *SHORT_SEARCH, "--set", setting], message,
                   [finished_run])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["search", "train"])
def test_cuda_without_a_gpu_is_refused_before_anything_is_written(finished_run, finished_training, command):
    run, extra = (finished_run, []) if command == "search" else (finished_training, TRAIN_ARGS[1:5])
    section = "search" if command == "search" else "train"
    assert_refused([command, *extra, "--out", str(run), "--force", "--set", f"{section}.device=cuda"],
                   "no CUDA device is available", [run])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_evaluating_on_cuda_without_a_gpu_is_refused_before_the_data_is_read(finished_training, monkeypatch):
    """A large test set takes long to read: a device that is not there is said first."""
    from ilnas.recipes import evaluate as evaluate_module

    def unread(*args, **kwargs):
        raise AssertionError("the data was read")
    monkeypatch.setattr(evaluate_module, "evaluation_set", unread)
    code, _, err = call("evaluate", str(finished_training), "--data", "digits", "--device", "cuda")
    assert code == 2 and err == "ilnas: error: device=cuda but no CUDA device is available; use device=cpu or auto\n"


BAD_TRAIN_SETTINGS = [
    ("train.device=tpu", "train.device must be auto, cpu, cuda or cuda:N"),
    ("optimizer.lr=.nan", "optimizer.lr must be a finite number"),
    ("optimizer.momentum=-1", "optimizer.momentum must lie in [0, 1)"),
    ("optimizer.grad_clip=-1", "optimizer.grad_clip must be positive"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay must be >= 0"),
    ("train.seed=1099511627776", "train.seed must be an integer in [0, 2**32)"),
    ("optimizer.gamma=0", "optimizer.gamma must be positive"),
    ("network.layers=200000", "network.layers must be at most 1000, got 200000"),
    ("network.layers=2", "network.layers must be at least 3, got 2: with fewer cells the network has no normal cell"),
    # the default cutout (16) on the 16x16 digits: a square centred mid-image erased it whole
    ("train.cutout=16", "train.cutout=16 is not smaller than the 16x16 images of mnist5k: its square would erase"),
    ("train.workers=100000", "train.workers must be at most 256, got 100000"),
    ("train.threads=99999999999", "train.threads must be at most 4096"),
    ("train.resolution=100000", "train.resolution must be at most 1024, got 100000"),
    ("data.tasks=[digits,mnist5k]", "data.tasks of a training names one task (the network has one classifier), "
                                    "got ['digits', 'mnist5k']: train once per task"),
    ("network.channels=100000", "of this machine's memory; lower network.channels or "
                                "network.layers"),
    ("network.channels=99999999999999999999", "network.channels must be at most 1048576, got 99999999999999999999"),
]


@pytest.mark.parametrize("setting, message", BAD_TRAIN_SETTINGS, ids=[s for s, _ in BAD_TRAIN_SETTINGS])
def test_a_bad_training_setting_never_deletes_the_run_it_would_replace(finished_training, setting, message):
    assert_refused([*TRAIN_ARGS, "--out", str(finished_training), "--force", "--set", setting], message,
                   [finished_training])


# --- configuration files and command lines -------------------------------------------------------------

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))

CONFIG_FILES = [  # (name, bytes of --config, extra --set, message)
    ("alias-bomb", ALIAS_BOMB.encode(), [], "YAML aliases (*name) are not accepted"),
    ("not-utf8", b"search:\n  lam: \xff\xfe\n", [], "is not UTF-8 text"),
    ("not-yaml", b"search: [unclosed\n", [], "is not valid YAML"),
    ("a-list", b"- 1\n- 2\n", [], "must hold a mapping of sections"),
    ("scalar-section", b"search: 5\n", ["--set", "engine.lam=1"], "section 'search' must be a mapping"),
    ("eval-kind", b"kind: eval\n", [],
     "is a training configuration (kind: eval), not a search one: `ilnas train` runs it"),
    ("unknown-key", b"search:\n  lamda: 1\n", [], "unknown config key 'search.lamda'"),
    # a section written twice: YAML keeps the second, and the first one's search.epochs was dropped silently
    ("twice", b"search:\n  epochs: 7\nengine:\n  lam: 3\nsearch:\n  seed: 5\n", [],
     "is not valid YAML: the key 'search' is given twice"),
    ("twice-nested", b"engine: {lam: 3, order: 1, lam: 30}\n", [], "the key 'lam' is given twice"),
]


@pytest.mark.parametrize("name, content, extra, message", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_a_bad_config_file_is_refused_in_one_line(finished_run, tmp_path, name, content, extra, message):
    f = tmp_path / "cfg.yaml"
    f.write_bytes(content)
    t0 = time.perf_counter()
    assert_refused(["search", "--config", str(f), *extra, "--out", str(finished_run), "--force"], message,
                   [finished_run])
    assert time.perf_counter() - t0 < 30  # an alias bomb must not hang


def test_a_config_file_that_cannot_be_read_is_refused(finished_run, tmp_path):
    assert_refused(["search", "--config", str(tmp_path), "--out", str(finished_run), "--force"],
                   "does not exist or is not a file", [finished_run])
    assert_refused(["search", "--config", str(tmp_path / "missing.yaml"), "--out", str(finished_run)],
                   "does not exist or is not a file", [finished_run])
    if os.geteuid() != 0:  # root reads anything
        f = tmp_path / "locked.yaml"
        f.write_text("search: {}\n")
        f.chmod(0)
        assert_refused(["search", "--config", str(f), "--out", str(finished_run), "--force"], "cannot be read",
                       [finished_run])


COMMAND_LINES = [
    (["search", "--preset", ""], "--preset is empty"),
    (["search", "--preset", "../presets/demo"], "unknown preset '../presets/demo'"),
    (["search", "--out", ""], "--out is empty"),
    (["search", "--resume", "--force", "--out", "__RUN__"], "--resume and --force exclude each other"),
    (["search", "--resume"], "--resume needs --out DIR"),
    (["search", "--resume", "--out", "__RUN__", "--set", "engine.lam=1"], "drop --preset/--config/--set"),
    (["search", "--resume", "--out", "__RUN__"], "holds a finished run; nothing to resume"),
    (["search", "--out", "__RUN__"], "already holds a finished run; pass --force"),
    (["train", "--resume", "--out", "__RUN__"], "holds a search run; resume it with `ilnas search --resume`"),
    (["search", "--set", "search"], "malformed --set 'search'"),
    (["search", "--out", "a\x00b"], "--out cannot hold a NUL byte"),
    (["search", "--config", "a\x00b"], "--config cannot hold a NUL byte"),
    (["describe", "a\x00b"], "cannot hold a NUL byte"),
    (["search", "--auto-resume"], "--auto-resume needs --out DIR"),
    (["search", "--auto-resume", "--resume", "--out", "__RUN__"], "--auto-resume excludes --resume and --force"),
    (["search", "--auto-resume", "--force", "--out", "__RUN__"], "--auto-resume excludes --resume and --force"),
    ([*SEARCH3, "--set", "search.seed=9", "--out", "__RUN__", "--auto-resume"],
     "holds a run of another configuration (first difference at search.seed)"),
    ([*TRAIN_ARGS, "--out", "__RUN__", "--auto-resume"], "holds a search run, not a training run"),
]


@pytest.mark.parametrize("argv, message", COMMAND_LINES, ids=[" ".join(a) for a, _ in COMMAND_LINES])
def test_a_bad_command_line_is_refused_in_one_line(finished_run, argv, message):
    argv = [a.replace("__RUN__", str(finished_run)) for a in argv]
    assert_refused(argv, message, [finished_run])


def test_a_run_or_a_sweep_in_another_runs_directory_is_refused(finished_run, finished_training, tmp_path):
    """A sweep given a training run's directory as its out used to write its cells and sweep.json among that run's
    files (a cell named tb would have gone into its TensorBoard folder); a --force of that run would delete them."""
    assert_refused([*SEARCH3, "--out", str(finished_training / "inner")],
                   f"the run directory {finished_training / 'inner'} lies inside the run directory {finished_training}",
                   [finished_training])
    assert_refused([*TRAIN_ARGS, "--out", str(finished_run / "a" / "b")], "lies inside the run directory",
                   [finished_run])
    # where the filesystem puts it: RUN/../x lies beside RUN (it was refused as inside it), LINK-TO-RUN/x inside
    beside = tmp_path / "beside"
    assert_refused([*TRAIN_ARGS, "--out", f"{finished_run}/../{beside.name}", "--set", "train.seed=-1"],
                   "train.seed must", [finished_run])
    (tmp_path / "link").symlink_to(finished_run)
    assert_refused([*TRAIN_ARGS, "--out", str(tmp_path / "link" / "x")],
                   f"lies inside the run directory {finished_run}", [finished_run])
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"search": {"preset": "demo"}, "grid": {"search.seed": [0]}}))
    assert_refused(["sweep", str(spec), "--out", str(finished_run)],
                   f"the sweep directory {finished_run} is the run directory {finished_run}", [finished_run])


def test_auto_resume_leaves_a_finished_run_as_it_is(finished_run, finished_training):
    for argv, run, says in ((SEARCH3, finished_run, "genotype = Genotype("), (TRAIN_ARGS, finished_training, "test error: ")):
        before = snapshot(run)
        r = ilnas_here(*argv, "--out", str(run), "--auto-resume")
        assert r.returncode == 0, r.stderr
        assert "finished: nothing to do" in r.stdout and says in r.stdout
        assert snapshot(run) == before


def test_auto_resume_refuses_a_training_run_of_another_genotype(finished_training):
    argv = [a if a != "DARTS_V2" else "PDARTS" for a in TRAIN_ARGS]
    assert_refused([*argv, "--out", str(finished_training), "--auto-resume"],
                   "holds a run of another configuration (first difference at genotype)", [finished_training])


def test_a_training_run_cannot_be_resumed_as_a_search(finished_training):
    assert_refused(["search", "--resume", "--out", str(finished_training)],
                   "holds a training run; resume it with `ilnas train --resume`", [finished_training])


# --- where --out points ---------------------------------------------------------------------------------

def test_force_refuses_a_directory_that_is_not_an_ilnas_run(tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    assert_refused(["search", "--out", str(mine), "--force"], "does not hold an ilnas run", [mine])
    assert_refused(["search", "--out", str(mine)], "does not hold an ilnas run", [mine])
    (mine / "config.yaml").write_text("my: own config\n")  # a config.yaml that is not ours
    assert_refused(["search", "--out", str(mine), "--force"], "does not hold an ilnas run", [mine])
    assert (mine / "chapter1.tex").read_text() == "precious"


def test_a_configuration_saved_by_hand_does_not_make_its_folder_a_run(tmp_path):
    """`ilnas config demo > config.yaml` in a project folder used to make that folder an ilnas run: --force
    emptied it (its code and notes deleted) and every run below it would have been refused as a run inside a run."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "model.py").write_text("precious")
    code, out, _ = call("config", "demo")
    assert code == 0
    (project / "config.yaml").write_text(out)
    for flags, message in ((["--force"], "does not hold an ilnas run"), (["--auto-resume"], "does not hold an ilnas"),
                           (["--resume"], "nothing to resume: ")):
        assert_refused(["search", "--out", str(project), *flags], message, [project])
    refuse_inside_a_run(project / "runs" / "x", "run")  # a run below it is no run inside a run: not refused


@pytest.mark.parametrize("left", [["config.yaml", ".provenance.json.k1ll3d.tmp"], [".config.yaml.k1ll3d.tmp"]])
def test_a_run_killed_as_it_started_is_started_again_by_auto_resume(micro_run, tmp_path, left):
    """Killed after it locked its directory, before its provenance.json was written: no run is there, and a
    requeued job's --auto-resume starts it, where that directory had been refused for ever as not an ilnas run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("")
    for name in left:
        shutil.copy(micro_run / ("provenance.json" if "provenance" in name else "config.yaml"), out / name)
    rc, _, err = call(*MICRO, "--out", str(out), "--auto-resume")
    assert rc == 0 and (out / "summary.json").is_file(), err
    assert not list(out.glob(".*.tmp"))


class _Killed(BaseException):
    """The process killed at this instant."""


def test_force_killed_at_any_point_of_emptying_a_run_leaves_one_it_takes_again(micro_run, tmp_path, monkeypatch):
    """--force deletes the old run's provenance.json last and replaces its config.yaml, in whatever order the
    filesystem lists them: killed after any number of deletions, the directory still holds a run, or a start
    cut short, which --force (and --auto-resume) take again, never a folder refused as not an ilnas run."""
    real_unlink, real_rmtree, listed, config = Path.unlink, shutil.rmtree, runs._entries, read_config(micro_run)

    def worst_order(path: Path) -> list[Path]:  # as a filesystem may list them: the run's own records first
        return sorted(listed(path), key=lambda e: e.name not in ("provenance.json", "config.yaml"))
    for n in range(len([e for e in micro_run.iterdir() if e.name not in {".lock", "config.yaml"}])):
        run, deleted = shutil.copytree(micro_run, tmp_path / f"run{n}"), []

        def killed_after_n(delete):
            def deleting(*args, **kwargs):
                if len(deleted) == n:
                    raise _Killed
                deleted.append(args[0])
                return delete(*args, **kwargs)
            return deleting

        monkeypatch.setattr(runs, "_entries", worst_order)
        monkeypatch.setattr(Path, "unlink", killed_after_n(real_unlink))
        monkeypatch.setattr(shutil, "rmtree", killed_after_n(real_rmtree))
        with pytest.raises(_Killed):  # where --force empties the run, once everything else has passed
            runs.RunDir.open(run, "search", {**config, "search": {**config["search"], "seed": 1}}, False, True)
        monkeypatch.undo()
        assert len(deleted) == n and len(os.listdir(run)) == len(os.listdir(micro_run)) - n
        check(run, resume=False, force=True, kind="search")  # not refused
    rc, _, err = call(*MICRO, "--set", "search.seed=1", "--out", str(run), "--force")
    assert rc == 0 and read_config(run)["search"]["seed"] == 1 and (run / "summary.json").is_file(), err


def test_out_below_a_file_or_on_an_unwritable_place_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_refused(["search", "--out", str(f / "run")], "is a file", [f])
    assert_refused(["search", "--out", str(f)], "exists and is not a directory", [f])
    newline = tmp_path / "two\nlines"
    newline.write_text("x")
    err = assert_refused(["search", "--out", str(newline / "run")], "two\\nlines", [newline])
    assert "\n" not in err.strip()
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        assert_refused(["search", "--out", str(ro / "run")], "cannot write to", [ro])
    if Path("/proc/self").is_dir():  # procfs: a read-only place every Linux has
        assert_refused(["search", "--out", "/proc/self/ilnas-run"], "cannot write to", [])


# --- genotypes ----------------------------------------------------------------------------------------

GENOTYPE_FILES = [
    ("null.json", b"null", "malformed genotype: expected a mapping"),
    ("five.json", b"5", "malformed genotype: expected a mapping"),
    ("list.json", b"[1, 2]", "malformed genotype: expected a mapping"),
    ("bad.json", b"{", "is not valid JSON"),
    ("latin1.txt", "Genotype(normal=[('sep_conv_3x3', 0)]) \xe9".encode("latin-1"), "is not UTF-8 text"),
    ("range-str.txt", GENOTYPE_OK.format(c="range('a')").encode(), "range takes one to three integers"),
    ("range-float.txt", GENOTYPE_OK.format(c="range(2.5)").encode(), "range takes one to three integers"),
    ("range-huge.txt", GENOTYPE_OK.format(c="range(2, 10000000000)").encode(), "is beyond any cell"),
    ("range-zero-step.txt", GENOTYPE_OK.format(c="range(2, 4, 0)").encode(), "malformed genotype"),
    ("nul.txt", b"Genotype(normal=\x00)", "malformed genotype"),
]


@pytest.mark.parametrize("name, content, message", GENOTYPE_FILES, ids=[g[0] for g in GENOTYPE_FILES])
def test_a_bad_genotype_file_is_refused_in_one_line(tmp_path, finished_training, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    assert_refused(["describe", str(f)], message, [])
    assert_refused([*TRAIN_ARGS[:1], "--genotype", str(f), *TRAIN_ARGS[3:], "--out", str(finished_training),
                    "--force"], message, [finished_training])


def test_a_good_range_still_parses():
    from ilnas.space.genotype import parse_genotype

    assert parse_genotype(GENOTYPE_OK.format(c="range(2, 3)")).normal_concat == (2,)


# --- data -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-type"])
def test_damaged_cifar_files_are_refused_without_a_traceback(tmp_path, finished_training, damage):
    write_cifar(tmp_path / "data", "cifar10")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2"
    data = batch.read_bytes()
    batch.write_bytes({"garbage": b"not a pickle at all", "truncated": data[:100],
                       "wrong-type": b"\x80\x04K\x05."}[damage])  # the last: a pickled int
    assert_refused(["train", "--genotype", "DARTS_V2", "--preset", "eval-cifar10", "--out", str(finished_training),
                    "--force", "--set", f"data.data_dir={tmp_path / 'data'}", "--set", "data.download=false",
                    "--set", "data.verify=false"], "are damaged", [finished_training])


def test_an_image_folder_too_small_for_the_network_is_refused_before_a_run_exists(tmp_path):
    """The refusal names the setting that gives the task larger images: train.resolution for a streamed folder,
    data.image_size for one held in memory, none for CIFAR, whose images are 32x32 as published."""
    write_image_folder(tmp_path / "imgs")
    write_cifar(tmp_path, "cifar10")
    out = tmp_path / "run"
    tiny = ["--set", "train.batch_size=6", "--set", "network.layers=3", "--set", "network.style=imagenet", "--set",
            f"data.data_dir={tmp_path}", "--set", "data.verify=false", "--out", str(out)]
    for preset, task, settings, remedy in [
            ("eval-imagefolder", f"imagefolder:{tmp_path / 'imgs'}", ["train.resolution=32", "train.workers=0"],
             "use larger images (train.resolution) or another network.style"),
            ("eval-folder", f"imagefolder:{tmp_path / 'imgs'}", ["data.image_size=32"],
             "use larger images (data.image_size) or another network.style"),
            ("eval-cifar10", "cifar10", [], "cifar10's images are 32x32: use another network.style")]:
        argv = ["train", "--genotype", "DARTS_V2", "--preset", preset, "--set", f"data.tasks=[{task}]", *tiny]
        for setting in settings:
            argv += ["--set", setting]
        err = assert_refused(argv, "too small for the imagenet-style network", [])
        assert err.rstrip().endswith(f"; {remedy}"), err
        assert not out.exists()  # nothing half-written blocks the rerun


@pytest.mark.parametrize("name, problem", [(os.fsdecode(b"caf\xe9"), "b'caf\\xe9' in {} is not UTF-8"),
                                           ("d\nog", "b'd\\nog' in {} holds a control character")],
                         ids=["latin-1", "newline"])
@pytest.mark.parametrize("command", ["search", "train"])
def test_an_image_folder_class_whose_name_is_no_label_text_is_refused_before_a_run_exists(tmp_path, name, problem,
                                                                                         command):
    """A class folder's name is its label in tasks.json, model.json and what predict prints: undecodable bytes
    ended evaluate in a UnicodeEncodeError traceback, a line break split predict's output lines."""
    write_image_folder(tmp_path / "imgs", classes=("cat", name))
    out = tmp_path / "run"
    task = ["--set", f"data.tasks=[imagefolder:{tmp_path / 'imgs'}]"]
    argv = (["search", "--preset", "darts2nd-folder", *task] if command == "search" else
            ["train", "--genotype", "DARTS_V2", "--preset", "eval-folder", *task])
    assert_refused([*argv, "--out", str(out)], problem.format(tmp_path / "imgs" / "train"), [])
    assert not out.exists()


def _private_mounts() -> bool:
    """Whether this process may mount in a mount namespace of its own (root, util-linux's unshare)."""
    return (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("unshare") is not None
            and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0)


@pytest.mark.skipif(not _private_mounts(), reason="mounts a small /dev/shm in a private mount namespace: root")
def test_loader_workers_out_of_shared_memory_stop_the_training_in_one_line_and_it_resumes(tmp_path):
    """A container's /dev/shm (Docker's default: 64 MB) smaller than the batches the workers hand over: a
    73-line traceback from inside a worker. Here /dev/shm is 64 KiB, in a mount namespace of the run's own."""
    write_image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "ilnas", *folder_training(tmp_path / "imgs", out, batch=6)]
    small = "mount -t tmpfs -o size=64k tmpfs /dev/shm && exec \"$@\""
    r = subprocess.run(["unshare", "-m", "sh", "-c", small, "sh", *argv], capture_output=True, text=True, timeout=600)
    ours = _without_torch_bus_error_line(r.stderr)
    assert r.returncode == 3 and ours.startswith("ilnas: error: the DataLoader workers ran out of shared memory ("), \
        r.stderr
    assert "/dev/shm: " in ours and "docker run --shm-size=" in ours and len(ours.splitlines()) == 1
    rc, _, err = call("train", "--resume", "--quiet", "--out", str(out))
    assert rc == 0 and (out / "result.json").exists(), err


def _without_torch_bus_error_line(stderr: str) -> str:
    """stderr less the line torch's own SIGBUS handler writes from a dying worker (with a NUL), where it does."""
    return re.sub(r"^ERROR: Unexpected bus error encountered in worker\.[^\n]*\n\x00?", "", stderr)


@pytest.mark.parametrize("end, message", [
    (lambda: os.kill(os.getpid(), signal.SIGBUS), r"the DataLoader workers ran out of shared memory \(DataLoader "
     r"worker .*, of SIGBUS; /dev/shm: .*docker run --shm-size=16g\) or lower train.workers or train.batch_size"),
    (lambda: os.kill(os.getpid(), signal.SIGSEGV), r"a DataLoader worker died \(DataLoader worker \(pid.*(Segmentation "
     r"fault|exited unexpectedly, of SIGSEGV)\)"),
    (lambda: os._exit(3), r"a DataLoader worker died \(DataLoader worker \(pid.* exited unexpectedly, with exit "
     r"code 3\)"),
], ids=["bus-error", "segfault", "exit"])
def test_a_loader_worker_that_dies_otherwise_than_killed_is_told_from_the_out_of_memory_killer(
        tmp_path, monkeypatch, end, message):
    """A worker writing a batch into a full /dev/shm dies of SIGBUS, and torch often reports only that it
    "exited unexpectedly", as it does a worker the out-of-memory killer ended: the worker's exit code tells
    them apart, and the advice is /dev/shm's, not fewer workers for lack of RAM; any other end is named."""
    from ilnas.config import DataConfig
    from ilnas.data.training import SeededSamples, Sharding, create_train_data

    write_image_folder(tmp_path / "imgs")
    data = create_train_data(f"imagefolder:{tmp_path / 'imgs'}", DataConfig(folder_pipeline="stream"), Sharding(2),
                             resolution=32, workers=1)
    monkeypatch.setattr(SeededSamples, "__getitem__", lambda self, i: end())
    with pytest.raises(RunFailed, match=f"^{message}; the last checkpoint is kept") as failed:
        next(data.epoch(0))
    assert "out-of-memory" not in str(failed.value)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers in /proc")
def test_a_loader_worker_killed_part_way_stops_the_training_in_one_line(tmp_path):
    """SIGKILL to a DataLoader worker, what the kernel's out-of-memory killer sends: a traceback, exit 1."""
    write_image_folder(tmp_path / "imgs", per_class=12)
    proc = ilnas(*folder_training(tmp_path / "imgs", tmp_path / "run", batch=2, epochs=100), wait=False)
    deadline, killed = time.time() + 300, set()
    while proc.poll() is None and time.time() < deadline:  # a worker lives while a loader is being read
        for children in Path(f"/proc/{proc.pid}/task").glob("*/children"):
            for pid in map(int, children.read_text().split()):
                if pid not in killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
        time.sleep(0.01)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 3 and killed and len(err.splitlines()) == 1, err
    # torch words it one way or the other, as it notices the death
    died = r"DataLoader worker \(pid\(?s?\)? \d+\) (is killed by signal: Killed|exited unexpectedly)"
    assert re.fullmatch(rf"ilnas: error: a DataLoader worker died \({died}; the kernel's out-of-memory killer stops "
                        r"workers so, most often\): lower train.workers or train.batch_size; the last checkpoint is "
                        r"kept: continue with --resume\n", err), err


def test_a_loader_worker_killed_as_its_loader_starts_stops_the_training_in_one_line(tmp_path, monkeypatch):
    """Killed before the loader has started all its workers, the death is reported by ``iter(loader)`` (its
    SIGCHLD handler, as it hands out the first indices): that too is the one line, not a traceback (seen in
    the test above, now and then)."""
    from ilnas.config import DataConfig
    from ilnas.data.training import Sharding, create_train_data

    write_image_folder(tmp_path / "imgs")
    data = create_train_data(f"imagefolder:{tmp_path / 'imgs'}", DataConfig(folder_pipeline="stream"), Sharding(2),
                             resolution=32, workers=0)

    def dies_as_it_starts(loader):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", dies_as_it_starts)
    with pytest.raises(RunFailed, match=r"^a DataLoader worker died \(DataLoader worker \(pid 4242\) is killed by "
                                        r"signal: Killed; the kernel's out-of-memory killer"):
        next(data.epoch(0))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds one row: PIL refuses it above its decompression-bomb
    limit (about 179 M pixels) as soon as it opens it, with an error that is no OSError."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("content, workers, reason", [
    (b"not a png", 0, "cannot identify image file"),
    (_png_header(20000, 20000), 2, "exceeds limit of"),  # read in a DataLoader worker, whose error arrives as text
], ids=["not-an-image", "decompression-bomb-in-a-worker"])
def test_an_unreadable_image_stops_training_in_one_line_that_names_it(tmp_path, content, workers, reason):
    write_image_folder(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "train" / "dog" / "3.png"
    bad.write_bytes(content)  # found only when read
    out = tmp_path / "run"
    rc, _, err = call("train", "--genotype", "DARTS_V2", "--preset", "eval-imagefolder", "--out", str(out), "--quiet",
                      "--set", f"data.tasks=[imagefolder:{tmp_path / 'imgs'}]", "--set", "train.resolution=64",
                      "--set", "network.auxiliary=false", "--set", f"train.workers={workers}", "--set", "train.epochs=1",
                      "--set", "optimizer.warmup_epochs=0", "--set", "network.layers=3", "--set", "network.channels=8",
                      "--set", "train.batch_size=6")
    assert rc == 3 and f"cannot read an image of imagefolder:{tmp_path / 'imgs'} ({bad}: " in err and reason in err, err
    assert len(err.strip().splitlines()) == 1 and not (out / "result.json").exists()


def test_predict_refuses_a_decompression_bomb_in_one_line(finished_training, tmp_path):
    (tmp_path / "huge.png").write_bytes(_png_header(20000, 20000))
    code, _, err = call("predict", str(finished_training), str(tmp_path / "huge.png"))
    assert code == 2 and err.startswith(f"ilnas: error: cannot read image {tmp_path / 'huge.png'}: Image size "), err


# --- resuming -----------------------------------------------------------------------------------------

def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


RESUME_DAMAGE = {  # name: (what is done to an unfinished copy of the finished search run, message)
    "edited-config": (lambda run: _edit(run / "config.yaml", "lr: 0.025", "lr: 0.05"),
                      "differs from the configuration its checkpoint was written with (first at optimizer.lr)"),
    "empty-config": (lambda run: (run / "config.yaml").write_text(""), "is not an ilnas configuration"),
    "non-yaml-config": (lambda run: (run / "config.yaml").write_text("search: [\n"), "cannot be read as YAML"),
    "binary-config": (lambda run: (run / "config.yaml").write_bytes(b"\xff\xfe\x00"), "cannot be read as YAML"),
    "invalid-config": (lambda run: _edit(run / "config.yaml", "lr: 0.025", "lr: -0.025"),
                       "is not a valid configuration: optimizer.lr must be positive"),
    "garbage-checkpoint": (lambda run: [(run / n).write_bytes(b"junk") for n in ("checkpoint.pt", PREVIOUS)],
                           "is not an ilnas checkpoint"),
    "both-checkpoints-damaged": (lambda run: [_flip(run / n) for n in ("checkpoint.pt", PREVIOUS)],
                                 "is damaged (checksum mismatch)"),
}


def _flip(path: Path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", list(RESUME_DAMAGE))
def test_resume_checks_config_and_checkpoint_before_touching_anything(finished_run, tmp_path, damage):
    run = unfinished_copy(finished_run, tmp_path / "run")
    do, message = RESUME_DAMAGE[damage]
    do(run)
    assert_refused(["search", "--resume", "--out", str(run)], message, [run])


def test_resume_refuses_a_foreign_checkpoint(finished_run, finished_training, tmp_path):
    run = unfinished_copy(finished_run, tmp_path / "run")
    shutil.copy(finished_training / "checkpoint.pt", run / "checkpoint.pt")  # a training checkpoint
    assert_refused(["search", "--resume", "--out", str(run)], "belongs to a training run", [run])
    deeper = tmp_path / "deeper"  # another search's checkpoint: another preset, another depth
    rc, _, err = call(*MICRO, "--out", str(deeper), "--set", "space.layers=4", "--set", "search.epochs=1")
    assert rc == 0, err
    shutil.copy(deeper / "checkpoint.pt", run / "checkpoint.pt")
    assert_refused(["search", "--resume", "--out", str(run)], "differs from the configuration its checkpoint", [run])


def write_checkpoint(path: Path, payload: dict) -> None:
    """A checkpoint file of ``payload`` with a valid checksum."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    path.write_bytes(MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)


def test_a_checkpoint_that_unpickles_a_class_is_refused(finished_run, tmp_path):
    run = unfinished_copy(finished_run, tmp_path / "run")
    write_checkpoint(run / "checkpoint.pt", {"kind": "search", "payload": Path("/")})  # a pickled class instance
    (run / "checkpoint.prev.pt").unlink()
    assert_refused(["search", "--resume", "--out", str(run)], "holds pickled objects other than tensors", [run])


def _part_way_search(payload: dict) -> None:
    """The final checkpoint of MICRO as one taken after step 1 of its third epoch."""
    payload["progress"].update(phase=0, epoch=2, epoch_steps=1, final_genotype=None)
    payload["rng"] = [{"cpu": torch.get_rng_state()}]


def _stage(i: int, name: str) -> Callable[[dict], list]:
    return lambda payload: payload["state"]["stages"][i][name]


# (what changes in the payload, part of the refusal): layouts another version could write, or a hand
SEARCH_LAYOUTS = [
    (lambda p: p.pop("state"), "it has no 'state'"),
    (lambda p: p["progress"].update(bogus=1), "unexpected keyword argument 'bogus'"),
    (lambda p: p["progress"].update(epoch="3"), "its epoch count is '3', where an integer from 0 to 3 belongs"),
    (lambda p: p["progress"].update(epoch_steps=2), "its step within its epoch is 2, where an integer from 0 to 1"),
    (lambda p: p.update(metrics_lines=-1), "its metrics line count is -1, where an integer from 0 belongs"),
    (lambda p: p["state"]["arch"].__setitem__(1, torch.zeros(3, 3)),
     "its architecture [1] is a torch.float32 tensor of shape (3, 3), where a torch.float32 tensor of shape (14, 4)"),
    (lambda p: p["state"]["arch"].__setitem__(0, p["state"]["arch"][0].double()), "torch.float64 tensor"),
    (lambda p: _stage(0, "w")(p).pop(), "its stage 1's w is a list of"),
    (lambda p: _stage(0, "buf_h")(p).__setitem__(0, torch.zeros(2)), "its stage 1's buf_h [0] is a torch.float32 "
                                                                      "tensor of shape (2,)"),
    (lambda p: p["state"]["stages"][0].update(learner=1), "its stage 1 belongs to learner 1, where 0 belongs"),
    (lambda p: p["state"]["arch_optimizer"]["state"][0].update(exp_avg=torch.zeros(2)),
     "its architecture optimizer's exp_avg is a torch.float32 tensor of shape (2,)"),
    (lambda p: p["state"]["arch"][0].fill_(math.nan), "its weights or architecture are not finite"),
    (lambda p: p.update(rng=[{"cpu": torch.zeros(2)}]), "its generator list [0] 'cpu' is a torch.float32 tensor"),
    (lambda p: p["progress"]["history"].update({"p0/alphas_normal": [1]}), "expected Tensor"),
]


@pytest.mark.parametrize("change, message", SEARCH_LAYOUTS)
def test_a_search_checkpoint_of_another_layout_is_refused_before_anything_is_written(micro_run, tmp_path, change,
                                                                                     message):
    """A valid checksum but a payload this version cannot continue from: each entry is read back against what
    a fresh search of the configuration holds, before the run is opened."""
    run = unfinished_copy(micro_run, tmp_path / "run")
    payload = read_checkpoint(run / "checkpoint.pt")
    _part_way_search(payload)
    change(payload)
    write_checkpoint(run / "checkpoint.pt", payload)
    err = assert_refused(["search", "--resume", "--out", str(run)], message, [run])
    assert f"the checkpoint in {run} cannot be continued from (" in err and "another ilnas version" in err, err


def test_the_same_checkpoint_rewritten_unchanged_is_continued(micro_run, tmp_path):
    """The check's control: the payload the refusals above change, as it is, resumes and finishes."""
    run = unfinished_copy(micro_run, tmp_path / "run")
    payload = read_checkpoint(run / "checkpoint.pt")
    _part_way_search(payload)
    write_checkpoint(run / "checkpoint.pt", payload)
    rc, _, err = call("search", "--quiet", "--no-report", "--resume", "--out", str(run))
    assert rc == 0, err
    assert json.loads((run / "summary.json").read_text())["steps"] == payload["progress"]["global_step"] + 1


def _within(payload: dict) -> dict:
    payload["within_epoch"] = {"steps": 1, "seconds": 0.5, "ranks": [
        {"rng": {"cpu": torch.get_rng_state()}, "totals": [1.0, 2.0], "seen": 16}]}
    payload["epoch"] = 2
    return payload["within_epoch"]


TRAIN_LAYOUTS = [
    (lambda p: p["model"].pop("stem.0.weight"), "its network state is missing the network's 'stem.0.weight'"),
    (lambda p: p["model"].update(extra=torch.zeros(1)), "its network state includes 'extra', which the network has"),
    (lambda p: p["model"].update({"stem.0.weight": torch.zeros(4, 1, 3, 3)}),
     "its network state 'stem.0.weight' is a torch.float32 tensor of shape (4, 1, 3, 3), where a torch.float32 "
     "tensor of shape (12, 1, 3, 3) belongs"),
    (lambda p: p["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(2)),
     "its optimizer's momentum_buffer is a torch.float32 tensor of shape (2,)"),
    (lambda p: p["optimizer"]["param_groups"][0]["params"].pop(), "doesn't match the size of optimizer's group"),
    (lambda p: p.update(epoch=4), "its epoch count is 4, where an integer from 0 to 3 belongs"),
    (lambda p: p.update(best_top1=math.inf), "its best top-1 accuracy is inf, where a finite number from 0 to 1"),
    (lambda p: _within(p).update(steps=3), "its step within its epoch is 3, where an integer from 1 to 2 belongs"),
    (lambda p: _within(p)["ranks"][0].update(totals=[1.0]), "its epoch's sums are a list of 1 entry"),
    (lambda p: _within(p)["ranks"][0].update(rng={"cpu": torch.zeros(5)}), "its generator list [0] 'cpu' is"),
]


@pytest.mark.parametrize("change, message", TRAIN_LAYOUTS)
def test_a_training_checkpoint_of_another_layout_is_refused_before_anything_is_written(
        finished_training, tmp_path, change, message):
    run = unfinished_copy(finished_training, tmp_path / "run")
    payload = read_checkpoint(run / "checkpoint.pt")
    change(payload)
    write_checkpoint(run / "checkpoint.pt", payload)
    err = assert_refused(["train", "--resume", "--out", str(run)], message, [run])
    assert f"the checkpoint in {run} cannot be continued from (" in err, err


@pytest.mark.parametrize("damage", ["[]", '{"sessions": 5}', '{"sessions": [1, {"world_size": 1}]}', "{not json"])
def test_a_resumed_run_replaces_a_damaged_provenance_record_instead_of_failing(micro_run, tmp_path, damage):
    """provenance.json is the run's history, not its state: valid JSON of another shape gave tracebacks at
    --resume; now, as with unreadable JSON, what cannot be trusted is dropped and the run continues."""
    run = unfinished_copy(micro_run, tmp_path / "run")
    (run / "provenance.json").write_text(damage)
    rc, _, err = call("search", "--quiet", "--no-report", "--resume", "--out", str(run))
    assert rc == 0, err
    sessions = json.loads((run / "provenance.json").read_text())["sessions"]
    assert len(sessions) == (2 if "world_size" in damage else 1)  # the mapping kept, the number dropped
    assert sessions[-1]["resumed"] is True and sessions[-1]["end"]


def test_a_run_written_before_a_setting_existed_continues_with_that_setting_at_its_default(micro_run, tmp_path):
    """config.yaml and checkpoints without search.checkpoint_minutes, as an earlier ilnas wrote them: the same
    command line with --auto-resume continues the run (a new setting's default keeps the old behaviour), and
    another value of that setting is still another configuration."""
    run = unfinished_copy(micro_run, tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["search"]["checkpoint_minutes"]
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        payload = read_checkpoint(run / name)
        del payload["config"]["search"]["checkpoint_minutes"]
        write_checkpoint(run / name, payload)
    assert_refused([*MICRO, "--out", str(run), "--auto-resume", "--set", "search.checkpoint_minutes=5"],
                   "first difference at search.checkpoint_minutes", [run])
    rc, _, err = call(*MICRO, "--out", str(run), "--auto-resume")
    assert rc == 0, err
    assert_same_search(micro_run, run)



def test_deterministic_kernels_hold_while_a_run_runs_and_leave_its_numbers_as_they_are(
        micro_run, finished_training, tmp_path, monkeypatch):
    """search.deterministic / train.deterministic: deterministic kernels, no cuDNN benchmarking and cuBLAS's
    reproducible workspaces (which older torch releases require) while the run runs, the process's settings as
    they were afterwards; on a CPU, whose kernels are deterministic anyway, the same run bit for bit."""
    from ilnas.recipes import train as train_recipe

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    seen = []

    def watched(original):
        def run(*args, **kwargs):
            seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                         torch.backends.cudnn.benchmark))
            return original(*args, **kwargs)
        return run

    monkeypatch.setattr(search_recipe, "_search", watched(search_recipe._search))
    monkeypatch.setattr(train_recipe, "_run", watched(train_recipe._run))
    code, _, err = call(*MICRO, "--out", str(tmp_path / "search"), "--set", "search.deterministic=true")
    assert code == 0, err
    code, _, err = call(*TRAIN_ARGS, "--out", str(tmp_path / "train"), "--set", "train.deterministic=true")
    assert code == 0, err
    assert seen == [(True, ":4096:8", False)] * 2
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert_same_search(micro_run, tmp_path / "search")
    assert_same_training(finished_training, tmp_path / "train")



@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="address-space limit: Linux")
@pytest.mark.parametrize("argv, settings", [
    (["search", "--set", "space.channels=100000", "--no-report"], "lower space.channels or space.layers"),
    (["train", "--genotype", "DARTS_V2", "--preset", "eval-digits", "--set", "network.channels=200000", "--no-report"],
     "lower network.channels or network.layers")], ids=["search", "train"])
def test_a_network_too_large_for_the_machine_is_one_line_and_writes_nothing(tmp_path, argv, settings):
    """A typo's worth of channels: the weights alone would take petabytes. They are counted before any is
    made (here under a 16 GB address-space limit too, so that nothing could fill the machine should they
    not be), and the line says what to lower."""
    import resource

    limit = 16 * 2**30
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "ilnas", *argv, "--out", str(out)], capture_output=True, text=True,
                       timeout=300, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert r.returncode == 2 and re.fullmatch(r"ilnas: error: the (supernet|network)'s weights \([\d.]+ GB a copy; "
                                              r".*\) alone take [\d.]+ GB, more than the [\d.]+ GB of this machine's "
                                              r"memory; " + settings + "\n", r.stderr), r.stderr
    assert not out.exists()


def test_device_memory_running_out_part_way_stops_in_one_line_and_the_run_resumes(micro_run, tmp_path, monkeypatch):
    """torch.OutOfMemoryError from the fourth step (after the first epoch's checkpoint): exit 3, one line with
    the size the allocator asked for and the setting to lower; resumed, the run ends as an uninterrupted one."""
    real, steps = search_recipe.search_step, [0]

    def step(*args, **kwargs):
        steps[0] += 1
        if steps[0] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                         "capacity of 139.8 GiB of which 1.2 GiB is free.")
        return real(*args, **kwargs)
    monkeypatch.setattr(search_recipe, "search_step", step)
    out = tmp_path / "run"
    rc, _, err = call(*MICRO, "--out", str(out))
    assert (rc, err) == (3, "ilnas: error: out of device memory (20.00 GiB at once); lower search.batch_size and "
                            "continue with --resume (the last checkpoint is intact)\n")
    monkeypatch.undo()
    rc, _, err = call("search", "--resume", "--out", str(out), "--quiet", "--no-report")
    assert rc == 0, err
    assert_same_search(micro_run, out)

def npy_file() -> bytes:
    """A NumPy file of one array (.npy), not an archive of several (.npz)."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    return buf.getvalue()


DAMAGED_RECORDS = [  # (run, file, content, command, message): valid JSON or arrays of the wrong shape or type
    ("search", "summary.json", "[1, 2]", "compare", "summary.json is damaged: it holds a JSON list, not an object"),
    ("search", "summary.json", "{}", "compare", "summary.json is damaged: its 'search_hours' is null, where a finite"),
    ("search", "summary.json", '{"search_hours": "x", "steps": 3}', "plot", "its 'search_hours' is \"x\", where a"),
    ("search", "summary.json", '{"search_hours": 1, "steps": 3, "phase_genotypes": 5}', "plot",
     "its 'phase_genotypes' is not a list of genotypes"),
    ("search", "provenance.json", '{"sessions": 5}', "status", None),
    ("search", "metrics.jsonl", "[1]\n{}\n", "plot", "metrics.jsonl line 1 is damaged: a JSON list, not an object"),
    ("search", "arch_history.npz", "junk", "plot", "arch_history.npz cannot be read (not an .npz archive of plain "
                                                   "arrays)"),
    ("search", "arch_history.npz", npy_file(), "plot", "arch_history.npz cannot be read (it holds one array, not an "
                                                      ".npz archive)"),
    ("train", "result.json", '{"task": "digits", "final_test_error": "x"}', "compare",
     "result.json is damaged: its 'final_test_error' is \"x\", where a finite number belongs"),
    ("train", "result.json", '{"task": 3}', "plot", "result.json is damaged: its 'task' is 3, where a string belongs"),
]


@pytest.mark.parametrize("kind, name, content, command, message", DAMAGED_RECORDS,
                         ids=[f"{r[3]}-{r[1]}-{i}" for i, r in enumerate(DAMAGED_RECORDS)])
def test_a_run_record_of_the_wrong_shape_is_refused_in_one_line_by_the_commands_that_read_it(
        finished_run, finished_training, tmp_path, kind, name, content, command, message):
    run = tmp_path / "run"
    shutil.copytree(finished_run if kind == "search" else finished_training, run)
    (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    if message is None:  # status lists the run, whose sessions it cannot count
        code, out, err = call(command, str(run), "--json")
        assert code == 0 and json.loads(out)[0]["sessions"] == 0, err
    else:
        assert_refused([command, str(run)], message, [run])

@pytest.mark.parametrize("damage", ["garbled", "a directory"])
@pytest.mark.parametrize("kind", ["search", "train"])
def test_a_finished_run_whose_final_record_is_unreadable_is_no_finished_run_and_is_finished_again_by_a_resume(
        finished_run, finished_training, tmp_path, kind, damage):
    """status does not list it as finished (compare could not read it); --resume and --auto-resume refuse it in one
    line that says how to write the record again (a directory in its place was found only once the resumed run had
    run to its end again, exit 3); done so, the run is finished with the record it had."""
    source, name, argv = ((finished_run, "summary.json", SEARCH3) if kind == "search"
                          else (finished_training, "result.json", TRAIN_ARGS))
    run = tmp_path / "run"
    shutil.copytree(source, run)
    if damage == "garbled":
        (run / name).write_bytes(b"\xff{")
        cause = f"{run / name} cannot be read as JSON ("
    else:
        (run / name).unlink()
        (run / name).mkdir()
        cause = f"{run / name} is not a file, where a finished run records its end"
    remedy = "; remove it, and --resume finishes the run again from its last checkpoint"
    code, out, err = call("status", str(run), "--json")
    state = json.loads(out)[0]["state"]
    assert code == 0 and state.startswith(f"unreadable: {cause}") and state.endswith(remedy), err
    for again in ([kind, "--resume", "--out", str(run)], [*argv, "--out", str(run), "--auto-resume"]):
        assert assert_refused(again, cause, [run]).endswith(f"{remedy}\n")
    (run / name).unlink() if damage == "garbled" else (run / name).rmdir()
    code, _, err = call(kind, "--resume", "--out", str(run), "--quiet", "--no-report")
    assert code == 0, err
    assert json.loads(call("status", str(run), "--json")[1])[0]["state"] == "finished"
    key = "genotype" if kind == "search" else "final_test_error"
    assert json.loads((run / name).read_text())[key] == json.loads((source / name).read_text())[key]


# --- concurrency --------------------------------------------------------------------------------------

def test_a_second_process_on_a_running_run_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    proc = ilnas(*SEARCH3, "--set", "search.epochs=30", "--out", str(out), wait=False)
    try:
        wait_for_sessions(out, 1, proc)
        before_log = (out / "provenance.json").read_text()
        # and a plain start too: not "already holds an unfinished run (continue it with --resume)"
        for argv in (["search", "--resume", "--out", str(out)], [*SEARCH3, "--out", str(out), "--force"],
                     ["train", "--genotype", "DARTS_V2", "--preset", "eval-digits", "--out", str(out), "--force"],
                     [*SEARCH3, "--out", str(out)], [*SEARCH3, "--out", str(out), "--check"]):
            rc, _, err = call(*argv)
            assert rc == 2 and "is in use by another ilnas process" in err, err
            assert f"pid {proc.pid}" in err and len(err.strip().splitlines()) == 1
        assert (out / "provenance.json").read_text() == before_log
    finally:
        proc.kill()
        proc.wait()


def test_metrics_brought_back_in_groups_log_the_same_search(finished_run, tmp_path):
    """search.log_every=3: the device runs three steps ahead of the host; the run is the same bit for bit."""
    out = tmp_path / "grouped"
    rc, _, err = call(*SEARCH3, "--out", str(out), "--set", "search.log_every=3")
    assert rc == 0, err
    assert_same_search(finished_run, out)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step_time"] > 0 for r in steps if r["kind"] == "step")


# --- divergence ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("log_every", [1, 5])
def test_a_diverging_search_stops_unfinished_with_strict_json(tmp_path, log_every):
    """Metrics brought back in groups (log_every=5, longer than an epoch) stop at the same step, with the
    same records, as metrics brought back every step."""
    out = tmp_path / "run"
    rc, _, err = call(*SEARCH3, "--out", str(out), "--set", "optimizer.lr=1e27", "--set", f"search.log_every={log_every}")
    assert rc == 3 and "the search diverged at step 1 (epoch 1)" in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "summary.json").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]  # the steps after it are not logged
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))
    last = json.loads(lines[-1])
    assert None in [*last["train_loss"].values(), *last.get("val_loss", {}).values(), last.get("hypergrad_norm")]
    if (out / "checkpoint.pt").exists():
        state = read_checkpoint(out / "checkpoint.pt")["state"]
        assert all(torch.isfinite(a).all() for a in state["arch"])


def test_a_diverging_training_stops_unfinished(tmp_path):
    out = tmp_path / "run"
    rc, _, err = call(*TRAIN_ARGS, "--out", str(out), "--set", "optimizer.lr=1e30", "--set", "optimizer.grad_clip=null")
    assert rc == 3 and "training diverged" in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "result.json").exists()


def _fail_at_step(monkeypatch, step: int, fault) -> None:
    """Make the search's ``step``-th engine step fail with ``fault(metrics)`` (a first-class fault injection)."""
    real, count = search_recipe.search_step, [0]

    def faulty(*args, **kwargs):
        metrics = real(*args, **kwargs)
        count[0] += 1
        if count[0] == step:
            fault(metrics)
        return metrics
    monkeypatch.setattr(search_recipe, "search_step", faulty)


def test_status_says_which_runs_failed_and_why(tmp_path, monkeypatch):
    """A run whose last session failed was listed as interrupted, as if --resume would carry it on, where most
    often it fails again. Each session now records how it ended (provenance.json: end and outcome), and
    status lists such a run as failed, with its error below the table, and so does its report."""
    diverged, crashed = tmp_path / "diverged", tmp_path / "crashed"
    rc, _, _ = call(*MICRO, "--set", "optimizer.lr=1e27", "--out", str(diverged))
    assert rc == 3

    def bug(metrics):
        raise ZeroDivisionError("a bug of its own")
    _fail_at_step(monkeypatch, 2, bug)
    with pytest.raises(ZeroDivisionError):
        call(*MICRO, "--out", str(crashed))
    outcomes = [json.loads((run / "provenance.json").read_text())["sessions"][-1]["outcome"]
                for run in (diverged, crashed)]
    assert outcomes[0].startswith("failed: the search diverged at step 1 (epoch 1): ")
    assert outcomes[1] == "crashed: ZeroDivisionError: a bug of its own"
    code, table, _ = call("status", str(tmp_path))
    assert code == 0 and table.count("| search | failed | ") == 2, table
    assert table.endswith(f"\n\n{crashed}: {outcomes[1]}\n{diverged}: {outcomes[0]}\n"), table
    assert call("plot", str(diverged))[0] == 0  # its report says so too, where it said "running or interrupted"
    assert "<th>status</th><td>failed: the search diverged at step 1" in (diverged / "report.html").read_text()
    monkeypatch.undo()
    # fixed, and resumed: finished
    assert call("search", "--resume", "--quiet", "--no-report", "--out", str(crashed))[0] == 0
    rows = json.loads(call("status", str(crashed), "--json")[1])
    assert [(r["state"], r["outcome"]) for r in rows] == [("finished", None)]


def test_divergence_after_a_checkpoint_keeps_it_and_the_run_resumes_exactly(micro_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _fail_at_step(monkeypatch, 3, lambda m: m["train_loss"].__setitem__(0, math.nan))  # epoch 2 of 3
    rc, _, err = call(*MICRO, "--out", str(out))
    assert rc == 3 and "step 3 (epoch 2): train loss of stage 1 (r1/digits) is not finite" in err, err
    assert read_checkpoint(out / "checkpoint.pt")["progress"]["epoch"] == 1  # the last good one
    assert not (out / "summary.json").exists()
    monkeypatch.undo()
    rc, _, err = call("search", "--resume", "--out", str(out), "--quiet", "--no-report")
    assert rc == 0, err
    assert_same_search(micro_run, out)


def test_a_run_directory_removed_while_the_run_runs_stops_it_in_one_line_that_says_so(tmp_path, monkeypatch):
    """Deleted by hand (cleaning up old runs, say) between two epochs: the next write fails. The line said to
    fix this and continue with --resume, where nothing is left to resume."""
    import ilnas.runs as runs

    out, real, saves = tmp_path / "run", runs.atomic_write_bytes, [0]

    def removed(path, data, keep_previous=None):
        if Path(path).name == "checkpoint.pt":
            saves[0] += 1
            if saves[0] == 2:
                shutil.rmtree(out)
        return real(path, data, keep_previous)
    monkeypatch.setattr(runs, "atomic_write_bytes", removed)
    rc, _, err = call(*MICRO, "--out", str(out))
    assert rc == 3 and err.startswith(f"ilnas: error: the run directory {out} was removed while the run ran, so "), err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(micro_run, tmp_path, monkeypatch):
    import ilnas.runs as runs

    out, real, saves = tmp_path / "run", runs.atomic_write_bytes, [0]

    def full_disk(path, data, keep_previous=None):
        if Path(path).name == "checkpoint.pt":
            saves[0] += 1
            if saves[0] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data, keep_previous)
    monkeypatch.setattr(runs, "atomic_write_bytes", full_disk)
    rc, _, err = call(*MICRO, "--out", str(out))
    assert rc == 3 and "No space left on device" in err and "the last checkpoint is intact" in err, err
    assert len(err.strip().splitlines()) == 1
    assert read_checkpoint(out / "checkpoint.pt")["progress"]["epoch"] == 1
    monkeypatch.undo()
    rc, _, err = call("search", "--resume", "--out", str(out), "--quiet", "--no-report")
    assert rc == 0, err
    assert_same_search(micro_run, out)



def test_a_full_disk_under_tensorboard_stops_the_run_in_one_line_and_it_resumes(micro_run, tmp_path, monkeypatch):
    """TensorBoard's writer writes in a thread of its own, and its failure surfaces at its next call: once the
    first checkpoint is written, every event write fails. The run stops in one line (exit 3), and resumed, ends
    as an uninterrupted run, its events included. A failure that surfaces only as the writer closes (the
    run's last events) is a warning, and the finished run exits 0."""
    import tensorboard.summary.writer.record_writer as record_writer

    out, real = tmp_path / "run", record_writer.RecordWriter.write

    def full_disk(self, data):
        if (out / "checkpoint.pt").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)
    monkeypatch.setattr(record_writer.RecordWriter, "write", full_disk)
    rc, _, err = call(*MICRO, "--out", str(out))
    assert rc == 3 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"ilnas: error: cannot write TensorBoard events (tb/) in {out} (No space left on device); "
                          f"the last checkpoint is intact;"), err
    monkeypatch.undo()
    rc, _, err = call("search", "--resume", "--out", str(out), "--quiet", "--no-report")
    assert rc == 0, err
    assert_same_search(micro_run, out)

    from torch.utils.tensorboard import SummaryWriter

    def failing_close(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(SummaryWriter, "close", failing_close)
    rc, _, err = call(*MICRO, "--out", str(tmp_path / "closed"))
    assert rc == 0 and err == (f"ilnas: warning: the TensorBoard events in {tmp_path / 'closed' / 'tb'} may lack "
                               f"the run's last values (No space left on device)\n"), err

def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(micro_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _fail_at_step(monkeypatch, 5, lambda m: m["train_loss"].__setitem__(0, math.inf))  # after two checkpoints
    assert call(*MICRO, "--out", str(out))[0] == 3
    monkeypatch.undo()
    assert read_checkpoint(out / "checkpoint.pt")["progress"]["epoch"] == 2
    _flip(out / "checkpoint.pt")
    rc, _, err = call("search", "--resume", "--out", str(out), "--quiet", "--no-report")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "checksum mismatch" in warnings[0] and "checkpoint.prev.pt" in warnings[0]
    assert_same_search(micro_run, out)


# --- hygiene ------------------------------------------------------------------------------------------

def test_run_files_honour_the_umask_and_record_provenance(finished_training, tmp_path):
    old = os.umask(0o027)
    try:
        rc, _, err = call(*TRAIN_ARGS, "--set", "train.epochs=1", "--out", str(tmp_path / "run"))
    finally:
        os.umask(old)
    assert rc == 0, err
    for p in (tmp_path / "run").iterdir():
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o640, p.name
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert prov["genotype_source"] == "DARTS_V2"
    session = prov["sessions"][0]
    assert session["ilnas"] and session["torch"] == torch.__version__ and session["end"] >= session["start"]
    assert session["command"] == sys.argv and session["host"]  # the program that ran it


def test_a_resume_on_another_number_of_ranks_is_recorded_and_warned_about(tmp_path, monkeypatch, caplog):
    from ilnas.runs import RunDir

    config = {"kind": "eval", "note": "a run's configuration"}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    RunDir.open(tmp_path / "run", "eval", config, resume=False, force=False).close()
    with caplog.at_level(logging.WARNING, logger="ilnas"):
        RunDir.open(tmp_path / "run", "eval", config, resume=True, force=False).close()  # same count: silent
        assert not caplog.records
        monkeypatch.setenv("WORLD_SIZE", "4")
        RunDir.open(tmp_path / "run", "eval", config, resume=True, force=False).close()
    assert [r.getMessage()[:55] for r in caplog.records] == ["resuming on 4 rank(s) a run whose last session ran on 1"]
    sessions = json.loads((tmp_path / "run" / "provenance.json").read_text())["sessions"]
    assert [(s["resumed"], s["world_size"]) for s in sessions] == [(False, 1), (True, 1), (True, 4)]


def test_a_resume_on_another_device_or_cpu_thread_count_is_recorded_and_warned_about(tmp_path, monkeypatch, caplog,
                                                                                     finished_run):
    """Sums split between another number of threads round otherwise: a search on 1 and on 2 threads took other
    architectures after three steps here. The default thread count is the cores a job was given, which a
    requeued job on another node need not match: a resume says so, and how to keep the run exact."""
    from ilnas.runs import RunDir

    session = json.loads((finished_run / "provenance.json").read_text())["sessions"][0]
    assert (session["device"], session["threads"]) == ("cpu", 1)  # what the search recipe records
    config, cpu = {"kind": "eval", "note": "a run's configuration"}, torch.device("cpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        RunDir.open(tmp_path / "run", "eval", config, resume=False, force=False, device=cpu).close()
        with caplog.at_level(logging.WARNING, logger="ilnas"):
            RunDir.open(tmp_path / "run", "eval", config, resume=True, force=False, device=cpu).close()  # silent
            assert not caplog.records
            torch.set_num_threads(2)
            RunDir.open(tmp_path / "run", "eval", config, resume=True, force=False, device=cpu).close()
            record = json.loads((tmp_path / "run" / "provenance.json").read_text())
            record["sessions"][-1]["device"] = "cuda: NVIDIA H200"
            (tmp_path / "run" / "provenance.json").write_text(json.dumps(record))
            RunDir.open(tmp_path / "run", "eval", config, resume=True, force=False, device=cpu).close()
            RunDir.open(tmp_path / "run", "eval", config, resume=True, force=False).close()  # none given: silent
    finally:
        torch.set_num_threads(threads)
    assert [r.getMessage() for r in caplog.records] == [
        "resuming on 2 CPU thread(s) a run whose last session used 1: sums split otherwise between threads round "
        "otherwise, so from here on the run will not repeat an uninterrupted one exactly (OMP_NUM_THREADS=1 would)",
        "resuming on cpu a run whose last session ran on cuda: NVIDIA H200: kernels round differently, so from here "
        "on the run will not repeat an uninterrupted one exactly"]
    sessions = json.loads((tmp_path / "run" / "provenance.json").read_text())["sessions"]
    assert [(s.get("device"), s.get("threads")) for s in sessions] == [
        ("cpu", 1), ("cpu", 1), ("cuda: NVIDIA H200", 2), ("cpu", 2), (None, None)]  # the third edited


def test_training_the_cell_of_an_unfinished_search_says_it_is_not_the_final_one(micro_run, tmp_path):
    """A search still running (or interrupted) already has a genotype.json, its latest epoch's: re-training it
    is allowed, and says so, on stderr as the CLI's other warnings; a finished search's cell says nothing."""
    running = unfinished_copy(micro_run, tmp_path / "search")
    tiny = ["train", *TRAIN_ARGS[3:], "--set", "train.epochs=1", "--set", "train.steps_per_epoch=1"]
    for source, warned in ((running, True), (running / "genotype.json", True), (micro_run, False)):
        rc, out, err = call(*tiny, "--genotype", str(source), "--out", str(tmp_path / f"train-{warned}"), "--force")
        assert rc == 0, err
        assert (err == f"ilnas: warning: the search in {running} has not finished: its genotype.json holds the cell "
                       f"of its latest epoch, not the one it will end with\n") == warned, err
        assert "warning" not in out


def test_a_resume_under_another_torch_or_ilnas_is_warned_about(tmp_path, monkeypatch, caplog):
    """An upgrade between two sessions of a long run: it continues, and says its numbers may now differ from
    an uninterrupted run's. A record without versions (or a damaged one) is no reason for a warning."""
    from ilnas import runs

    config = {"kind": "eval", "note": "a run's configuration"}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    runs.RunDir.open(tmp_path / "run", "eval", config, resume=False, force=False).close()
    p = tmp_path / "run" / "provenance.json"
    record = json.loads(p.read_text())
    record["sessions"][0].update(torch="1.0.0", ilnas=7)  # ilnas damaged: not compared
    p.write_text(json.dumps(record))
    version = runs.__version__
    with caplog.at_level(logging.WARNING, logger="ilnas"):
        runs.RunDir.open(tmp_path / "run", "eval", config, resume=True, force=False).close()
        monkeypatch.setattr(runs, "__version__", "99.0")
        runs.RunDir.open(tmp_path / "run", "eval", config, resume=True, force=False).close()
        runs.RunDir.open(tmp_path / "run", "eval", config, resume=True, force=False).close()  # as the last one: silent
    assert [r.getMessage() for r in caplog.records] == [
        f"resuming a run under other software than its last session (torch 1.0.0 -> {torch.__version__}): kernels "
        f"and random streams may differ between versions, so from here on the run may not repeat an uninterrupted "
        f"one exactly",
        f"resuming a run under other software than its last session (ilnas {version} -> 99.0): kernels "
        f"and random streams may differ between versions, so from here on the run may not repeat an uninterrupted "
        f"one exactly"]


def test_describe_into_a_closed_pipe_exits_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "ilnas", "describe", "DARTS_V2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first byte, like `| head -0`
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err


# --- correctness bugs found by independent checks ---------------------------------------------------------

def test_skip_connect_dropout_is_off_in_evaluation_mode():
    op = MixedOp(4, 1, ["skip_connect", "sep_conv_3x3"])
    x, w = torch.randn(3, 4, 6, 6), torch.tensor([1.0, 0.0])
    op.eval()
    assert torch.equal(op(x, w, skip_dropout=0.5), x)
    op.train()
    assert not torch.equal(op(x, w, skip_dropout=0.5), x)


# --- SIGKILL at random points ----------------------------------------------------------------------------

def kill_and_resume(argv: list[str], out: Path, finished: str, seed: int, kills: int, lines: int,
                    auto: bool = False) -> int:
    """Start ``argv``; SIGKILL it at a random point (once its metrics log has reached a random line below
    ``lines``, the length of the uninterrupted run's log, plus a random instant), resume; ``kills`` times.
    Then let the last resume finish, in this process. Returns how many kills hit an unfinished run. ``auto``:
    start and resume with the same command line plus --auto-resume, as a restarted or requeued job does."""
    rng, hits = random.Random(seed), 0
    argv = [*argv, "--auto-resume"] if auto else argv
    proc = ilnas(*argv, "--out", str(out), wait=False)
    for i in range(kills):
        wait_for_sessions(out, i + 1, proc)
        target = rng.randint(0, lines - 2)
        while proc.poll() is None and len(read_lines(out / "metrics.jsonl")) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (out / finished).exists():
            return hits
        hits += 1
        restart = argv if auto else [argv[0], "--resume", "--quiet", "--no-report"]
        if i + 1 < kills:
            proc = ilnas(*restart, "--out", str(out), wait=False)
    rc, _, err = call(*restart, "--out", str(out))  # the last resume, killed no more: in this process
    assert rc == 0, err
    return hits


def with_ctrl_c(*args: str) -> subprocess.Popen:
    """``ilnas ARGS`` with Ctrl-C as in a terminal (a test runner's workers may ignore SIGINT, and their
    children inherit that)."""
    return subprocess.Popen([sys.executable, "-m", "ilnas", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stopped_by(signum: int, argv: list[str], out: Path) -> list[str]:
    """``ilnas ARGV --out OUT`` (Ctrl-C as in a terminal) sent ``signum`` once its session is open, before its
    first step has ended; it must exit with 128 + signum, or, for Ctrl-C, end killed by SIGINT as Python ends on
    a Ctrl-C (a shell shows 130 too, and stops a loop that runs it). Its stderr lines."""
    proc = with_ctrl_c(*argv, "--out", str(out))
    wait_for_sessions(out, 1, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == (-signum if signum == signal.SIGINT else 128 + signum), err.decode()
    return err.decode().splitlines()


def killed_once_checkpointed(argv: list[str], out: Path, reached: Callable[[dict], bool]) -> None:
    """``ilnas ARGV --out OUT``, SIGKILLed at the first checkpoint that ``reached`` accepts. Each new checkpoint
    is read with the run held (SIGSTOP), so that however slowly it is read, the run has not gone on past it,
    or to its end, in the meantime."""
    proc, ckpt, seen = ilnas(*argv, "--out", str(out), wait=False), out / "checkpoint.pt", None
    while True:
        assert proc.poll() is None, proc.communicate()
        with contextlib.suppress(FileNotFoundError):
            st = ckpt.stat()
            if (st.st_ino, st.st_mtime_ns) != seen:
                proc.send_signal(signal.SIGSTOP)
                seen = (st.st_ino, st.st_mtime_ns)
                try:
                    hit = reached(read_checkpoint(ckpt))
                except (IlnasError, OSError):  # caught between a save's renames: the next one
                    hit = False
                if hit:
                    break
                proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    proc.kill()
    proc.wait()


def resume(command: str, out: Path) -> None:
    """``ilnas COMMAND --resume`` in this process: the stopped process's checkpoint, not its memory, carries on."""
    rc, _, err = call(command, "--resume", "--quiet", "--no-report", "--out", str(out))
    assert rc == 0, err


def test_a_resumed_sessions_tensorboard_file_sorts_after_the_earlier_sessions(tmp_path):
    """TensorBoard reads a run's event files in name order: the second each was opened, then the pid as text. A
    session resumed within the second the earlier one opened its file (a resume in the same process, here as in
    the image-folder test below, had a smaller pid) sorted first, and the earlier session's steps after the
    checkpoint, read after the purge, stood. It now opens its file in a later second. A file from a clock set
    ahead is not waited out."""
    from ilnas.runs import after_earlier_events

    now = int(time.time())
    earlier = f"events.out.tfevents.{now:010d}.host.99999.0"
    (tmp_path / earlier).write_bytes(b"")
    after_earlier_events(tmp_path)
    opened = f"events.out.tfevents.{int(time.time()):010d}.host.1.0"  # a smaller pid, in the second reached
    assert sorted([opened, earlier]) == [earlier, opened]
    (tmp_path / f"events.out.tfevents.{now + 3600:010d}.host.2.0").write_bytes(b"")
    start = time.monotonic()
    after_earlier_events(tmp_path, longest=0.2)
    assert time.monotonic() - start < 1.0


def test_a_search_killed_at_random_points_resumes_bit_exact(micro_run, tmp_path):
    """The IL search's own stages resume bit-exactly in the signal test below."""
    out = tmp_path / "run"
    hits = kill_and_resume(MICRO, out, "summary.json", 1, 2, len(read_lines(micro_run / "metrics.jsonl")))
    assert hits >= 1
    assert_same_search(micro_run, out)
    sessions = json.loads((out / "provenance.json").read_text())["sessions"]
    assert len(sessions) >= 2 and sessions[-1]["resumed"] and sessions[-1]["end"]


def test_a_search_stopped_by_ctrl_c_checkpoints_that_step_and_resumes_bit_exact(finished_run, tmp_path):
    """Ctrl-C (SIGINT; SIGTERM, a cluster's notice, takes the same path: the torchrun, training and SLURM script
    tests) before the IL search's first step has ended: the run finishes that step, checkpoints it part-way
    through epoch 1, with both tasks' batch streams part-way too, and ends killed by SIGINT."""
    out = tmp_path / "run"
    assert stopped_by(signal.SIGINT, SEARCH3, out) == [
        "ilnas: Ctrl-C: stopping after this step, with a checkpoint (Ctrl-C again: at once, without)",
        "ilnas: stopped by SIGINT after step 1 of 2 of epoch 1 (global step 1), with a checkpoint there; continue "
        "with --resume (or the same command with --auto-resume)"]
    progress = read_checkpoint(out / "checkpoint.pt")["progress"]
    assert (progress["epoch"], progress["epoch_steps"], progress["global_step"]) == (0, 1, 1)
    assert not (out / "summary.json").exists() and len(read_lines(out / "metrics.jsonl")) == 1
    code, table, _ = call("status", str(out))
    assert code == 0 and "| interrupted | 0/3 | - | 0 ep + 1 steps, " in table  # where --resume continues
    session = json.loads((out / "provenance.json").read_text())["sessions"][-1]
    assert session["end"] and session["outcome"].startswith("stopped by SIGINT after step 1 of 2 of epoch 1")
    resume("search", out)
    assert_same_search(finished_run, out)


def test_a_closed_terminal_checkpoints_the_step_and_stops_though_writing_to_it_fails(micro_run, tmp_path):
    """SIGHUP, as a closed terminal or a dropped ssh session sends, with stdout and stderr on that terminal:
    once it has hung up every write to it fails (EIO), yet the run checkpoints its step, exits 129, and
    --resume ends it exactly as an uninterrupted run."""
    out = tmp_path / "run"
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ilnas", *MICRO, "--out", str(out)], stdout=terminal,
                            stderr=terminal, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    os.close(terminal)
    wait_for_sessions(out, 1, proc)
    os.close(controller)  # the terminal hangs up
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=300) == 128 + signal.SIGHUP
    progress = read_checkpoint(out / "checkpoint.pt")["progress"]
    assert (progress["epoch"], progress["epoch_steps"]) == (0, 1)
    resume("search", out)
    assert_same_search(micro_run, out)


@pytest.mark.skipif(shutil.which("bash") is None, reason="runs a bash loop")
def test_a_ctrl_c_stops_a_shell_loop_of_runs_after_the_step_it_checkpoints(tmp_path):
    """Ctrl-C in a terminal reaches the shell and the run it waits for. A shell goes on to its loop's next
    command when that run exits with a code (130 did), and stops only when it was killed by SIGINT: the run
    checkpoints its step, reports its stop, and ends so."""
    script = f'for s in 1 2; do "{sys.executable}" -m ilnas {shlex.join(MICRO)} --out "{tmp_path}/run-$s"; done'
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL), os.setpgrp()))
    wait_for_sessions(tmp_path / "run-1", 1, proc)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: to the whole foreground process group
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGINT and err.decode().splitlines()[-1].startswith(STOP_REPORTED), err
    assert (tmp_path / "run-1" / "checkpoint.pt").exists() and not (tmp_path / "run-2").exists()


STOP_REPORTED = "ilnas: stopped by SIGINT after step 1 of 2 of epoch 1"


@pytest.mark.parametrize("when", ["in its first step", "once its stop is reported"])
def test_a_second_ctrl_c_stops_at_once_as_python_ends_a_ctrl_c_in_one_line(tmp_path, when):
    """It ends as Python ends a Ctrl-C, killed by SIGINT (which a shell shows as 130, and which stops a shell
    loop), in one line instead of a traceback. In its first step: the second Ctrl-C follows the first by the
    milliseconds this test takes to read the first one's line (on a loaded machine the step may have ended
    and checkpointed by then). Once the stop is reported: the second Ctrl-C lands as the command ends, in a
    finaliser (where Python prints "Exception ignored ... KeyboardInterrupt" and goes on) or in the
    interpreter's clean-up; either way the checkpoint stays."""
    proc = with_ctrl_c(*MICRO, "--out", str(tmp_path / "twice"))
    wait_for_sessions(tmp_path / "twice", 1, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.stderr.readline().decode().startswith("ilnas: Ctrl-C: stopping after this step")
    if when == "once its stop is reported":
        assert proc.stderr.readline().decode().startswith(STOP_REPORTED)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    lines = [STOP_REPORTED if line.startswith(STOP_REPORTED) else line for line in err.decode().splitlines()]
    assert proc.returncode == -signal.SIGINT, err
    if when == "once its stop is reported":
        assert lines in ([], ["ilnas: interrupted"]) and (tmp_path / "twice" / "checkpoint.pt").exists(), err
    elif (tmp_path / "twice" / "checkpoint.pt").exists():  # the first step had ended, checkpointed, before it
        assert lines in ([STOP_REPORTED], ["ilnas: interrupted"], [STOP_REPORTED, "ilnas: interrupted"]), err
    else:  # stopped before its first step had ended
        assert lines == ["ilnas: interrupted"], err


def test_a_ctrl_c_while_a_stop_is_being_reported_ends_in_one_line_not_a_traceback(monkeypatch):
    """Where the second Ctrl-C lands in the handler that reports the first one's stop."""
    from ilnas import cli, ranks
    from ilnas.errors import Stopped

    def stopped_run(args):
        raise Stopped("stopped by SIGINT after step 1 of 2 of epoch 1, with a checkpoint there", signal.SIGINT)

    def second_ctrl_c() -> bool:
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.COMMANDS, "presets", stopped_run)
    monkeypatch.setattr(ranks, "is_main_rank", second_ctrl_c)
    assert call("presets") == (130, "", "ilnas: interrupted\n")


@pytest.mark.skipif(shutil.which("bash") is None, reason="runs a bash script")
def test_the_slurm_job_script_requeues_before_its_time_limit_and_the_next_job_continues_bit_exact(micro_run, tmp_path):
    """examples/slurm-requeue.sbatch run by bash as SLURM runs it (scontrol: a stub that notes its arguments):
    USR1 to the script, which --signal=B:USR1@180 sends, stops the search after its step and requeues the job;
    the script run again, as the requeued job, ends the run exactly as an uninterrupted one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("scontrol", f'echo "$@" >> {tmp_path / "scontrol.txt"}'),
                       ("ilnas", f'exec "{sys.executable}" -m ilnas "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "SLURM_JOB_ID": "4242"}
    job = ["bash", str(Path(__file__).parent.parent / "examples" / "slurm-requeue.sbatch"), *MICRO, "--out",
           str(tmp_path / "run")]
    proc = subprocess.Popen(job, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_sessions(tmp_path / "run", 1, proc)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr.decode()
    assert "requeueing job 4242" in stdout.decode() and (tmp_path / "scontrol.txt").read_text() == "requeue 4242\n"
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["progress"]["epoch_steps"] == 1
    r = subprocess.run(job, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "requeue" not in r.stdout, r.stderr
    assert_same_search(micro_run, tmp_path / "run")


def test_a_search_checkpointed_part_way_through_its_epochs_resumes_bit_exact_after_a_kill(tmp_path):
    """checkpoint_minutes so short that every step writes one; P-DARTS, whose skip-connect dropout draws from
    the global generator the checkpoint keeps. SIGKILL once one exists part-way through an epoch."""
    argv = ["search", "--quiet", "--no-report", "--preset", "pdarts-cifar10", "--set", "data.tasks=[digits]",
            *(a for kv in TINY_PDARTS for a in ("--set", kv))]
    rc, _, err = call(*argv, "--out", str(tmp_path / "reference"))
    assert rc == 0, err
    out = tmp_path / "run"
    # phase 2 (dropout 0.2 in its warm-up epoch), part-way through its first epoch (after its step 1 or 2 of 3)
    killed_once_checkpointed(argv, out, lambda c: (c["progress"]["phase"], c["progress"]["epoch"]) == (1, 0)
                             and c["progress"]["epoch_steps"] > 0)
    assert not (out / "summary.json").exists()
    resume("search", out)
    assert_same_search(tmp_path / "reference", out)


def test_a_training_killed_at_random_points_resumes_bit_exact(finished_training, tmp_path):
    """Restarted with its own command line and --auto-resume each time, as a requeued job is."""
    out = tmp_path / "run"
    hits = kill_and_resume(TRAIN_ARGS, out, "result.json", seed=3, kills=2,
                           lines=len(read_lines(finished_training / "metrics.jsonl")), auto=True)
    assert hits >= 1
    assert_same_training(finished_training, out)


def test_a_training_stopped_by_a_signal_checkpoints_that_step_and_resumes_bit_exact(finished_training, tmp_path):
    out = tmp_path / "run"
    assert stopped_by(signal.SIGTERM, TRAIN_ARGS, out) == [
        "ilnas: stopped by SIGTERM after step 1 of 3 of epoch 1, with a checkpoint there; continue with --resume (or "
        "the same command with --auto-resume)"]
    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 0 and ckpt["within_epoch"]["steps"] == 1 and ckpt["within_epoch"]["ranks"][0]["seen"] == 16
    resume("train", out)
    assert_same_training(finished_training, out)


def test_an_image_folder_training_checkpointed_part_way_through_an_epoch_resumes_bit_exact(tmp_path):
    """A checkpoint after every step; SIGKILL part-way through epoch 2, where drop-path draws from the global
    generator; the DataLoader worker augments each image from its own seed, so the resumed epoch, which starts
    at a later batch, augments every image as the uninterrupted one does. The resume follows the kill at
    once: the killed process's worker, which outlives it by seconds, must not keep the run locked."""
    write_image_folder(tmp_path / "imgs", per_class=10)  # 5 steps an epoch
    argv = ["train", "--genotype", "PC_DARTS_image", "--preset", "eval-imagefolder", "--quiet", "--no-report",
            *(a for kv in [f"data.tasks=[imagefolder:{tmp_path / 'imgs'}]", "train.resolution=64", "train.workers=1",
                           "network.auxiliary=false", "train.epochs=2", "optimizer.warmup_epochs=0",
                           "network.layers=3", "network.channels=4", "train.batch_size=6", "network.drop_path=0.5",
                           "train.checkpoint_minutes=1e-9"] for a in ("--set", kv))]
    rc, _, err = call(*argv, "--out", str(tmp_path / "reference"))
    assert rc == 0, err
    out = tmp_path / "run"
    killed_once_checkpointed(argv, out, lambda c: c["epoch"] == 1 and 0 < c.get("within_epoch", {}).get("steps", 0))
    resume("train", out)
    assert_same_training(tmp_path / "reference", out)


def test_a_crash_below_python_prints_where_the_run_was(tmp_path):
    """A C++ abort (say, one rank's collective library calling std::terminate) kills the process without a
    Python exception; the run still says which line of which thread it was on."""
    out = tmp_path / "run"
    proc = ilnas(*MICRO, "--set", "search.epochs=50", "--out", str(out), wait=False)
    deadline = time.time() + 300
    while not read_lines(out / "metrics.jsonl"):  # in its steps: not in a deep import, whose frames the dump cuts
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGABRT)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in err and "Current thread" in err, err[-2000:]
    current = err[err.index("Current thread"):]
    assert re.search(r'File ".*/ilnas/[\w/]+\.py", line \d+ in \w+', current), current[:2000]


@pytest.mark.parametrize("preset, override, message", [
    (None, "search.checkpoint_minutes=-1", "search.checkpoint_minutes must be >= 0, got -1.0"),
    (None, "search.checkpoint_minutes=inf", "search.checkpoint_minutes must be a number, got 'inf'"),
    ("eval-digits", "train.checkpoint_minutes=-0.5", "train.checkpoint_minutes must be >= 0, got -0.5"),
])
def test_a_bad_checkpoint_interval_is_refused(preset, override, message):
    with pytest.raises(IlnasError, match=re.escape(message)):
        resolve(preset, overrides=[override], kind=None)


def test_run_failed_is_an_ilnas_error_with_its_own_exit_code():
    assert issubclass(RunFailed, IlnasError) and RunFailed.exit_code == 3 and IlnasError.exit_code == 2
    with pytest.raises(IlnasError, match="optimizer.lr must be a finite number"):
        resolve(overrides=["optimizer.lr=.nan"])


# --- a filesystem without file locks ------------------------------------------------------------------

# Two processes that both found the run free: each writes its lease once START (a shared instant) has come.
LEASE_RACE = """
import errno, fcntl, sys, time
from pathlib import Path
from ilnas import runlock
from ilnas.errors import IlnasError

def flock(fd, operation):
    raise OSError(errno.ENOSYS, "Function not implemented")

fcntl.flock = flock
runlock.SETTLE_S = 1.0
runlock.RunLock._lease_holder = lambda self: None  # the run looked free to both
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
lock = runlock.RunLock(Path(sys.argv[1]))
try:
    lock.acquire()
except IlnasError as e:
    print("refused:", e)
else:
    print("held")
    time.sleep(1.5)
    lock.release()
"""


def test_without_file_locks_of_two_processes_taking_a_free_run_in_the_same_instant_one_holds_it(tmp_path):
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", LEASE_RACE, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=60) for p in procs]
    outs = sorted(out.strip() for out, _ in results)
    assert outs[0] == "held" and outs[1].startswith("refused:"), results
    winner = procs[[out.strip() for out, _ in results].index("held")].pid
    assert f"in use by another ilnas process (pid {winner} on {socket.gethostname()}, since " in outs[1], outs
    assert (tmp_path / ".lock").read_text() == ""  # the holder released it; the loser left it alone


def test_without_file_locks_a_lease_overwritten_before_it_settles_is_refused_and_a_lost_one_is_reported(
        without_file_locks, tmp_path, monkeypatch, capfd):
    """In one process, what the race above leaves to timing: another process's line lands while this one's
    settles (refused, naming it, its line kept), and a held lease taken over later (the renewal says so and
    stops renewing; release leaves the other's line)."""
    sleeper = subprocess.Popen(["sleep", "60"])
    other = f"pid {sleeper.pid} on {socket.gethostname()}, since 2026-11-29T12:00:00+00:00: ilnas search --out x"
    try:
        monkeypatch.setattr(runlock, "_settle", lambda: (tmp_path / ".lock").write_text(other + "\n"))
        with pytest.raises(IlnasError, match=f"in use by another ilnas process \\(pid {sleeper.pid} on "):
            runlock.RunLock(tmp_path).acquire()
        assert (tmp_path / ".lock").read_text() == other + "\n"

        (tmp_path / ".lock").write_text("")
        monkeypatch.setattr(runlock, "_settle", lambda: None)
        held = runlock.RunLock(tmp_path)
        held.acquire()
        (tmp_path / ".lock").write_text(other + "\n")
        deadline = time.time() + 10
        while "was taken over" not in (err := capfd.readouterr().err):
            assert time.time() < deadline
            time.sleep(0.02)
        assert f"{tmp_path} was taken over (pid {sleeper.pid} on " in err
        held.release()
        assert (tmp_path / ".lock").read_text() == other + "\n"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_flock_that_holds_only_on_this_node_does_not_let_a_run_live_on_another_host_be_taken(tmp_path, monkeypatch):
    """BeeGFS, Lustre with localflock, NFS with nolock grant the flock here although a process on another node
    holds the run. Its line, renewed, refuses the run; one that stops being renewed (its process died without
    releasing) is taken after two renewal periods; one older than the lease at once. The holder renews its
    own line, and empties it when it releases."""
    monkeypatch.setattr(runlock, "RENEW_S", 0.05)
    lock = tmp_path / ".lock"
    other = "pid 4242 on node-elsewhere, since 2026-11-29T12:00:00+00:00: ilnas search --out x"
    lock.write_text(other + "\n")
    stop = threading.Event()

    def renew():  # the process on the other node
        while not stop.wait(0.02):
            os.utime(lock)
    renewing = threading.Thread(target=renew, daemon=True)
    renewing.start()
    try:
        assert runlock.lock_holder(tmp_path) == other  # ilnas status: running there
        with pytest.raises(IlnasError, match="in use by another ilnas process \\(pid 4242 on node-elsewhere, "):
            runlock.RunLock(tmp_path).acquire()
        assert_refused([*MICRO, "--out", str(tmp_path)], "in use by another ilnas process (pid 4242 on node-elsewhere",
                       [tmp_path / "config.yaml"])  # refused by the search's first check
    finally:
        stop.set()
        renewing.join()
    assert lock.read_text() == other + "\n"

    t0 = time.monotonic()
    held = runlock.RunLock(tmp_path)
    held.acquire()  # no longer renewed: its process is gone
    assert time.monotonic() - t0 >= 2 * runlock.RENEW_S
    assert lock.read_text().startswith(f"pid {os.getpid()} on {socket.gethostname()}, since ")
    os.utime(lock, (time.time() - 1000, time.time() - 1000))
    deadline = time.time() + 10
    while time.time() - lock.stat().st_mtime > 10:  # this holder renews its line too
        assert time.time() < deadline
        time.sleep(0.01)
    held.release()
    assert lock.read_text() == "" and runlock.lock_holder(tmp_path) is None

    lock.write_text(other + "\n")
    os.utime(lock, (time.time() - runlock.LEASE_S - 10,) * 2)
    assert runlock.lock_holder(tmp_path) is None
    t0, last = time.monotonic(), runlock.RunLock(tmp_path)
    last.acquire()  # older than the lease: taken without watching
    assert time.monotonic() - t0 < 2 * runlock.RENEW_S
    last.release()

@pytest.fixture
def without_file_locks(monkeypatch):
    """flock as on Lustre mounted without its flock option; the lease renewed every 50 ms, and a new one
    read back after 50 ms."""
    import fcntl

    def flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(runlock, "RENEW_S", 0.05)
    monkeypatch.setattr(runlock, "SETTLE_S", 0.05)


def test_without_file_locks_a_search_runs_under_a_lease_and_says_so(without_file_locks, micro_run, tmp_path):
    out = tmp_path / "run"
    code, _, err = call(*MICRO, "--out", str(out))
    assert code == 0 and err.count("lies on a filesystem without file locks (Function not implemented)") == 1, err
    assert (out / ".lock").read_text() == "" and runlock.lock_holder(out) is None  # released: names nobody
    assert_same_search(micro_run, out)


def test_without_file_locks_the_lease_refuses_a_live_holder_and_frees_a_dead_one(without_file_locks, tmp_path):
    lock, here = tmp_path / ".lock", socket.gethostname()

    def held_by(pid: int, host: str, age: float) -> str | None:
        lock.write_text(f"pid {pid} on {host}, since 2026-11-29T12:00:00+00:00: ilnas search\n")
        os.utime(lock, (time.time() - age, time.time() - age))
        return runlock.lock_holder(tmp_path)

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert held_by(sleeper.pid, here, 0).startswith(f"pid {sleeper.pid} on {here}")
        with pytest.raises(IlnasError, match=f"in use by another ilnas process \\(pid {sleeper.pid} on "):
            runlock.RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert held_by(sleeper.pid, here, 0) is None  # its process is gone: free at once
    assert held_by(1, "node-that-died", runlock.LEASE_S - 10) is not None  # another host's: its lease decides
    assert held_by(1, "node-that-died", runlock.LEASE_S + 10) is None

    taken = runlock.RunLock(tmp_path)
    taken.acquire()
    os.utime(lock, (time.time() - 1000, time.time() - 1000))
    deadline = time.time() + 10
    while time.time() - lock.stat().st_mtime > 10:  # the holder renews its lease
        assert time.time() < deadline
        time.sleep(0.01)
    with pytest.raises(IlnasError, match="in use by another ilnas process"):
        runlock.RunLock(tmp_path).acquire()
    taken.release()
    runlock.RunLock(tmp_path).acquire()


# --- ilnas status -----------------------------------------------------------------------------------------

def test_the_time_left_of_a_search_weighs_warm_up_epochs_and_p_darts_phases_apart(tmp_path):
    """A warm-up epoch skips the architecture step and a P-DARTS phase costs its cells times its candidate
    operations per edge (il-pdarts-demo: 3 x 8, 4 x 5, 5 x 3): epochs that take 2 and 5 s per unit of that size
    leave exactly 22.5 s after the first two, where the mean of the recent epochs says 24.5; with only a warm-up
    epoch seen, the estimate is a lower bound."""
    from ilnas.config import to_dict

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(resolve("il-pdarts-demo"))))
    (run / "provenance.json").write_text('{"sessions": [{"resumed": false}]}')
    lock = runlock.RunLock(run)
    lock.acquire()  # running
    try:
        def seen(*times: float) -> dict:
            lines = [{"kind": "epoch", "phase": 0, "epoch": e, "arch_updated": e >= 1, "epoch_time": t}
                     for e, t in enumerate(times)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
            return json.loads(ilnas_here("status", str(run), "--json").stdout)[0]
        two = seen(2.0, 5.0)
        assert two["state"] == "running" and two["epochs"] == 9
        assert two["remaining_seconds"] == pytest.approx(5 + 12 * 20 / 24 + 12 * 15 / 24)
        assert not two["remaining_at_least"]
        one = seen(2.0)
        assert one["remaining_seconds"] == pytest.approx(4 + 6 * 20 / 24 + 6 * 15 / 24) and one["remaining_at_least"]
        assert "| ≥ 13 s |" in ilnas_here("status", str(run)).stdout
    finally:
        lock.release()


def test_status_tells_finished_running_and_interrupted_runs_apart(finished_run, finished_training, tmp_path):
    out = tmp_path / "run"
    proc = ilnas(*MICRO, "--set", "search.epochs=50", "--out", str(out), wait=False)
    deadline = time.time() + 300
    while not (out / PREVIOUS).exists():  # two epochs checkpointed
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.02)
    running = json.loads(ilnas_here("status", str(out), "--json").stdout)[0]
    assert running["state"] == "running" and running["holder"].startswith(f"pid {proc.pid} on ")
    assert running["epochs"] == 50 and running["epochs_done"] >= 1 and running["remaining_seconds"] > 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "epo')  # a line the kill cut short
    before = snapshot(out)
    r = ilnas_here("status", str(finished_run), str(finished_training), str(out), "--json")
    assert r.returncode == 0, r.stderr
    rows = {Path(row["run"]).name: row for row in json.loads(r.stdout)}
    search, training, stopped = rows[finished_run.name], rows[finished_training.name], rows["run"]
    assert (search["state"], search["epochs_done"], search["epochs"], search["sessions"]) == ("finished", 3, 3, 1)
    assert search["last"].startswith("val acc mnist5k ") and search["remaining_seconds"] is None
    assert (training["kind"], training["state"], training["epochs_done"]) == ("training", "finished", 3)
    assert training["last"].startswith("test top-1 ")
    assert stopped["state"] == "interrupted" and stopped["holder"] is None and stopped["remaining_seconds"] is None
    assert stopped["checkpoint"]["file"] == "checkpoint.pt" and stopped["checkpoint"]["steps"] == 0
    assert stopped["checkpoint"]["epochs"] in (stopped["epochs_done"], stopped["epochs_done"] - 1)  # killed between
    assert search["checkpoint"] is None and 0 <= running["checkpoint"]["age_seconds"] < 300
    assert running["checkpoint"]["epochs"] >= 2 and running["checkpoint"]["damaged_latest"] is None
    table = ilnas_here("status", str(tmp_path)).stdout
    assert "| interrupted |" in table and table.count("\n") == 3  # one run: no tally
    tally = ilnas_here("status", str(finished_run), str(finished_training), str(out)).stdout.splitlines()
    assert tally[-1] == "3 runs: 2 finished, 1 interrupted" and tally[-2] == "", tally
    assert snapshot(out) == before  # status only reads
    r = ilnas_here("plot", str(out))  # the report leaves the torn line out too
    assert r.returncode == 0 and (out / "report.html").is_file(), r.stderr
    (out / "checkpoint.pt").write_bytes(b"torn")  # --resume would continue from the previous one: so says status
    code, table, _ = call("status", str(out))
    assert code == 0 and f"| {stopped['checkpoint']['epochs'] - 1} ep, " in table and " (previous file) |" in table


def test_status_says_for_how_many_epochs_a_search_has_kept_its_cell(finished_run, tmp_path):
    """Its 3 epochs made DARTS_V1, then DARTS_V2 twice (listed the other way round the second time: the same cell):
    the cell has stayed for 2 epochs. An epoch's cell that cannot be read leaves the count out, not the run."""
    from helpers import listed_the_other_way
    from ilnas.space.genotype import zoo

    run = shutil.copytree(finished_run, tmp_path / "run")
    v1, v2 = zoo()["DARTS_V1"], zoo()["DARTS_V2"]
    cells = iter(g.to_string() for g in (v1, v2, listed_the_other_way(v2)))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [{**r, "genotype": next(cells)} if r["kind"] == "epoch" else r for r in records]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, err = call("status", str(run), "--json")
    assert code == 0 and json.loads(out)[0]["cell_unchanged_epochs"] == 2, err
    assert "; same cell 2 ep |" in call("status", str(run))[1]
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().replace("Genotype(", "Genotype([", 1))
    code, out, err = call("status", str(run), "--json")
    assert code == 0 and json.loads(out)[0]["cell_unchanged_epochs"] is None, err
    assert "same cell" not in call("status", str(run))[1]


def test_status_lists_a_damaged_run_as_unreadable_and_refuses_a_directory_without_runs(tmp_path):
    r = ilnas_here("status", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip() == f"ilnas: error: no ilnas runs in {tmp_path}"
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "config.yaml").write_text("kind: search\n")  # hand-edited: no settings
    (tmp_path / "damaged" / "provenance.json").write_text("{not json")
    r = ilnas_here("status", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)
    assert row["state"].startswith("unreadable: ") and "provenance.json cannot be read as JSON" in row["state"]


def test_status_of_a_local_sweep_says_how_long_its_runs_to_go_should_take(finished_run, finished_training, tmp_path):
    """A sweep of three cells (a search and a training each), two at a time, the first cell finished in 60 s and
    20 s: the four runs to go take (2 x 60 + 2 x 20) / 2 = 80 s. Without a finished training to time the trainings
    by, the searches alone give a lower bound; a sweep that has ended says nothing more."""
    def finished(source: Path, run: Path, seconds: int) -> None:
        shutil.copytree(source, run)
        record = json.loads((run / "provenance.json").read_text())
        record["sessions"] = [{**record["sessions"][0], "start": "2026-01-01T00:00:00+00:00",
                               "end": f"2026-01-01T00:{seconds // 60:02d}:{seconds % 60:02d}+00:00"}]
        (run / "provenance.json").write_text(json.dumps(record))

    finished(finished_run, tmp_path / "seed-0" / "search", 60)
    finished(finished_training, tmp_path / "seed-0" / "train-digits", 20)
    cells = [{"cell": f"seed-{i}", "runs": {"search": "pending", "train-digits": "pending"}} for i in range(3)]
    record = {"final": False, "executor": "local", "parallel": 2, "cells": cells}
    (tmp_path / "sweep.json").write_text(json.dumps(record))
    lines = ilnas_here("status", str(tmp_path)).stdout.splitlines()
    assert lines[-2:] == ["6 runs: 4 not started, 2 finished",
                          f"{tmp_path}: 4 runs to go, about 80 s at 2 at a time"]
    shutil.rmtree(tmp_path / "seed-0" / "train-digits")
    lines = ilnas_here("status", str(tmp_path)).stdout.splitlines()
    assert lines[-1] == f"{tmp_path}: 5 runs to go, at least 60 s at 2 at a time"
    (tmp_path / "sweep.json").write_text(json.dumps({**record, "final": True}))
    assert ilnas_here("status", str(tmp_path)).stdout.splitlines()[-1] == "6 runs: 5 not started, 1 finished"


def test_status_of_a_sweep_lists_the_runs_its_record_names_before_they_start(tmp_path):
    """A sweep just started (its sweep.json written, no run yet) is all "not started"; a torn record is left aside
    (the runs on disk are still listed) and a directory without runs then refused as without one."""
    cells = [{"cell": "seed-0", "labels": {"search.seed": "0"},
              "runs": {"search": "pending", "train-digits": "pending"}},
             {"cell": "bad", "runs": ["search"]}, "torn"]
    (tmp_path / "sweep.json").write_text(json.dumps({"final": False, "cells": cells}))
    r = ilnas_here("status", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    assert [(r["run"], r["kind"], r["state"]) for r in json.loads(r.stdout)] == [
        (str(tmp_path.resolve() / "seed-0" / "search"), "search", "not started"),
        (str(tmp_path.resolve() / "seed-0" / "train-digits"), "training", "not started")]
    assert ilnas_here("status", str(tmp_path)).stdout.splitlines()[-1] == "2 runs: 2 not started"
    (tmp_path / "sweep.json").write_text('{"cells": [')
    r = ilnas_here("status", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip() == f"ilnas: error: no ilnas runs in {tmp_path}"
