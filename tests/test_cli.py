"""End to end through the command line: a short demo search, SIGKILL + resume, and every bad input."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import yaml

from helpers import SEARCH3, SHORT_SEARCH, TINY_TRAIN, call, ilnas_here, snapshot
from ilnas.config import list_presets, load_preset, resolve, to_dict
from ilnas.errors import IlnasError
from ilnas.space.genotype import parse_genotype

SHORT = SHORT_SEARCH


def test_short_demo_search_writes_a_complete_run(finished_run):
    files = {p.name for p in finished_run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "checkpoint.pt", "genotype.json", "genotype.txt", "arch_history.npz",
            "summary.json", "tb"} <= files
    records = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(steps) == 6 and len(epochs) == 3
    assert list(steps[0]["train_loss"]) == ["r1/mnist5k", "r1/digits", "r2/mnist5k", "r2/digits"]  # S = 4 stages
    assert list(steps[0]["val_loss"]) == ["mnist5k", "digits"]  # the final round's K = 2 learners
    history = np.load(finished_run / "arch_history.npz")
    assert history["p0/normal_ops"].shape == (14, 4) and history["edges"][2] == "c_{k-2} -> 1"
    assert set(epochs[-1]["val_acc"]) == {"mnist5k", "digits"}
    assert epochs[0]["alpha_entropy"]["normal"] > epochs[-1]["alpha_entropy"]["normal"] - 1e-3
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["genotype"] == (finished_run / "genotype.txt").read_text().strip()
    assert any((finished_run / "tb").iterdir())
    # the found genotype feeds straight into describe
    r = ilnas_here("describe", str(finished_run), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["params"] > 1e6


def test_a_search_space_of_other_operations_is_searched_and_its_cell_re_trained(tmp_path):
    """space.ops: the two extra operations of the official code among DARTS's; the architecture weights have a
    column per operation, the cell holds none other and is re-trained, and the run's configuration records the
    space."""
    ops = ["none", "skip_connect", "sep_conv_7x7", "conv_7x1_1x7"]
    out = tmp_path / "s"
    code, stdout, err = call(*SEARCH3, "--set", f"space.ops=[{','.join(ops)}]", "--set", "search.epochs=1",
                             "--out", str(out))
    assert code == 0, err
    with np.load(out / "arch_history.npz") as history:
        assert history["p0/alphas_normal"].shape == (1, 14, 4)
    found = parse_genotype((out / "genotype.txt").read_text())
    assert {op for op, _ in found.normal + found.reduce} <= set(ops[1:])
    assert yaml.safe_load((out / "config.yaml").read_text())["space"]["ops"] == ops
    code, stdout, err = call("train", "--genotype", str(out), "--preset", "eval-digits", *TINY_TRAIN, "--set",
                             "train.epochs=1", "--out", str(tmp_path / "t"))
    assert code == 0, err
    card = json.loads((tmp_path / "t" / "model.json").read_text())
    assert parse_genotype(card["genotype"]) == found


PLUGIN = """
import torch
import ilnas


@ilnas.register_op("conv_1x1")
def conv_1x1(c, stride, affine, sets=1):
    return torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(sets * c, sets * c, 1, stride, groups=sets, bias=False),
                               torch.nn.BatchNorm2d(sets * c, affine=affine, track_running_stats=affine))
