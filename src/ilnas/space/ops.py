"""The DARTS candidate operations (Liu et al., 2019), one registry for search and evaluation; ``register_op``
adds one's own.

ReLU -> conv -> BN ordering; a separable conv is the depthwise-pointwise block twice, a dilated conv
once with dilation 2. ``affine=False`` gives the search variants, in which pools are followed by a
non-affine BatchNorm (``pool_bn=True``). Every op takes ``sets``: S independent copies side by side along
the channels, with convolutions grouped by set (ilnas/space/sets.py).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ilnas.errors import IlnasError, allocation_failure, fault
from ilnas.space.depthwise import DepthwiseConv2d, differentiated
from ilnas.space.layout import BUILT_IN_OPS, OP_NAME, add_op_name
from ilnas.space.sets import cat_channels

OpFactory = Callable[[int, int, bool, int], nn.Module]  # (channels, stride, affine, sets)
OPS: dict[str, OpFactory] = {}


def batch_norm(channels: int, affine: bool) -> nn.BatchNorm2d:
    # Search cells never switch to running statistics: without buffers a supernet is a pure
    # function of (weights, alphas, x), which is what functional_call and vmap need.
    return nn.BatchNorm2d(channels, affine=affine, track_running_stats=affine)




def register_op(name: str) -> Callable[[OpFactory], OpFactory]:
    """A decorator that makes ``factory(channels, stride, affine, sets)`` the operation ``name``, for a search
    space (``space.ops``) and the networks that re-train its cells. The module maps ``sets * channels`` input
    channels to ``sets * channels`` output channels, ``sets`` independent copies side by side along the channels
    (grouped convolutions, ``groups=sets``; see ilnas/space/sets.py), halving the resolution where ``stride`` is 2;
    ``affine=False`` in the supernet, True in re-training. DARTS's and the extra built-in names are taken."""
    if not isinstance(name, str) or not OP_NAME.fullmatch(name):
        raise IlnasError(f"an operation's name must be lower-case letters, digits and _ (a letter first, at most "
                         f"64), got {name!r}")
    if name in BUILT_IN_OPS:
        raise IlnasError(f"{name!r} is a built-in operation; give yours another name")
    return _register(name)


def _register(name: str) -> Callable[[OpFactory], OpFactory]:
    def wrap(fn: OpFactory) -> OpFactory:
        OPS[name] = fn
        add_op_name(name)
        return fn
    return wrap


def create_op(name: str, channels: int, stride: int, affine: bool = True, sets: int = 1) -> nn.Module:
    """The op on ``channels`` channels per set, ``sets`` sets side by side."""
    return _as_module(name, _factory(name)(channels, stride, affine, sets))


def _factory(name: str) -> OpFactory:
    if name not in OPS:
        raise IlnasError(f"unknown operation {name!r}; known: {', '.join(sorted(OPS))}")
    return OPS[name]


def _as_module(name: str, op: object) -> nn.Module:
    if not isinstance(op, nn.Module):
        raise IlnasError(f"operation {name!r} is no torch.nn.Module: its factory returned {type(op).__name__}")
    return op


