"""Evaluation networks: published parameter counts, shapes, drop-path; the search supernet's shapes and its
mixing sum's gradients."""
from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

from helpers import call
from ilnas.config import SpaceConfig, resolve
from ilnas.recipes.describe import describe
from ilnas.space.depthwise import DepthwiseConv2d, route_for, routed_conv
from ilnas.errors import IlnasError
from ilnas.space.genotype import parse_genotype, zoo
from ilnas.space.network import NetworkCIFAR, NetworkImageNet, check_input_size, count_parameters, drop_path
from ilnas.space.layout import EXTRA_OPS, PRIMITIVES, known_ops
from ilnas.space.ops import OPS, create_op
from ilnas.search.task_net import FreshParameters, fresh_parameters
from ilnas.space.supernet import Supernet, arch_weights, init_arch, weighted_sum

PUBLISHED = [  # (genotype, CIFAR-10 20 cells C=36, ImageNet 14 cells C=48), millions, as published
    ("DARTS_V2", 3.3, 4.7), ("PDARTS", 3.4, 4.9), ("PC_DARTS_cifar", 3.6, 5.3),
]


@pytest.mark.parametrize("name, cifar, imagenet", PUBLISHED)
def test_published_parameter_counts(name, cifar, imagenet):
    g = zoo()[name]
    assert round(count_parameters(NetworkCIFAR(g, 10, 20, 36)) / 1e6, 1) == cifar
    assert round(count_parameters(NetworkImageNet(g, 1000, 14, 48)) / 1e6, 1) == imagenet


def test_describe_darts_v2_on_the_cifar10_preset():
    info = describe(zoo()["DARTS_V2"], resolve("eval-cifar10", kind="eval"))
    assert info["params"] == 3_349_342  # the official code prints "param size = 3.349342MB"
    assert info["params_total"] > info["params"]
    assert 400e6 < info["macs"] < 700e6


def test_network_outputs_and_drop_path():
    g = zoo()["DARTS_V2"]
    net = NetworkCIFAR(g, 7, layers=5, channels=8)
    net.train()
    logits, aux = net(torch.randn(3, 3, 32, 32), drop_path_rate=0.3)
    assert logits.shape == (3, 7) and aux.shape == (3, 7)
    net.eval()
    x = torch.randn(3, 3, 32, 32)
    logits = net(x)  # plain logits in eval mode: no auxiliary output, no randomness
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 7) and torch.equal(net(x), logits)
    y = torch.randn(4, 2, 3, 3)
    assert torch.equal(drop_path(y, 0.5, training=False), y)
    dropped = drop_path(torch.ones(1000, 1, 1, 1), 0.25, training=True)
    kept = dropped[dropped != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.75)) and 0.15 < (dropped == 0).float().mean() < 0.35
    inet = NetworkImageNet(g, 11, layers=5, channels=8).train()
    logits, aux = inet(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 11) and aux.shape == (2, 11)


def test_compiled_network_is_not_recompiled_as_drop_path_ramps_up():
    """The re-training's drop-path rate changes every epoch; a compiled network must take it as an input, not
    compile itself again each epoch (torch.compile gives up after a few recompilations and runs eagerly)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = NetworkCIFAR(zoo()["DARTS_V2"], 10, layers=3, channels=4).train()
    net.compile(backend="aot_eager")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    graphs = []
    for rate in (0.0, 0.1, 0.2, 0.3):  # as the recipe passes it: a 0-dim tensor
        logits, aux = net(x, drop_path_rate=torch.tensor(rate))
        torch.nn.functional.cross_entropy(logits + aux, y).backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 4  # every rate, 0 included, runs the first graph
    torch._dynamo.reset()
    # eagerly, a tensor rate drops what the float rate drops, from the same draws; rate 0 drops nothing
    z = torch.ones(64, 2, 1, 1)
    torch.manual_seed(3)
    as_float = drop_path(z, 0.25, training=True)
    torch.manual_seed(3)
    assert torch.equal(as_float, drop_path(z, torch.tensor(0.25), training=True)) and not torch.equal(as_float, z)
    assert torch.equal(drop_path(z, torch.tensor(0.0), training=True), z)


def test_supernet_is_a_pure_function_of_weights_alphas_and_input():
    net = Supernet(3, 4, 5)
    a = arch_weights(init_arch(8, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(2, 3, 16, 16)
    out = net(x, *a)
    assert out.shape == (2, net.out_features) == (2, 4 * 16)
    assert torch.equal(net(x, *a), out) and not list(net.buffers())
    # 14 edges x 8 ops per cell; reductions at layers // 3 and 2 * layers // 3
    assert [c.reduction for c in net.cells] == [False, True, False, True, False]
    assert sum(len(e.ops) for e in net.cells[0].edges) == 14 * 8


def test_describe_sizes_an_image_folder_network(tmp_path):
    from helpers import write_image_folder

    write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"))
    cfg = resolve("eval-imagefolder", kind="eval", overrides=[f"data.tasks=[imagefolder:{tmp_path / 'imgs'}]"])
    info = describe(zoo()["DARTS_V2"], cfg)
    assert info["resolution"] == 224 and info["params"] > 3e6  # 14 cells, C=48, a 3-way classifier


def expected_op_parameters(name: str, c: int, stride: int, affine: bool) -> int:
    """The official DARTS operations' weights, counted by hand: a depthwise k x k conv has c * k * k, a
    pointwise conv c * c, an affine BatchNorm 2c; a separable conv is two depthwise-pointwise blocks."""
    bn = 2 * c if affine else 0
    kernel = {"3x3": 9, "5x5": 25, "7x7": 49}
    if name == "conv_7x1_1x7":  # a 1x7 and a 7x1 convolution, c to c channels each
        return 2 * 7 * c * c + bn
    if name.startswith("sep_conv"):
        return 2 * (c * kernel[name[-3:]] + c * c + bn)
    if name.startswith("dil_conv"):
        return c * kernel[name[-3:]] + c * c + bn
    if name == "skip_connect" and stride == 2:  # FactorizedReduce: two 1x1 convs to c/2 channels each
        return c * c + bn
    return 0  # none, pools (their search-mode BatchNorm is not affine), identity


def test_the_op_registry_is_the_darts_space_and_two_more_of_the_official_code():
    assert set(OPS) == set(PRIMITIVES + EXTRA_OPS) and len(PRIMITIVES) == 8
    assert known_ops() == PRIMITIVES + EXTRA_OPS == (*PRIMITIVES, "sep_conv_7x7", "conv_7x1_1x7")


class Conv1x1(torch.nn.Sequential):
    """ReLU, a 1x1 convolution (strided where it reduces), BatchNorm: an operation of one's own."""

    def __init__(self, c: int, stride: int, affine: bool, sets: int = 1):
        super().__init__(torch.nn.ReLU(), torch.nn.Conv2d(sets * c, sets * c, 1, stride, groups=sets, bias=False),
                         torch.nn.BatchNorm2d(sets * c, affine=affine, track_running_stats=affine))