"""


def test_operations_of_ones_own_come_in_through_ilnas_plugins(tmp_path, monkeypatch):
    """A module that ILNAS_PLUGINS names is imported before the command: its operation can be searched, and a run
    that uses it is read back (describe) where the module is named, and refused in one line where it is not; a
    module that cannot be imported stops any command in one line."""
    from ilnas.space import layout, ops as ops_module

    monkeypatch.setattr(ops_module, "OPS", dict(ops_module.OPS))  # the registration ends with the test
    monkeypatch.setattr(layout, "_REGISTERED", dict(layout._REGISTERED))
    (tmp_path / "my_ops.py").write_text(PLUGIN)
    (tmp_path / "broken_ops.py").write_text("raise ValueError('no such device')\n")
    (tmp_path / "script_ops.py").write_text("import sys\nsys.exit(0)\n")  # a script named by mistake
    monkeypatch.syspath_prepend(str(tmp_path))
    search = [*SEARCH3, "--set", "space.ops=[none,skip_connect,conv_1x1]", "--set", "search.epochs=1", "--out",
              str(tmp_path / "s")]
    code, _, err = call(*search)
    assert code == 2 and "space.ops: unknown operation 'conv_1x1'" in err and "ILNAS_PLUGINS names" in err, err
    monkeypatch.setenv("ILNAS_PLUGINS", " my_ops,")
    code, _, err = call(*search)
    assert code == 0, err
    with np.load(tmp_path / "s" / "arch_history.npz") as history:
        assert history["p0/alphas_reduce"].shape == (1, 14, 3)
    found = parse_genotype((tmp_path / "s" / "genotype.txt").read_text())
    assert {op for op, _ in found.normal + found.reduce} <= {"skip_connect", "conv_1x1"}
    assert call("describe", str(tmp_path / "s"))[0] == 0
    listed = call("presets")[1].splitlines()
    assert listed[-3].endswith("dil_conv_5x5, sep_conv_7x7, conv_7x1_1x7, conv_1x1")
    assert listed[-2] == "networks a re-training may build (network.style): cifar, imagenet"
    monkeypatch.setattr(layout, "_REGISTERED", {})  # another process, without the plugin
    code, _, err = call("describe", "Genotype(normal=[('conv_1x1', 0), ('skip_connect', 1)], normal_concat=[2], "
                                    "reduce=[('conv_1x1', 0), ('skip_connect', 1)], reduce_concat=[2])")
    assert code == 2 and "unknown operation 'conv_1x1'" in err and "ILNAS_PLUGINS names" in err
    run = tmp_path / "s"  # describe builds the network: refused, naming the record it read, not calling it damaged
    code, _, err = call("describe", str(run))
    assert code == 2 and err.startswith(f"ilnas: error: {run / 'genotype.json'}: unknown operation 'conv_1x1' "), err
    assert "ILNAS_PLUGINS names" in err and "malformed" not in err, err
    # plot and compare take the cells by their names: no plugin needed
    code, _, err = call("plot", str(run))
    assert code == 0 and "conv_1x1" in (run / "plots" / "cell_normal.svg").read_text(), err
    code, out, err = call("compare", str(run))
    assert code == 0 and "| DARTS-2nd | il |" in out, err
    monkeypatch.setenv("ILNAS_PLUGINS", "my_ops,broken_ops")
    assert call("presets") == (2, "", "ilnas: error: ILNAS_PLUGINS: cannot import broken_ops (ValueError: no such "
                                      "device)\n")
    monkeypatch.setenv("ILNAS_PLUGINS", "script_ops")
    assert call("presets") == (2, "", "ilnas: error: ILNAS_PLUGINS: cannot import script_ops (SystemExit: 0)\n")


def test_describe_says_how_many_choices_the_cell_shares_with_others(finished_training):
    """DARTS_V2 against DARTS_V1: 5 + 6 of 16 (counted by hand in tests/test_genotype.py); ``zoo`` stands for every
    published cell; a trained run is compared by its own cell; a cell of another size is one line."""
    code, out, err = call("describe", "DARTS_V2", "--against", "DARTS_V1", "--against", "zoo")
    assert code == 0, err
    assert "shares 11 of 16 (op, input) choices with DARTS_V1 (normal 5, reduce 6)" in out
    assert "shares 16 of 16 (op, input) choices with DARTS_V2 (normal 8, reduce 8)" in out and "PC_DARTS_image" in out
    trained = json.loads((finished_training / "model.json").read_text())["genotype"]
    code, out, err = call("describe", str(finished_training), "--against", trained, "--json")
    assert code == 0 and json.loads(out)["shared_with"] == {trained: {"normal": 8, "reduce": 8, "shared": 16, "of": 16}}
    one_node = "Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 1)], normal_concat=[2], " \
               "reduce=[('max_pool_3x3', 0), ('skip_connect', 1)], reduce_concat=[2])"
    assert call("describe", "DARTS_V2", "--against", one_node) == (
        2, "", "ilnas: error: cells of 4 and 1 nodes cannot be compared choice by choice\n")


def test_describe_of_a_training_run_gives_the_network_it_trained(finished_training):
    """Its parameter count is the one the run recorded (result.json), at its own width, depth and input; a
    preset or a --set describes the cell under that evaluation setting instead (CIFAR-10 by default)."""
    result = json.loads((finished_training / "result.json").read_text())
    code, out, err = call("describe", str(finished_training), "--json")
    assert code == 0, err
    own = json.loads(out)
    assert (own["params"], own["macs"], own["resolution"]) == (result["params"], result["macs"], 16)
    assert own["network"] == "cifar, 3 cells, C=4" and own["task"] == "mnist5k"
    code, out, err = call("describe", str(finished_training))  # well under a million: not "0M"
    assert code == 0 and f"multiply-adds: {own['macs'] / 1e6:.2g}M at 16x16" in out and own["macs"] < 1e6, err
    code, out, err = call("describe", str(finished_training), "--set", "network.layers=8", "--json")
    assert code == 0 and json.loads(out)["network"] == "cifar, 8 cells, C=36" and json.loads(out)["task"] == "cifar10"
    literal = (finished_training / "genotype.txt").read_text().strip()  # longer than a file name may be
    assert len(literal) > 255 and call("describe", literal)[0] == 0


BAD = [
    (["search", "--preset", "no-such-preset"], "unknown preset 'no-such-preset'; known: "),
    (["search", "--set", "search.no_such_key=1"], "unknown config key 'search.no_such_key'; valid keys in search: framework, method, rounds, epochs,"),
    (["search", "--set", "searchlam"], "malformed --set 'searchlam'"),
    (["search", "--set", "search.batch_size=0"], "search.batch_size must be positive"),
    (["search", "--set", "search.epochs=-3"], "search.epochs must be positive"),
    (["search", "--set", "engine.lam=-1"], "engine.lam (lambda) must be >= 0"),
    (["search", "--set", "engine.coupling=gd"], "coupling 'gd' with 2*lr*lambda = 5 >= 1"),
    (["search", "--set", "engine.order=3"], "order must be 1 or 2"),
    (["search", "--preset", "darts2nd-cifar10", "--set", "data.data_dir=__EMPTY__", "--set", "data.download=false",
      "--force"], "no cifar10 data in"),  # --force passes the run-dir check; the data must still fail first
    (["describe", "Genotype(normal=[('warp_conv', 0)])"], "malformed genotype"),
    (["describe", "NO_SUCH_CELL"], "unknown genotype 'NO_SUCH_CELL'"),
    (["search", "--bogus-flag"], "unrecognized arguments"),
    (["train", "--genotype", "__RUN__", "--out", "__RUN__", "--force", "--preset", "eval-digits"],
     "lies in --out"),  # --force would replace the search whose cell it re-trains
    (["train", "--genotype", "__RUN__/genotype.json", "--out", "__RUN__", "--force", "--preset", "eval-digits"],
     "lies in --out"),
    (["config", "--set", "data.tasks=[no_such_task]"], "unknown task 'no_such_task'; known: "),
    (["config", "demo", "--preset", "eval-digits"], "two presets given"),
    (["search", "--set", "space.ops=[none,conv_3x3]"], "space.ops: unknown operation 'conv_3x3'; known: none, "),
    (["search", "--set", "space.ops=[skip_connect,sep_conv_7x7,skip_connect]"], "space.ops names 'skip_connect' twice"),
    (["search", "--set", "space.ops=[none]"], "space.ops needs at least two operations, one of them other than none"),
    (["search", "--set", "space.ops=[[none],skip_connect]"], "space.ops[0] must be a string, got ['none']"),
    (["search", "--set", "pdarts.ops_per_edge=[8,5,x]"], "pdarts.ops_per_edge[2] must be an integer, got 'x'"),
    (["search", "--preset", "il-pdarts-demo", "--set", "space.ops=[none,skip_connect,sep_conv_7x7]"],
     "pdarts.ops_per_edge must start at 3 (the operations of space.ops)"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a[:3]) for a, _ in BAD])
def test_bad_input_gives_one_line_and_exit_2_and_leaves_the_run_untouched(finished_run, tmp_path, args, message):
    before = snapshot(finished_run)
    args = [a.replace("__EMPTY__", str(tmp_path)).replace("__RUN__", str(finished_run)) for a in args]
    if args[0] == "search":
        args = [*args, "--out", str(finished_run)]
    rc, _, err = call(*args)  # in this process: what the ilnas process prints is tested elsewhere
    assert rc == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert snapshot(finished_run) == before


def test_a_path_too_long_for_the_filesystem_is_refused_in_one_line_by_every_command(finished_training, tmp_path):
    """pathlib raises where the system cannot look a name up (ENAMETOOLONG; EACCES on a parent), where an absent
    path is merely False: every path a user gives is looked up first."""
    name = "y" * 300  # past NAME_MAX (255) on every common filesystem
    run = str(finished_training)
    commands = [
        ["train", "--genotype", name, "--preset", "eval-digits", "--out", str(tmp_path / "t")],
        ["search", "--preset", "demo", "--out", name], ["search", "--preset", "demo", "--out", f"{tmp_path}/new/{name}"],
        ["search", "--preset", "demo", "--set", f"data.tasks=[imagefolder:{name}]", "--out", str(tmp_path / "s")],
        ["train", "--genotype", "DARTS_V2", "--preset", "eval-imagefolder", "--set", f"data.tasks=[imagefolder:{name}]",
         "--out", str(tmp_path / "t")],
        ["status", name], ["compare", name], ["plot", name], ["describe", name], ["evaluate", name, "--data", "digits"],
        ["evaluate", run, "--data", name], ["predict", name, "x.png"], ["predict", run, name],
        ["export", name, "--format", "torchscript"], ["export", run, "--format", "torchscript", "--out", name],
        ["evaluate", run, "--data", "digits", "--out", f"{tmp_path}/{name}"], ["config", name]]
    for argv in commands:
        rc, _, err = call(*argv)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert ("cannot be" if argv[0] != "config" else "unknown preset") in err, (argv, err)
        assert name not in err and " characters)" in err, err  # the name shortened
    assert not any(tmp_path.iterdir())


def test_input_nested_too_deeply_for_the_parsers_is_refused_in_one_line(finished_run, finished_training, tmp_path):
    """YAML and JSON nested deeper than Python's recursion limit: the parsers raise a RecursionError, no
    parse error, which gave a traceback wherever a configuration, sweep spec or run record is read."""
    deep = "[" * 100_000
    (tmp_path / "deep.yaml").write_text(f"search: {deep}")
    (tmp_path / "spec.yaml").write_text(f"grid: {deep}")
    runs = {}
    for name, source, damaged, text in [("config", finished_run, "config.yaml", f"kind: search\nsearch: {deep}"),
                                        ("summary", finished_run, "summary.json", deep),
                                        ("card", finished_training, "model.json", deep)]:
        runs[name] = tmp_path / name
        shutil.copytree(source, runs[name])
        (runs[name] / damaged).write_text(text)
    cases = [(["search", "--preset", "demo", "--set", f"search.seed={deep}", "--out", str(tmp_path / "r")],
              "the value is not valid YAML"),
             (["search", "--config", str(tmp_path / "deep.yaml"), "--out", str(tmp_path / "r")], "nested too deeply"),
             (["sweep", str(tmp_path / "spec.yaml")], "nested too deeply"),
             (["search", "--resume", "--out", str(runs["config"])], "config.yaml cannot be read as YAML"),
             (["compare", str(runs["summary"])], "summary.json cannot be read as JSON (nested too deeply"),
             (["predict", str(runs["card"]), "x.png"], "model.json")]
    for argv, message in cases:
        rc, _, err = call(*argv)
        assert rc == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)


def _closing(*fds: int):
    return lambda: [os.close(fd) for fd in fds]


def test_a_process_started_with_its_standard_streams_closed_runs_and_speaks_where_it_can(tmp_path):
    """As some daemons and schedulers start processes: with stdin, stdout and stderr closed a search runs
    to its end (nothing it opens takes descriptor 1 or 2), and with stdout closed a refusal still reaches
    stderr in one line."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "ilnas", "search", "--preset", "demo", *SHORT_SEARCH, "--set", "search.epochs=1",
            "--set", "search.steps_per_epoch=1", "--out", str(out)]
    r = subprocess.run(argv, preexec_fn=_closing(0, 1, 2), timeout=600)
    assert r.returncode == 0 and (out / "summary.json").is_file()
    r = subprocess.run([sys.executable, "-m", "ilnas", "describe", "NO_SUCH_CELL"], stderr=subprocess.PIPE,
                       text=True, preexec_fn=_closing(0, 1), timeout=600)
    assert r.returncode == 2 and r.stderr.startswith("ilnas: error: unknown genotype 'NO_SUCH_CELL'")
    assert len(r.stderr.splitlines()) == 1, r.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_output_that_cannot_be_written_is_one_line_and_a_failed_exit():
    """``ilnas presets > file`` on a full disk: one line naming the cause and exit code 3, where a traceback
    came from the print that failed (and, had that been caught, another from the interpreter's last flush)."""
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "ilnas", "presets"], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=600)
    assert (r.returncode, r.stderr) == (3, "ilnas: error: cannot write to standard output (No space left on "
                                           "device)\n")


