"""Weights against memory: counted on the meta device before anything is built, a run too wide for its
device refused in one line, the cgroup limits a container sets read, and a width described without its memory."""
from __future__ import annotations

import logging
import math
import re
import subprocess
import sys

import pytest
import torch

from helpers import call, under_address_space_limit
from ilnas import memory
from ilnas.space.genotype import load_genotype
from ilnas.space.network import build_network
from ilnas.space.supernet import Supernet


def _built_count(build) -> int:
    return sum(p.numel() for p in build().parameters())


@pytest.mark.parametrize("build", [
    lambda: Supernet(1, 8, 5),
    lambda: Supernet(3, 8, 4, partial_channels=4, stem_multiplier=2),
    lambda: build_network(load_genotype("DARTS_V2"), 10, 3, 32, "cifar", 8, 16, True),
    lambda: build_network(load_genotype("PC_DARTS_cifar"), 100, 3, 224, "imagenet", 6, 12, True),
], ids=["supernet", "pc-darts", "cifar", "imagenet"])
def test_the_meta_count_is_the_built_modules_and_draws_nothing(build):
    rng = torch.get_rng_state()
    counted = memory.parameter_count(build)
    assert torch.equal(torch.get_rng_state(), rng)
    assert counted == _built_count(build) > 0


def _limits(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    return tmp_path


@pytest.mark.parametrize("membership, files, swap, expected", [
    # v2: the smallest limit on the path up from the process's cgroup; its swap limit beside RAM's
    ("0::/job/step\n", {"job/memory.max": "4000000000", "job/memory.swap.max": "0", "job/step/memory.max": "max",
                        "memory.max": "max"}, 10 ** 9, 4 * 10 ** 9),
    ("0::/job/step\n", {"job/memory.max": "8000000000", "job/step/memory.max": "6000000000",
                        "job/step/memory.swap.max": "1000000000"}, 10 ** 9, 7 * 10 ** 9),
    ("0::/job\n", {"job/memory.max": "4000000000", "job/memory.swap.max": "max"}, 10 ** 9, 5 * 10 ** 9),
    # v1: memory.memsw.limit_in_bytes counts RAM and swap together; an unset one reads as a huge number
    ("12:cpu,cpuacct:/x\n4:memory:/docker/abc\n", {"memory/docker/abc/memory.limit_in_bytes": "2000000000",
                                                   "memory/docker/abc/memory.memsw.limit_in_bytes": "3000000000"},
     10 ** 9, 3 * 10 ** 9),
    ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712",
                      "memory/memory.memsw.limit_in_bytes": "9223372036854771712"}, 10 ** 9, None),
    ("4:memory:/a\n", {"memory/a/memory.limit_in_bytes": "2000000000"}, 10 ** 9, 3 * 10 ** 9),
    ("0::/\n", {}, 0, None),
], ids=["v2-parent", "v2-own-swap", "v2-swap-max", "v1-memsw", "v1-unlimited", "v1-no-memsw", "none"])
def test_the_cgroup_limit_is_the_smallest_on_the_path_up(tmp_path, membership, files, swap, expected):
    assert memory.cgroup_limit(swap, _limits(tmp_path, files), membership) == expected


@pytest.mark.parametrize("membership, files, expected", [
    ("0::/job/step\n", {"job/cpu.max": "400000 100000", "job/step/cpu.max": "max 100000",
                        "cpu.max": "max 100000"}, 4.0),
    ("0::/job\n", {"job/cpu.max": "150000 100000"}, 1.5),  # --cpus=1.5: two threads
    ("12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n",
     {"cpu/docker/abc/cpu.cfs_quota_us": "200000", "cpu/docker/abc/cpu.cfs_period_us": "100000"}, 2.0),
    ("12:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ("0::/\n", {}, None),
], ids=["v2-parent", "v2-fraction", "v1", "v1-unlimited", "none"])
def test_the_cpu_quota_of_a_container_caps_the_default_threads(tmp_path, monkeypatch, membership, files, expected):
    """docker run --cpus=N on a many-core host: the affinity shows every core, the cgroup grants N CPUs' time,
    and as many threads as cores would make a step many times slower. OMP_NUM_THREADS still decides where set,
    its first level where it lists nested ones."""
    from ilnas import threads

    root = _limits(tmp_path, files)
    assert threads.cgroup_cpu_quota(root, membership) == expected
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: expected)  # this process's cgroup: that one
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert threads.default_threads() == (64 if expected is None else math.ceil(expected))
    for value, count in (("3", 3), (" 3 ", 3), ("5,2", 5)):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert threads.default_threads() == count


