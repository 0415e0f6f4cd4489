"""Evaluation networks built from a Genotype (DARTS Sec. 3.2): affine ops, drop-path, auxiliary head.

``NetworkCIFAR`` (stem 3C, reductions at layers//3 and 2*layers//3, auxiliary head after cell
2*layers//3) and ``NetworkImageNet`` (two stride-2 stems, 7x7 average pooling). In training mode
``forward`` returns ``(logits, aux_logits)`` (``aux_logits`` None without an auxiliary head); in
evaluation mode plain logits, so a trained network traces and exports like any classifier.
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ilnas.errors import IlnasError, allocation_failure, fault, first_line, positive_integer
from ilnas.space.genotype import Edge, Genotype
from ilnas.space.layout import BUILT_IN_OPS, NETWORK_STYLES, REGISTRY_NAME, add_style_name, known_styles
from ilnas.space.ops import FactorizedReduce, ReLUConvBN, create_op, unchanged_rng
from ilnas.space.supernet import reduction_layers, uneven_side


def drop_path(x: torch.Tensor, drop_prob: float | torch.Tensor, training: bool) -> torch.Tensor:
    """Zero whole samples with probability drop_prob and rescale the rest (Zoph et al., 2018).

    ``drop_prob`` may be a 0-dim tensor on x's device, as the re-training passes it: then the masks are drawn
    even at rate 0, and a compiled network takes the rate as an input of one graph instead of compiling
    itself again as the rate ramps up. The mask is a uniform draw compared with the keep probability, not
    ``bernoulli_(keep)``, which torch.compile specialises on its probability."""
    if not training or (not isinstance(drop_prob, torch.Tensor) and drop_prob <= 0.0):
        return x
    keep = 1.0 - drop_prob
    mask = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < keep
    return x * mask / keep


class EvalCell(nn.Module):
    def __init__(self, edges: tuple[Edge, ...], concat: tuple[int, ...], c_prev_prev: int, c_prev: int,
                 channels: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = (FactorizedReduce(c_prev_prev, channels, affine=True) if reduction_prev
                            else ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=True))
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=True)
        self.ops = nn.ModuleList(create_op(op, channels, 2 if reduction and j < 2 else 1, affine=True)
                                 for op, j in edges)
        self.inputs = [j for _, j in edges]
        self.concat = list(concat)
        self.out_channels = len(concat) * channels

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float | torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(0, len(self.ops), 2):
            node = 0
            for op, j in zip(self.ops[i:i + 2], self.inputs[i:i + 2]):
                h = op(states[j])
                if not isinstance(op, nn.Identity):  # drop-path spares identity edges
                    h = drop_path(h, drop_prob, self.training)
                node = node + h
            states.append(node)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """The DARTS auxiliary classifier: pool to 2x2 (8x8 maps on CIFAR: 5x5 pool, stride 3; 14x14 on
    ImageNet: stride 2; smaller images: adaptive), 1x1 conv to 128, 2x2 conv to 768, linear."""

    def __init__(self, channels: int, num_classes: int, pool: nn.Module, bn_after_second_conv: bool):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            pool,
            nn.Conv2d(channels, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768) if bn_after_second_conv else nn.Identity(), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class _Network(nn.Module):
    """Shared body: cells, auxiliary head, pooling, classifier. Subclasses add the stem and ``_stem``
    (input -> the first two cell inputs)."""

    @staticmethod
    def _require_arguments(genotype: Genotype, **counts: int) -> None:
        """The constructor's arguments refused in one line rather than deep inside torch (a negative width) or
        as a network without cells (no layer)."""
        if not isinstance(genotype, Genotype):
            raise IlnasError(f"genotype must be a Genotype (load_genotype or parse_genotype gives one), got "
                             f"{type(genotype).__name__}")
        for name, value in counts.items():
            positive_integer(name, value)

    def _build_cells(self, genotype: Genotype, layers: int, c_prev_prev: int, c_prev: int, channels: int,
                     reduction_prev: bool) -> None:
        cells, c_curr, self.aux_after = [], channels, 2 * layers // 3
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            c_curr = c_curr * 2 if reduction else c_curr
            edges, concat = (genotype.reduce, genotype.reduce_concat) if reduction else (
                genotype.normal, genotype.normal_concat)
            cell = EvalCell(edges, concat, c_prev_prev, c_prev, c_curr, reduction, reduction_prev)
            cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.out_channels
            if i == self.aux_after:
                self.aux_channels = c_prev
        self.cells = nn.ModuleList(cells)
        self.out_features = c_prev

    def forward(self, x: torch.Tensor, drop_path_rate: float | torch.Tensor = 0.0
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Training mode: (logits, auxiliary logits or None); evaluation mode: logits.
        ``drop_path_rate``: the rate of dropping each cell's non-identity paths (training mode only; DARTS
        ramps it up linearly over the epochs); a float, or a 0-dim tensor on x's device (``drop_path``)."""
        s0, s1 = self._stem(x)
        aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, drop_path_rate)
            if i == self.aux_after and self.auxiliary is not None and self.training:
                aux = self.auxiliary(s1)
        logits = self.classifier(torch.flatten(self.global_pool(s1), 1))
        return (logits, aux) if self.training else logits