def unchanged_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """The random state of the CPU and of ``device`` (a GPU) as it was once the block ends: a check draws nothing
    from a run's streams."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# The widest an operation is checked at: enough for one that needs many channels a set (a GroupNorm of 32 groups,
# say), while a mistyped width (space.channels=100000) stays milliseconds here and is the memory check's to refuse.
CHECK_CHANNELS = 64


def check_ops(names: Sequence[str], channels: int = 8, sets: int = 2, size: int = 8,
              device: str | torch.device = "cpu") -> None:
    """Each operation built as a supernet and a re-trained network build it, at both strides, run once on a small
    input on ``device`` (the run's: an operation of one's own may run on a GPU only), ``channels`` a set (the run's
    narrowest cells', at most CHECK_CHANNELS): it must keep ``sets * channels`` channels and keep (stride 1) or
    halve (stride 2) the resolution. One of one's own runs on a batch of two images and one of three (a run feeds
    it batches of any size). One that does not hold is refused here, in one line, rather than deep in a supernet's
    pass. The random state is left as it was."""
    device, channels = torch.device(device), min(channels, CHECK_CHANNELS)
    with unchanged_rng(device), torch.no_grad():
        for name in dict.fromkeys(names):
            factory = _factory(name)
            batches = (2,) if name in BUILT_IN_OPS else (2, 3)
            for stride, affine, batch in itertools.product((1, 2), (False, True), batches):
                x = torch.randn(batch, sets * channels, size, size, device=device)
                try:
                    op = factory(channels, stride, affine, sets)
                except Exception as e:  # one's own factory's failure, whatever it is
                    if allocation_failure(e) is not None:  # out of memory: the recipe names the settings
                        raise
                    raise IlnasError(f"operation {name!r} cannot be built as factory(channels={channels}, "
                                     f"stride={stride}, affine={affine}, sets={sets}) ({fault(e)})") from None
                op = _as_module(name, op)
                try:
                    shape = tuple(op.to(device).train()(x).shape)
                except Exception as e:  # one's own module's failure, whatever it is
                    if allocation_failure(e) is not None:  # out of memory: the recipe names the settings
                        raise
                    raise IlnasError(f"operation {name!r} fails on a {tuple(x.shape)} input at stride {stride} "
                                     f"({fault(e)})") from None
                want = (batch, sets * channels, size // stride, size // stride)
                if shape != want:
                    raise IlnasError(f"operation {name!r} maps a {tuple(x.shape)} input at stride {stride} to "
                                     f"{shape}, not {want}: an operation keeps its sets * channels channels and "
                                     f"halves the resolution at stride 2")


class ReLUConvBN(nn.Sequential):
    starts_with_relu = True

    def forward_from_relu(self, x: torch.Tensor) -> torch.Tensor:
        """The op given relu(x): a supernet computes each node's ReLU once for all the ops it feeds."""
        return self[2](self[1](x))

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool, sets: int = 1):
        super().__init__(nn.ReLU(inplace=False),
                         nn.Conv2d(sets * c_in, sets * c_out, kernel, stride, padding, groups=sets, bias=False),
                         batch_norm(sets * c_out, affine))


class FactorizedConv7(nn.Sequential):
    """ReLU, a 1x7 then a 7x1 convolution (the stride split between them), BatchNorm: the official code's
    ``conv_7x1_1x7``."""

    starts_with_relu = True

    def forward_from_relu(self, x: torch.Tensor) -> torch.Tensor:
        return self[3](self[2](self[1](x)))

    def __init__(self, c: int, stride: int, affine: bool, sets: int = 1):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(sets * c, sets * c, (1, 7), (1, stride), (0, 3), groups=sets, bias=False),
            nn.Conv2d(sets * c, sets * c, (7, 1), (stride, 1), (3, 0), groups=sets, bias=False),
            batch_norm(sets * c, affine),
        )


class DilConv(nn.Sequential):
    starts_with_relu = True

    def forward_from_relu(self, x: torch.Tensor) -> torch.Tensor:
        return self[3](self[2](self[1](x)))

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int,
                 affine: bool, sets: int = 1):
        super().__init__(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(sets * c_in, kernel, stride, padding, dilation),
            nn.Conv2d(sets * c_in, sets * c_out, 1, groups=sets, bias=False),
            batch_norm(sets * c_out, affine),
        )


class SepConv(nn.Sequential):
    starts_with_relu = True

    def forward_from_relu(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](self[0].forward_from_relu(x))

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool, sets: int = 1):
        super().__init__(DilConv(c_in, c_in, kernel, stride, padding, 1, affine, sets),
                         DilConv(c_in, c_out, kernel, 1, padding, 1, affine, sets))


