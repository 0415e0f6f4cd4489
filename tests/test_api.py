"""The Python API: SupernetSearch on one's own tensors and heads, create_state, resolve with a mapping,
epoch lines through logging, and the documented example."""
from __future__ import annotations

import functools
import logging
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import FOUR_OPS
from ilnas import SGD, EngineConfig, SpaceConfig, SupernetSearch, resolve
from ilnas.errors import IlnasError
from ilnas.search.engine import Learner, create_state, search_step, to_host
from ilnas.search.task_net import FunctionalTaskNet, fresh_parameters
from ilnas.seeds import derive_seed
from ilnas.space.supernet import Supernet, init_arch

REPO = Path(__file__).resolve().parents[1]
SPACE = SpaceConfig(channels=4, layers=3)


def tensors(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def test_a_supernet_search_is_the_engine_on_the_state_one_would_build_by_hand():
    """Same seeds, same heads, same batches: SupernetSearch's step equals search_step on a state built from
    create_state, FunctionalTaskNet and a hand-written criterion, bit for bit."""
    heads = {"a": nn.Linear(4 * 4 * 4, 3), "b": nn.Sequential(nn.Linear(4 * 4 * 4, 5), nn.Tanh(), nn.Linear(5, 2))}
    head_init = {k: [p.detach().clone() for p in m.parameters()] for k, m in heads.items()}
    smooth = functools.partial(F.cross_entropy, label_smoothing=0.2)
    search = SupernetSearch(heads, 3, space=SPACE, rounds=2, criteria={"b": smooth}, seed=5)
    assert [st.learner for st in search.state.stages] == [0, 1, 0, 1]
    assert all(torch.equal(p, q) for st in search.state.stages for p, q in zip(st.h, head_init["ab"[st.learner]]))
    assert not torch.equal(search.state.stages[0].w[0], search.state.stages[2].w[0])  # own encoder per stage

    build = lambda: Supernet(3, 4, 3, channels_last=True)  # noqa: E731  (the CPU default of SupernetSearch)
    encoder = build()
    nets = [FunctionalTaskNet(encoder, heads["a"], 3), FunctionalTaskNet(encoder, heads["b"], 2, smooth)]
    arch = init_arch(8, generator=torch.Generator().manual_seed(derive_seed(5, 0)))
    state = create_state(arch, lambda s, k: (fresh_parameters(build, derive_seed(5, 0, s, 0)), head_init["ab"[k]]),
                         2, 2)
    train = {"a": tensors(6, 3, 0), "b": tensors(6, 2, 1)}
    val = {"a": tensors(6, 3, 2), "b": tensors(6, 2, 3)}
    metrics = search.step(train, val, lr=0.05)
    by_hand = search_step(state, [Learner(t, net.loss, net.losses) for t, net in zip("ab", nets)],
                          [train["a"], train["b"]],
                          [val["a"], val["b"]], EngineConfig(), SGD(lr_min=0.001), 0.05)
    assert all(torch.equal(x, y) for x, y in zip(search.state.arch, state.arch))
    assert all(torch.equal(x, y) for s1, s2 in zip(search.state.stages, state.stages) for x, y in zip(s1.w, s2.w))
    assert list(metrics["train_loss"]) == ["r1/a", "r1/b", "r2/a", "r2/b"]
    assert list(metrics["train_loss"].values()) == by_hand["train_loss"]
    assert metrics["val_loss"] == dict(zip("ab", by_hand["val_loss"]))


def test_heads_from_builders_follow_the_seed_not_the_global_rng():
    def heads_of(seed: int, draws: int) -> list[torch.Tensor]:
        torch.randn(draws)  # the caller's RNG in another state
        before = torch.get_rng_state()
        search = SupernetSearch({"a": lambda w: nn.Linear(w, 3), "b": lambda w: nn.Linear(w, 2)}, 3, space=SPACE,
                                seed=seed)
        assert torch.equal(torch.get_rng_state(), before)  # and left as it was
        return [p for st in search.state.stages for p in st.h]

    same, moved, other = heads_of(1, 0), heads_of(1, 7), heads_of(2, 0)
    assert all(torch.equal(p, q) for p, q in zip(same, moved))
    assert not torch.equal(same[0], other[0])
    assert not torch.equal(same[0][:2], same[2][:2])  # each task's head its own draw


def test_a_criterion_receives_the_heads_logits_and_the_targets():
    seen = []

    def criterion(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(logits.shape), tuple(targets.shape)))
        return F.mse_loss(logits.squeeze(-1), targets)  # a regression head: any loss of (logits, targets)

    search = SupernetSearch({"r": lambda width: nn.Linear(width, 1)}, 3, space=SPACE, rounds=1,
                            engine=EngineConfig(coupling="none"), criteria={"r": criterion})
    x, _ = tensors(4, 2, 0)
    before = [a.detach().clone() for a in search.state.arch]
    search.step({"r": (x, torch.randn(4))}, {"r": (x, torch.randn(4))})
    assert seen and set(seen) == {((4, 1), (4,))}
    assert any(not torch.equal(a, b) for a, b in zip(search.state.arch, before))
    frozen = [a.detach().clone() for a in search.state.arch]
    search.step({"r": (x, torch.randn(4))}, {"r": (x, torch.randn(4))}, update_arch=False)
    assert all(torch.equal(a, b) for a, b in zip(search.state.arch, frozen))
    assert search.logits("r", x).shape == (4, 1) and search.genotype().to_string().startswith("Genotype(")


