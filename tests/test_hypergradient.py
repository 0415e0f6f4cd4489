"""The engine's hypergradient against brute-force autograd through the whole unrolled chain."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import Problem, brute_force, engine_hypergradient, make_problem, rel_error
from ilnas.search.coupling import COUPLINGS, create_coupling
from ilnas.optim import SGD
from ilnas.search.engine import EngineConfig, SearchState, Stage, search_step
from ilnas.search.hvp import HVPS

LR, LAM = 0.1, 1.0


@pytest.mark.parametrize("coupling", list(COUPLINGS))
def test_exact_hypergradient_equals_autograd_through_the_unrolled_chain(coupling):
    p = make_problem(K=2, M=2)
    cfg = EngineConfig(hvp="exact", coupling=coupling, lam=LAM, allow_unstable=True)
    expected = brute_force(p, cfg, LR)
    assert torch.cat([e.flatten() for e in expected]).norm() > 1e-3  # a real signal, not zeros
    assert rel_error(engine_hypergradient(p, cfg, LR), expected) < 1e-8


@pytest.mark.parametrize("coupling", list(COUPLINGS))
def test_finite_difference_hypergradient_converges_to_autograd(coupling):
    """On a smooth supernet the FD error is the O(eps^2) truncation error: below 1e-3 at eps=1e-3,
    and ten times smaller eps gives a far smaller error."""
    p = make_problem(K=2, M=2, smooth_ops=True)
    exact = brute_force(p, EngineConfig(coupling=coupling, lam=LAM), LR)
    errors = [rel_error(engine_hypergradient(p, EngineConfig(hvp="fd", fd_eps=eps, coupling=coupling, lam=LAM,
                                                                allow_unstable=True), LR), exact)
              for eps in (1e-2, 1e-3)]
    assert errors[1] < 1e-3
    assert errors[1] < errors[0] / 30


def test_mtl_equals_the_sum_of_two_single_task_hypergradients():
    """lambda = 0, M = 1, K = 2 is Eq. 10 with alpha = beta = 1."""
    p = make_problem(K=2, M=1)
    cfg = EngineConfig(hvp="exact", coupling="none", lam=0.0)
    joint = engine_hypergradient(p, cfg, LR)
    singles = []
    for k in range(2):
        q = copy.copy(p)
        q.state = copy.copy(p.state)
        q.state.stages = [copy.copy(p.state.stages[k])]
        q.state.stages[0].learner = 0
        q.learners, q.train, q.val = [p.learners[k]], [p.train[k]], [p.val[k]]
        singles.append(engine_hypergradient(q, cfg, LR))
    assert rel_error(joint, [a + b for a, b in zip(*singles)]) < 1e-12


def test_task_weights_scale_the_mtl_objective():
    p = make_problem(K=2, M=1)
    base = EngineConfig(hvp="exact", coupling="none", lam=0.0)
    g1 = engine_hypergradient(p, base, LR)
    g2 = engine_hypergradient(p, EngineConfig(hvp="exact", coupling="none", lam=0.0, val_weights=(2.0, 2.0),
                                              train_weights=(1.0, 1.0)), LR)
    assert rel_error(g2, [2 * g for g in g1]) < 1e-12


# --- the official DARTS-2nd architect step, written independently ------------------------------

class DartsModel(nn.Module):
    """DARTS's Network: alphas as parameters of the model, weights = encoder + classifier."""

    def __init__(self, net, w, h, arch):
        super().__init__()
        self.encoder, self.head = copy.deepcopy(net.encoder), copy.deepcopy(net.head)
        with torch.no_grad():
            for p, v in zip(self.weights(), w + h):
                p.copy_(v)
        self.alphas = nn.ParameterList([nn.Parameter(a.detach().clone()) for a in arch])

    def weights(self):
        return list(self.encoder.parameters()) + list(self.head.parameters())

    def loss(self, x, y):
        feats = self.encoder(x, self.alphas[0].softmax(-1), self.alphas[1].softmax(-1))
        return nn.functional.cross_entropy(self.head(feats), y)