def test_this_machines_memory_is_known():
    assert memory.memory_total(torch.device("cpu")) >= 10 ** 9
    assert memory.memory_total(torch.device("meta")) is None


@pytest.mark.parametrize("argv, copies, settings", [
    (["search", "--set", "space.channels=1000"], 1 + 3 * 4, "space.channels or space.layers"),  # IL: K=2, M=2
    (["search", "--set", "space.channels=1000", "--set", "search.framework=single", "--set", "data.tasks=[digits]",
      "--set", "search.rounds=1"],
     1 + 3, "space.channels or space.layers"),
    # P-DARTS reads its cells from pdarts.layers (space.layers goes unread: naming it was no help)
    (["search", "--preset", "il-pdarts-demo", "--set", "space.channels=1000"], 1 + 3 * 4,
     "space.channels or pdarts.layers"),
    (["train", "--genotype", "DARTS_V2", "--preset", "eval-digits", "--set", "network.channels=1000"], 3,
     "network.channels or network.layers"),
    (["train", "--genotype", "DARTS_V2", "--preset", "eval-digits", "--set", "network.channels=1000", "--set",
      "optimizer.momentum=0"], 2, "network.channels or network.layers"),
], ids=["il", "darts", "pdarts", "train", "train-no-momentum"])
def test_weights_too_large_for_the_memory_are_refused_before_a_run_exists(tmp_path, monkeypatch, argv, copies,
                                                                          settings):
    """The limit is set here (2 GB), so the refusal does not depend on the machine; the copies counted are the
    module's and, per stage, the weights, gradient and virtual step of a search step, or the weights, gradients
    and momentum of a training step."""
    monkeypatch.setattr(memory, "memory_total", lambda device: 2 * 10 ** 9)
    out = tmp_path / "run"
    code, _, err = call(*argv, "--no-report", "--quiet", "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    found = re.search(r"\(([\d.]+) GB a copy; .*\) alone take ([\d.]+) GB, more than the 2\.0 GB of this machine's "
                      r"memory; lower (.*)$", err.strip())
    assert found, err
    one, total = float(found.group(1)), float(found.group(2))
    assert total == pytest.approx(copies * one, rel=0.01) and found.group(3) == settings
    assert not out.exists()


def test_a_supernet_search_too_wide_for_the_memory_is_refused_before_it_is_built(monkeypatch):
    from torch import nn

    from ilnas import SpaceConfig, SupernetSearch
    from ilnas.errors import IlnasError

    monkeypatch.setattr(memory, "memory_total", lambda device: 2 * 10 ** 9)
    heads = {"a": lambda width: nn.Linear(width, 10), "b": lambda width: nn.Linear(width, 3)}
    with pytest.raises(IlnasError, match=r"for each of 4 stage\(s\).* more than the 2\.0 GB .* lower space.channels"):
        SupernetSearch(heads, 3, space=SpaceConfig(channels=1000, layers=5), rounds=2)
    assert SupernetSearch(heads, 3, space=SpaceConfig(channels=4, layers=3), rounds=2).state.stages