class _DiskFilling(io.StringIO):
    """A standard output whose disk is full once it holds ``room`` characters."""

    def __init__(self, room: int):
        super().__init__()
        self.room = room

    def write(self, text: str) -> int:
        if self.tell() + len(text) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(text)


def test_a_run_whose_output_fills_its_disk_goes_on_to_its_end_having_said_so_once(tmp_path):
    """Epoch lines that can no longer be written do not stop a run: one warning, the run finishes (its lines
    are in metrics.jsonl) and exits 0, where each line had printed logging's traceback and the end a crash."""
    out = tmp_path / "run"
    code, printed, err = call("search", "--preset", "darts2nd-cifar10", "--set", "data.tasks=[digits]", *SHORT_SEARCH,
                              "--set", "search.steps_per_epoch=1", "--set", "search.epochs=2", "--out", str(out),
                              stdout=_DiskFilling(room=len(f"run directory: {out}\n") + 10))
    assert code == 0 and (out / "summary.json").is_file(), err
    assert printed == f"run directory: {out}\n"
    assert err.splitlines() == ["ilnas: warning: cannot write to standard output (No space left on "
                                              "device); the run goes on without it (metrics.jsonl holds its lines)"]


def test_an_empty_argument_is_refused_rather_than_read_as_here_or_as_not_given(finished_training, tmp_path,
                                                                               monkeypatch):
    """'' (an unset shell variable, most often): `evaluate --out ""` wrote its four files into the current
    directory, `--html ""` and `describe --preset ""` counted as not given, and a run or image named '' was looked
    for here."""
    monkeypatch.chdir(tmp_path)
    run = str(finished_training)
    for argv, name in [(["evaluate", run, "--data", "digits", "--out", ""], "--out"),
                       (["evaluate", " ", "--data", "digits"], "RUN"), (["compare", run, "--html", ""], "--html"),
                       (["describe", "DARTS_V2", "--preset", ""], "--preset"), (["predict", run, ""], "IMAGE"),
                       (["sweep", ""], "SPEC"), (["train", "--genotype", "", "--check"], "--genotype")]:
        code, printed, err = call(*argv)
        assert (code, printed, err) == (2, "", f"ilnas: error: {name} is empty (an unset shell variable?)\n"), argv
    assert not any(tmp_path.iterdir())


