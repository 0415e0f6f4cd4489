"""Shared fixtures: a tiny float64 supernet problem with K learners and M rounds."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import SEARCH3, TINY_TRAIN, ilnas
from ilnas.search.engine import EngineConfig, Learner, SearchState, Stage, stage_learners
from ilnas.space.functional import FunctionalTaskNet, fresh_parameters
from ilnas.space.ops import PRIMITIVES
from ilnas.space.supernet import Supernet, full_edge_ops, init_arch


def smooth(module: nn.Module) -> nn.Module:
    """Swap every ReLU for SiLU: finite differences need a smooth loss to be checked tightly."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.SiLU())
        else:
            smooth(child)
    return module


@dataclass
class Problem:
    state: SearchState
    learners: list[Learner]
    train: list
    val: list


def make_problem(K: int = 2, M: int = 2, classes=(3, 4), seed: int = 0, smooth_ops: bool = False,
                 momentum_buffers: bool = True, partial_channels: int = 1, edge_normalization: bool = False) -> Problem:
    """A 3-cell, C=2 supernet (C=4 with partial channels) on 8x8 one-channel images, float64, random data."""
    dtype = torch.float64
    primitives = [p for p in PRIMITIVES if p != "max_pool_3x3"] if smooth_ops else PRIMITIVES
    ops = full_edge_ops(primitives)

    def build_encoder() -> Supernet:
        net = Supernet(1, 2 * partial_channels, 3, ops, ops, partial_channels).to(dtype)
        return smooth(net) if smooth_ops else net

    gen = torch.Generator().manual_seed(seed)
    encoder = build_encoder()
    head_builders = [lambda c=c: nn.Linear(encoder.out_features, c).to(dtype) for c in classes[:K]]
    nets = [FunctionalTaskNet(encoder, hb(), c) for hb, c in zip(head_builders, classes)]
    learners = [Learner(f"task{k}", net.loss) for k, net in enumerate(nets)]
    stages = []
    for s, k in enumerate(stage_learners(list(range(K)), M)):
        w = fresh_parameters(build_encoder, 100 * seed + s)
        h = fresh_parameters(head_builders[k], 100 * seed + 50 + s)
        bufs = ([0.1 * torch.randn(x.shape, generator=gen, dtype=dtype) for x in w],
                [0.1 * torch.randn(x.shape, generator=gen, dtype=dtype) for x in h]) if momentum_buffers else (None, None)
        stages.append(Stage(k, w, h, *bufs))
    arch = [(a * 300).requires_grad_() for a in init_arch(len(primitives), edge_normalization, gen, dtype)]
    adam = torch.optim.Adam(arch, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)

    def batch(c: int):
        return (torch.randn(6, 1, 8, 8, generator=gen, dtype=dtype), torch.randint(0, c, (6,), generator=gen))

    return Problem(SearchState(arch, adam, stages), learners, [batch(c) for c in classes[:K]],
                   [batch(c) for c in classes[:K]])


@pytest.fixture
def problem_factory():
    return make_problem


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A finished three-epoch demo search (IL, K=2, M=2, two steps an epoch) on a tiny supernet, via the CLI."""
    out = tmp_path_factory.mktemp("runs") / "demo"
    r = ilnas(*SEARCH3, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "genotype = Genotype(" in r.stdout
    return out


TRAIN_ARGS = ["train", "--genotype", "DARTS_V2", "--preset", "eval-digits", *TINY_TRAIN, "--set", "train.epochs=3"]


@pytest.fixture(scope="session")
def finished_training(tmp_path_factory) -> Path:
    """A finished three-epoch re-training of DARTS_V2 on the digits (3 cells, C=4), run through the CLI."""
    out = tmp_path_factory.mktemp("runs") / "train"
    r = ilnas(*TRAIN_ARGS, "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


__all__ = ["EngineConfig", "make_problem", "smooth"]