def test_an_operation_of_ones_own_is_searched_and_re_trained(monkeypatch):
    """register_op: the name joins what space.ops and a genotype may name; a search over it (IL, K=2, M=2,
    batched weight sets) finds cells of its ops alone, and their network builds and runs. A built-in name or a
    malformed one is refused."""
    import ilnas
    from ilnas import SGD, EngineConfig, SpaceConfig, SupernetSearch
    from ilnas.space import layout, ops as ops_module

    monkeypatch.setattr(ops_module, "OPS", dict(ops_module.OPS))  # the registration ends with the test
    monkeypatch.setattr(layout, "_REGISTERED", dict(layout._REGISTERED))
    with pytest.raises(IlnasError, match="unknown operation 'conv_1x1'"):
        parse_genotype(str(zoo()["DARTS_V2"]).replace("sep_conv_3x3", "conv_1x1"))
    ilnas.register_op("conv_1x1")(Conv1x1)
    assert known_ops()[-1] == "conv_1x1"
    for bad, message in (("sep_conv_3x3", "'sep_conv_3x3' is a built-in operation"),
                         ("Conv'1", "an operation's name must be lower-case letters"), ("", "must be lower-case")):
        with pytest.raises(IlnasError, match=message):
            ilnas.register_op(bad)
    space = SpaceConfig(channels=4, layers=3, ops=("none", "skip_connect", "conv_1x1"))
    search = SupernetSearch({"a": lambda w: torch.nn.Linear(w, 3), "b": lambda w: torch.nn.Linear(w, 2)},
                            in_channels=1, space=space, rounds=2, engine=EngineConfig(lam=1.0, batched_sets=2),
                            sgd=SGD(lr=0.05))
    assert [a.shape for a in search.state.arch] == [(14, 3), (14, 3)]
    gen = torch.Generator().manual_seed(0)
    batch = {t: (torch.randn(4, 1, 8, 8, generator=gen), torch.randint(0, n, (4,), generator=gen))
             for t, n in (("a", 3), ("b", 2))}
    search.step(train=batch, val=batch)
    found = search.genotype()
    assert {op for op, _ in found.normal + found.reduce} <= {"skip_connect", "conv_1x1"}
    net = NetworkCIFAR(parse_genotype(str(found)), 4, 3, 5, in_channels=1)
    assert torch.isfinite(net.eval()(torch.randn(2, 1, 8, 8))).all()
    with pytest.raises(IlnasError, match="space.ops: unknown operation 'conv_3x3'"):
        SupernetSearch({"a": lambda w: torch.nn.Linear(w, 3)}, in_channels=1,
                       space=SpaceConfig(channels=4, layers=3, ops=("none", "conv_3x3")))


class _Refusing(torch.nn.Module):
    """An operation of one's own that takes only inputs of 16x16 or more."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] >= 16, "wants 16x16"
        return x


class _TwoImagesOnly(torch.nn.Module):
    """An operation of one's own written for batches of two images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(2, *x.shape[1:])


@pytest.mark.parametrize("factory, message", [
    (lambda c, stride, affine, sets: torch.nn.Conv2d(sets * c, 2 * sets * c, 1, stride),
     r"maps a \(2, 16, 8, 8\) input at stride 1 to \(2, 32, 8, 8\), not \(2, 16, 8, 8\)"),
    (lambda c, stride, affine, sets: torch.nn.Conv2d(c, c, 1, stride),  # blind to the sets
     r"fails on a \(2, 16, 8, 8\) input at stride 1 \(.*channels"),
    (lambda c, stride, affine, sets: torch.nn.Conv2d(sets * c, sets * c, 1),
     r"maps a \(2, 16, 8, 8\) input at stride 2 to \(2, 16, 8, 8\), not \(2, 16, 4, 4\)"),
    (lambda c, stride, affine, sets: 3, "is no torch.nn.Module: its factory returned int"),
    (lambda c, stride, affine: torch.nn.Identity(),  # a factory of the wrong signature
     r"cannot be built as factory\(channels=8, stride=1, affine=False, sets=2\) \(TypeError: "),
    (lambda c, stride, affine, sets: _Refusing(),  # fails with an error other than torch's
     r"fails on a \(2, 16, 8, 8\) input at stride 1 \(AssertionError: wants 16x16\)$"),
    (lambda c, stride, affine, sets: _TwoImagesOnly(),
     r"fails on a \(3, 16, 8, 8\) input at stride 1 \(RuntimeError: shape '\[2, 16, 8, 8\]' is invalid")],
    ids=["channels", "sets", "stride", "no-module", "signature", "assertion", "batch"])