class Zero(nn.Module):
    input_only = True  # its output is a function of its input alone: a cell's edges that read one state share it

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class HalvingConv1x1(nn.Conv2d):
    """``nn.Conv2d(c_in, c_out, 1, stride=2, groups=groups, bias=False)`` (the same parameters and state-dict
    keys). On CPUs a pass that needs its gradient computes it as the stride-1 convolution of every other
    pixel, the same numbers: oneDNN's backward of a strided 1x1 convolution of an NHWC input with fewer
    input channels than its block (16 with AVX-512, 8 with AVX2) writes past its workspace (oneDNN issue
    6035, torch 2.4 to 2.14 at least): heap corruption, a crash from 56x56 inputs on, wrong weight gradients
    on some CPUs. As for the depthwise routes, only training passes that need a gradient take it: eval mode
    (inference, export, tracing) and passes without a gradient keep the strided convolution."""

    def __init__(self, c_in: int, c_out: int, groups: int = 1):
        super().__init__(c_in, c_out, 1, stride=2, groups=groups, bias=False)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.device.type != "cpu" or not differentiated(self, x, weight):  # not ROUTE_DEVICES: a fix, not a speed-up
            return super()._conv_forward(x, weight, bias)
        return F.conv2d(x[:, :, ::2, ::2], weight, bias, 1, 0, 1, self.groups)


class FactorizedReduce(nn.Module):
    """Halves the resolution with two offset stride-2 1x1 convs, concatenated."""

    starts_with_relu = True

    def __init__(self, c_in: int, c_out: int, affine: bool, sets: int = 1):
        super().__init__()
        if c_out % 2:
            raise IlnasError(f"FactorizedReduce needs an even channel count, got {c_out}")
        self.sets = sets
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = HalvingConv1x1(sets * c_in, sets * c_out // 2, groups=sets)
        self.conv_2 = HalvingConv1x1(sets * c_in, sets * c_out // 2, groups=sets)
        self.bn = batch_norm(sets * c_out, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_relu(self.relu(x))

    def forward_from_relu(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(cat_channels([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], self.sets))


class PoolBN(nn.Sequential):
    """A search cell's pool: the pool, then a BatchNorm without parameters or running statistics."""

    input_only = True  # its output is a function of its input alone: a cell's edges that read one state share it

    def __init__(self, pool: nn.Module, channels: int):
        super().__init__(pool, batch_norm(channels, affine=False))


def _pool(pool: nn.Module, channels: int, affine: bool) -> nn.Module:
    return pool if affine else PoolBN(pool, channels)


@_register("none")
def _none(c: int, stride: int, affine: bool, sets: int = 1) -> nn.Module:
    return Zero(stride)


@_register("max_pool_3x3")
def _max_pool(c: int, stride: int, affine: bool, sets: int = 1) -> nn.Module:
    return _pool(nn.MaxPool2d(3, stride=stride, padding=1), sets * c, affine)


@_register("avg_pool_3x3")
def _avg_pool(c: int, stride: int, affine: bool, sets: int = 1) -> nn.Module:
    return _pool(nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False), sets * c, affine)


@_register("skip_connect")
def _skip(c: int, stride: int, affine: bool, sets: int = 1) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine, sets)


@_register("sep_conv_3x3")
def _sep3(c: int, stride: int, affine: bool, sets: int = 1) -> nn.Module:
    return SepConv(c, c, 3, stride, 1, affine, sets)


@_register("sep_conv_5x5")
def _sep5(c: int, stride: int, affine: bool, sets: int = 1) -> nn.Module:
    return SepConv(c, c, 5, stride, 2, affine, sets)


@_register("dil_conv_3x3")
def _dil3(c: int, stride: int, affine: bool, sets: int = 1) -> nn.Module:
    return DilConv(c, c, 3, stride, 2, 2, affine, sets)


@_register("dil_conv_5x5")
def _dil5(c: int, stride: int, affine: bool, sets: int = 1) -> nn.Module:
    return DilConv(c, c, 5, stride, 4, 2, affine, sets)


@_register("sep_conv_7x7")
def _sep7(c: int, stride: int, affine: bool, sets: int = 1) -> nn.Module:
    return SepConv(c, c, 7, stride, 3, affine, sets)


@_register("conv_7x1_1x7")
def _conv_7x1_1x7(c: int, stride: int, affine: bool, sets: int = 1) -> nn.Module:
    return FactorizedConv7(c, stride, affine, sets)