@pytest.mark.parametrize("engine", [EngineConfig(), EngineConfig(hvp="exact", update_order="darts"),
                                    EngineConfig(coupling="copy", batched_sets=1)])
def test_a_step_without_sync_never_reads_from_the_device(engine):
    """sync=False: no value of the step comes back to the host (the calls that would wait for a GPU), so the
    host runs ahead; to_host brings the metrics back afterwards. Adam's own step counter lives on the host.
    Under the copy coupling each later stage reads one number."""
    reads = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_local_scalar_dense", "equal", "is_nonzero", "nonzero"):
                frames = [f.filename for f in traceback.extract_stack()]
                if not any(os.sep + os.path.join("torch", "optim") in f for f in frames):
                    reads.append((func.overloadpacket.__name__, frames[-3:]))
            return func(*args, **(kwargs or {}))

    search = SupernetSearch({"a": nn.Linear(64, 2), "b": nn.Linear(64, 3)}, 3, space=SPACE, engine=engine,
                            sgd=SGD(grad_clip=5.0))
    batches = {"a": tensors(4, 2, 0), "b": tensors(4, 3, 1)}
    learners, train = search.learners, [batches["a"], batches["b"]]
    with Reads():
        metrics = search_step(search.state, learners, train, train, engine, search.sgd, 0.025, sync=False)
    # copy: one read per stage after the first, to tell whether the commit moved its gradient's point
    assert len(reads) == (3 if engine.coupling == "copy" else 0), reads
    assert all(isinstance(v, torch.Tensor) for v in [*metrics["train_loss"], *metrics["val_loss"]])
    (host,) = to_host([metrics])
    assert [float(v) for v in metrics["train_loss"]] == host["train_loss"]
    assert isinstance(host["hypergrad_norm"], float) and math.isfinite(host["hypergrad_norm"])


@pytest.mark.parametrize("batched_sets", [1, 8])
def test_a_supernet_search_averages_through_its_reduce(batched_sets):
    calls = []

    def reduce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        calls.append(len(tensors))
        return tensors

    search = SupernetSearch({"a": nn.Linear(64, 2), "b": nn.Linear(64, 3)}, 3, space=SPACE, reduce=reduce,
                            engine=EngineConfig(batched_sets=batched_sets))
    batches = {"a": tensors(4, 2, 0), "b": tensors(4, 3, 1)}
    search.step(batches, batches)
    weights = len(search.state.stages[0].w) + 2  # encoder and a linear head
    # 4 stage gradients (one pass per stage, or each task's two stages in one batched pass and one reduce),
    # 2 validation gradients, the hypergradient, the 6 logged losses
    stage_gradients = [weights] * 4 if batched_sets == 1 else [2 * weights] * 2
    assert calls == stage_gradients + [weights] * 2 + [len(search.state.arch), 1]