def test_output_the_terminal_cannot_encode_is_escaped(tmp_path):
    """A run's path (or a class name) outside the terminal's encoding: escaped, as stderr does, where printing
    the status table raised a UnicodeEncodeError."""
    (tmp_path / "café").mkdir()
    (tmp_path / "café" / "config.yaml").write_text("kind: search\n")
    (tmp_path / "café" / "provenance.json").write_text('{"sessions": []}')
    r = subprocess.run([sys.executable, "-m", "ilnas", "status", str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONIOENCODING": "ascii"}, timeout=600)
    assert r.returncode == 0 and f"{tmp_path}/caf\\xe9" in r.stdout, r.stderr


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 but MASTER_ADDR is not set: start the ranks with torchrun"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a rank index or count"),
    ({"WORLD_SIZE": "1", "RANK": "5"}, "RANK=5 with WORLD_SIZE=1 is no rank of the job"),
    ({"RANK": "-1"}, "RANK='-1' is not a rank index or count")])
def test_torchrun_variables_that_describe_no_job_are_refused_before_anything_is_written(tmp_path, monkeypatch, env,
                                                                                        message):
    """Left over in a shell or set by hand: a traceback each, or (RANK past WORLD_SIZE) an empty batch slice."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for argv in (["search", "--preset", "demo"], ["train", "--genotype", "DARTS_V2", "--preset", "eval-digits"]):
        rc, _, err = call(*argv, "--out", str(tmp_path / "run"))
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


WAITER = "from ilnas import distributed; distributed.WAIT_NOTE_S = 0.2; distributed.start('cpu')"


@pytest.mark.parametrize("rank", ["0", "1"], ids=["the store's host", "a rank that connects"])
def test_a_rank_whose_peers_never_come_says_so_while_it_waits(rank):
    """torchrun's variables left in a shell: the rank waited out torch's half-hour timeout without a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-c", WAITER], env=env, stderr=subprocess.PIPE, text=True)
    notes: list[str] = []

    def read() -> None:
        for line in proc.stderr:  # torch may warn first (a refused connection, say)
            if line.startswith("ilnas:"):
                notes.append(line)
                return
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(120)
    waiting = proc.poll() is None
    proc.kill()
    proc.wait()
    assert waiting and notes == [f"ilnas: rank {rank} of 2 is still waiting for the other ranks at 127.0.0.1:{port} "
                                 f"(RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the environment: unset "
                                 f"them to run one process)\n"], notes