def official_darts_step(model: DartsModel, w_opt, a_opt, train, val, lr, momentum, wd, r=1e-2):
    """architect.step(unrolled=True) followed by train_search.py's weight step."""
    # _compute_unrolled_model: theta - eta * (momentum * buf + dtheta + wd * theta)
    unrolled = copy.deepcopy(model)
    grads = torch.autograd.grad(model.loss(*train), model.weights())
    with torch.no_grad():
        for p, q, g in zip(model.weights(), unrolled.weights(), grads):
            buf = w_opt.state[p]["momentum_buffer"]
            q.copy_(p - lr * (momentum * buf + g + wd * p))
    # _backward_step_unrolled
    unrolled.zero_grad()
    unrolled.loss(*val).backward()
    dalpha = [a.grad.clone() for a in unrolled.alphas]
    vector = [q.grad.clone() for q in unrolled.weights()]
    R = r / torch.cat([v.flatten() for v in vector]).norm()
    with torch.no_grad():
        for p, v in zip(model.weights(), vector):
            p.add_(v, alpha=R)
    grads_p = torch.autograd.grad(model.loss(*train), list(model.alphas))
    with torch.no_grad():
        for p, v in zip(model.weights(), vector):
            p.sub_(v, alpha=2 * R)
    grads_n = torch.autograd.grad(model.loss(*train), list(model.alphas))
    with torch.no_grad():
        for p, v in zip(model.weights(), vector):
            p.add_(v, alpha=R)
    for a, d, gp, gn in zip(model.alphas, dalpha, grads_p, grads_n):
        a.grad = d - lr * (gp - gn) / (2 * R)
    a_opt.step()
    # the weight step at the new alphas
    w_opt.zero_grad()
    model.loss(*train).backward()
    nn.utils.clip_grad_norm_(model.weights(), 5.0)
    w_opt.step()


def test_single_task_step_equals_the_official_darts_architect():
    p = make_problem(K=1, M=1, momentum_buffers=False)
    st = p.state.stages[0]
    model = DartsModel(p.learners[0].loss.__self__, st.w, st.h, p.state.arch)
    w_opt = torch.optim.SGD(model.weights(), lr=LR, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(model.alphas, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    # one plain weight step first, so that both sides carry real momentum buffers
    w_opt.zero_grad()
    model.loss(*p.train[0]).backward()
    w_opt.step()
    st.w = [q.detach().clone() for q in model.encoder.parameters()]
    st.h = [q.detach().clone() for q in model.head.parameters()]
    bufs = [w_opt.state[q]["momentum_buffer"].clone() for q in model.weights()]
    st.buf_w, st.buf_h = bufs[:len(st.w)], bufs[len(st.w):]

    cfg = EngineConfig(order=2, hvp="fd", coupling="none", lam=0.0, update_order="darts", virtual_momentum=True)
    sgd = SGD(momentum=0.9, weight_decay=3e-4, grad_clip=5.0)
    for _ in range(2):
        search_step(p.state, p.learners, p.train, p.val, cfg, sgd, LR)
        official_darts_step(model, w_opt, a_opt, p.train[0], p.val[0], LR, 0.9, 3e-4)
    for ours, theirs in zip(p.state.arch, model.alphas):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-10)
    for ours, theirs in zip(st.w + st.h, model.weights()):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-10)
    assert not torch.allclose(p.state.arch[0], model.alphas[0] * 0)  # sanity: non-trivial alphas


def test_literal_gd_coupling_diverges_where_prox_stays_stable():
    """At the paper's eta = 0.025 and lambda = 100 (2 eta lambda = 5), committing Eq. 7 literally
    overshoots by -4x per step; the proximal form contracts towards the previous stage instead."""
    norms = {}
    for coupling in ("gd", "prox"):
        p = make_problem(K=2, M=2, momentum_buffers=False)
        cfg = EngineConfig(order=1, coupling=coupling, lam=100.0, allow_unstable=True)
        for _ in range(6):
            search_step(p.state, p.learners, p.train, p.val, cfg, SGD(grad_clip=None), 0.025)
        norms[coupling] = max(float(torch.cat([w.flatten() for w in st.w]).abs().max()) for st in p.state.stages)
    assert norms["prox"] < 10.0
    assert not norms["gd"] < 1e3  # also true when it has overflowed to inf/nan