def test_amp_search_steps_in_bf16_and_keeps_float32_state():
    def search(amp: bool) -> SupernetSearch:
        torch.manual_seed(0)  # the same heads
        return SupernetSearch({"a": nn.Linear(64, 2), "b": nn.Linear(64, 3)}, 3, space=SPACE, amp=amp)

    mixed, plain = search(True), search(False)
    batches = {"a": tensors(4, 2, 0), "b": tensors(4, 3, 1)}
    seen = []
    # every convolution's output, batched passes (their own module) included
    hook = nn.modules.module.register_module_forward_hook(
        lambda m, i, out: seen.append(out.dtype) if isinstance(m, nn.Conv2d) else None)
    metrics = mixed.step(batches, batches)
    hook.remove()
    plain_metrics = plain.step(batches, batches)
    assert torch.bfloat16 in seen and torch.float32 in seen  # bf16 passes, float32 FD passes
    assert all(t.dtype == torch.float32 for t in mixed.state.arch + mixed.state.stages[0].w)
    for name, loss in plain_metrics["train_loss"].items():
        assert math.isfinite(metrics["train_loss"][name])
        assert metrics["train_loss"][name] == pytest.approx(loss, rel=0.05)


@pytest.mark.parametrize("make, message", [
    (lambda: SupernetSearch({}, 3), "heads is empty"),
    (lambda: SupernetSearch({"a": nn.Linear(16, 2)}, 3, space=SPACE, criteria={"b": F.cross_entropy}),
     "criteria name tasks without a head"),
    (lambda: SupernetSearch({"a": nn.Linear(16, 2)}, 3, space=SPACE, engine=EngineConfig(order=3)),
     "engine.order must be 1 or 2"),
    (lambda: SupernetSearch({"a": nn.Linear(16, 2)}, 3, space=SPACE, dtype=torch.float64, amp=True),
     "amp \\(bf16 autocast\\) needs dtype=torch.float32"),
    (lambda: SupernetSearch({"a": nn.Linear(16, 2)}, 3, space=SpaceConfig(channels=4, layers=2)),
     "space.layers must be at least 3, got 2: with fewer cells the supernet has no normal cell"),
    (lambda: SupernetSearch({"a": nn.Linear(64, 2), "b": nn.Linear(64, 2)}, 3, space=SPACE).step(
        {"a": tensors(2, 2, 0)}, {"a": tensors(2, 2, 0), "b": tensors(2, 2, 0)}), "train has no batch for b"),
    # values the CLI's parser refuses and Python passes: none of them made an error where it was given
    (lambda: SupernetSearch({"a": nn.Linear(16, 2)}, 3, space=SPACE, rounds=0),
     "rounds must be a positive integer, got 0"),
    (lambda: SupernetSearch({"a": nn.Linear(16, 2)}, 3, space=SPACE, engine=EngineConfig(lam=math.nan)),
     "^engine.lam must be a finite number of at most 1e\\+30 in size, got nan$"),
    (lambda: SupernetSearch({"a": nn.Linear(16, 2)}, 3, space=SPACE, sgd=SGD(lr=math.nan)),
     "^sgd.lr must be a finite number of at most 1e\\+30 in size, got nan$"),
    (lambda: SupernetSearch({"a": nn.Linear(16, 2)}, 3, space=SpaceConfig(channels=0, layers=3)),
     "^space.channels must be positive, got 0$"),  # was: "operation 'max_pool_3x3' fails on ..."
    (lambda: SupernetSearch({"a": nn.Linear(16, 2)}, 3, space=SpaceConfig(channels=4, layers=3, partial_channels=3)),
     "^space.partial_channels must be >= 1 and divide space.channels=4, got 3$"),
    # heads and batches a first step used to trip over, deep in torch (a grouped convolution's channels, say)
    (lambda: SupernetSearch({"a": 3}, 3, space=SPACE),
     "^the head of task 'a' must be a torch.nn.Module or a builder of one given the feature width, got int$"),
    (lambda: SupernetSearch({"a": lambda width: "linear"}, 3, space=SPACE),
     "^the head builder of task 'a' returned str, not a torch.nn.Module$"),
    (lambda: SupernetSearch({"a": nn.Linear(16, 2)}, 3, space=SPACE),
     "^task 'a': the task head cannot take the supernet's features, \\(N, 64\\) \\(RuntimeError: mat1 and mat2"),
    (lambda: SupernetSearch({"a": nn.Linear(64, 2)}, 1, space=SPACE).step(
        {"a": tensors(2, 2, 0)}, {"a": tensors(2, 2, 0)}),
     "^train\\['a'\\]: the images must be a torch.float32 tensor \\(N, 1, H, W\\) on cpu, got torch.float32 "
     "\\(2, 3, 8, 8\\) on cpu$"),
    (lambda: SupernetSearch({"a": nn.Linear(64, 2)}, 3, space=SPACE, dtype=torch.float64).step(
        {"a": tensors(2, 2, 0)}, {"a": tensors(2, 2, 0)}),
     "^train\\['a'\\]: the images must be a torch.float64 tensor"),
    (lambda: SupernetSearch({"a": nn.Linear(64, 2)}, 3, space=SPACE).step(
        {"a": tensors(2, 2, 0)}, {"a": (tensors(2, 2, 0)[0], torch.zeros(3, dtype=torch.long))}),
     "^val\\['a'\\]: 2 images but targets of shape \\(3,\\)$"),
    (lambda: SupernetSearch({"a": nn.Linear(64, 2)}, 3, space=SPACE).step({"a": tensors(2, 2, 0)}, {"a": [1]}),
     "^val\\['a'\\] must be an \\(images, targets\\) pair, got list$"),
    (lambda: SupernetSearch({"a": nn.Linear(64, 2)}, 3, space=SPACE).step(
        {"a": tensors(2, 2, 0)}, {"a": tensors(2, 2, 0)}, lr=math.nan), "^lr must be a positive number, got nan$"),
    # flags given as text or numbers: "false" is truthy, and was taken for True without a word
    (lambda: SupernetSearch({"a": nn.Linear(64, 2)}, 3, space=SPACE, amp="false"),
     "^amp must be True or False, got 'false'$"),
    (lambda: SupernetSearch({"a": nn.Linear(64, 2)}, 3, space=SPACE, channels_last=0),
     "^channels_last must be True, False or None, got 0$"),
    (lambda: SupernetSearch({"a": nn.Linear(64, 2)}, 3, space=SPACE).step(
        {"a": tensors(2, 2, 0)}, {"a": tensors(2, 2, 0)}, update_arch="no"),
     "^update_arch must be True or False, got 'no'$"),
    (lambda: Supernet(3, 4, 3, channels_last="yes"), "^channels_last must be True or False, got 'yes'$"),
    (lambda: Supernet(3, 4, 3, group_edges=1), "^group_edges must be True, False or None, got 1$"),
    (lambda: SupernetSearch({"a": nn.Linear(64, 2)}, 3, space=SPACE).logits(
        "a", torch.zeros(2, 3, 8, 8, dtype=torch.uint8)),
     "^logits: the images must be a torch.float32 tensor \\(N, 3, H, W\\) on cpu, got torch.uint8"),
])
def test_a_supernet_search_refuses_bad_input_in_one_line(make, message):
    with pytest.raises(IlnasError, match=message):
        make()