def test_a_run_directory_whose_path_is_not_utf8_is_refused_before_anything_is_written(tmp_path):
    """A name in another encoding (a Latin-1 byte, as Python passes it: a surrogate escape): TensorBoard's
    writer cannot open a file there, after the run directory was made. Nothing is printed but the refusal (a
    search had named the run directory first)."""
    out = str(tmp_path / "caf\udce9")
    for argv in (["search", "--preset", "demo"], ["train", "--genotype", "DARTS_V2", "--preset", "eval-digits"]):
        rc, printed, err = call(*argv, "--out", out)
        assert rc == 2 and err == f"ilnas: error: the run directory's path {out!r} is not valid UTF-8; choose " \
                                  f"another --out\n", err
        assert printed == ""
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may search any directory")
def test_a_path_below_a_directory_that_may_not_be_searched_is_refused_in_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        rc, _, err = call("status", str(locked / "run"))
    finally:
        locked.chmod(0o755)
    assert rc == 2 and err == f"ilnas: error: run path {locked / 'run'} cannot be looked up (Permission denied)\n"


def test_a_finished_run_is_not_overwritten_without_force(finished_run):
    before = snapshot(finished_run)
    r = ilnas_here("search", "--out", str(finished_run), *SHORT)
    assert r.returncode == 2 and "already holds a finished run; pass --force" in r.stderr
    r = ilnas_here("search", "--out", str(finished_run), "--resume")
    assert r.returncode == 2 and "finished run" in r.stderr
    assert snapshot(finished_run) == before


def test_a_head_that_does_not_match_its_task_is_refused():
    from torch import nn

    from ilnas.search.task_net import FunctionalTaskNet
    from ilnas.space.supernet import Supernet

    enc = Supernet(1, 2, 3)
    with pytest.raises(IlnasError, match="task head gives 7 outputs but the task has 10 classes"):
        FunctionalTaskNet(enc, nn.Linear(enc.out_features, 7), 10)


@pytest.mark.parametrize("name", list(list_presets()))
def test_every_preset_runs_the_values_its_files_state(name):
    """What a preset's file (and each base preset it names) writes is what runs: nothing lies over it."""
    kind = "eval" if name.startswith("eval-") else "search"
    resolved = to_dict(resolve(name, kind=kind))
    assert resolved["description"] and resolved["kind"] == kind
    chain, stated = [load_preset(name)], {}
    while "base" in chain[-1]:
        chain.append(load_preset(chain[-1]["base"]))
    for layer in reversed(chain):  # the base first; the preset's own values last
        for section, values in layer.items():
            if isinstance(values, dict):
                stated.update({(section, key): value for key, value in values.items()})
    assert stated
    for (section, key), value in stated.items():
        assert resolved[section][key] == value, f"{name}: {section}.{key}"