class NetworkCIFAR(_Network):
    """Args: genotype, num_classes, layers (20), channels (C=36), auxiliary, in_channels, stem_multiplier,
    small_images (under 32x32, e.g. the digit tasks: the auxiliary head pools adaptively)."""

    def __init__(self, genotype: Genotype, num_classes: int = 10, layers: int = 20, channels: int = 36,
                 auxiliary: bool = True, in_channels: int = 3, stem_multiplier: int = 3, small_images: bool = False):
        super().__init__()
        self._require_arguments(genotype, num_classes=num_classes, layers=layers, channels=channels,
                                in_channels=in_channels, stem_multiplier=stem_multiplier)
        c_stem = stem_multiplier * channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_stem, 3, padding=1, bias=False), nn.BatchNorm2d(c_stem))
        self._build_cells(genotype, layers, c_stem, c_stem, channels, reduction_prev=False)
        pool = (nn.AdaptiveAvgPool2d(2) if small_images
                else nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False))
        self.auxiliary = AuxiliaryHead(self.aux_channels, num_classes, pool, bn_after_second_conv=True) if auxiliary else None
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.out_features, num_classes)

    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.stem(x)
        return s, s


class NetworkImageNet(_Network):
    """Args: genotype, num_classes, layers (14), channels (C=48), auxiliary. Input 224x224."""

    def __init__(self, genotype: Genotype, num_classes: int = 1000, layers: int = 14, channels: int = 48,
                 auxiliary: bool = True, in_channels: int = 3):
        super().__init__()
        self._require_arguments(genotype, num_classes=num_classes, layers=layers, channels=channels,
                                in_channels=in_channels)
        if channels < 2:
            raise IlnasError(f"channels must be at least 2 (the stem's first convolution has half as many), got "
                             f"{channels}")
        self.stem0 = nn.Sequential(
            nn.Conv2d(in_channels, channels // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels // 2), nn.ReLU(inplace=True),
            nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels),
        )
        self.stem1 = nn.Sequential(nn.ReLU(inplace=True),
                                   nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(channels))
        self._build_cells(genotype, layers, channels, channels, channels, reduction_prev=True)
        # The official ImageNet auxiliary head has no BatchNorm after its second conv.
        pool = nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False)
        self.auxiliary = AuxiliaryHead(self.aux_channels, num_classes, pool, bn_after_second_conv=False) if auxiliary else None
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.out_features, num_classes)

    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s0 = self.stem0(x)
        return s0, self.stem1(s0)