def test_a_step_above_the_schedules_rate_is_held_to_the_couplings_stability_and_a_head_is_left_as_it_was():
    """A step's own lr above sgd.lr is checked as sgd.lr was (gd coupling: 2 * lr * lambda < 1). Building the search
    runs a head given as a module once, to learn its output width: in evaluation mode without gradients, so its
    running statistics, its mode and torch's global RNG stay as they were (a training-mode pass updated the
    BatchNorm statistics and drew the dropout mask from the global RNG, which the class promises to leave alone)."""
    head = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    before, rng = {k: v.clone() for k, v in head.state_dict().items()}, torch.get_rng_state()
    search = SupernetSearch({"a": head}, 3, space=SPACE, rounds=2, engine=EngineConfig(coupling="gd", lam=5.0),
                            sgd=SGD(lr=0.05))
    assert head.training and all(torch.equal(v, head.state_dict()[k]) for k, v in before.items())
    assert torch.equal(rng, torch.get_rng_state())
    batch = {"a": tensors(4, 2, 0)}
    search.step(batch, batch, lr=0.02)
    with pytest.raises(IlnasError, match="coupling 'gd' with 2\\*lr\\*lambda = 2 >= 1 overshoots"):
        search.step(batch, batch, lr=0.2)


def test_resolve_takes_a_mapping_of_dotted_keys_or_sections():
    strings = resolve("demo", overrides=["engine.lam=10", "search.epochs=3", "data.tasks=[digits]",
                                         "search.framework=single", "search.rounds=1"])
    mapping = resolve("demo", overrides={"engine.lam": 10, "search": {"epochs": 3, "framework": "single"},
                                         "data.tasks": ["digits"], "search.rounds": 1})
    assert mapping == strings and mapping.engine.lam == 10.0 and mapping.search.epochs == 3
    with pytest.raises(IlnasError, match="unknown config key 'search.epoch'"):
        resolve("demo", overrides={"search.epoch": 3})
    with pytest.raises(IlnasError, match="search.amp \\(bf16 autocast\\) needs search.dtype=float32"):
        resolve("demo", overrides={"search.amp": True, "search.dtype": "float64"})