def test_copy_coupling_commits_gradients_at_the_clipped_previous_weights():
    """alg1 + copy: stage s starts from stage s-1's committed (clipped) weights, so its real update must use
    the gradient there, not the one the unrolled chain took at the unclipped virtual weights."""
    p = make_problem(K=2, M=2)
    clip, lr, mom, wd = 0.05, 0.1, 0.9, 3e-4
    arch0 = [a.detach().clone() for a in p.state.arch]
    expected, prev, clipped = [], None, []
    for s, st in enumerate(p.state.stages):
        w = [x.detach().requires_grad_() for x in (prev if s > 0 else st.w)]
        h = [x.detach().requires_grad_() for x in st.h]
        g = torch.autograd.grad(p.learners[st.learner].loss(arch0, w, h, p.train[st.learner]), w + h)
        total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in g])))
        clipped.append(total > clip)
        g = [x * (clip / (total + 1e-6)) for x in g] if total > clip else list(g)
        bufs = [mom * b + gi + wd * q.detach() for b, gi, q in zip(st.buf_w + st.buf_h, g, w + h)]
        new = [q.detach() - lr * b for q, b in zip(w + h, bufs)]
        expected.append(new)
        prev = new[:len(w)]
    assert all(clipped)
    cfg = EngineConfig(order=1, coupling="copy", update_order="alg1")
    search_step(p.state, p.learners, p.train, p.val, cfg, SGD(momentum=mom, weight_decay=wd, grad_clip=clip), lr)
    for st, want in zip(p.state.stages, expected):
        for got, w in zip(st.w + st.h, want):
            assert torch.allclose(got, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(COUPLINGS))
def test_a_coupling_built_directly_knows_its_own_facts(name):
    direct, made = COUPLINGS[name](lr=0.025, lam=1.0), create_coupling(name, 0.025, 1.0)
    assert (direct.grad_at_prev, direct.needs_w_hvp) == (made.grad_at_prev, made.needs_w_hvp)
    assert (direct.grad_at_prev, direct.needs_w_hvp) == ((True, True) if name == "copy" else (False, False))


@pytest.mark.parametrize("hvp", sorted(HVPS))
def test_every_registered_hvp_gives_the_hypergradient_of_the_unrolled_chain(hvp):
    p = make_problem(K=2, M=2, smooth_ops=True)
    cfg = EngineConfig(hvp=hvp, fd_eps=1e-3, coupling="prox", lam=LAM)
    assert rel_error(engine_hypergradient(p, cfg, LR), brute_force(p, cfg, LR)) < 1e-3


@pytest.mark.parametrize("want_w", [False, True])
def test_a_zero_direction_gives_an_exactly_zero_finite_difference_product(want_w):
    """The FD radius stays on the device (no host synchronisation); v = 0 must still give exact zeros."""
    from ilnas.search.hvp import fd

    p = make_problem(K=1, M=1)
    st, (x, y) = p.state.stages[0], p.train[0]
    loss = lambda a, w, h: p.learners[0].loss(a, w, h, (x, y))  # noqa: E731
    arch = [a.detach().requires_grad_() for a in p.state.arch]
    d_arch, d_w = fd(loss, arch, st.w, st.h, [torch.zeros_like(t) for t in st.w], [torch.zeros_like(t) for t in st.h],
                     want_w)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in d_arch + (d_w or []))
    assert (d_w is not None) == want_w


def in_dtype(p, dtype: torch.dtype):
    """The same problem (same numbers, rounded) in another precision, its alphas at DARTS's 1e-3 scale."""
    cast = lambda ts: None if ts is None else [t.detach().to(dtype) for t in ts]  # noqa: E731
    arch = [(a.detach() / 300).to(dtype).requires_grad_() for a in p.state.arch]
    stages = [Stage(s.learner, cast(s.w), cast(s.h), cast(s.buf_w), cast(s.buf_h)) for s in p.state.stages]
    batches = lambda bs: [(x.to(dtype), y) for x, y in bs]  # noqa: E731
    return Problem(SearchState(arch, torch.optim.Adam(arch), stages), p.learners, batches(p.train), batches(p.val))


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat([x.double().flatten() for x in a]), torch.cat([x.double().flatten() for x in b])
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("cfg, bound", [(EngineConfig(order=1), 0.95), (EngineConfig(hvp="exact"), 0.9),
                                        (EngineConfig(hvp="fd"), 0.6)])
