"""Stage batching: weight sets side by side along the channels give the numbers of one pass per set."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.func import functional_call

from helpers import engine_hypergradient, make_problem, rel_error
from ilnas import SGD, EngineConfig, SpaceConfig, SupernetSearch
from ilnas.errors import IlnasError
from ilnas.search.engine import hypergradient, search_step, widest_pass
from ilnas.space.layout import EXTRA_OPS, PRIMITIVES, full_edge_ops
from ilnas.space.sets import cat_channels, shuffle_channels, slice_channels, stack_sets, unstack_sets
from ilnas.space.supernet import Supernet, arch_weights, init_arch

SETS = 3


def per_set(x: torch.Tensor, sets: int) -> list[torch.Tensor]:
    return list(x.chunk(sets, 1))


@pytest.mark.parametrize("nhwc", [False, True])
def test_channel_moves_keep_the_sets_apart_and_the_layout(nhwc):
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    a, b = (torch.randn(2, SETS * c, 3, 3).contiguous(memory_format=fmt) for c in (4, 2))
    cat = cat_channels([a, b], SETS)
    assert torch.equal(cat, torch.cat([torch.cat([x, y], 1) for x, y in zip(per_set(a, SETS), per_set(b, SETS))], 1))
    assert cat.is_contiguous(memory_format=fmt)
    sliced = slice_channels(a, 1, 3, SETS)
    assert torch.equal(sliced, torch.cat([x[:, 1:3] for x in per_set(a, SETS)], 1))
    shuffled = shuffle_channels(a, 2, SETS)
    assert torch.equal(shuffled, torch.cat([shuffle_channels(x, 2) for x in per_set(a, SETS)], 1))
    assert shuffled.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("partial_channels, edge_normalization, channels_last, ops",
                         [(1, False, False, PRIMITIVES), (1, False, True, PRIMITIVES), (4, True, True, PRIMITIVES),
                          (4, True, False, PRIMITIVES), (1, False, True, PRIMITIVES + EXTRA_OPS)])
def test_a_supernet_of_three_sets_is_three_supernets(partial_channels, edge_normalization, channels_last, ops):
    """Output and every gradient (architecture and each set's weights), through normal and reduction
    cells, plain DARTS and PC-DARTS, NCHW and NHWC, DARTS's operations and the two extra ones, in float64."""
    torch.manual_seed(0)
    net = Supernet(2, 8, 3, full_edge_ops(ops), full_edge_ops(ops), partial_channels=partial_channels,
                   channels_last=channels_last).double()
    names = [n for n, _ in net.named_parameters()]
    sets = [[torch.randn_like(p).requires_grad_() for p in net.parameters()] for _ in range(SETS)]
    arch = [a.requires_grad_() for a in init_arch(net.num_ops, edge_normalization, dtype=torch.float64)]
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    outs = [functional_call(net, dict(zip(names, w)), (x, *arch_weights(arch))) for w in sets]
    stacked = [t.detach().requires_grad_() for t in stack_sets([[t.detach() for t in w] for w in sets])]
    out = functional_call(net.batched(SETS), dict(zip(names, stacked)), (x.repeat(1, SETS, 1, 1), *arch_weights(arch)))
    assert out.shape == (3, SETS, net.out_features)
    assert max((out[:, s] - outs[s]).abs().max().item() for s in range(SETS)) < 1e-12
    probe = torch.randn(out.shape, dtype=torch.float64)
    expected = torch.autograd.grad(sum((o * probe[:, s]).sum() for s, o in enumerate(outs)), arch + sum(sets, []))
    got = torch.autograd.grad((out * probe).sum(), arch + stacked)
    assert rel_error(got[:len(arch)], expected[:len(arch)]) < 1e-10
    got_sets = unstack_sets(list(got[len(arch):]), SETS)
    n = len(names)
    for s in range(SETS):
        assert rel_error(got_sets[s], expected[len(arch) + s * n:len(arch) + (s + 1) * n]) < 1e-10


def test_a_supernets_batched_twin_is_built_once_per_number_of_sets_and_follows_its_mode():
    """The learners of a search share one supernet, and so its weightless twins: one per number of sets, kept
    apart from its own parameters, in the mode the supernet is in whenever it is asked for."""
    net = Supernet(2, 4, 3)
    twin = net.batched(2)
    assert net.batched(2) is twin and net.batched(3) is not twin and twin.training
    net.eval()
    assert net.batched(2) is twin and not any(m.training for m in twin.modules())
    assert all(p.is_meta for p in twin.parameters()) and not any(p.is_meta for p in net.parameters())
    assert len(net.state_dict()) == len(Supernet(2, 4, 3).state_dict())


@pytest.mark.parametrize("K, M, coupling, hvp", [(2, 2, "prox", "fd"), (2, 3, "gd", "fd"), (2, 1, "none", "fd"),
                                                (1, 1, "none", "fd"), (2, 2, "prox", "exact"),
                                                (2, 2, "copy", "fd")])
def test_the_batched_hypergradient_is_the_one_pass_per_set_hypergradient(K, M, coupling, hvp):
    cfg = EngineConfig(hvp=hvp, coupling=coupling, lam=1.0, allow_unstable=True)
    one_by_one = engine_hypergradient(make_problem(K=K, M=M, batched=False), cfg, 0.1)
    for sets in (2, 8):  # groups of one stage (its two FD passes), of every stage of a learner
        batched = engine_hypergradient(make_problem(K=K, M=M), dataclasses.replace(cfg, batched_sets=sets), 0.1)
        assert rel_error(batched, one_by_one) < 1e-12


@pytest.mark.parametrize("K, M, coupling, order, hvp, sets", [
    (2, 2, "prox", 2, "fd", 8), (2, 3, "gd", 2, "fd", 4), (1, 1, "none", 2, "fd", 8), (2, 2, "prox", 2, "exact", 8),
    (2, 2, "copy", 2, "fd", 8), (2, 3, "prox", 1, "fd", 2), (2, 2, "prox", 2, "fd", 1)])
def test_the_widest_pass_of_a_step_is_the_one_the_memory_check_counts(K, M, coupling, order, hvp, sets):
    """The search's memory check counts a step's activations as widest_pass() weight sets side by side: the
    most that any pass of a whole step (virtual steps, hypergradient, commit) evaluates at once."""
    p = make_problem(K=K, M=M)
    cfg = EngineConfig(order=order, hvp=hvp, coupling=coupling, lam=1.0, allow_unstable=True, batched_sets=sets)
    widths = []

    def counting(losses):
        def counted(arch, ws, hs, batch):
            widths.append(len(ws))
            return losses(arch, ws, hs, batch)
        return counted
    learners = [dataclasses.replace(learner, losses=counting(learner.losses)) for learner in p.learners]
    search_step(p.state, learners, p.train, p.val, cfg, SGD(), 0.1)
    assert max(widths, default=1) == widest_pass(cfg, M)


# Four operations, one of each kind, half the time of DARTS's eight. Average pooling, not max: with a max-pool's
# kink, one thread's float32 rounding sent Adam's second architecture step 4e-4 apart (the weights 3e-8).
SMOOTH_FOUR_OPS = ("none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3")


def small_search(batched_sets: int, dtype: torch.dtype = torch.float32, **engine) -> SupernetSearch:
    torch.manual_seed(0)  # the same heads
    return SupernetSearch({"a": nn.Linear(64, 3), "b": nn.Linear(64, 4)}, 1,
                          space=SpaceConfig(channels=4, layers=3, ops=SMOOTH_FOUR_OPS),
                          engine=EngineConfig(batched_sets=batched_sets, **engine), dtype=dtype,
                          sgd=SGD(lr=0.05, momentum=0.9, weight_decay=3e-4))


def batches(step: int, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {t: (torch.randn(8, 1, 8, 8, generator=gen, dtype=dtype), torch.randint(0, c, (8,), generator=gen))
            for t, c in (("a", 3), ("b", 4))}


@pytest.mark.parametrize("update_order", ["alg1", "darts"])
def test_a_float32_search_is_the_same_batched_or_not(update_order):
    """In float32: the same hypergradient (to 1e-5), the same architecture and committed weights after two
    steps (to 1e-5), the same genotype after four."""
    eager, fast = small_search(1, update_order=update_order), small_search(8, update_order=update_order)
    for run in (eager, fast):
        run.calls = {"loss": 0, "losses": 0}
        for learner in run.learners:
            learner_loss, learner_losses = learner.loss, learner.losses
            object.__setattr__(learner, "loss", counted(run.calls, "loss", learner_loss))
            object.__setattr__(learner, "losses", counted(run.calls, "losses", learner_losses))
    hyper = [hypergradient(run.state, run.learners, list(batches(0, torch.float32).values()),
                           list(batches(1, torch.float32).values()), run.engine, run.sgd, 0.05)[0]
             for run in (eager, fast)]
    assert rel_error(hyper[1], hyper[0]) < 1e-5
    for step in range(4):
        for run in (eager, fast):
            run.step(batches(2 * step, torch.float32), batches(2 * step + 1, torch.float32))
        if step == 1:  # later, Adam turns rounding-level differences of near-zero components into whole steps
            assert rel_error(fast.state.arch, eager.state.arch) < 1e-5
            for a, b in zip(eager.state.stages, fast.state.stages):
                assert rel_error(b.w + b.h, a.w + a.h) < 1e-5
    assert fast.genotype() == eager.genotype()
    # per step: 4 stage gradients and 8 FD passes one by one, or 2 + 2 batched passes (one per task each),
    # plus the commit's 4 gradients at the new A under update_order=darts; 2 validation passes either way
    commits = 4 if update_order == "darts" else 0
    # (five hypergradients: the one above and four steps; four commits)
    assert eager.calls == {"loss": 5 * (4 + 2 + 8) + 4 * commits, "losses": 0}
    assert fast.calls == {"loss": 5 * 2, "losses": 5 * (2 + 2) + 4 * commits // 2}


def counted(calls: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        calls[key] += 1
        return fn(*args, **kwargs)
    return wrapper


def test_batched_sets_below_one_is_refused():
    with pytest.raises(IlnasError, match="engine.batched_sets must be an integer >= 1, got 0"):
        small_search(0)