def test_ranks_on_one_machine_share_its_memory(monkeypatch):
    """torchrun's LOCAL_WORLD_SIZE ranks each hold their copies in the host's memory; on a GPU each has its own."""
    from ilnas.errors import IlnasError

    monkeypatch.setattr(memory, "memory_total", lambda device: 10 ** 9)
    memory.require_memory(6 * 10 ** 8, torch.device("cpu"), "weights", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(IlnasError, match=r"^weights take 0\.6 GB in each of 2 ranks on this machine, more than the "
                                         r"1\.0 GB of this machine's memory; lower x$"):
        memory.require_memory(6 * 10 ** 8, torch.device("cpu"), "weights", "x")
    memory.require_memory(6 * 10 ** 8, torch.device("cuda", 1), "weights", "x")


def test_saved_activations_are_counted_per_image_without_the_weights():
    """Conv -> BatchNorm -> ReLU keeps, per image, the convolution's input (3 channels), BatchNorm's input and
    ReLU's output (8 each); the weights it keeps do not grow with the batch."""
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    sides = []

    def forward(n: int, side: int) -> torch.Tensor:
        sides.append(side)
        return net(torch.randn(n, 3, side, side))
    assert memory.saved_activation_bytes(forward, 64, 16) == 64 * (3 + 8 + 8) * 16 * 16 * 4
    assert sides == [16, 16]
    # larger images: measured at 64x64 (4 images of 512x512 through a supernet took the check past 24 GB)
    assert memory.saved_activation_bytes(forward, 64, 512) == 64 * (3 + 8 + 8) * 512 * 512 * 4
    assert sides[2:] == [64, 64]


def test_large_images_measured_at_a_smaller_side_give_a_supernets_activations_within_a_thousandth():
    """A supernet's stride-2 cells round each side up: the bytes scaled from 64x64 to 100x100 images come within a
    thousandth of those measured on 100x100 images; a network that cannot take the smaller side is measured at its
    own."""
    from ilnas.space.supernet import init_arch

    net = Supernet(1, 4, 3)
    arch = [a.requires_grad_() for a in init_arch(net.num_ops, False, torch.Generator().manual_seed(0), torch.float32)]
    weights = {k: p.detach().requires_grad_() for k, p in net.named_parameters()}

    def forward(n: int, side: int):
        return torch.func.functional_call(net, weights, (torch.randn(n, 1, side, side), *arch))

    exact = memory._per_image(lambda n: forward(n, 100))
    assert abs(memory.saved_activation_bytes(forward, 1, 100) / exact - 1) < 1e-3
    sides = []

    def fixed(n: int, side: int):
        sides.append(side)
        if side != 100:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        return forward(n, side)
    assert memory.saved_activation_bytes(fixed, 3, 100) == 3 * exact and sides == [64, 100, 100]


def test_what_a_supernet_pass_keeps_grows_linearly_with_its_batch():
    """The search extrapolates from passes of one and two images: on a real supernet pass (with architecture and
    weights as leaves needing gradients, as in a validation pass) eight images keep exactly what that predicts."""
    from ilnas.space.supernet import init_arch

    net = Supernet(1, 4, 3, channels_last=True)
    arch = [a.requires_grad_() for a in init_arch(net.num_ops, False, torch.Generator().manual_seed(0), torch.float32)]
    weights = {k: p.detach().requires_grad_() for k, p in net.named_parameters()}
    x = torch.randn(8, 1, 16, 16)

    def forward(n: int, side: int = 16):
        return torch.func.functional_call(net, weights, (x[:n], *arch))

    one, eight = memory._saved_bytes(lambda: forward(1)), memory._saved_bytes(lambda: forward(8))
    assert eight - one == memory.saved_activation_bytes(forward, 7, 16) > 0


def test_a_batch_whose_activations_cannot_fit_is_refused_before_a_run_exists(tmp_path, monkeypatch):
    """The demo's tiny supernet passes the weights' check; 600 images a pass keep 3.4 GB for the backward, and
    the widest pass of its steps (IL, K=2, M=2: a task's two stages' finite differences) takes four weight
    sets side by side."""
    monkeypatch.setattr(memory, "memory_total", lambda device: 10 ** 9)
    out = tmp_path / "run"
    code, _, err = call("search", "--set", "search.batch_size=600", "--no-report", "--quiet", "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"at once\) and what one pass of 600 images through 4 weight sets side by side keeps for its "
                     r"backward \(13\.4\d GB\) take 13\.4 GB, "
                     r"more than the 1\.0 GB of this machine's memory; lower space.channels, space.layers, "
                     r"search.batch_size or engine.batched_sets \(1: a pass a weight set, slower\)$", err.strip()), err
    assert not out.exists()


