"""P-DARTS and PC-DARTS: partial channels, edge normalisation, pruning, skip limit, dropout, and all
nine {single, MTL, IL} x {DARTS, P-DARTS, PC-DARTS} searches end to end on the embedded tasks."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from helpers import FOUR_OPS, brute_force, engine_hypergradient, make_problem, rel_error
from ilnas.config import resolve
from ilnas.recipes.search import run_search
from ilnas.recipes.train import run_train
from ilnas.runs import read_metrics
from ilnas.config import PDartsConfig
from ilnas.errors import IlnasError
from ilnas.search.engine import EngineConfig
from ilnas.search.methods import Darts, PDarts, Phase, _edge_index, limit_skips, prune_ops
from ilnas.space.genotype import derive_genotype
from ilnas.space.layout import PRIMITIVES, full_edge_ops
from ilnas.space.sets import shuffle_channels
from ilnas.space.supernet import MixedOp, edge_weights, ranking_weights


def test_channel_shuffle_is_a_permutation():
    x = torch.arange(12.0).view(1, 12, 1, 1)
    y = shuffle_channels(x, 4).flatten().tolist()
    assert sorted(y) == list(range(12)) and y != list(range(12))
    assert y[:4] == [0, 3, 6, 9]  # one channel from each group in turn


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_channel_op_sends_a_quarter_through_the_ops(stride):
    torch.manual_seed(0)
    k, c = 4, 8
    pc = MixedOp(c, stride, PRIMITIVES, partial_channels=k)
    plain = MixedOp(c // k, stride, PRIMITIVES, partial_channels=1)
    plain.load_state_dict(pc.state_dict())
    x, w = torch.randn(3, c, 8, 8), torch.softmax(torch.randn(len(PRIMITIVES)), -1)
    out = pc(x, w)
    assert out.shape == (3, c, 8 // stride, 8 // stride)
    unshuffled = shuffle_channels(out, c // k)  # the inverse of a shuffle with k groups
    assert torch.allclose(unshuffled[:, :c // k], plain(x[:, :c // k], w), atol=1e-6)
    bypass = x[:, c // k:] if stride == 1 else torch.nn.functional.max_pool2d(x[:, c // k:], 2, 2)
    assert torch.equal(unshuffled[:, c // k:], bypass)


def test_one_partial_channel_group_is_the_plain_mixed_op():
    torch.manual_seed(0)
    op = MixedOp(4, 1, PRIMITIVES, partial_channels=1)
    x, w = torch.randn(2, 4, 6, 6), torch.softmax(torch.randn(8), -1)
    assert torch.allclose(op(x, w), sum(wi * o(x) for wi, o in zip(w, op.ops)), atol=1e-6)


def test_edge_weights_are_a_softmax_per_node():
    b = torch.randn(14)
    w = edge_weights(b)
    for start, n in ((0, 2), (2, 3), (5, 4), (9, 5)):
        assert torch.allclose(w[start:start + n], torch.softmax(b[start:start + n], -1))


@pytest.mark.parametrize("coupling", ["prox", "copy"])
def test_betas_get_the_exact_hypergradient_through_the_chain(coupling):
    p = make_problem(K=2, M=2, partial_channels=2, edge_normalization=True)
    cfg = EngineConfig(hvp="exact", coupling=coupling, lam=1.0)
    expected = brute_force(p, cfg, 0.1)
    assert len(expected) == 4 and float(expected[2].norm()) > 1e-4  # betas move
    assert rel_error(engine_hypergradient(p, cfg, 0.1), expected) < 1e-8


def test_genotype_ranks_edges_by_edge_weight_times_alpha():
    alphas = torch.zeros(14, 8)
    alphas[:, PRIMITIVES.index("sep_conv_3x3")] = 1.0
    alphas[0, PRIMITIVES.index("dil_conv_3x3")] = 3.0  # edge 0 has the strongest op ...
    betas = torch.zeros(14)
    betas[1] = 5.0  # ... but node 0 trusts edge 1, and edge 2 of node 1
    betas[4] = 5.0
    normal, _ = ranking_weights([alphas, alphas, betas, betas])
    assert normal.shape == (14, 8)
    g = derive_genotype(normal, normal)
    assert g.normal[:2] == (("sep_conv_3x3", 1), ("dil_conv_3x3", 0))
    assert g.normal[2] == ("sep_conv_3x3", 2)


@pytest.mark.parametrize("layers", [1, 2])
def test_a_supernet_without_a_normal_cell_is_refused(layers):
    """Below three cells every cell is a reduction cell: the normal cell's architecture gets no gradient, and
    its genotype (or, in P-DARTS, the ops kept for the next phase) would come from its initialisation."""
    from ilnas.space.supernet import Supernet, arch_weights, init_arch

    net = Supernet(1, 4, layers)
    arch = [a.requires_grad_() for a in init_arch(net.num_ops, generator=torch.Generator().manual_seed(0))]
    net(torch.randn(2, 1, 16, 16), *arch_weights(arch)).sum().backward()
    assert arch[0].grad is None and arch[1].grad.abs().sum() > 0  # what the refusal is for
    for preset, setting, name in (
            ("darts2nd-cifar10", f"space.layers={layers}", "space.layers"),
            ("pdarts-cifar10", f"pdarts.layers=[5, {layers}, 17]", "every entry of pdarts.layers")):
        with pytest.raises(IlnasError, match=f"^{name} must be at least 3, got {layers}: with fewer cells"):
            resolve(preset, overrides=[setting])


def test_pruning_keeps_the_strongest_ops_of_each_edge():
    torch.manual_seed(0)
    ops = full_edge_ops()
    for keep in (5, 3):
        w = torch.softmax(torch.randn(14, len(ops[0])), -1)
        pruned = prune_ops(w, ops, keep)
        assert all(len(p) == keep for p in pruned)
        for e in range(14):
            top = {ops[e][int(j)] for j in w[e].argsort(descending=True)[:keep]}
            assert set(pruned[e]) == top
            assert [PRIMITIVES.index(o) for o in pruned[e]] == sorted(PRIMITIVES.index(o) for o in pruned[e])
        ops = pruned


def test_skip_limit_strikes_the_weakest_skips_first():
    ops = [["none", "skip_connect", "sep_conv_3x3"]] * 14
    w = torch.tensor([[0.0, 0.6, 0.4]] * 14)  # skip wins every edge at first
    for e, strength in enumerate((0.90, 0.80, 0.70, 0.65, 0.61, 0.95, 0.85, 0.75, 0.62, 0.99, 0.88, 0.63, 0.64, 0.66)):
        w[e, 1] = strength
    g = limit_skips(w, w, ops, ops, max_skips=2)
    normal = [op for op, _ in g.normal]
    assert normal.count("skip_connect") == 2
    # the two strongest skip-connects survive: edge 9 (0.99, node 3 input 0) and edge 5 (0.95, node 2 input 0)
    assert ("skip_connect", 0) in g.normal[4:6] and ("skip_connect", 0) in g.normal[6:8]
    assert [op for op, _ in g.reduce].count("skip_connect") == 8  # the rule is for the normal cell only
    assert [op for op, _ in limit_skips(w, w, ops, ops, max_skips=8).normal].count("skip_connect") == 8


def test_skip_limit_on_edges_left_with_none_and_skip_connect_alone(caplog):
    """pdarts.ops_per_edge ending at 2 can leave an edge [none, skip_connect]: striking that skip-connect made
    the cell take 'none', and the search ended, after all its phases, in "malformed genotype". Now its node
    takes another edge (as the official code's zeroed skip probability does), and where none is left (every
    edge of a node [none, skip_connect]), the cell keeps the skip-connect with a warning."""
    torch.manual_seed(0)
    reduce, reduce_ops = torch.rand(14, 2), [["none", "sep_conv_3x3"]] * 14
    with caplog.at_level(logging.WARNING, logger="ilnas"):
        kept = limit_skips(torch.rand(14, 2), reduce, [["none", "skip_connect"]] * 14, reduce_ops, max_skips=2)
    assert [op for op, _ in kept.normal] == ["skip_connect"] * 8
    assert caplog.messages == ["the final normal cell keeps 8 skip-connects, more than pdarts.max_skips=2: nothing "
                               "but none was left to take their place"]
    caplog.clear()
    # nodes 0 and 1 (edges 0-4) have only skip-connects; node 2 takes its two conv edges (7, 8) in place of
    # skip-connects on 5 and 6, however strong, and likewise nodes 3 (11, 12, 13 of 9-13)
    ops = [["none", "skip_connect"]] * 7 + [["none", "sep_conv_3x3"]] * 2 + [["none", "skip_connect"]] * 2 + \
        [["none", "sep_conv_3x3"]] * 3
    w = torch.rand(14, 2)
    w[[5, 6, 9, 10], 1] += 10  # strong skip-connects where another edge of the node can stand in
    with caplog.at_level(logging.WARNING, logger="ilnas"):
        cell = limit_skips(w, reduce, ops, reduce_ops, max_skips=2)
    chosen = [(op, _edge_index(k, j)) for k, (op, j) in enumerate(cell.normal)]
    assert [op for op, _ in chosen] == ["skip_connect"] * 4 + ["sep_conv_3x3"] * 4
    assert {e for _, e in chosen[4:6]} == {7, 8} and {e for _, e in chosen[6:]} <= {11, 12, 13}
    assert caplog.messages == ["the final normal cell keeps 4 skip-connects, more than pdarts.max_skips=2: nothing "
                               "but none was left to take their place"]


def test_skip_dropout_follows_the_official_schedule():
    # P-DARTS train_search.py: warm-up p = rate * (epochs - epoch - 1) / epochs; then rate * exp(-(epoch - warmup) * 0.2)
    pdarts = PDarts(PDartsConfig(skip_dropout=(0.0, 0.4, 0.7)))
    assert math.isclose(pdarts.skip_dropout(1, 0, 25, 10), 0.4 * 24 / 25)
    assert math.isclose(pdarts.skip_dropout(1, 9, 25, 10), 0.4 * 15 / 25)
    assert math.isclose(pdarts.skip_dropout(1, 10, 25, 10), 0.4)
    assert math.isclose(pdarts.skip_dropout(2, 15, 25, 10), 0.7 * math.exp(-1.0))
    assert pdarts.skip_dropout(0, 20, 25, 10) == 0.0
    assert Darts(8, 8).skip_dropout(0, 0, 25, 10) == 0.0 and Darts(8, 8).phases == [Phase(8, 8)]


def test_skip_dropout_is_an_argument_of_the_forward_pass():
    """Rate 0 (and evaluation mode) leave the supernet deterministic; a positive rate draws masks."""
    from ilnas.space.supernet import Supernet, arch_weights, init_arch

    net = Supernet(3, 4, 2)
    a = arch_weights(init_arch(8, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(net(x, *a), net(x, *a, skip_dropout=0.0))
    assert not torch.equal(net(x, *a, skip_dropout=0.9), net(x, *a, skip_dropout=0.9))
    net.eval()
    assert torch.equal(net(x, *a, skip_dropout=0.9), net(x, *a))


TINY = ["space.channels=8", "search.batch_size=8", "search.steps_per_epoch=2", "search.eval_batches=1",
        "search.epochs=2", "search.warmup_epochs=1", "pdarts.layers=[3, 3, 4]", "space.layers=3", FOUR_OPS,
        "pdarts.ops_per_edge=[4, 3, 2]"]
FRAMEWORKS = {"single": ["data.tasks=[digits]"], "mtl": ["data.tasks=[mnist5k, digits]"],
              "il": ["data.tasks=[mnist5k, digits]"]}
PRESETS = {("single", "darts"): "darts2nd-cifar10", ("single", "pdarts"): "pdarts-cifar10",
           ("single", "pcdarts"): "pcdarts-cifar10", ("mtl", "darts"): "mtl-darts2nd-cifar",
           ("mtl", "pdarts"): "mtl-pdarts-cifar", ("mtl", "pcdarts"): "mtl-pcdarts-cifar",
           ("il", "darts"): "il-darts2nd-cifar", ("il", "pdarts"): "il-pdarts-cifar", ("il", "pcdarts"): "il-pcdarts-cifar"}


@pytest.mark.parametrize("framework, method", list(PRESETS), ids=["-".join(k) for k in PRESETS])
def test_every_combination_searches_and_its_genotype_trains(tmp_path, framework, method):
    cfg = resolve(PRESETS[framework, method], overrides=[*TINY, *FRAMEWORKS[framework]])
    assert cfg.search.framework == framework
    report = (framework, method) == ("il", "pdarts")  # one search draws its report: every phase's cells
    genotype = run_search(cfg, tmp_path / "search", progress=False, report=report)
    records = [r for r in read_metrics(tmp_path / "search") if r["kind"] == "epoch"]
    phases = 3 if method == "pdarts" else 1
    assert len(records) == 2 * phases and [r["arch_updated"] for r in records[:2]] == [False, True]
    if method == "pdarts":
        assert [op for op, _ in genotype.normal].count("skip_connect") <= 2
    history = np.load(tmp_path / "search" / "arch_history.npz")
    assert ("p0/betas_normal" in history) == (method == "pcdarts")
    if method == "pdarts":
        assert history["p1/alphas_normal"].shape == (2, 14, 3) and history["p2/alphas_normal"].shape == (2, 14, 2)
        assert history["p1/normal_ops"].shape == (14, 3) and history["p2/reduce_ops"].shape == (14, 2)
    if report:
        plots = {p.name for p in (tmp_path / "search" / "plots").iterdir()}
        assert {f"cell_phase{p}_{c}.svg" for p in (1, 2, 3) for c in ("normal", "reduce")} <= plots
        assert {f"alphas_p{p}_{c}.png" for p in (0, 1, 2) for c in ("normal", "reduce")} <= plots
    train_cfg = resolve("eval-digits", kind="eval", overrides=[
        "data.tasks=[digits]", "network.layers=3", "network.channels=4", "train.epochs=1",
        "train.steps_per_epoch=1", "train.batch_size=8"])
    result = run_train(train_cfg, genotype, tmp_path / "train", progress=False, report=False)
    assert result["genotype"] == genotype.to_string() and result["params"] > 0