def test_epoch_lines_go_through_logging_and_progress_false_is_silent(tmp_path, capsys, caplog, monkeypatch):
    from ilnas import run_train
    from ilnas.space.genotype import zoo

    # The logger as a library user finds it: an in-process CLI call of another test may have given it the CLI's
    # stdout handler.
    monkeypatch.setattr(logging.getLogger("ilnas"), "handlers", [])
    monkeypatch.setattr(logging.getLogger("ilnas"), "propagate", True)

    cfg = resolve("eval-digits", overrides={"network.layers": 3, "network.channels": 4, "train.batch_size": 16,
                                            "train.steps_per_epoch": 2, "train.epochs": 2}, kind="eval")
    with caplog.at_level(logging.INFO, logger="ilnas"):
        run_train(cfg, zoo()["DARTS_V2"], tmp_path / "loud", report=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "ilnas.recipes.train"]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2") and "test top-1" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ilnas"):
        run_train(cfg, zoo()["DARTS_V2"], tmp_path / "quiet", progress=False, report=False)
    assert not [r for r in caplog.records if r.name.startswith("ilnas")]
    captured = capsys.readouterr()
    assert "epoch" not in captured.out and "epoch" not in captured.err


def test_the_documented_example_runs(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "examples" / "custom_search.py"), "--steps", "1"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "step 1: val loss digit" in r.stdout and "genotype = Genotype(" in r.stdout


def test_threads_default_to_what_the_environment_grants(monkeypatch):
    from ilnas.threads import available_cores, default_threads, set_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    for value in ("", "0", "two", "99999999999"):  # the last overflowed torch.set_num_threads
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert default_threads() == available_cores() >= 1
    before = torch.get_num_threads()
    try:
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(IlnasError, match="search.threads must be positive"):
        resolve("demo", overrides={"search.threads": 0})


def test_more_threads_than_cores_are_used_as_asked_and_warned_of(monkeypatch, caplog):
    """64 OpenMP threads on 2 cores made a search step many times slower, in silence."""
    from ilnas import threads

    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING, logger="ilnas"):
            assert threads.set_threads(2, "search.threads") == 2 and not caplog.records
            assert threads.set_threads(3, "search.threads") == 3 and torch.get_num_threads() == 3
            assert threads.set_threads(None, "train.threads") == 6
        assert [r.getMessage() for r in caplog.records] == [
            f"{asked} is more than the 2 core(s) this process may run on: OpenMP threads beyond the cores make each "
            f"step many times slower" for asked in ("search.threads=3", "OMP_NUM_THREADS=6")]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("hvp", ["fd", "exact"])
def test_channels_last_computes_the_same_step(hvp):
    """NHWC activations (the CPU default) are a layout, not another function: in float64 the hypergradient and
    the committed weights of an IL step (K=2, M=2) match the NCHW ones to 1e-10. (In float32 this
    supernet's hypergradient moves by a few per cent under a 1e-7 change of its input, so float32 is no
    test of equality.)"""
    results = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        search = SupernetSearch({"a": lambda w: nn.Linear(w, 3), "b": lambda w: nn.Linear(w, 4)}, 3,
                                space=SpaceConfig(channels=4, layers=3), rounds=2, engine=EngineConfig(hvp=hvp),
                                dtype=torch.float64, channels_last=channels_last)
        gen = torch.Generator().manual_seed(1)
        batch = {t: (torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, c, (6,), generator=gen))
                 for t, c in (("a", 3), ("b", 4))}
        arch = [a.detach().clone() for a in search.state.arch]
        search.step(batch, batch)
        step = [a.detach() - b for a, b in zip(search.state.arch, arch)]
        results[channels_last] = (torch.cat([t.flatten() for t in step]),
                                  torch.cat([t.flatten() for st in search.state.stages for t in st.w]))
    for nchw, nhwc in zip(results[False], results[True]):
        assert float((nhwc - nchw).norm() / nchw.norm()) < 1e-10