def count_parameters(model: nn.Module, include_auxiliary: bool = False) -> int:
    """Parameters, by default without the auxiliary head (the convention of published tables)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if include_auxiliary or not name.startswith("auxiliary."))


# (genotype, classes, in_channels, resolution, layers, channels, auxiliary) -> the network
NetworkFactory = Callable[[Genotype, int, int, int, int, int, bool], nn.Module]
NETWORKS: dict[str, NetworkFactory] = {}


def register_network(style: str) -> Callable[[NetworkFactory], NetworkFactory]:
    """A decorator that makes ``factory(genotype, classes, in_channels, resolution, layers, channels, auxiliary)``
    the evaluation network ``network.style=style``, which ``ilnas train`` re-trains a cell in and ``load_model``,
    ``describe`` and ``export`` rebuild. Its ``forward(x, drop_path_rate=0.0)`` returns ``(logits, auxiliary
    logits or None)`` in training mode and the logits in evaluation mode; ``drop_path_rate`` (a 0-dim tensor in
    re-training) goes to each EvalCell's forward; parameters under ``auxiliary.`` are left out of the published
    parameter count. Built from EvalCell, as NetworkCIFAR is, it takes any genotype."""
    if not isinstance(style, str) or not REGISTRY_NAME.fullmatch(style) or style in NETWORK_STYLES:
        raise IlnasError(f"a network style's name must be lower-case letters, digits, _ and - (a letter first, at "
                         f"most 64) and none of {', '.join(NETWORK_STYLES)}; got {style!r}")

    def wrap(factory: NetworkFactory) -> NetworkFactory:
        NETWORKS[style] = factory
        add_style_name(style)
        return factory
    return wrap


def build_network(genotype: Genotype, classes: int, in_channels: int, resolution: int, style: str = "cifar",
                  layers: int = 20, channels: int = 36, auxiliary: bool = True) -> nn.Module:
    """The evaluation network of ``style``: cifar (``small_images`` below 32x32), imagenet, or one registered."""
    if style == "imagenet":
        return NetworkImageNet(genotype, classes, layers, channels, auxiliary, in_channels=in_channels)
    if style == "cifar":
        return NetworkCIFAR(genotype, classes, layers, channels, auxiliary, in_channels=in_channels,
                            small_images=resolution < 32)
    if style not in NETWORKS:
        raise IlnasError(f"unknown network style {style!r}; known: {', '.join(known_styles())} (one of your own: "
                         f"ilnas.register_network in a module that ILNAS_PLUGINS names)")
    try:
        model = NETWORKS[style](genotype, classes, in_channels, resolution, layers, channels, auxiliary)
    except IlnasError:
        raise
    except Exception as e:  # one's own factory's failure, whatever it is: one line
        if allocation_failure(e) is not None:  # out of memory: the recipe names the settings
            raise
        raise IlnasError(f"network style {style!r} cannot be built ({fault(e, 100)})") from None
    if not isinstance(model, nn.Module):
        raise IlnasError(f"network style {style!r} is no torch.nn.Module: its factory returned {type(model).__name__}")
    return model


def _uneven_side(resolution: int, style: str) -> str | None:
    """Why a built-in network style's cells cannot take images of ``resolution`` pixels (uneven_side), or None. The
    ImageNet style's stem halves the side twice into the first cell's earlier input and once more into its later
    one, which the first cell's factorized reduction must match from the earlier: four halvings from there."""
    if style != "imagenet":
        return uneven_side(resolution)
    earlier = ((resolution + 1) // 2 + 1) // 2
    if earlier % 8 == 0:
        return None
    return (f"the stem halves the side three times and the two reduction cells twice more, which takes a side the "
            f"stem's first two halvings leave a multiple of 8 (224: 56), got {resolution}: {earlier}")


def check_input_size(genotype: Genotype, classes: int, in_channels: int, resolution: int, style: str = "cifar",
                     layers: int = 20, channels: int = 36, auxiliary: bool = True, device: str | torch.device = "cpu",
                     remedy: str = "use larger images or another network style",
                     side_remedy: str = "use images of another side") -> None:
    """Refuse images a network cannot take: one training-mode (auxiliary head and drop-path included) and one
    evaluation-mode forward pass of a narrow copy of it (same cells, C=8 instead of ``channels``; a network of
    one's own at its own width, which it may depend on) on two images, on ``device`` (the run's), the random state
    untouched; and a network of one's own that returns what re-training cannot take. Code of one's own also runs
    the passes a recipe makes before its run (one image to count multiply-adds, four for the memory check), so
    that one written for a single batch size fails here, in one line. ``remedy`` ends the refusal of images too
    small for the network's built-in parts, ``side_remedy`` that of a side its reduction cells cannot halve: what
    its caller can change."""
    device = torch.device(device)
    width = 8 if style in NETWORK_STYLES else channels
    ops = sorted({op for op, _ in genotype.normal + genotype.reduce} - set(BUILT_IN_OPS))
    own = [f"an operation of your own ({', '.join(ops)})"] if ops else []
    own += [f"your network style {style}"] if style not in NETWORK_STYLES else []
    with unchanged_rng(device), torch.no_grad():
        model = build_network(genotype, classes, in_channels, resolution, style, layers, width, auxiliary).to(device)

        def forward(training: bool, images: int, side: int = resolution) -> object:
            x = torch.zeros(images, in_channels, side, side, device=device)
            return model.train()(x, torch.tensor(0.1, device=device)) if training else model.eval()(x)

        def halvable_above() -> int | None:
            """The next larger side the cells can halve, where the network takes it: the side was the fault,
            not the size (else None)."""
            side = next(s for s in itertools.count(resolution + 1) if _uneven_side(s, style) is None)
            try:
                forward(True, 2, side), forward(False, 2, side)
            except Exception:
                return None
            return side
        try:
            trained, evaluated = forward(True, 2), forward(False, 2)
        except Exception as e:  # an operation or a network of one's own may fail any way it likes
            if allocation_failure(e) is not None:  # out of memory: the recipe names the settings
                raise
            if own:
                raise IlnasError(f"the {style}-style network of {layers} cells fails on {resolution}x{resolution} "
                                 f"images ({fault(e, 100)}): they are too small for it, or "
                                 f"{' or '.join(own)} fails at that size") from None
            if (why := _uneven_side(resolution, style)) and (larger := halvable_above()):
                works = f" ({larger}x{larger} works)" if style == "imagenet" else ""  # cifar's names its multiples
                raise IlnasError(f"the {style}-style network cannot take {resolution}x{resolution} images: "
                                 f"{why}{works}; {side_remedy}") from None
            raise IlnasError(f"{resolution}x{resolution} images are too small for the {style}-style network of "
                             f"{layers} cells ({first_line(e, 100)}); {remedy}") from None
        for training, images in ((False, 1), (True, 4)) if own else ():
            try:
                forward(training, images)
            except Exception as e:
                if allocation_failure(e) is not None:
                    raise
                raise IlnasError(f"{' or '.join(own)} fails on a batch of {images} image(s) in "
                                 f"{'training' if training else 'evaluation'} mode ({fault(e, 100)}), where it takes "
                                 f"two: a run feeds it batches of any size") from None
    _require_outputs(style, trained, evaluated, classes)


def _require_outputs(style: str, trained: object, evaluated: object, classes: int) -> None:
    """What re-training and evaluation take from a network: (logits, auxiliary logits or None) in training mode,
    logits in evaluation mode, each (N, classes). A network of one's own is held to it before a run starts."""
    def logits(t: object) -> bool:
        return isinstance(t, torch.Tensor) and tuple(t.shape) == (2, classes)

    pair = isinstance(trained, tuple) and len(trained) == 2 and logits(trained[0]) and (
        trained[1] is None or logits(trained[1]))
    if not pair or not logits(evaluated):
        raise IlnasError(f"network style {style!r} must return (logits, auxiliary logits or None) in training mode "
                         f"and logits in evaluation mode, each (N, {classes}); got {_kind(trained)} and "
                         f"{_kind(evaluated)} for N=2")


def _kind(out: object) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor {tuple(out.shape)}"
    if isinstance(out, tuple):
        return "(" + ", ".join(_kind(o) for o in out) + ")"
    return type(out).__name__


def multiply_adds(model: nn.Module, in_channels: int, resolution: int) -> int:
    """Multiply-adds of one eval-mode forward pass of one image (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, in_channels, resolution, resolution))
    return counter.get_total_flops() // 2