def test_config_prints_what_a_preset_resolves_to(capsys):
    from ilnas import cli

    assert cli.main(["config", "il-pdarts-cifar", "--set", "engine.lam=10"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(resolve("il-pdarts-cifar", overrides=["engine.lam=10"]))
    assert (printed["search"]["epochs"], printed["search"]["batch_size"], printed["engine"]["lam"]) == (50, 64, 10.0)
    assert cli.main(["config", "eval-digits"]) == 0 and "kind: eval" in capsys.readouterr().out
    assert cli.main(["config", "--preset", "eval-digits"]) == 0 and "kind: eval" in capsys.readouterr().out


def test_paper_preset_settings():
    cfg = resolve("il-darts2nd-cifar")
    s, o, a = cfg.search, cfg.optimizer, cfg.arch_optimizer
    assert cfg.data.tasks == ("cifar100", "cifar10") and s.rounds == 2 and cfg.engine.lam == 100.0
    assert cfg.engine.order == 2 and (s.batch_size, s.epochs) == (64, 50)
    assert (o.lr, o.lr_min, o.schedule, o.momentum, o.weight_decay, o.grad_clip) == (0.025, 0.001, "cosine", 0.9, 3e-4, 5.0)
    assert (a.lr, a.betas, a.weight_decay) == (3e-4, (0.5, 0.999), 1e-3)
    assert (cfg.space.channels, cfg.space.layers) == (16, 8)


@pytest.mark.parametrize("name", [n for n in list_presets() if not n.startswith("eval-")])
def test_one_key_set_in_a_section_changes_that_key_only(name):
    """--set optimizer.lr on a preset that leaves the optimizer section at the search's defaults used to rebuild
    the section from the class's defaults: lr_min fell from the search's 0.001 to 0, silently."""
    before = to_dict(resolve(name))
    after = to_dict(resolve(name, overrides=["optimizer.lr=0.5", "arch_optimizer.lr=0.5", "data.data_dir=x"]))
    for section, key in (("optimizer", "lr"), ("arch_optimizer", "lr"), ("data", "data_dir")):
        before[section][key] = after[section][key]
    assert after == before


def test_a_section_of_an_eval_config_file_keeps_the_eval_defaults_it_does_not_name(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("kind: eval\ndata: {data_dir: /somewhere}\n")
    assert resolve(None, str(f), kind="eval").data.tasks == ("cifar10",)  # not the search's embedded tasks
    assert resolve("demo", overrides=["optimizer.momentum=0.5"]).optimizer.lr_min == 0.001

def test_a_set_setting_the_run_never_reads_is_warned_of(tmp_path, monkeypatch):
    """space.layers of a P-DARTS search used to be taken in silence: its phases read pdarts.layers."""
    code, out, err = call("config", "pdarts-cifar10", "--set", "space.layers=20", "--set", "optimizer.gamma=0.5",
                          "--set", "engine.lam=3", "--set", "pdarts.max_skips=1", "--set", "search.epochs=30")
    assert code == 0 and yaml.safe_load(out)["space"]["layers"] == 20
    assert err.splitlines() == [
        "ilnas: warning: --set space.layers changes nothing: P-DARTS takes each phase's cells from pdarts.layers",
        "ilnas: warning: --set optimizer.gamma changes nothing: the cosine schedule does not read it",
        "ilnas: warning: --set engine.lam changes nothing: a single stage has none before it to couple to"]
    taken = tmp_path / "file"
    taken.write_text("mine")
    code, _, err = call("search", "--set", "engine.order=1", "--set", "engine.fd_eps=0.1", "--out", str(taken))
    assert code == 2 and err.splitlines()[0] == ("ilnas: warning: --set engine.fd_eps changes nothing: a first-order "
                                                 "hypergradient takes no Hessian-vector product")
    assert call("config", "--set", "engine.lam=3", "--set", "optimizer.lr_min=0.01")[2] == ""
    monkeypatch.setenv("RANK", "1")  # under torchrun, rank 0 alone says it
    assert call("config", "--set", "pdarts.max_skips=1")[2] == ""

def test_help_version_and_presets_start_without_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom ilnas import cli\n"
            "for argv in (['--help'], ['--version'], ['search', '--help']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "cli.main(['presets'])\nprint('torch loaded:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch loaded: False" in r.stdout and "ilnas 0.1.0" in r.stdout and "il-darts2nd-cifar" in r.stdout
    import ilnas

    assert ilnas.Genotype is ilnas.__getattr__("Genotype") and "run_search" in dir(ilnas)


def test_config_and_refused_settings_answer_without_torch(tmp_path):
    """`ilnas config` of every preset, a sweep's --dry-run, and a search or training whose settings are refused,
    answer in a fraction of a second: the checks of the configuration (the engine's, the methods', the task names)
    need no torch."""
    import subprocess
    import sys

    from ilnas.config import list_presets

    spec = tmp_path / "spec.yaml"
    spec.write_text("out: sweep\nsearch: {preset: demo}\ngrid: {search.seed: [0, 1], engine.lam: [1, 10]}\n"
                    "train: {preset: eval-digits, tasks: [digits, mnist5k]}\n")

    refused = {("search", "--set", "search.roundz=0"): "unknown config key 'search.roundz'",
               ("search", "--set", "engine.hvp=nope"): "unknown hvp 'nope'; choose from exact, fd",
               ("search", "--set", "engine.coupling=gd", "--set", "engine.lam=1e9"): "coupling 'gd' with 2*lr*lambda",
               ("search", "--set", "engine.coupling=glue"): "unknown coupling 'glue'; choose from none, prox, gd",
               ("search", "--set", "search.method=nope"): "search.method must be darts or pdarts",
               ("search", "--set", "engine.val_weights=[0,0]"): "engine.val_weights are all 0",
               ("search", "--set", "data.tasks=[nosuch]"): "unknown task 'nosuch'",
               ("search", "--resume", "--out", "gone"): "nothing to resume",
               ("train", "--genotype", "NO_SUCH"): "unknown genotype 'NO_SUCH'",
               ("train", "--genotype", "DARTS_V2", "--set", "data.tasks=[nosuch]"): "unknown task 'nosuch'",
               ("config", "--set", "search.rounds=0"): "search.rounds must be positive"}
    code = ("import sys\nfrom ilnas import cli\n"
            f"for preset in {sorted(list_presets())}:\n"
            "    assert cli.main(['config', '--preset', preset]) == 0, preset\n"
            "assert cli.main(['sweep', 'spec.yaml', '--dry-run']) == 0\n"
            f"for argv in {list(refused)}:\n"
            "    assert cli.main(list(argv)) == 2, argv\n"
            "print('torch loaded:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "torch loaded: False" and "4 cells (12 runs, 0 finished)" in r.stdout
    errors = r.stderr.splitlines()
    assert len(errors) == len(refused) and all(e.startswith("ilnas: error: ") for e in errors)
    assert all(m in e for m, e in zip(refused.values(), errors)), errors
    assert list(tmp_path.iterdir()) == [spec]


def test_commands_of_a_trained_model_refuse_a_run_that_holds_none_without_torch(tmp_path, finished_run,
                                                                              finished_training):
    """evaluate, predict, export and describe given a run that holds no trained model (no directory, a search run,
    a training without the weights asked for, a damaged card), data that is no task, an unknown genotype, image
    files that are not there, or an --out or --data-dir they cannot use answer before torch loads."""
    unfinished, damaged = tmp_path / "unfinished", tmp_path / "damaged"
    for run in (unfinished, damaged):
        shutil.copytree(finished_training, run)
    (unfinished / "model.safetensors").unlink()
    (damaged / "model.json").write_text('{"format": "ilnas-model/1", "genotype": "DARTS_V2"}')
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "model.pt2").write_bytes(b"someone's own")
    (tmp_path / "mine" / "confusion.png").write_bytes(b"someone's own")
    (tmp_path / "fruit" / "apple").mkdir(parents=True)
    before = snapshot(tmp_path)
    trained = str(finished_training)
    refused = {("evaluate", "gone", "--data", "digits"): "no run directory gone",
               ("predict", str(finished_run), "x.png"): f"{finished_run} holds no model.json: not a training run",
               ("export", str(unfinished), "--format", "onnx"): f"{unfinished} holds no model.safetensors yet (written when the run "
                                            f"finishes)",
               ("evaluate", str(damaged), "--data", "digits", "--weights", "best"):
                   f"{damaged / 'model.json'} is not an ilnas model card",
               ("evaluate", str(finished_training), "--data", "nosuch"):
                   "--data 'nosuch' is neither a folder nor a task",
               ("describe", "NO_SUCH"): "unknown genotype 'NO_SUCH'",
               ("describe", "DARTS_V2", "--against", "NOR_THIS"): "unknown genotype 'NOR_THIS'",
               ("predict", trained, "cat.jpg"): "no image file cat.jpg",
               ("predict", trained, "mine"): "no image file mine; it is a folder",
               ("predict", trained, "cat.jpg", "--top-k", "0"): "top-k and the batch size must be positive",
               ("predict", trained, "cat.jpg", "--device", "gpu"): "device must be auto, cpu, cuda or cuda:N",
               ("export", trained, "--format", "torchscript", "--out", "m.json"): "ends in .json",
               ("export", trained, "--format", "torchscript", "--out", f"{trained}/m.pt"): "beside the run's own files",
               ("export", trained, "--format", "exported-program", "--out", "mine"):
                   "mine/model.pt2 exists and is no earlier ilnas export",
               ("evaluate", trained, "--data", "digits", "--out", "mine"): "holds confusion.png and no earlier",
               ("evaluate", trained, "--data", "digits", "--data-dir", "nowhere"): "--data-dir 'nowhere' is no "
                                                                                   "directory",
               ("evaluate", trained, "--data", "mine"): "mine holds no class folders",
               ("evaluate", trained, "--data", "fruit"): "fruit has classes the model does not know (apple)"}
    code = ("import sys\nfrom ilnas import cli\n"
            f"for argv in {list(refused)}:\n"
            "    assert cli.main(list(argv)) == 2, argv\n"
            "print('torch loaded:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "torch loaded: False", r.stderr
    errors = r.stderr.splitlines()
    assert len(errors) == len(refused) and all(m in e for m, e in zip(refused.values(), errors)), errors
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "fruit", "mine", "unfinished"]


def test_the_names_configuration_checks_are_those_the_engine_and_methods_run():
    from ilnas.config.schema import SEARCH_METHODS
    from ilnas.search.config import COUPLING_MODES, HVP_METHODS
    from ilnas.search.coupling import COUPLINGS
    from ilnas.search.hvp import HVPS
    from ilnas.search.methods import METHODS

    assert sorted(HVPS) == sorted(HVP_METHODS) and tuple(COUPLINGS) == COUPLING_MODES
    assert tuple(METHODS) == SEARCH_METHODS


def test_status_and_compare_of_finished_runs_read_them_without_torch(finished_run, finished_training):
    """They read records only: on a cluster's login node importing torch takes seconds (1.3 s and 650 MB here)."""
    import subprocess
    import sys

    runs = [str(finished_run), str(finished_training)]
    code = ("import sys\nfrom ilnas import cli\n"
            f"assert cli.main(['status', *{runs}]) == 0 and cli.main(['compare', *{runs}]) == 0\n"
            "print('torch loaded:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch loaded: False" in r.stdout and "| finished |" in r.stdout and "| DARTS-2nd | il |" in r.stdout


def test_a_config_file_may_name_a_base_preset(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: il-darts2nd-cifar\nengine: {lam: 10}\n")
    cfg = resolve(None, str(f))
    assert cfg.engine.lam == 10.0 and cfg.data.tasks == ("cifar100", "cifar10") and cfg.search.batch_size == 64
    with pytest.raises(IlnasError, match="names a base preset; drop --preset"):
        resolve("demo", str(f))
    f.write_text("base: [1]\n")
    with pytest.raises(IlnasError, match="is not a preset name"):
        resolve(None, str(f))
    f.write_text("base: no-such-preset\n")
    with pytest.raises(IlnasError, match="unknown preset 'no-such-preset'"):
        resolve(None, str(f))


def test_check_runs_every_check_a_run_makes_and_writes_nothing(finished_run, finished_training, tmp_path):
    """``--check`` (a job tried before it is queued): a search or training that would start, replace or continue a
    run says so and writes nothing; whatever a run would refuse, it refuses, in the same one line."""
    out = tmp_path / "new"
    code, stdout, err = call(*SEARCH3, "--check", "--out", str(out))
    assert (code, stdout) == (0, f"checked: the run would start {out}; nothing was written\n"), err
    assert not out.exists()
    interrupted = tmp_path / "interrupted"
    shutil.copytree(finished_run, interrupted)
    (interrupted / "summary.json").unlink()
    for run, args, what in ((finished_run, ("--force",), "replace the run in"),
                            (interrupted, ("--resume",), "continue the run in")):
        before = snapshot(run)
        code, stdout, err = call(*(SEARCH3 if "--force" in args else ["search"]), *args, "--check", "--out", str(run))
        assert (code, stdout) == (0, f"checked: the run would {what} {run}; nothing was written\n"), err
        assert snapshot(run) == before
    code, _, err = call(*SEARCH3, "--check", "--out", str(finished_run))
    assert code == 2 and "already holds a finished run; pass --force" in err
    code, _, err = call(*SEARCH3, "--set", "space.channels=100000", "--check", "--out", str(out))
    assert code == 2 and err.startswith("ilnas: error: the supernet's weights (") and not out.exists(), err
    code, stdout, err = call("train", "--genotype", "DARTS_V2", "--preset", "eval-digits", *TINY_TRAIN, "--check",
                             "--out", str(tmp_path / "t"))
    assert (code, stdout) == (0, f"checked: the run would start {tmp_path / 't'}; nothing was written\n"), err
    assert not (tmp_path / "t").exists()
    code, _, err = call("train", "--genotype", "DARTS_V2", "--preset", "eval-digits", *TINY_TRAIN, "--check",
                        "--out", str(finished_training))
    assert code == 2 and "already holds a finished run" in err


def test_a_finished_search_suggests_the_retraining_of_each_task_a_shipped_preset_covers():
    """The next step a search prints: a shipped eval preset of the task alone, an image folder's with its path, the
    small-image recipe for digits (and any task of one's own held in memory), at the search's image size."""
    from ilnas.config import resolve, retraining_presets

    suggested = dict(retraining_presets(["cifar100", "digits", "mnist5k", "imagefolder:/data/my photos"], 16))
    assert suggested == {"cifar100": ["--preset", "eval-cifar100"], "mnist5k": ["--preset", "eval-digits"],
                         "digits": ["--preset", "eval-digits", "--set", "data.tasks=[digits]"],
                         "imagefolder:/data/my photos": ["--preset", "eval-folder", "--set",
                                                         "data.tasks=[imagefolder:/data/my photos]", "--set",
                                                         "data.image_size=16"]}
    assert dict(retraining_presets(["cifar10", "mnist5k"], 28)) == {
        "cifar10": ["--preset", "eval-cifar10"], "mnist5k": ["--preset", "eval-digits", "--set", "data.image_size=28"]}
    for task, args in suggested.items():  # each re-trains on that task, at the search's image size where it has one
        cfg = resolve(args[1], None, args[3::2], "eval")
        assert cfg.data.tasks == (task,) and (task.startswith("cifar") or cfg.data.image_size == 16)