def test_a_short_search_finds_the_same_cell_in_either_layout(tmp_path):
    """search.channels_last does not change the recipe's search: in float64 (where rounding cannot flip the
    near-uniform alphas' ranking) every epoch's alphas agree and so does the cell."""
    from ilnas import run_search

    found = {}
    for flag in ("true", "false"):
        cfg = resolve("demo", overrides=["space.layers=3", "space.channels=4", "search.batch_size=8",
                                         "search.steps_per_epoch=2", "search.epochs=2", "search.eval_batches=1",
                                         "search.dtype=float64", "data.image_size=8", FOUR_OPS,
                                         f"search.channels_last={flag}"])
        genotype = run_search(cfg, tmp_path / flag, progress=False, report=False)
        with np.load(tmp_path / flag / "arch_history.npz") as history:
            found[flag] = (genotype, {k: history[k] for k in history.files})
    (cell_nhwc, alphas_nhwc), (cell_nchw, alphas_nchw) = found["true"], found["false"]
    assert cell_nhwc == cell_nchw and sorted(alphas_nhwc) == sorted(alphas_nchw)
    assert alphas_nhwc["p0/alphas_normal"].shape == (2, 14, 4)  # one entry per epoch
    for name, a in alphas_nhwc.items():
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, alphas_nchw[name], rtol=1e-6, atol=1e-9)
        else:  # the labels: ops and edges
            assert (a == alphas_nchw[name]).all()


def test_the_recipes_hold_a_configuration_built_in_python_to_what_resolve_holds_one_to(tmp_path):
    """dataclasses.replace of a resolved configuration passes any value: the recipes check it as resolve does,
    before anything is written, and refuse a configuration of the other kind; run_train takes a genotype by name."""
    from dataclasses import replace

    from ilnas import run_search, run_train

    search, training = resolve("demo"), resolve("eval-digits", kind="eval")
    out = tmp_path / "run"
    for call_recipe, message in [
            (lambda: run_search(replace(search, search=replace(search.search, epochs=0)), out),
             "^search.epochs must be positive, got 0$"),
            (lambda: run_search(replace(search, search=replace(search.search, epochs="3")), out),
             "^search.epochs must be an integer, got '3'$"),
            (lambda: run_search(replace(search, engine=replace(search.engine, lam=-1.0)), out),
             "^engine.lam \\(lambda\\) must be >= 0, got -1.0$"),
            (lambda: run_search(training, out), "^expected a search configuration \\(SearchRunConfig: "
                                                "ilnas.resolve\\(preset, kind='search'\\)\\), got EvalRunConfig$"),
            (lambda: run_search({"search": {}}, out), "^expected a search configuration .*, got dict$"),
            (lambda: run_train(search, "DARTS_V2", out), "^expected a training configuration .*, got SearchRunConfig$"),
            (lambda: run_train(replace(training, train=replace(training.train, batch_size=-4)), "DARTS_V2", out),
             "^train.batch_size must be positive, got -4$"),
            (lambda: run_train(training, 42, out), "^genotype must be a Genotype or what load_genotype reads"),
            (lambda: run_train(training, "DARTS_V9", out), "^unknown genotype 'DARTS_V9'")]:
        with pytest.raises(IlnasError, match=message):
            call_recipe()
        assert not out.exists()
    tiny = replace(training, network=replace(training.network, layers=3, channels=4))
    assert run_train(tiny, "DARTS_V2", out, progress=False, check_only=True) is None and not out.exists()


HEAD = functools.partial(nn.LazyLinear, 2)
ARCH = torch.zeros(14, 8)
INF = torch.full((14, 8), math.inf)


