"""A ready search over your own tasks in Python: the DARTS space, one task head per task, the engine.

    search = SupernetSearch({"shapes": lambda width: nn.Linear(width, 4),
                             "colours": lambda width: MyHead(width)}, in_channels=3)
    for step in range(100):
        search.step(train={"shapes": (x1, y1), "colours": (x2, y2)}, val={...})
    print(search.genotype())

The recipe ``ilnas search`` adds data pipelines, epochs, schedules, P-DARTS phases, checkpoints and the run
directory on top of the same pieces; this class is for tasks that live in your own tensors and code.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ilnas.config.loading import checked_section
from ilnas.config.schema import (SpaceConfig, require_normal_cell, validate_arch_optimizer, validate_sgd,
                                 validate_space)
from ilnas.distributed import as_device
from ilnas.errors import IlnasError, flag, positive_integer
from ilnas.memory import parameter_count, require_search_memory
from ilnas.optim import SGD, Adam
from ilnas.search.config import EngineConfig, validate_config
from ilnas.search.engine import (Batch, Learner, Reduce, create_state, final_stages, label_metrics, no_reduce,
                                 search_step)
from ilnas.search.task_net import Criterion, FreshParameters, FunctionalTaskNet
from ilnas.seeds import checked_seed, derive_seed
from ilnas.space.genotype import Genotype, derive_genotype
from ilnas.space.layout import full_edge_ops
from ilnas.space.ops import check_ops
from ilnas.space.supernet import Supernet, init_arch, ranking_weights, uneven_side, use_channels_last

HeadSpec = nn.Module | Callable[[int], nn.Module]  # a head, or a builder given the supernet's feature width


class SupernetSearch:
    """K tasks (the mapping's order is the learner order l1..lK of every round), M rounds, one shared
    searchable cell.

    Args:
        heads: task name -> its head: a module mapping (N, feature width) to logits, or a builder called
            with the feature width (under a seed derived from ``seed``, so that its initial weights are too).
            Every stage of a task starts from the head's initial weights.
        in_channels: channels of the images every task feeds the shared supernet.
        space: the supernet (channels, cells, PC-DARTS's partial channels and edge normalisation).
        rounds: M (1 with ``engine.coupling="none"``: the multi-task baseline; one task, one round: DARTS).
        engine, sgd, arch_optimizer: how stages are unrolled and coupled; the stages' SGD (momentum,
            weight decay, clipping); Adam on the architecture.
        criteria: task name -> loss of (logits, targets), default cross-entropy. A loss receives the head's
            logits and the batch's targets and returns a scalar.
        seed: the stages' initial encoder weights, the heads that builders make, and the architecture's
            initialisation. Building the search neither reads nor moves torch's global RNG.
        channels_last: NHWC activations (None: on CPUs, where they are faster; see Supernet).
        amp: bf16 autocast for the step's passes (float32 only; see SearchConfig.amp).
        reduce: the mean over data-parallel ranks, for a search under torchrun where each rank steps on
            its slice of every batch: ``ilnas.distributed.mean_over_ranks(ilnas.distributed.start("cuda"))``.
    """

    def __init__(self, heads: Mapping[str, HeadSpec], in_channels: int, *, space: SpaceConfig = SpaceConfig(),
                 rounds: int = 2, engine: EngineConfig = EngineConfig(), sgd: SGD = SGD(lr_min=0.001),
                 arch_optimizer: Adam = Adam(), criteria: Mapping[str, Criterion] | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 channels_last: bool | None = None, amp: bool = False, reduce: Reduce = no_reduce):
        if not isinstance(heads, Mapping):
            raise IlnasError(f"heads must map each task's name to its head, got {type(heads).__name__}")
        if not heads:
            raise IlnasError("heads is empty: give at least one task")
        for name, spec in heads.items():
            if not (isinstance(spec, nn.Module) or callable(spec)):
                raise IlnasError(f"the head of task {name!r} must be a torch.nn.Module or a builder of one given the "
                                 f"feature width, got {type(spec).__name__}")
        rounds, in_channels = positive_integer("rounds", rounds), positive_integer("in_channels", in_channels)
        amp, channels_last = flag("amp", amp), flag("channels_last", channels_last, none=True)
        engine, sgd = checked_section(engine, EngineConfig, "engine"), checked_section(sgd, SGD, "sgd")
        arch_optimizer = checked_section(arch_optimizer, Adam, "arch_optimizer")
        space = checked_section(space, SpaceConfig, "space")
        validate_space(space)
        validate_sgd(sgd, section="sgd")
        validate_arch_optimizer(arch_optimizer)
        require_normal_cell("space.layers", space.layers)
        device = as_device(device)
        if dtype not in (torch.float32, torch.float64):
            raise IlnasError(f"dtype must be torch.float32 or torch.float64 (bf16: amp=True), got {dtype!r}")
        seed = checked_seed(seed, "seed")
        if criteria is not None and not isinstance(criteria, Mapping):
            raise IlnasError(f"criteria must map task names to loss functions, got {type(criteria).__name__}")
        check_ops(space.ops, channels=space.channels // space.partial_channels, device=device)
        unknown = set(criteria or {}) - set(heads)
        if unknown:
            raise IlnasError(f"criteria name tasks without a head: {sorted(unknown)}")
        validate_config(engine, len(heads), sgd.lr)
        if amp and dtype != torch.float32:
            raise IlnasError(f"amp (bf16 autocast) needs dtype=torch.float32, got {dtype}")
        self.tasks, self.engine, self.sgd, self.reduce = list(heads), engine, sgd, reduce
        self.images = (in_channels, dtype, torch.device(device))
        self.own_criterion = {name: name in (criteria or {}) for name in heads}
        self.autocast = functools.partial(torch.autocast, torch.device(device).type, dtype=torch.bfloat16,
                                          enabled=amp)

        def module() -> Supernet:
            edge_ops = full_edge_ops(space.ops)
            return Supernet(in_channels, space.channels, space.layers, edge_ops, edge_ops,
                            partial_channels=space.partial_channels,
                            stem_multiplier=space.stem_multiplier,
                            channels_last=use_channels_last(channels_last, device))

        require_search_memory(parameter_count(module) * dtype.itemsize, len(heads) * rounds, torch.device(device),
                              "space.channels or space.layers")

        with torch.random.fork_rng(devices=[]):  # its own weights are never used: each pass gets a stage's
            self.encoder = module().to(device, dtype)
        width = self.encoder.out_features

        def build_head(k: int, spec: HeadSpec) -> nn.Module:
            if isinstance(spec, nn.Module):
                return spec
            with torch.random.fork_rng(devices=[]):  # the caller's global RNG is neither read nor moved
                torch.manual_seed(derive_seed(seed, 0, k, 1))
                return spec(width)
        modules = [_placed_head(name, build_head(k, h), device, dtype) for k, (name, h) in enumerate(heads.items())]
        self.nets = [_task_net(name, self.encoder, m, (criteria or {}).get(name, F.cross_entropy))
                     for name, m in zip(self.tasks, modules)]
        self.learners = [Learner(name, net.loss, net.losses) for name, net in zip(self.tasks, self.nets)]
        heads_init = [[p.detach().clone() for p in m.parameters()] for m in modules]

        encoder_init = FreshParameters(module, torch.device(device), dtype)

        def initial(s: int, k: int):
            return encoder_init(derive_seed(seed, 0, s, 0)), heads_init[k]
        arch = init_arch(self.encoder.num_ops, space.edge_normalization,
                         torch.Generator().manual_seed(derive_seed(seed, 0)), dtype)
        self.state = create_state([a.to(device) for a in arch], initial, len(self.tasks), rounds, arch_optimizer)

    def _per_task(self, batches: Mapping[str, Batch], what: str) -> list[Batch]:
        if not isinstance(batches, Mapping):
            raise IlnasError(f"{what} must map each task's name to its batch, got {type(batches).__name__}")
        missing = [t for t in self.tasks if t not in batches]
        if missing:
            raise IlnasError(f"{what} has no batch for {', '.join(missing)}")
        for task in self.tasks:
            _require_batch(f"{what}[{task!r}]", batches[task], *self.images, self.own_criterion[task])
        return [batches[t] for t in self.tasks]

    def step(self, train: Mapping[str, Batch], val: Mapping[str, Batch], lr: float | None = None,
             update_arch: bool = True) -> dict[str, Any]:
        """One iteration: every stage's unrolled step on its task's ``train`` batch, the hypergradient of the
        final round's losses on the ``val`` batches, Adam on the architecture, the stages' real SGD updates.
        ``lr``: this step's learning rate (default ``sgd.lr``). Returns the engine's metrics, losses named
        by stage (``r2/colours``) and task."""
        update_arch = flag("update_arch", update_arch)
        if lr is None:
            lr = self.sgd.lr
        elif isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
            raise IlnasError(f"lr must be a positive number, got {lr!r}")
        elif lr > self.sgd.lr:  # the coupling was checked for stability up to sgd.lr
            validate_config(self.engine, len(self.tasks), lr)
        with self.autocast():
            metrics = search_step(self.state, self.learners, self._per_task(train, "train"),
                                  self._per_task(val, "val"), self.engine, self.sgd, lr, update_arch, self.reduce)
        return label_metrics(metrics, self.state, self.tasks)

    def genotype(self) -> Genotype:
        """The cell the current architecture weights derive (the DARTS rule: two strongest inputs per node)."""
        return derive_genotype(*ranking_weights(self.state.arch), self.encoder.normal_ops, self.encoder.reduce_ops)

    @torch.no_grad()
    def logits(self, task: str, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``task``'s final-round stage on ``x`` (evaluation mode)."""
        if task not in self.tasks:
            raise IlnasError(f"unknown task {task!r}; tasks: {', '.join(self.tasks)}")
        _require_images("logits", x, *self.images)
        k = self.tasks.index(task)
        stage = next(self.state.stages[s] for s in final_stages(self.state, len(self.tasks))
                     if self.state.stages[s].learner == k)
        self.encoder.eval()
        try:
            return self.nets[k].logits([a.detach() for a in self.state.arch], stage.w, stage.h, x)
        finally:
            self.encoder.train()


def _placed_head(task: str, head: Any, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """The head on the search's device and dtype."""
    if not isinstance(head, nn.Module):
        raise IlnasError(f"the head builder of task {task!r} returned {type(head).__name__}, not a torch.nn.Module")
    return head.to(device, dtype)


def _task_net(task: str, encoder: nn.Module, head: nn.Module, criterion: Criterion) -> FunctionalTaskNet:
    try:
        return FunctionalTaskNet(encoder, head, None, criterion)
    except IlnasError as e:  # a head that cannot take the features: which task's
        raise IlnasError(f"task {task!r}: {e}") from None


def _require_batch(where: str, batch: Any, channels: int, dtype: torch.dtype, device: torch.device,
                   own_criterion: bool) -> None:
    """An (images, targets) pair the supernet can take: images (N, channels, H, W) of the search's dtype on its
    device; targets, where a tensor, of N rows (a criterion of one's own may take other targets), and for the
    default cross-entropy, class indices (int64, (N,)) or class probabilities (floating, (N, classes)). Their
    values are not looked at: that would wait for the device at every step."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise IlnasError(f"{where} must be an (images, targets) pair, got {type(batch).__name__}")
    x, y = batch
    _require_images(where, x, channels, dtype, device)
    if isinstance(y, torch.Tensor) and (y.dim() == 0 or len(y) != len(x)):
        raise IlnasError(f"{where}: {len(x)} images but targets of shape {tuple(y.shape)}")
    if own_criterion:
        return
    indices = isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.dim() == 1
    probabilities = isinstance(y, torch.Tensor) and y.is_floating_point() and y.dim() == 2
    if not (indices or probabilities) or y.device != x.device:
        got = f"{y.dtype} {tuple(y.shape)} on {y.device}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise IlnasError(f"{where}: the default cross-entropy takes targets of class indices (torch.int64, (N,)) or "
                         f"class probabilities (floating, (N, classes)) on the images' device, got {got}")


def _require_images(where: str, x: Any, channels: int, dtype: torch.dtype, device: torch.device) -> None:
    on_device = isinstance(x, torch.Tensor) and x.device.type == device.type and (
        device.index is None or x.device.index == device.index)
    if not on_device or x.dim() != 4 or x.shape[1] != channels or x.dtype != dtype:
        got = (f"{x.dtype} {tuple(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__)
        raise IlnasError(f"{where}: the images must be a {dtype} tensor (N, {channels}, H, W) on {device}, got {got}")
    if len(x) == 0:
        raise IlnasError(f"{where} holds no images")
    for side in x.shape[2:]:
        if why := uneven_side(side):
            raise IlnasError(f"{where}: the supernet cannot take {tuple(x.shape[2:])} images: {why}")