def test_an_operation_of_ones_own_that_cannot_take_a_cells_place_is_refused_before_a_run(factory, message, monkeypatch,
                                                                                        tmp_path):
    """Checked as a search or a re-training starts, before its run directory is made."""
    import ilnas
    from ilnas.space import layout, ops as ops_module

    monkeypatch.setattr(ops_module, "OPS", dict(ops_module.OPS))
    monkeypatch.setattr(layout, "_REGISTERED", dict(layout._REGISTERED))
    ilnas.register_op("broken")(factory)
    with pytest.raises(IlnasError, match=f"^operation 'broken' {message}"):
        ops_module.check_ops(["sep_conv_3x3", "broken"])
    genotype = str(zoo()["DARTS_V2"]).replace("sep_conv_3x3", "broken")
    cfg = resolve("eval-digits", kind="eval", overrides=["network.layers=3", "network.channels=8"])  # its ops' width
    with pytest.raises(IlnasError, match=f"^operation 'broken' {message}"):
        ilnas.run_train(cfg, parse_genotype(genotype), tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()


class _SmallOnly(torch.nn.Conv2d):
    """An operation of one's own that passes check_ops's 8x8 inputs and fails on inputs larger than ``largest``."""
    largest = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > self.largest:
            raise ValueError(f"no {x.shape[-1]}x{x.shape[-1]} input, please")
        return super().forward(x)


def test_an_operation_of_ones_own_that_fails_only_at_the_networks_size_is_named_before_a_run(monkeypatch, tmp_path):
    """The re-training's size check and ``describe`` name one's own operation rather than the image size alone."""
    import ilnas
    from ilnas.space import layout, ops as ops_module

    monkeypatch.setattr(ops_module, "OPS", dict(ops_module.OPS))
    monkeypatch.setattr(layout, "_REGISTERED", dict(layout._REGISTERED))
    ilnas.register_op("small_only")(lambda c, stride, affine, sets: _SmallOnly(sets * c, sets * c, 1, stride,
                                                                                groups=sets, bias=False))
    genotype = parse_genotype(str(zoo()["DARTS_V2"]).replace("sep_conv_3x3", "small_only"))
    cfg = resolve("eval-digits", kind="eval", overrides=["network.layers=3", "network.channels=4"])
    with pytest.raises(IlnasError, match=r"^the cifar-style network of 3 cells fails on 16x16 images \(ValueError: "
                                         r"no 16x16 input, please\): they are too small for it, or an operation of "
                                         r"your own \(small_only\) fails at that size$"):
        ilnas.run_train(cfg, genotype, tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()
    with pytest.raises(IlnasError, match=r"^the network cannot be measured on 16x16 images \(ValueError: no 16x16"):
        describe(genotype, cfg)
    with pytest.raises(IlnasError, match=r"^32x32 images are too small for the imagenet-style network of 3 cells"):
        check_input_size(zoo()["DARTS_V2"], 10, 3, 32, style="imagenet", layers=3)  # built-in ops: the size's fault


@functools.cache
def five_cell_supernet() -> Supernet:
    """One for every side below: building it takes as long as a pass."""
    return Supernet(1, 4, 5)


@pytest.mark.parametrize("side, works", [(s, s % 4 == 0) for s in range(8, 41)])
def test_the_cells_take_the_sides_their_reduction_cells_can_halve_twice(side, works):
    """Not a matter of size: 30x30 images were "too small" for a network that takes 28x28 and 32x32. A supernet and
    a CIFAR-style network take a side exactly where it is a multiple of 4, and say so where it is not."""
    try:
        five_cell_supernet()(torch.zeros(2, 1, side, side), *init_arch(8))
    except RuntimeError:
        assert not works
    else:
        assert works
    if works:
        check_input_size(zoo()["DARTS_V2"], 10, 1, side, layers=5)
        return
    below = side // 4 * 4
    with pytest.raises(IlnasError, match=rf"^the cifar-style network cannot take {side}x{side} images: the two "
                                         rf"reduction cells halve the side twice, which takes a multiple of 4 "
                                         rf"\({below} or {below + 4}\), got {side}; another side$"):
        check_input_size(zoo()["DARTS_V2"], 10, 1, side, layers=5, remedy="-", side_remedy="another side")


def test_an_image_side_the_cells_cannot_halve_is_refused_as_such_before_a_run(tmp_path):
    """By the search's probe and the training's, naming the setting; the ImageNet style's after its stem (224 and
    256 work, 220 does not; 60 is too small)."""
    code, _, err = call("search", "--set", "data.image_size=30", "--check")
    assert code == 2 and err.strip() == (
        "ilnas: error: the supernet cannot take mnist5k's (1, 30, 30) images: the two reduction cells halve the side "
        "twice, which takes a multiple of 4 (28 or 32), got 30 (data.image_size)"), err
    code, _, err = call("train", "--preset", "eval-digits", "--genotype", "DARTS_V2", "--set", "data.image_size=30",
                        "--check")
    assert code == 2 and err.strip().endswith(
        "cannot take 30x30 images: the two reduction cells halve the side twice, which takes a multiple of 4 (28 or "
        "32), got 30; use another side (data.image_size) or another network.style"), err
    for side in (224, 256):
        check_input_size(zoo()["DARTS_V2"], 10, 3, side, style="imagenet", layers=3)
    with pytest.raises(IlnasError, match=r"^the imagenet-style network cannot take 220x220 images: the stem halves "
                                         r".* leave a multiple of 8 \(224: 56\), got 220: 55 \(221x221 works\); "):
        check_input_size(zoo()["DARTS_V2"], 10, 3, 220, style="imagenet", layers=3)
    with pytest.raises(IlnasError, match=r"^60x60 images are too small for the imagenet-style network"):
        check_input_size(zoo()["DARTS_V2"], 10, 3, 60, style="imagenet", layers=3)  # uneven too, but 64 fails as well


@pytest.mark.parametrize("size, largest, memory, message", [
    (16, 8, None, r"the supernet fails on mnist5k's \(1, 16, 16\) images \(ValueError: no 16x16 input, please\): an "
                  r"operation of your own \(small_only\) fails at that size$"),
    (96, 64, None, r"the supernet fails on mnist5k's \(1, 96, 96\) images \(ValueError: no 96x96 input, please\)"),
    (96, 64, 10 ** 6, r"the supernet's weights .* more than the 0\.0 GB of this machine's memory")],
    ids=["measured-at-its-size", "measured-at-64", "memory-first"])
def test_a_search_over_an_operation_of_ones_own_that_fails_at_the_images_size_is_refused_in_one_line(
        size, largest, memory, message, monkeypatch, tmp_path):
    """The supernet's passes before a search name one's own operation, where its failure had ended the search in a
    traceback: the memory check's passes (images above 64x64 measured at 64x64, the others at their size), then
    one at the images' own size. A batch too large for the memory is refused before that last pass, which at a
    large size could fill the machine itself."""
    import ilnas
    from ilnas import memory as memory_module
    from ilnas.space import layout, ops as ops_module

    monkeypatch.setattr(ops_module, "OPS", dict(ops_module.OPS))
    monkeypatch.setattr(layout, "_REGISTERED", dict(layout._REGISTERED))
    monkeypatch.setattr(_SmallOnly, "largest", largest)
    if memory is not None:
        monkeypatch.setattr(memory_module, "memory_total", lambda device: memory)
    ilnas.register_op("small_only")(lambda c, stride, affine, sets: _SmallOnly(sets * c, sets * c, 1, stride,
                                                                                groups=sets, bias=False))
    cfg = resolve("demo", kind="search", overrides=["space.ops=[small_only, skip_connect, none]", "space.layers=3",
                                                    "space.channels=4", "search.batch_size=8",
                                                    f"data.image_size={size}"])
    with pytest.raises(IlnasError, match=f"^{message}"):
        ilnas.run_search(cfg, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("affine", [True, False], ids=["eval", "search"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", sorted(OPS))
def test_every_registered_op_keeps_channels_and_has_its_published_weights(name, stride, affine):
    c = 6
    op = create_op(name, c, stride, affine)
    assert count_parameters(op) == expected_op_parameters(name, c, stride, affine)
    if not affine:  # search ops: no running statistics, so the supernet stays a pure function
        assert not list(op.buffers())
    x = torch.randn(2, c, 8, 8, requires_grad=True)
    y = op(x)
    assert y.shape == (2, c, 8 // stride, 8 // stride)
    if name == "none":
        assert not y.any()
    elif name == "skip_connect" and stride == 1:
        assert torch.equal(y, x)
    else:
        y.square().sum().backward()
        assert x.grad.abs().sum() > 0 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in op.parameters())


@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("nhwc", "nhwc"), ("nhwc", "nchw")])
@pytest.mark.parametrize("weights_need_grad", [True, False])
def test_the_mixing_sum_has_autograds_first_and_second_derivatives(layouts, weights_need_grad):
    """weighted_sum's own backward (one broadcast multiply, one dot product per term) against autograd's
    through sum_i w_i y_i, in float64: the value, the gradients and a double backward (what hvp=exact
    takes through it) to 1e-12; terms laid out as NCHW or NHWC, the incoming gradient alike or not."""
    fmt = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, layout="nchw"):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt[layout])

    terms = [rand(3, 4, 5, 5, layout=layouts[0]).requires_grad_() for _ in range(4)]
    w = rand(4).requires_grad_(weights_need_grad)
    upstream = rand(3, 4, 5, 5, layout=layouts[1])
    vs = [rand(*t.shape) for t in [w, *terms]]
    inputs = [w, *terms] if weights_need_grad else terms

    def derivatives(total):
        first = torch.autograd.grad(total, inputs, upstream, create_graph=True)
        if not weights_need_grad:  # then the terms' gradients, upstream * w_i, are constants
            return total, first, []
        second = torch.autograd.grad(sum((g * v).sum() for g, v in zip(first, vs)), inputs, allow_unused=True)
        return total, first, second

    ours = derivatives(weighted_sum(w, terms))
    plain = derivatives(sum(wi * y for wi, y in zip(w.unbind(0), terms)))
    for a, b in zip([ours[0], *ours[1], *ours[2]], [plain[0], *plain[1], *plain[2]]):
        assert (a is None) == (b is None)
        if a is not None:
            assert float((a - b).detach().abs().max()) <= 1e-12 * max(1.0, float(b.detach().abs().max()))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("kernel, stride", [(3, 1), (5, 1), (3, 2), (5, 2)])
def test_dilated_conv_routes_have_torchs_values_and_derivatives(kernel, stride, layout):
    """The dilated convs' CPU routes (a strided view for stride = dilation, a flipped-kernel input gradient
    for stride 1) against torch's own dilated convolution in float64: value, gradients, double backward
    (gradgradcheck) and per-weight-set gradients under vmap; an odd input size checks the borders."""
    padding = kernel - 1  # dilation 2, "same"
    route = route_for(kernel, stride, padding, 2)
    assert route == {1: "flipped", 2: "subsample"}[stride]
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 9, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(3, 1, kernel, kernel, generator=gen, dtype=torch.float64, requires_grad=True)

    def ours(x, w):
        return routed_conv(x, w, route, padding, 2)

    def torchs(x, w):
        return torch.nn.functional.conv2d(x, w, None, stride, padding, 2, 3)

    upstream = torch.randn(ours(x, w).shape, generator=gen, dtype=torch.float64)
    for a, b in zip([ours(x, w), *torch.autograd.grad(ours(x, w), (x, w), upstream)],
                    [torchs(x, w), *torch.autograd.grad(torchs(x, w), (x, w), upstream)]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(ours, (x, w))
    sets = torch.randn(4, *w.shape, generator=gen, dtype=torch.float64)

    def weight_grads(fn):
        return torch.func.vmap(torch.func.grad(lambda w: fn(x.detach(), w).square().sum()))(sets)
    torch.testing.assert_close(weight_grads(ours), weight_grads(torchs), rtol=1e-12, atol=1e-12)


def test_only_training_passes_that_need_a_gradient_take_the_dilated_routes(monkeypatch):
    """The dilated ops' depthwise convolution goes through ``routed_conv`` in a training pass with a gradient
    (search and re-training on a CPU), through torch's own in eval mode (export, tracing) and without a
    gradient; non-dilated and non-"same" ones never."""
    import ilnas.space.depthwise as depthwise

    taken = []
    monkeypatch.setattr(depthwise, "routed_conv", lambda *a: taken.append(a[2]) or torch.zeros(()))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    for stride, route in [(1, "flipped"), (2, "subsample")]:
        for name in ("dil_conv_3x3", "dil_conv_5x5"):
            conv = create_op(name, 4, stride)[1]
            assert isinstance(conv, DepthwiseConv2d) and conv.route == route
            taken.clear()
            conv(x)
            assert taken == [route]
            with torch.no_grad():
                assert conv(x).shape == (2, 4, 8 // stride, 8 // stride)
            assert conv.eval()(x).shape == (2, 4, 8 // stride, 8 // stride) and taken == [route]
            monkeypatch.setattr(depthwise, "ROUTE_DEVICES", ())  # what bench/search_step.py's variants switch
            assert conv.train()(x).shape == (2, 4, 8 // stride, 8 // stride) and taken == [route]
            monkeypatch.setattr(depthwise, "ROUTE_DEVICES", ("cpu",))
    assert create_op("sep_conv_3x3", 4, 1)[0][1].route is None
    assert DepthwiseConv2d(4, 3, 1, 1, 2).route is None and DepthwiseConv2d(4, 3, 3, 2, 2).route is None


FACTORIZED_REDUCE_CHECK = """
import sys, torch
from ilnas.space.ops import FactorizedReduce
torch.manual_seed(0)
reduce = FactorizedReduce(4, 4, affine=True).to(memory_format=torch.channels_last)
reference = FactorizedReduce(4, 4, affine=True).double()
reference.load_state_dict(reduce.state_dict())
for _ in range(10):
    x = torch.randn(4, 4, 64, 64)
    grads = []
    for net, inp in ((reduce, x.contiguous(memory_format=torch.channels_last)), (reference, x.double())):
        net.zero_grad()
        inp.requires_grad_()
        out = net(inp)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([inp.grad, net.conv_1.weight.grad, net.conv_2.weight.grad])
    for got, want in zip(*grads):
        assert (got.double() - want).abs().max() <= 1e-3 * want.abs().max(), (got - want).abs().max()
print("ok")
"""


def test_a_factorized_reduce_of_few_nhwc_channels_differentiates_without_corrupting_memory():
    """oneDNN's backward of a strided 1x1 convolution of an NHWC input with fewer input channels than its
    block writes past its workspace (a crash at 56x56 and above on AVX-512 CPUs); the ops compute it as the
    stride-1 convolution of every other pixel. In a process of its own: the old path aborts it."""
    r = subprocess.run([sys.executable, "-c", FACTORIZED_REDUCE_CHECK], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr[-2000:]


class _PlainNetwork(torch.nn.Module):
    """A network of one's own: a stem, ``layers`` normal cells at one width (no reduction), mean pooling, a linear
    classifier, and an auxiliary head on the first cell where ``auxiliary``."""

    def __init__(self, genotype, classes, in_channels, resolution, layers, channels, auxiliary):
        super().__init__()
        from ilnas.space.network import EvalCell

        self.stem = torch.nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        cells, c_pp, c_p = [], channels, channels
        for _ in range(layers):
            cells.append(EvalCell(genotype.normal, genotype.normal_concat, c_pp, c_p, channels, False, False))
            c_pp, c_p = c_p, cells[-1].out_channels
        self.cells = torch.nn.ModuleList(cells)
        self.classifier = torch.nn.Linear(c_p, classes)
        self.auxiliary = torch.nn.Linear(cells[0].out_channels, classes) if auxiliary else None

    def forward(self, x, drop_path_rate=0.0):
        s0 = s1 = self.stem(x)
        aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, drop_path_rate)
            if i == 0 and self.auxiliary is not None:
                aux = self.auxiliary(s1.mean((2, 3)))
        logits = self.classifier(s1.mean((2, 3)))
        return (logits, aux) if self.training else logits


@pytest.fixture
def network_registry(monkeypatch):
    """The network styles as they are; whatever a test registers goes with the test."""
    from ilnas.space import layout, network

    monkeypatch.setattr(network, "NETWORKS", dict(network.NETWORKS))
    monkeypatch.setattr(layout, "_STYLES", dict(layout._STYLES))


def test_a_network_of_ones_own_re_trains_a_cell_and_is_rebuilt_as_it_was_trained(network_registry, tmp_path):
    """network.style names a registered network: re-trained (auxiliary head and drop-path included), its size
    counted without the auxiliary head, rebuilt with its weights by load_model and by create_model."""
    import ilnas
    from ilnas.recipes.describe import describe_trained
    from ilnas.models import create_model, load_model

    ilnas.register_network("plain")(_PlainNetwork)
    cfg = resolve("eval-digits", kind="eval", overrides=["network.style=plain", "network.layers=2",
                                                         "network.channels=4", "train.epochs=1",
                                                         "train.steps_per_epoch=3", "train.batch_size=8"])
    result = ilnas.run_train(cfg, zoo()["DARTS_V2"], tmp_path / "t", progress=False)
    net = _PlainNetwork(zoo()["DARTS_V2"], 10, 1, 16, 2, 4, True)
    assert result["params"] == count_parameters(net) == result["params_total"] - (4 * 4 * 10 + 10)
    model = load_model(tmp_path / "t")
    x = torch.randn(3, 1, 16, 16)
    net.load_state_dict(model.state_dict())
    assert torch.equal(model(x), net.eval()(x))
    assert describe_trained(model.card)["network"] == "plain, 2 cells, C=4"
    assert isinstance(create_model("DARTS_V1", 5, style="plain", layers=2, channels=4, in_channels=1), _PlainNetwork)
    (tmp_path / "t" / "result.json").unlink()  # interrupted; meanwhile the network's code changed
    ilnas.register_network("plain")(_PlainWithABias)
    with pytest.raises(IlnasError, match=r"^the checkpoint in .* cannot be continued from \(its network state is "
                                         r"missing the network's 'bias'\): .* or by an operation or network of your "
                                         r"own \(ILNAS_PLUGINS\) whose code has changed since"):
        ilnas.run_train(cfg, zoo()["DARTS_V2"], tmp_path / "t", resume=True, progress=False)
    from ilnas.space import layout, network

    del network.NETWORKS["plain"], layout._STYLES["plain"]  # a process without the plugin: no damaged record
    code, _, err = call("train", "--resume", "--out", str(tmp_path / "t"))
    assert code == 2 and err.startswith(f"ilnas: error: {tmp_path / 't' / 'config.yaml'}: network.style must be one "
                                        f"of cifar, imagenet, got 'plain' (one of your own: "), err


class _PlainWithABias(_PlainNetwork):
    """The same network with one parameter more: its code changed."""

    def __init__(self, *args):
        super().__init__(*args)
        self.bias = torch.nn.Parameter(torch.zeros(()))


def _tensor_in_training(genotype, classes, in_channels, resolution, layers, channels, auxiliary):
    net = _PlainNetwork(genotype, classes, in_channels, resolution, layers, channels, auxiliary)
    net.forward = lambda x, drop_path_rate=0.0: torch.zeros(len(x), classes)  # logits alone in training mode too
    return net


def _two_images_only(genotype, classes, in_channels, resolution, layers, channels, auxiliary):
    net = _PlainNetwork(genotype, classes, in_channels, resolution, layers, channels, auxiliary)
    plain = net.forward

    def forward(x, drop_path_rate=0.0):
        if len(x) != 2:  # a reshape written for one batch size, say
            raise RuntimeError(f"shape '[2, -1]' is invalid for input of size {len(x) * 10}")
        return plain(x, drop_path_rate)
    net.forward = forward
    return net


@pytest.mark.parametrize("factory, message", [
    (lambda *args: 1 / 0, r"^network style 'mine' cannot be built \(ZeroDivisionError: division by zero\)$"),
    (lambda *args: "a network", r"^network style 'mine' is no torch.nn.Module: its factory returned str$"),
    (_tensor_in_training, r"^network style 'mine' must return \(logits, auxiliary logits or None\) in training mode "
                          r"and logits in evaluation mode, each \(N, 10\); got a tensor \(2, 10\) and a tensor "
                          r"\(2, 10\) for N=2$"),
    (lambda g, classes, *args: _PlainNetwork(g, classes + 1, *args), r"each \(N, 10\); got \(a tensor \(2, 11\), "
                                                                      r"a tensor \(2, 11\)\) and a tensor \(2, 11\)"),
    (lambda g, classes, in_channels, *args: _PlainNetwork(g, classes, 3, *args),
     r"^the mine-style network of 2 cells fails on 16x16 images \(RuntimeError: .*\): they are too small for it, or "
     r"your network style mine fails at that size$"),
    # it passed the check of two images, then failed the recipe's count of multiply-adds (one image) in a traceback
    (_two_images_only, r"^your network style mine fails on a batch of 1 image\(s\) in evaluation mode \(RuntimeError: "
                       r"shape '\[2, -1\]' is invalid for input of size 10\), where it takes two: a run feeds it "
                       r"batches of any size$")],
    ids=["raises", "no-module", "tensor", "classes", "channels", "batch"])
def test_a_network_of_ones_own_that_cannot_be_re_trained_is_refused_before_a_run(factory, message, network_registry,
                                                                                 tmp_path):
    import ilnas

    ilnas.register_network("mine")(factory)
    cfg = resolve("eval-digits", kind="eval", overrides=["network.style=mine", "network.layers=2"])
    with pytest.raises(IlnasError, match=message):
        ilnas.run_train(cfg, zoo()["DARTS_V2"], tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()


def test_a_network_style_is_registered_only_under_a_name_of_its_own(network_registry):
    import ilnas

    for bad in ("cifar", "imagenet", "My Net", "", 3):
        with pytest.raises(IlnasError, match="a network style's name must be lower-case letters"):
            ilnas.register_network(bad)
    with pytest.raises(IlnasError, match=r"network.style must be one of cifar, imagenet, got 'mine' \(one of your own: "
                                         r"ilnas.register_network in a module that ILNAS_PLUGINS names\)"):
        resolve("eval-digits", kind="eval", overrides=["network.style=mine"])


class _OnlyOn(torch.nn.Module):
    """Code of one's own that runs on one kind of device only (a GPU kernel, say): here the meta device."""

    def __init__(self, inner: torch.nn.Module, kind: str = "meta"):
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x, *args):
        if x.device.type != self.kind:
            raise NotImplementedError(f"no kernel for {x.device.type}")
        return self.inner(x, *args)


def test_the_checks_of_ones_own_code_run_on_the_runs_device(monkeypatch, network_registry):
    """check_ops and the re-training's size check run where the run will: an operation or a network that runs on
    one device only passes there and is refused elsewhere, in one line."""
    import ilnas
    from ilnas.space import layout, ops as ops_module

    monkeypatch.setattr(ops_module, "OPS", dict(ops_module.OPS))
    monkeypatch.setattr(layout, "_REGISTERED", dict(layout._REGISTERED))
    ilnas.register_op("device_only")(lambda c, stride, affine, sets: _OnlyOn(create_op("sep_conv_3x3", c, stride,
                                                                                         affine, sets)))
    ops_module.check_ops(["device_only"], device="meta")
    with pytest.raises(IlnasError, match=r"^operation 'device_only' fails on .* \(NotImplementedError: no kernel for "
                                         r"cpu\)$"):
        ops_module.check_ops(["device_only"])
    ilnas.register_network("device-only")(lambda *args: _OnlyOn(_PlainNetwork(*args)))
    check_input_size(zoo()["DARTS_V2"], 10, 1, 16, style="device-only", layers=2, channels=4, device="meta")
    with pytest.raises(IlnasError, match=r"\(NotImplementedError: no kernel for cpu\): they are too small for it, "
                                         r"or your network style device-only fails at that size$"):
        check_input_size(zoo()["DARTS_V2"], 10, 1, 16, style="device-only", layers=2, channels=4)


def _needs_sixteen(c: int, stride: int, affine: bool, sets: int) -> torch.nn.Module:
    """An operation of one's own that needs 16 channels a set (a GroupNorm of 16 groups, say)."""
    assert c >= 16, f"needs 16 channels, got {c}"
    return create_op("sep_conv_3x3", c, stride, affine, sets)


def test_the_checks_of_ones_own_code_run_at_the_runs_width(monkeypatch, network_registry):
    """An operation is checked at the channels the run's narrowest cells give it (the supernet's C, over K for
    PC-DARTS), and a network of one's own at its own width: code that needs a width the run has passes, and where
    the run lacks it, the refusal comes before the run, in one line."""
    import ilnas
    from ilnas.space import layout, ops as ops_module

    monkeypatch.setattr(ops_module, "OPS", dict(ops_module.OPS))
    monkeypatch.setattr(layout, "_REGISTERED", dict(layout._REGISTERED))
    ilnas.register_op("sixteen")(_needs_sixteen)
    heads = {"a": lambda width: torch.nn.Linear(width, 3)}
    ilnas.SupernetSearch(heads, 1, space=SpaceConfig(channels=16, layers=3, ops=("none", "sixteen")))
    with pytest.raises(IlnasError, match=r"^operation 'sixteen' cannot be built .*\(AssertionError: needs 16 "
                                         r"channels, got 4\)$"):
        ilnas.SupernetSearch(heads, 1, space=SpaceConfig(channels=16, layers=3, ops=("none", "sixteen"),
                                                         partial_channels=4))

    def sixteen_wide(genotype, classes, in_channels, resolution, layers, channels, auxiliary):
        assert channels >= 16, "needs 16 channels"
        return _PlainNetwork(genotype, classes, in_channels, resolution, layers, channels, auxiliary)

    ilnas.register_network("wide")(sixteen_wide)
    check_input_size(zoo()["DARTS_V2"], 10, 1, 16, style="wide", layers=2, channels=16)
    with pytest.raises(IlnasError, match=r"^network style 'wide' cannot be built \(AssertionError: needs 16"):
        check_input_size(zoo()["DARTS_V2"], 10, 1, 16, style="wide", layers=2, channels=12)


def _edge_by_edge_and_grouped(**settings) -> tuple[Supernet, Supernet]:
    """Two float64 supernets of the same weights, one calling every edge alone, one grouping them."""
    alone = Supernet(**settings, group_edges=False).double()
    together = Supernet(**settings, group_edges=True).double()
    together.load_state_dict(alone.state_dict())
    return alone, together


GROUPINGS = {  # name: supernet settings, and the weight sets of a batched pass
    "darts": (dict(channels_last=False), 1),
    "darts-nhwc": (dict(channels_last=True), 1),
    "pc-darts": (dict(partial_channels=2), 1),  # with edge normalisation's betas below
    "p-darts": (dict(normal_ops=[list(PRIMITIVES[i:i + 5]) for i in (0, 1, 2, 3, 1, 2, 3, 0, 2, 3, 1, 0, 3, 2)],
                     reduce_ops=[["none", "max_pool_3x3", "skip_connect", "sep_conv_7x7", "conv_7x1_1x7"]] * 14), 1),
    "two-sets-nhwc": (dict(channels_last=True), 2),
}


@pytest.mark.parametrize("name", list(GROUPINGS))
def test_grouped_edges_compute_what_every_edge_computes_alone(name):
    """A cell's edges that read one state, evaluated together (ilnas/space/grouped.py), against every edge called
    alone, in float64: the features, the gradients of the architecture, the edge weights and every weight, and a
    second derivative (what hvp=exact takes), to 1e-11; DARTS in NCHW and NHWC, PC-DARTS (partial channels, edge
    normalisation), P-DARTS's different operations per edge (the reduction cells' extra operations among them), and
    two weight sets side by side."""
    settings, sets = GROUPINGS[name]
    alone, together = _edge_by_edge_and_grouped(in_channels=3, channels=4, layers=3, **settings)
    gen = torch.Generator().manual_seed(0)
    arch = [a.double().requires_grad_() for a in init_arch(alone.num_ops, name == "pc-darts", gen)]
    x = torch.randn(3, 3 * sets, 8, 8, generator=gen, dtype=torch.float64)
    names = [k for k, _ in alone.named_parameters()]
    weights = [p.detach().repeat(sets, *[1] * (p.dim() - 1)).requires_grad_() for p in alone.parameters()]
    v = [torch.randn(a.shape, generator=gen, dtype=torch.float64) for a in arch]

    def derivatives(net: Supernet) -> list[torch.Tensor]:
        net = net.batched(sets) if sets > 1 else net
        y = torch.func.functional_call(net, dict(zip(names, weights)), (x, *arch_weights(arch)))
        loss = (y * torch.linspace(-1, 1, y.shape[-1], dtype=torch.float64)).square().sum()
        first = torch.autograd.grad(loss, [*arch, *weights], create_graph=True)
        second = torch.autograd.grad(sum((g * u).sum() for g, u in zip(first, v)), weights)
        return [y.detach(), *(g.detach() for g in first), *second]

    expected, got = derivatives(alone), derivatives(together)
    assert expected[0].abs().sum() > 0 and all(e.abs().sum() > 0 for e in expected[1:3])  # a real signal
    for e, g in zip(expected, got):
        assert float((e - g).abs().max()) <= 1e-11 * max(1.0, float(e.abs().max()))


class _Convolutions(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ == "convolution"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(GROUPINGS))
def test_a_supernet_drawn_again_for_each_seed_starts_where_a_new_build_would(name):
    """FreshParameters (a search's stages each start from a seed of their own) builds a supernet of ilnas's
    operations once and redraws it in place for every seed: each seed's parameters, placed in float64, equal
    those of a supernet built anew under it (fresh_parameters) bit for bit, in any order of seeds, and torch's
    global random state is left as it was."""
    settings, _ = GROUPINGS[name]
    builds = []

    def build() -> Supernet:
        builds.append(name)
        return Supernet(channels=8, layers=3, **settings)

    init = FreshParameters(build, torch.device("cpu"), torch.float64)
    before = torch.get_rng_state()
    for seed in (5, 9, 5, 0):
        got = init(seed)
        expected = fresh_parameters(lambda: Supernet(channels=8, layers=3, **settings).double(), seed)
        assert len(got) == len(expected) and all(g.dtype == torch.float64 and torch.equal(g, e)
                                                 for g, e in zip(got, expected))
    assert len(builds) == 1 and torch.equal(torch.get_rng_state(), before)
    head = FreshParameters(lambda: torch.nn.Linear(6, 3))
    linear = fresh_parameters(lambda: torch.nn.Linear(6, 3), 4)
    assert [torch.equal(a, b) for a, b in zip(head(4), linear)] == [True, True]


def test_a_supernet_with_an_operation_of_ones_own_is_built_anew_for_every_seed(monkeypatch):
    """An operation of one's own may draw random numbers as it is built (this one draws one and then builds a
    sep_conv_3x3): a redraw would leave that draw out and start elsewhere, so such a supernet is built anew."""
    import ilnas
    from ilnas.space import layout, ops as ops_module

    monkeypatch.setattr(ops_module, "OPS", dict(ops_module.OPS))
    monkeypatch.setattr(layout, "_REGISTERED", dict(layout._REGISTERED))

    @ilnas.register_op("noisy_conv")
    def noisy_conv(c: int, stride: int, affine: bool, sets: int) -> torch.nn.Module:
        torch.rand(1)
        return create_op("sep_conv_3x3", c, stride, affine, sets)

    ops = [["none", "noisy_conv", "sep_conv_3x3"]] * 14
    builds = []

    def build() -> Supernet:
        builds.append(1)
        return Supernet(channels=8, layers=3, normal_ops=ops, reduce_ops=ops)

    init = FreshParameters(build)
    for seed in (1, 2):
        expected = fresh_parameters(lambda: Supernet(channels=8, layers=3, normal_ops=ops, reduce_ops=ops), seed)
        assert all(torch.equal(g, e) for g, e in zip(init(seed), expected))
    assert len(builds) == 2


def test_grouped_edges_call_each_convolution_once_per_state_and_an_operation_changed_later_alone():
    """A 3-cell DARTS supernet (a normal cell, a reduction cell, a reduction cell after a reduction) calls 544
    convolutions edge by edge: the stem's, each cell's preprocessing (2, 2, 3), 12 in the convolutional operations
    of each of 14 edges and 2 in the factorized reduction (skip_connect at stride 2) of each reduction cell's 8 input
    edges. Grouped, the 12 run once for each of a cell's 5 states that edges read, the 2 once for each input of a
    reduction cell: 196. An operation whose modules were changed after the supernet was built (ReLU swapped for
    SiLU) is called edge by edge, with its new modules: the grouped supernet still computes the changed one."""
    alone, together = _edge_by_edge_and_grouped(in_channels=3, channels=4, layers=3)
    a = arch_weights(init_arch(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    counts = []
    for net in (alone, together):
        with torch.no_grad(), _Convolutions() as convolutions:
            net(x, *a)
        counts.append(convolutions.count)
    assert counts == [1 + 2 + 2 + 3 + 3 * 14 * 12 + 2 * 8 * 2, 1 + 2 + 2 + 3 + 3 * 5 * 12 + 2 * 2 * 2] == [544, 196]
    changed = [Supernet(3, 4, 3, group_edges=g).double() for g in (False, True)]
    for net in changed:
        net.load_state_dict(alone.state_dict())
        for edge in net.cells[0].edges:
            edge.ops[PRIMITIVES.index("sep_conv_3x3")][1][0] = torch.nn.SiLU()  # its second ReLU
    with torch.no_grad():
        assert not torch.allclose(changed[0](x, *a), alone(x, *a))
        assert float((changed[1](x, *a) - changed[0](x, *a)).abs().max()) < 1e-12