def test_bf16_autocast_hypergradient_stays_near_the_float64_one(cfg, bound):
    """search.amp's deviation, bounded: bf16 passes (fp32 weights, sums, and FD passes) keep the direction
    of the float64 hypergradient. Measured cosines on seeds 0-4 of this problem: first order 0.98-0.99, exact
    0.97-0.99, fd 0.90-0.96; on DARTS's 14-edge cell, exact 0.93-0.97 and fd 0.71-0.92 (0.29-0.67 if the FD
    passes also ran in bf16, which is why they do not). float32 alone keeps the direction (most often within 5e-6
    relative; but a ReLU or a max-pool makes the loss kinked, and one precision's rounding can put a perturbed pass
    across a kink that the other's does not: fd on seed 1 of the 14-edge cell with one thread is 1.6% off, its
    cosine 0.99988)."""
    for seed in range(2):
        p = make_problem(seed=seed)
        want = engine_hypergradient(in_dtype(p, torch.float64), cfg, 0.05)
        fp32 = engine_hypergradient(in_dtype(p, torch.float32), cfg, 0.05)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = engine_hypergradient(in_dtype(p, torch.float32), cfg, 0.05)
        assert all(g.dtype == torch.float32 for g in bf16)
        assert cosine(fp32, want) > 0.999
        assert rel_error(bf16, [g.float() for g in want]) > 1e-3  # bf16 really ran
        assert cosine(bf16, want) > bound



# A changed value for each engine setting the test below varies.
CHANGED = {"engine.hvp": lambda v: "exact" if v == "fd" else "fd", "engine.fd_eps": lambda v: 0.3,
           "engine.lam": lambda v: 3.0, "engine.virtual_momentum": lambda v: not v,
           "engine.allow_unstable": lambda v: not v, "engine.coupling": lambda v: "prox" if v != "prox" else "gd"}


@pytest.mark.parametrize("cfg, K, M, read", [
    (EngineConfig(order=1, coupling="prox", lam=1.0), 2, 1, "engine.lam"),
    (EngineConfig(order=2, hvp="exact", coupling="prox", lam=1.0), 2, 1, "engine.virtual_momentum"),
    (EngineConfig(order=2, coupling="none"), 2, 1, "engine.coupling"),
    (EngineConfig(order=2, coupling="copy"), 2, 1, "engine.fd_eps"),
    (EngineConfig(order=2, coupling="prox", lam=1.0), 1, 1, "engine.hvp"),
], ids=["first-order", "exact", "mtl", "copy", "single-stage"])
def test_the_engine_settings_a_run_never_reads_change_no_number_and_one_it_reads_does(cfg, K, M, read):
    """What config.schema.unused_settings calls unused (compare pools runs over it, a sweep refuses cells that
    differ only in it): a search step with it changed ends in the same architecture, weights and momentum
    buffers, bit for bit; ``read``, a setting the run reads, changed moves them (the comparison can fail)."""
    from dataclasses import asdict, replace

    from ilnas.config.schema import unused_settings

    problem = make_problem(K=K, M=M)  # with momentum buffers: as a step of a run past its first

    def after_a_step(engine: EngineConfig) -> list[torch.Tensor]:
        p = copy.deepcopy(problem)
        search_step(p.state, p.learners, p.train, p.val, engine, SGD(), 0.1)
        return [*p.state.arch, *(x for st in p.state.stages for x in (*st.w, *st.h, *st.buf_w, *st.buf_h))]

    unused = unused_settings({"kind": "search", "engine": asdict(cfg), "search": {"rounds": M},
                              "data": {"tasks": [f"t{k}" for k in range(K)]}})
    assert read not in unused and {k for k in unused if k.startswith("engine.")} <= set(CHANGED)
    base = after_a_step(cfg)
    for key in sorted(k for k in unused if k.startswith("engine.")) + [read]:
        name = key.split(".")[1]
        changed = after_a_step(replace(cfg, **{name: CHANGED[key](getattr(cfg, name))}))
        same = all(torch.equal(a, b) for a, b in zip(base, changed, strict=True))
        assert same == (key != read), f"{key} changed: the same numbers {same}"