@pytest.mark.parametrize("make, message", [
    # the modules and functions the package exports, given what Python lets one pass: each used to fail deep in
    # torch (a ZeroDivisionError, an AttributeError, a negative dimension) or to build something silently
    (lambda: Supernet(1, 4, 3, partial_channels=0), "^partial_channels must be a positive integer, got 0$"),
    (lambda: Supernet(1, -1, 3), "^channels must be a positive integer, got -1$"),
    (lambda: Supernet(1, 4, 3, normal_ops=[["none"]] * 13),
     "^normal_ops must list, for each of the 14 edges of a 4-node cell, its candidate operations' names, got 13 edges$"),
    (lambda: Supernet(1, 4, 3, reduce_ops=[[]] * 14), "^reduce_ops must list, for each of the 14 edges"),
    (lambda: _network("cifar", layers=0), "^layers must be a positive integer, got 0$"),
    (lambda: _network("cifar", num_classes=-1), "^num_classes must be a positive integer, got -1$"),
    (lambda: _network("imagenet", channels=1), "^channels must be at least 2 \\(the stem's first convolution"),
    (lambda: _network("cifar", genotype="DARTS_V2"), "^genotype must be a Genotype \\(load_genotype or parse_genotype"),
    (lambda: init_arch(0), "^num_ops must be a positive integer, got 0$"),
    (lambda: init_arch(8, dtype=0), "^init_arch's dtype must be a torch.dtype or None, got 0$"),  # torch: 40 lines
    (lambda: init_arch(8, generator=0), "^init_arch's generator must be a torch.Generator or None, got 0$"),
    (lambda: init_arch(8, dtype=torch.int64), "^init_arch's dtype must be a floating dtype, got torch.int64$"),
    (lambda: _load_genotype(3), "^a genotype is given by a name, a path or a Genotype\\(...\\) literal, got int$"),
    (lambda: _derive(torch.zeros(14, 1), ARCH), "^normal must be a tensor of shape \\(14, 8\\) \\(edges x candidate "
                                                "operations\\), got \\(14, 1\\)$"),
    (lambda: _derive(ARCH, ARCH * math.nan), "^reduce holds NaN or \\+inf: no cell can be derived from them$"),
    (lambda: _derive(INF, ARCH), "^normal holds NaN or \\+inf"),
    (lambda: resolve(3), "^preset must be a name, got int$"),
    (lambda: resolve("demo", kind="evaluation"), "^kind must be one of search, eval or None, got 'evaluation'$"),
    (lambda: resolve("demo", overrides="engine.lam=10"),  # was read letter by letter: "malformed --set 'e'"
     "^overrides must be a list of 'section.key=value' strings or a mapping, got 'engine.lam=10'$"),
    (lambda: _load_model(3), "^run directory must be a path, got int$"),  # os.stat took it for a descriptor
    (lambda: _load_model("runs/x", device="gpu"), "^device must be a torch.device or its name \\(cpu, cuda, cuda:1"),
    (lambda: _load_model("runs/x", device=1.5), "^device must be a torch.device or its name"),
    # SupernetSearch's sections are held to the types resolve holds them to, and its other arguments checked
    (lambda: SupernetSearch([HEAD], 1, space=SPACE), "^heads must map each task's name to its head, got list$"),
    (lambda: SupernetSearch({"a": HEAD}, 1, space=SPACE, engine=EngineConfig(virtual_momentum="no")),
     "^engine.virtual_momentum must be true or false, got 'no'$"),
    (lambda: SupernetSearch({"a": HEAD}, 1, space=SPACE, sgd=SGD(schedule="constant")),
     "^sgd.schedule must be cosine, "),
    (lambda: SupernetSearch({"a": HEAD}, 1, space=SPACE, sgd=SGD(momentum=1.0)),
     "^sgd.momentum must lie in \\[0, 1\\), got 1.0$"),
    (lambda: SupernetSearch({"a": HEAD}, 1, space=SPACE, arch_optimizer=_adam(betas="")),
     "^arch_optimizer.betas must have 2 entries, got 0$"),
    (lambda: SupernetSearch({"a": HEAD}, 1, space={"channels": 4}), "^space must be an ilnas.SpaceConfig, got dict$"),
    (lambda: SupernetSearch({"a": HEAD}, 1, space=SPACE, seed=1.5), "^seed must be an integer in \\[0, 2\\*\\*32\\)"),
    (lambda: SupernetSearch({"a": HEAD}, 1, space=SPACE, seed=2**32),
     "^seed must be an integer in \\[0, 2\\*\\*32\\), got 4294967296$"),
    (lambda: SupernetSearch({"a": HEAD}, 1, space=SPACE, device="gpu"), "^device must be a torch.device or its name"),
    (lambda: SupernetSearch({"a": HEAD}, 1, space=SPACE, dtype=torch.int64),
     "^dtype must be torch.float32 or torch.float64 \\(bf16: amp=True\\), got torch.int64$"),
    (lambda: SupernetSearch({"a": HEAD}, 1, space=SPACE, criteria=[F.cross_entropy]),
     "^criteria must map task names to loss functions, got list$"),
    (lambda: _step(torch.randn(2, 1, 8, 8)), "^train must map each task's name to its batch, got Tensor$"),
    (lambda: _step({"a": (torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))}), "^train\\['a'\\] holds no "
                                                                                       "images$"),
    (lambda: _step({"a": (torch.randn(2, 1, 10, 10), torch.zeros(2, dtype=torch.long))}),
     "^train\\['a'\\]: the supernet cannot take \\(10, 10\\) images: the two reduction cells halve the side twice, "
     "which takes a multiple of 4 \\(8 or 12\\), got 10$"),
    (lambda: _step({"a": tensors(2, 2, 0)}, lr=True), "^lr must be a positive number, got True$"),
    (lambda: _step({"a": (torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.int32))}),  # torch: "expected ... Long"
     "^train\\['a'\\]: the default cross-entropy takes targets of class indices \\(torch.int64, \\(N,\\)\\) or class "
     "probabilities \\(floating, \\(N, classes\\)\\) on the images' device, got torch.int32 \\(2,\\) on cpu$"),
    (lambda: _step({"a": (torch.randn(2, 1, 8, 8), torch.zeros(2, 1, dtype=torch.long))}),
     "^train\\['a'\\]: the default cross-entropy takes .* got torch.int64 \\(2, 1\\) on cpu$"),
])
def test_the_public_modules_and_functions_refuse_bad_arguments_in_one_line(make, message):
    with pytest.raises(IlnasError, match=message) as refused:
        make()
    assert "\n" not in str(refused.value)