def test_an_exact_hessian_product_counts_the_double_backward_graph_it_keeps(tmp_path, monkeypatch):
    """With engine.hvp=exact a stage's gradient keeps its own graph for the double backward: on the demo's
    supernet 1.84x what its plain pass keeps. With one weight set a pass that is the widest pass of a step, so
    600 images that fit a 5 GB machine with fd (3.7 GB) do not with exact (6.8 GB)."""
    monkeypatch.setattr(memory, "memory_total", lambda device: 5 * 10 ** 9)
    out = tmp_path / "run"
    fd = call("search", "--set", "engine.batched_sets=1", "--set", "search.batch_size=600", "--check", "--out",
              str(out))
    assert fd[0] == 0, fd
    code, _, err = call("search", "--set", "engine.batched_sets=1", "--set", "search.batch_size=600", "--set",
                        "engine.hvp=exact", "--check", "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"at once\) and what one pass of 600 images keeps for its double backward \(engine.hvp=exact\) "
                     r"\(6\.\d\d GB\) take 6\.\d GB, more than the 5\.0 GB of this machine's memory; lower "
                     r"space.channels, space.layers, search.batch_size or engine.hvp \(fd: first-order passes only\)$",
                     err.strip()), err
    assert not out.exists()


def test_a_training_batch_whose_activations_cannot_fit_is_refused_before_a_run_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "memory_total", lambda device: 10 ** 9)
    out = tmp_path / "run"
    code, _, err = call("train", "--genotype", "DARTS_V2", "--preset", "eval-digits", "--set", "train.batch_size=1000",
                        "--no-report", "--quiet", "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"momentum at once\) and what one pass of 1000 images keeps for its backward \(\d\.\d\d GB\) take "
                     r"\d\.\d GB, more than the 1\.0 GB of this machine's memory; lower network.channels, "
                     r"network.layers or train.batch_size$", err.strip()), err
    assert not out.exists()


def test_the_training_pass_that_measures_activations_leaves_the_model_and_the_generators_alone():
    from ilnas.config import resolve
    from ilnas.recipes.train import _training_pass
    from ilnas.space.genotype import load_genotype

    cfg = resolve("eval-digits", overrides=["network.layers=3", "network.channels=4"], kind="eval")
    model = build_network(load_genotype("DARTS_V2"), 10, 1, 16, **cfg.network.build_args()).eval()
    data = type("Data", (), {"in_channels": 1, "resolution": 16})
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    logits, aux = _training_pass(model, cfg, data, torch.device("cpu"), 4, 16)
    assert logits.shape == (4, 10) and aux is not None and logits.requires_grad
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_search_on_large_images_is_refused_for_its_batch_without_the_check_running_out_of_memory():
    """The digits at 256x256: the two tasks' images resized a chunk at a time, and the activations measured on
    64x64 images and scaled, under a 5 GB address-space limit. The whole set resized at once, then 4 images a pass
    measured at their own size, ran out of memory there ("out of memory (1.3 GB at once)"); at 1000x1000 the
    kernel killed the check itself on a 24 GB machine."""
    r = subprocess.run([sys.executable, "-m", "ilnas", "search", "--set", "data.image_size=256", "--set",
                        "search.batch_size=600", "--check"], capture_output=True, text=True, timeout=300,
                       preexec_fn=under_address_space_limit(5))
    assert r.returncode == 2 and re.search(r"what one pass of 600 images through 4 weight sets side by side keeps "
                                           r"for its backward \(343\d\.\d\d GB\)", r.stderr), r.stderr


