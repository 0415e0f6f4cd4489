"""Depthwise convolutions whose dilated variants take faster routes through autograd on CPUs.

On CPUs, torch's backward of a dilated depthwise convolution is slow, its input gradient up to 60x the
forward's time (NHWC, 24x32x16x16, 5x5, stride 2). The DARTS dilated convolutions have "same" padding
(2p = d(k-1)), and two exact re-expressions avoid that backward:

- stride = dilation = d (the reduction cells' input edges): output pixel i reads input pixels
  d*i + d*j - p = d*(i + j - p/d), so the convolution is a non-dilated one, padding p/d, of every d-th
  input pixel (a strided view), whose backward is fast.
- stride 1: the forward is torch's; the input's gradient is the (same padding, same dilation) forward
  convolution of the output's gradient with the kernel flipped, and the weight's gradient is torch's.

Both are built of differentiable operators (double backward for ``hvp=exact``, vmap, torch.compile).
Measured with bench/depthwise.py (2 threads), forward + backward, NHWC: stride 2 3.6-7.1x faster, stride 1
1.2-1.6x on the larger shapes and 0.8-1.0x on the smallest (8 channels at 16x16, 32-64 at 4x4), where the
custom function's overhead shows; NCHW: stride 1 1.0-1.9x. Only training passes that need a gradient take
the routes: a module in eval mode (inference, export, tracing), a pass without gradient and devices not in
``ROUTE_DEVICES`` (CUDA: unmeasured) use torch's convolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Device types whose training passes take the routes. Benchmarks set it to measure a step without them (())
# or with them on a GPU (("cpu", "cuda")).
ROUTE_DEVICES: tuple[str, ...] = ("cpu",)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel, stride, padding, dilation, groups=channels, bias=False)``
    (the same parameters and state-dict keys); dilated "same"-padded ones differentiate faster on CPUs."""

    def __init__(self, channels: int, kernel: int, stride: int, padding: int, dilation: int):
        super().__init__(channels, channels, kernel, stride, padding, dilation=dilation, groups=channels, bias=False)
        self.route = route_for(kernel, stride, padding, dilation)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.route is None or x.device.type not in ROUTE_DEVICES or not differentiated(self, x, weight):
            return super()._conv_forward(x, weight, bias)
        return routed_conv(x, weight, self.route, self.padding[0], self.dilation[0])


def differentiated(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``conv`` runs in a training pass that needs its gradient: the only passes that take a route
    around torch's convolution (eval mode, so inference, export and tracing, keeps torch's)."""
    return conv.training and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def route_for(kernel: int, stride: int, padding: int, dilation: int) -> str | None:
    """"subsample", "flipped" or None (torch's convolution) for a square depthwise convolution."""
    if dilation == 1 or 2 * padding != dilation * (kernel - 1):
        return None
    if stride == dilation and padding % dilation == 0:
        return "subsample"
    return "flipped" if stride == 1 else None


def routed_conv(x: torch.Tensor, weight: torch.Tensor, route: str, padding: int, dilation: int) -> torch.Tensor:
    """The depthwise convolution of ``x`` by ``weight`` (C, 1, k, k) through ``route`` (on any device)."""
    if route == "subsample":
        return F.conv2d(x[:, :, ::dilation, ::dilation], weight, None, 1, padding // dilation, 1, weight.shape[0])
    return _FlippedInputGrad.apply(x, weight, padding, dilation)


class _FlippedInputGrad(torch.autograd.Function):
    """A stride-1 dilated depthwise convolution whose input gradient is a forward convolution."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int) -> torch.Tensor:
        return F.conv2d(x, weight, None, 1, padding, dilation, weight.shape[0])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, ctx.padding, ctx.dilation = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        p, d, groups = ctx.padding, ctx.dilation, weight.shape[0]
        # Under autocast the forward ran in the autocast dtype, which is the gradient's: cast alike.
        w = weight.to(grad.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, w.flip(-2, -1), None, 1, p, d, groups).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                grad, x.to(grad.dtype), w, None, [1, 1], [p, p], [d, d], False, [0, 0], groups,
                [False, True, False])[1].to(weight.dtype)
        return grad_x, grad_w, None, None