def _network(style: str, **kwargs):
    from ilnas import NetworkCIFAR, NetworkImageNet, load_genotype
    args = {"genotype": load_genotype("DARTS_V2"), "layers": 3, "channels": 4, **kwargs}
    return (NetworkImageNet if style == "imagenet" else NetworkCIFAR)(**args)


def _load_genotype(spec):
    from ilnas import load_genotype
    return load_genotype(spec)


def _derive(normal, reduce):
    from ilnas import derive_genotype
    return derive_genotype(normal, reduce)


def _load_model(run, **kwargs):
    from ilnas import load_model
    return load_model(run, **kwargs)


def _adam(**kwargs):
    from ilnas import Adam
    return Adam(**kwargs)


def _step(train, **kwargs):
    search = SupernetSearch({"a": HEAD}, 1 if not isinstance(train, dict) or "a" not in train
                            or train["a"][0].shape[1] == 1 else 3, space=SPACE, rounds=1)
    return search.step(train, {"a": (torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))}, **kwargs)


def test_a_genotype_is_loaded_from_a_path_object_and_a_struck_out_op_is_no_fault(tmp_path):
    """load_genotype took only strings (a pathlib.Path failed on ``.strip``); derive_genotype refuses NaN and +inf
    but takes -inf, which P-DARTS's skip limit writes to strike an operation out."""
    from ilnas import derive_genotype, load_genotype

    (tmp_path / "cell.txt").write_text(load_genotype("DARTS_V2").to_string())
    assert load_genotype(tmp_path / "cell.txt") == load_genotype("DARTS_V2")
    assert load_genotype(load_genotype("PDARTS")) == load_genotype("PDARTS")
    weights = torch.zeros(14, 8)
    weights[:, 3] = 1.0  # skip_connect everywhere ...
    weights[0, 3] = -math.inf  # ... but on the first edge, struck out
    cell = derive_genotype(weights, weights)
    assert cell.normal[:2] == (("skip_connect", 1), ("max_pool_3x3", 0))  # the stronger edge first