def test_describe_gives_the_size_of_a_network_that_would_not_fit_in_memory():
    """C=3000: 21.9 G parameters, 88 GB of weights; described under a 4 GB address-space limit (the
    network is built on the meta device, shapes only)."""
    r = subprocess.run([sys.executable, "-m", "ilnas", "describe", "DARTS_V2", "--set", "network.channels=3000"],
                       capture_output=True, text=True, timeout=300, preexec_fn=under_address_space_limit(4))
    assert r.returncode == 0, r.stderr
    assert "parameters: 21895.56M (auxiliary head excluded), 21902.11M in all" in r.stdout
    assert "multiply-adds: 3385715M at 32x32" in r.stdout


PDARTS_TWO_PHASES = ["search", "--preset", "pdarts-cifar10", "--no-report", "--quiet", *(
    a for kv in ("data.tasks=[digits]", "space.channels=4", "pdarts.layers=[3, 9]", "pdarts.ops_per_edge=[8, 4]",
                 "pdarts.skip_dropout=[0.0, 0.0]", "search.batch_size=64", "search.epochs=1", "search.warmup_epochs=0",
                 "search.steps_per_epoch=1", "search.eval_batches=1") for a in ("--set", kv))]


def test_a_later_pdarts_phase_that_may_not_fit_is_warned_of_at_the_start(tmp_path, monkeypatch):
    """Phase 2 (9 cells) keeps 4 of the 8 operations of each edge, known only once phase 1 (3 cells) has ended.
    Under 0.3 GB the first phase's step fits (0.17 GB) and the second's, should every edge keep its four heaviest
    operations, would not (0.38 GB): the run starts, and says so at once, rather than stopping hours in."""
    from ilnas.recipes.search import warn_of_later_phases

    monkeypatch.setattr(memory, "memory_total", lambda device: 3 * 10 ** 8)
    code, _, err = call(*PDARTS_TWO_PHASES, "--out", str(tmp_path / "tight"))
    assert code == 0, err
    assert re.fullmatch(r"ilnas: warning: phase 2 of 2 \(9 cells, 4 operations an edge\) may not fit, should its edges "
                        r"keep their heaviest operations: the supernet's weights .* and what one pass of 64 images "
                        r"keeps for its backward \(0\.3\d GB\) take 0\.\d GB, more than the 0\.3 GB of this machine's "
                        r"memory; lower space.channels, pdarts.layers or search.batch_size\n", err), err
    monkeypatch.setattr(memory, "memory_total", lambda device: 10 ** 9)  # checked as it would start: no warning
    code, _, err = call(*PDARTS_TWO_PHASES, "--out", str(tmp_path / "roomy"), "--check")
    assert code == 0 and err == "", err
    monkeypatch.setattr(memory, "memory_total", lambda device: 3 * 10 ** 8)  # a run resumed in phase 2: nothing to say
    from ilnas.config import resolve
    from ilnas.data.loader import BatchMaker
    from ilnas.data.tasks import create_task
    from ilnas.search.methods import create_method

    cfg = resolve("pdarts-cifar10", overrides=[a for a in PDARTS_TWO_PHASES[3:] if "=" in a])
    task = create_task("digits", cfg.data)
    val = [BatchMaker(task, task.val, torch.device("cpu"), torch.float32, augment=False)]
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # on the logger itself: the CLI's calls above stopped its propagation
    logging.getLogger("ilnas").addHandler(handler)
    try:
        for current in (0, 1):
            warn_of_later_phases(cfg, [task], create_method(cfg).phases, current, val, torch.device("cpu"),
                                 torch.float32)
            assert [r.getMessage()[:13] for r in records] == ["phase 2 of 2 "]  # from current 0 only
    finally:
        logging.getLogger("ilnas").removeHandler(handler)
