"""A learner of the search: the supernet plus one task head, evaluated as a pure function of
(arch, encoder weights, head weights, x), which is what the engine's loss functions take.

One module instance serves every weight set (``torch.func.functional_call``), so the search can keep
as many stages as it likes without deep copies of the network.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ilnas.errors import IlnasError, fault
from ilnas.space.sets import stack_sets
from ilnas.space.supernet import Supernet, arch_weights

Tensors = list[torch.Tensor]


Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> scalar loss


def _output_width(head: nn.Module, features: int) -> int:
    """The width of a head's output for (N, features) inputs: one pass of two rows in evaluation mode without
    gradients, so that the head's running statistics, its mode and torch's global RNG (dropout) stay as they
    were. A head that cannot take such input is refused in one line."""
    first = next(head.parameters(), None)
    probe = torch.zeros(2, features, dtype=first.dtype if first is not None else torch.float32,
                        device=first.device if first is not None else None)
    training = head.training
    try:
        with torch.no_grad():
            return head.eval()(probe).shape[-1]
    except Exception as e:  # a head of one's own may fail any way it likes
        raise IlnasError(f"the task head cannot take the supernet's features, (N, {features}) "
                         f"({fault(e, 120)})") from None
    finally:
        head.train(training)


class FunctionalTaskNet:
    """Args:
        encoder: the (shared-architecture) supernet; its parameters are W.
        head: maps (N, encoder.out_features) to (N, num_classes); its parameters are H.
        num_classes: checked against the head's output width (None: not checked).
        criterion: the task's loss of (logits, targets); cross-entropy by default.
    """

    def __init__(self, encoder: Supernet, head: nn.Module, num_classes: int | None,
                 criterion: Criterion = F.cross_entropy):
        self.encoder, self.head, self.criterion = encoder, head, criterion
        width = _output_width(head, encoder.out_features)
        if num_classes is not None and width != num_classes:
            raise IlnasError(f"task head gives {width} outputs but the task has {num_classes} classes")
        self.encoder_names = [n for n, _ in encoder.named_parameters()]
        self.head_names = [n for n, _ in head.named_parameters()]
        # functional_call looks for a parameter registered under two names in every call (a walk over every
        # submodule, a tenth of a small supernet's step); a module without such names is spared the walk.
        self.encoder_tied, self.head_tied = has_tied_parameters(encoder), has_tied_parameters(head)

    def logits(self, arch: Tensors, w: Tensors, h: Tensors, x: torch.Tensor,
               skip_dropout: float = 0.0) -> torch.Tensor:
        feats = functional_call(self.encoder, dict(zip(self.encoder_names, w)), (x, *arch_weights(arch)),
                                {"skip_dropout": skip_dropout}, tie_weights=self.encoder_tied)
        return self._head(h, feats)

    def _head(self, h: Tensors, feats: torch.Tensor) -> torch.Tensor:
        return functional_call(self.head, dict(zip(self.head_names, h)), (feats,), tie_weights=self.head_tied)

    def loss(self, arch: Tensors, w: Tensors, h: Tensors, batch: tuple[torch.Tensor, torch.Tensor],
             skip_dropout: float = 0.0) -> torch.Tensor:
        """The engine's loss of a learner: the criterion of the logits and the batch's targets."""
        x, y = batch
        return self.criterion(self.logits(arch, w, h, x, skip_dropout), y)

    def losses(self, arch: Tensors, ws: Sequence[Tensors], hs: Sequence[Tensors],
               batch: tuple[torch.Tensor, torch.Tensor], skip_dropout: float = 0.0) -> torch.Tensor:
        """``loss`` of several weight sets on one batch, in one batched pass of the supernet (the sets side
        by side along the channels, ilnas/space/sets.py): (S,) losses, the same numbers as S calls."""
        x, y = batch
        sets = len(ws)
        encoder = self.encoder.batched(sets)
        feats = functional_call(encoder, dict(zip(self.encoder_names, stack_sets(ws))),
                                (x.repeat(1, sets, 1, 1), *arch_weights(arch)), {"skip_dropout": skip_dropout},
                                tie_weights=self.encoder_tied)
        return torch.stack([self.criterion(self._head(h, feats[:, s]), y) for s, h in enumerate(hs)])


def has_tied_parameters(module: nn.Module) -> bool:
    """Whether one parameter of ``module`` is registered under more than one name."""
    return sum(1 for _ in module.named_parameters(remove_duplicate=False)) != sum(1 for _ in module.parameters())


def fresh_parameters(build: Callable[[], nn.Module], seed: int) -> Tensors:
    """The initial parameters of a newly built module, reproducible from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [p.detach().clone() for p in build().parameters()]


# torch's layers whose construction draws exactly what their reset_parameters() draws
REDRAWN = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


class FreshParameters:
    """``seed -> fresh_parameters(build, seed)``, placed on ``device`` in ``dtype``, for seed after seed (a
    search's stages each start from their own seed). A module whose building draws nothing but its layers'
    initialisations (``redrawable``) is built once and drawn again in place, every layer's ``reset_parameters``
    in the order the layers were built: the draws of a new build (tests/test_network.py holds it to that, bit for
    bit) at a tenth of the cost of building the module. Any other module is built anew for every seed."""

    def __init__(self, build: Callable[[], nn.Module], device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        self.build, self.device, self.dtype = build, device, dtype
        self._kept: nn.Module | None = None

    def __call__(self, seed: int) -> Tensors:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self._kept is None:
                module = self.build()
                self._kept = module if redrawable(module) else None
            else:
                module = self._kept
                for layer in module.modules():
                    if isinstance(layer, REDRAWN):
                        layer.reset_parameters()
            return [p.detach().to(self.device, self.dtype, copy=True) for p in module.parameters()]


def redrawable(module: nn.Module) -> bool:
    """Whether building ``module`` draws nothing but what its layers' ``reset_parameters`` draw: a supernet of
    ilnas's operations (whose layers subclass torch's without drawing more) or a module of torch's layers, with
    every parameter in a REDRAWN layer. (Code of one's own, an operation or a head, may draw anything as it is
    built.)"""
    if type(module) is Supernet:
        trusted = module.built_in
    else:
        trusted = all(type(layer).__module__.startswith("torch.nn.") for layer in module.modules())
    return trusted and all(isinstance(layer, REDRAWN) or all(p is None for p in layer._parameters.values())
                           for layer in module.modules())
