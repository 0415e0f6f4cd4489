"""The configuration schema: frozen dataclasses that hold every setting and its default, once, nested
where a block is shared (the engine's settings, the SGD block of search and training), and the
checks a resolved configuration must pass. No torch at import time."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ilnas.data.names import is_streamed, side_setting
from ilnas.errors import IlnasError, NotRegistered
from ilnas.optim import SCHEDULE_SETTINGS, SCHEDULES, SGD, Adam
from ilnas.search.config import EngineConfig, validate_config
from ilnas.seeds import checked_seed
from ilnas.space.layout import NETWORK_STYLES, PRIMITIVES, known_ops, known_styles, op_list_fault
from ilnas.threads import MAX_THREADS

DEVICES = "auto, cpu, cuda or cuda:N"
# Bounds far past any published run (DARTS: 8 cells searched, 20 re-trained; P-DARTS: 17; the paper: M = 2;
# ImageNet loaders: tens of workers a GPU) that stop a typo before it fills the machine's memory or process table.
MAX_CELLS, MAX_ROUNDS, MAX_WORKERS = 1000, 100, 256
MAX_IMAGE_SIDE = 1024  # pixels: data.image_size, train.resolution and a model card's input
MAX_CHANNELS, MAX_STEM_MULTIPLIER = 1 << 20, 64  # far past any machine's memory (refused there, counted on
# the meta device), short of the sizes torch's 64-bit integers overflow at
SEARCH_METHODS = ("darts", "pdarts")  # search.method: a strategy of search/methods.py each
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # inductor's


@dataclass(frozen=True)
class DataConfig:
    """The tasks of a run and where and how their files are found.

    Args:
        tasks: task names; for a search, the learner order l1..lK of every round.
        data_dir: where data sets live (downloaded to, for CIFAR).
        download: fetch missing CIFAR files (torchvision).
        verify: check the files' MD5 sums (torchvision's integrity check).
        image_size: side of the embedded digit images and of image folders decoded into memory.
        folder_pipeline: how ``imagefolder:<path>`` tasks are read: ``memory`` (decoded once to uint8
            at image_size, searchable, CIFAR-style augmentation) or ``stream`` (re-training only:
            torchvision's ImageFolder at train.resolution, the ImageNet recipe's augmentation).
        memory_limit_gb: the most a task held in memory at ``image_size`` (an image folder decoded, the digits,
            a task of one's own) may take.
    """

    tasks: tuple[str, ...] = ("mnist5k", "digits")
    data_dir: str = "data"
    download: bool = True
    verify: bool = True
    image_size: int = 16
    folder_pipeline: str = "memory"
    memory_limit_gb: float = 8.0


@dataclass(frozen=True)
class SpaceConfig:
    """The supernet: C channels in the first cell, ``layers`` cells (at least 3, MIN_CELLS), stem of
    stem_multiplier * C.

    Args:
        partial_channels: K of PC-DARTS, 1/K of the channels through the mixed op (1: off).
        edge_normalization: PC-DARTS betas, a softmax over each node's incoming edges.
        ops: the candidate operations of every edge, in the architecture weights' column order: DARTS's eight
            by default; any of ``ilnas.space.layout.known_ops()`` (sep_conv_7x7, conv_7x1_1x7, and names given
            to ``ilnas.register_op``).
    """

    channels: int = 16
    layers: int = 8
    stem_multiplier: int = 3
    partial_channels: int = 1
    edge_normalization: bool = False
    ops: tuple[str, ...] = PRIMITIVES


@dataclass(frozen=True)
class PDartsConfig:
    """P-DARTS phases (search.method=pdarts): cells (at least 3) and candidate ops per edge of each phase, the
    skip-connect dropout base rate of each phase (CIFAR-10 0.0/0.4/0.7, CIFAR-100 0.1/0.2/0.3),
    its decay after the warm-up, and the cap on skip-connects in the final normal cell."""

    layers: tuple[int, ...] = (5, 11, 17)
    ops_per_edge: tuple[int, ...] = (8, 5, 3)
    skip_dropout: tuple[float, ...] = (0.0, 0.4, 0.7)
    dropout_decay: float = 0.2
    max_skips: int = 2


@dataclass(frozen=True)
class SearchConfig:
    """The search recipe. Defaults: the DARTS search; the framework picks K and M: ``single`` (one
    task, one round), ``mtl`` (Eq. 10: one round, engine.coupling none), ``il``.

    Args:
        rounds: M, the number of interleaving rounds.
        method: darts (one phase; PC-DARTS is darts on a partial-channel space) | pdarts (the phases
            of the pdarts section; epochs are per phase).
        warmup_epochs: weight-only epochs at the start of each phase (P-DARTS 10, PC-DARTS 15).
        steps_per_epoch: None = the largest task's train split / batch_size.
        eval_batches: validation batches per task for the epoch's accuracy (None = all).
        dtype: float32 | float64.
        threads: CPU threads of torch's operations (None: OMP_NUM_THREADS when set, else every core
            this process may use; see ilnas/threads.py).
        channels_last: NHWC activations in the supernet (None: on CPUs, where they are measured faster;
            off on CUDA, not yet measured there).
        amp: bf16 autocast for the search's passes (any device; float32 only). Weights, the architecture,
            gradients and the hypergradient's sums stay float32, and finite-difference HVP passes run in
            float32 (their perturbation eps/||v|| lies below bf16's resolution). Off by default: the
            hypergradient moves (tests bound it) and the speed-up is unmeasured on GPUs.
        deterministic: deterministic kernels only (ilnas/determinism.py): on CUDA a search then repeats bit for
            bit, with slower kernels; on CPUs it does anyway.
        log_every: steps whose metrics come back to the host together (1: every step waits for the
            device before the next one starts). Every step is still logged, with the group's mean step time;
            a non-finite loss is found at the end of its group, before anything of the group is saved.
        checkpoint_minutes: between epoch checkpoints, a checkpoint part-way through an epoch at the first step
            this long after the last one (0: at epoch ends only). A stop signal writes one at once
            (ilnas/stopping.py).
    """

    framework: str = "il"
    method: str = "darts"
    rounds: int = 2
    epochs: int = 50
    warmup_epochs: int = 0
    steps_per_epoch: int | None = None
    batch_size: int = 64
    eval_batches: int | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = None
    channels_last: bool | None = None
    amp: bool = False
    deterministic: bool = False
    log_every: int = 1
    checkpoint_minutes: float = 30.0


@dataclass(frozen=True)
class NetworkConfig:
    """An evaluation network: ``style`` cifar (stem 3C) or imagenet (two stride-2 stems)."""

    style: str = "cifar"
    layers: int = 20
    channels: int = 36
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path: float = 0.2

    def build_args(self) -> dict:
        """The settings ``ilnas.space.network.build_network`` takes."""
        return {"style": self.style, "layers": self.layers, "channels": self.channels, "auxiliary": self.auxiliary}


@dataclass(frozen=True)
class TrainConfig:
    """Re-training from scratch (its SGD and learning-rate schedule: the optimizer section).
    Defaults: the DARTS CIFAR recipe (600 epochs, batch 96).

    Args:
        batch_size: the global batch, split evenly over torchrun ranks.
        cutout: side of the cutout square on in-memory tasks (0: off; smaller than the image side).
        resolution, color_jitter, workers: image-folder tasks (ImageNet recipe).
        decode: how image-folder tasks are decoded: ``workers`` (PIL in the DataLoader workers) or ``device``
            (the workers read the files; JPEGs are decoded in one batched call on the training device,
            nvJPEG on CUDA, and cropped, flipped, jittered and normalised there: a GPU fed by few CPU cores).
        steps_per_epoch: cap on steps per epoch (None: the whole training set).
        amp: bf16 autocast on CUDA; channels_last: NHWC activations (CUDA and CPU: 1.4-1.7x a step on CPUs,
            bench/train_step.py).
        deterministic: deterministic kernels only, as the search's (slower kernels on CUDA).
        threads: CPU threads of torch's operations (None: OMP_NUM_THREADS when set, else every core
            this process may use).
        compile: a ``torch.compile`` backend for the network's forward and backward (None: eager;
            ``inductor`` the usual one, ``aot_eager`` traces without generating code); a backend that
            fails falls back to eager with torch's warning. compile_mode: inductor's mode
            (``reduce-overhead``: CUDA graphs; ``max-autotune``; None: its default).
        checkpoint_minutes: as the search's: a checkpoint part-way through an epoch at the first step this long
            after the last one (0: at epoch ends only); a stop signal writes one at once.
    """

    epochs: int = 600
    batch_size: int = 96
    label_smoothing: float = 0.0
    cutout: int = 16
    resolution: int = 224
    color_jitter: bool = False
    workers: int = 4
    decode: str = "workers"
    steps_per_epoch: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    deterministic: bool = False
    threads: int | None = None
    compile: str | None = None
    compile_mode: str | None = None
    checkpoint_minutes: float = 30.0


@dataclass(frozen=True)
class SearchRunConfig:
    kind: str = "search"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optimizer: SGD = field(default_factory=lambda: SGD(lr_min=0.001))  # of the stages' weights
    arch_optimizer: Adam = field(default_factory=Adam)
    pdarts: PDartsConfig = field(default_factory=PDartsConfig)


@dataclass(frozen=True)
class EvalRunConfig:
    kind: str = "eval"
    description: str = ""
    data: DataConfig = field(default_factory=lambda: DataConfig(tasks=("cifar10",)))
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: SGD = field(default_factory=SGD)


KINDS = {"search": SearchRunConfig, "eval": EvalRunConfig}
KIND_NAMES = {"search": "search", "eval": "training"}  # a kind as messages name it
KIND_COMMANDS = {"search": "ilnas search", "eval": "ilnas train"}  # the command that runs a configuration of it

RunConfig = SearchRunConfig | EvalRunConfig


def validate(cfg: RunConfig) -> None:
    if not cfg.data.tasks:
        raise IlnasError("data.tasks is empty: name at least one task")
    if not 8 <= cfg.data.image_size <= MAX_IMAGE_SIDE:
        raise IlnasError(f"data.image_size must lie in [8, {MAX_IMAGE_SIDE}], got {cfg.data.image_size}")
    if cfg.data.folder_pipeline not in ("memory", "stream"):
        raise IlnasError(f"data.folder_pipeline must be memory or stream, got {cfg.data.folder_pipeline!r}")
    if not cfg.data.data_dir.strip():  # '' is the current directory, where CIFAR would be downloaded
        raise IlnasError("data.data_dir is empty; name the folder of the data sets (default: data)")
    if not cfg.data.memory_limit_gb > 0:
        raise IlnasError(f"data.memory_limit_gb must be positive, got {cfg.data.memory_limit_gb}")
    run = cfg.search if isinstance(cfg, SearchRunConfig) else cfg.train
    section = "search" if isinstance(cfg, SearchRunConfig) else "train"
    _positive(section, run, ("epochs", "batch_size", "steps_per_epoch", "threads"))
    _at_most(section, run, ("threads",), MAX_THREADS)
    checked_seed(run.seed, f"{section}.seed")
    check_device_name(run.device, f"{section}.device")
    validate_sgd(cfg.optimizer, run.epochs, f"{section}.epochs")
    if isinstance(cfg, SearchRunConfig):
        _validate_search(cfg)
    else:
        if len(cfg.data.tasks) != 1:  # a training used to take the first task and leave the others out, silently
            raise IlnasError(f"data.tasks of a training names one task (the network has one classifier), got "
                             f"{list(cfg.data.tasks)}: train once per task (a sweep's train.tasks does)"[:200])
        validate_network(cfg.network)
        if cfg.network.style in NETWORK_STYLES:  # one's own network places its cells as it likes
            require_normal_cell("network.layers", cfg.network.layers, "network")  # not a card's: old models load
        _validate_train(cfg.train)


def _positive(section: str, obj: Any, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise IlnasError(f"{section}.{name} must be positive, got {value}")


# The fewest cells a supernet or network may have: the reduction cells sit at layers//3 and 2*layers//3, so
# below three every cell reduces. A search would then train nothing of the normal cell's architecture (the
# normal cell it printed would be what the optimiser made of its initialisation); a re-training would leave
# the genotype's normal cell out of the network.
MIN_CELLS = 3
WITHOUT_NORMAL_CELL = {"supernet": "nothing would search the normal cell",
                       "network": "the genotype's normal cell would be in none of its cells"}


def require_normal_cell(name: str, layers: int, kind: str = "supernet") -> None:
    """A ``kind`` (supernet or network) of ``layers`` cells, setting ``name``, must hold a normal cell."""
    if layers < MIN_CELLS:
        raise IlnasError(f"{name} must be at least {MIN_CELLS}, got {layers}: with fewer cells the {kind} has no "
                         f"normal cell (reduction cells sit at layers//3 and 2*layers//3), so "
                         f"{WITHOUT_NORMAL_CELL[kind]}")


def _at_most(section: str, obj: Any, names: Sequence[str], limit: int) -> None:
    """A typo's worth of cells, rounds, threads, workers or channels: it would fill the host's memory object by
    object (no one allocation fails, so nothing else stops it), start as many processes, or overflow torch's
    integers (channels of 1e20 stopped the check in a traceback)."""
    for name in names:
        value = getattr(obj, name)
        for v in value if isinstance(value, tuple) else (value,):
            if v is not None and v > limit:
                raise IlnasError(f"{section}.{name} must be at most {limit}, got {v}"[:120])


def _non_negative(section: str, obj: Any, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 0:
            raise IlnasError(f"{section}.{name} must be >= 0, got {value}")


def validate_sgd(o: SGD, epochs: int | None = None, epochs_setting: str = "", section: str = "optimizer") -> None:
    """The weights' optimizer (the ``section`` of its settings); its warm-up against ``epochs`` (setting
    ``epochs_setting``) where they are known."""
    _positive(section, o, ("lr", "grad_clip", "step_size", "gamma"))
    _non_negative(section, o, ("weight_decay", "lr_min"))
    if not 0.0 <= o.momentum < 1.0:
        raise IlnasError(f"{section}.momentum must lie in [0, 1), got {o.momentum}")
    if o.lr_min > o.lr:
        raise IlnasError(f"{section}.lr_min must lie in [0, lr], got {o.lr_min}")
    if o.schedule not in SCHEDULES:
        raise IlnasError(f"{section}.schedule must be {', '.join(SCHEDULES)}, got {o.schedule!r}")
    if o.warmup_epochs < 0:
        raise IlnasError(f"{section}.warmup_epochs must be >= 0, got {o.warmup_epochs}")
    if epochs is not None and o.warmup_epochs >= epochs and o.schedule == "linear":
        raise IlnasError(f"{section}.warmup_epochs must lie in [0, {epochs_setting}={epochs}), got {o.warmup_epochs}")


def _validate_search(cfg: SearchRunConfig) -> None:
    s, e, k = cfg.search, cfg.engine, len(cfg.data.tasks)
    _positive("search", s, ("rounds", "eval_batches", "log_every"))
    _non_negative("search", s, ("checkpoint_minutes",))
    validate_space(cfg.space)
    _at_most("pdarts", cfg.pdarts, ("layers",), MAX_CELLS)
    _at_most("search", s, ("rounds",), MAX_ROUNDS)
    validate_arch_optimizer(cfg.arch_optimizer)
    if len(set(cfg.data.tasks)) != k:
        raise IlnasError(f"data.tasks names a task twice: {list(cfg.data.tasks)}")
    if s.method not in SEARCH_METHODS:
        raise IlnasError(f"search.method must be {' or '.join(SEARCH_METHODS)} (PC-DARTS is space.partial_channels and "
                         f"space.edge_normalization), got {s.method!r}")
    if not 0 <= s.warmup_epochs < s.epochs:
        raise IlnasError(f"search.warmup_epochs must lie in [0, epochs), got {s.warmup_epochs}")
    if s.method == "pdarts":
        _validate_pdarts(cfg.pdarts, len(cfg.space.ops))
    else:
        require_normal_cell("space.layers", cfg.space.layers)
    if s.framework not in ("single", "mtl", "il"):
        raise IlnasError(f"search.framework must be single, mtl or il, got {s.framework!r}")
    if s.framework == "single" and (k != 1 or s.rounds != 1):
        raise IlnasError(f"framework 'single' takes one task and one round, got {k} tasks, {s.rounds} rounds")
    if s.framework == "mtl" and (s.rounds != 1 or e.coupling != "none"):
        raise IlnasError("framework 'mtl' (Eq. 10) takes search.rounds=1 and engine.coupling=none")
    if s.dtype not in ("float32", "float64"):
        raise IlnasError(f"search.dtype must be float32 or float64, got {s.dtype!r}")
    if s.amp and s.dtype != "float32":
        raise IlnasError(f"search.amp (bf16 autocast) needs search.dtype=float32, got {s.dtype}")
    validate_config(e, k, cfg.optimizer.lr)


def validate_arch_optimizer(a: Adam) -> None:
    _positive("arch_optimizer", a, ("lr",))
    _non_negative("arch_optimizer", a, ("weight_decay",))
    if not all(0.0 <= b < 1.0 for b in a.betas):
        raise IlnasError(f"arch_optimizer.betas must both lie in [0, 1), got {list(a.betas)}")


def validate_space(space: SpaceConfig) -> None:
    """The space section's values (the supernet's cell count is checked against the method: P-DARTS reads its
    phases' instead)."""
    _positive("space", space, ("channels", "layers", "stem_multiplier"))
    _at_most("space", space, ("layers",), MAX_CELLS)
    _at_most("space", space, ("channels",), MAX_CHANNELS)
    _at_most("space", space, ("stem_multiplier",), MAX_STEM_MULTIPLIER)
    if space.partial_channels < 1 or space.channels % space.partial_channels:
        raise IlnasError(f"space.partial_channels must be >= 1 and divide space.channels={space.channels}, "
                         f"got {space.partial_channels}")
    validate_ops(space.ops)


def validate_ops(ops: Sequence[str]) -> None:
    """A search space's candidate operations (space.ops): known, each once, and not only none."""
    fault, op = op_list_fault(ops) or ("", "")
    if fault == "unknown":
        raise NotRegistered(f"space.ops: unknown operation {op!r}; known: {', '.join(known_ops())} (one of your "
                            f"own: ilnas.register_op in a module that ILNAS_PLUGINS names)")
    if fault == "twice":
        raise IlnasError(f"space.ops names {op!r} twice")
    if len(ops) < 2 or fault == "only none":
        raise IlnasError(f"space.ops needs at least two operations, one of them other than none; got {list(ops)}")


def _validate_pdarts(p: PDartsConfig, num_ops: int) -> None:
    if not len(p.layers) == len(p.ops_per_edge) == len(p.skip_dropout) >= 1:
        raise IlnasError("pdarts.layers, pdarts.ops_per_edge and pdarts.skip_dropout need one entry per phase")
    for layers in p.layers:
        require_normal_cell("every entry of pdarts.layers", layers)
    ops = list(p.ops_per_edge)
    if ops[0] != num_ops or ops != sorted(ops, reverse=True) or ops[-1] < 2:
        raise IlnasError(f"pdarts.ops_per_edge must start at {num_ops} (the operations of space.ops), never grow, "
                         f"and end at >= 2; got {ops}")
    if any(not 0.0 <= r < 1.0 for r in p.skip_dropout) or p.max_skips < 0:
        raise IlnasError("pdarts.skip_dropout rates must lie in [0, 1) and pdarts.max_skips be >= 0")


def flat_settings(config: dict, prefix: str = "") -> dict[str, object]:
    """A nested configuration as dotted keys and hashable values (lists as tuples)."""
    out: dict[str, object] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def canonical(config: dict) -> dict:
    """A configuration, nested as config.yaml holds it, with what its settings mean spelled one way: per-learner
    loss weights that are all 1 as null (their default), which computes the same numbers. Two runs whose
    configurations differ only in such spellings are one configuration."""
    engine = dict(config.get("engine") or {})
    for name in ("train_weights", "val_weights"):
        weights = engine.get(name)
        if isinstance(weights, (list, tuple)) and weights and all(w == 1 for w in weights):
            engine[name] = None
    return {**config, "engine": engine} if "engine" in config else config


def unused_settings(config: dict) -> dict[str, str]:
    """The settings (dotted keys) of a configuration, nested as config.yaml holds it, that its run never reads, each
    with the reason: the other schedules' settings, the P-DARTS phases of a DARTS search (or space.layers of a P-DARTS
    one), the finite-difference radius of an exact or first-order hypergradient, lambda of a coupling that has none,
    the coupling of a single stage, ... Runs that differ only in these compute the same numbers: one run, not two."""
    def get(section: str, key: str, default: Any) -> Any:
        value = (config.get(section) or {}).get(key, default)
        return default if value is None else value

    def add(keys: Iterable[str], why: str) -> None:
        unused.update(dict.fromkeys(keys, why))

    unused: dict[str, str] = {}
    schedule = get("optimizer", "schedule", SGD.schedule)
    add((f"optimizer.{k}" for k in set().union(*SCHEDULE_SETTINGS.values()) - SCHEDULE_SETTINGS.get(schedule, set())),
        f"the {schedule} schedule does not read it")
    tasks = get("data", "tasks", DataConfig.tasks)
    if isinstance(tasks, (list, tuple)) and tasks and all(isinstance(t, str) for t in tasks):
        unused.update(_unread_data_settings(tuple(tasks), get("data", "folder_pipeline", DataConfig.folder_pipeline),
                                            config.get("kind") == "eval"))
    if config.get("kind") == "eval":
        if not get("network", "auxiliary", True):
            add(["network.auxiliary_weight"], "network.auxiliary is false")
        return unused
    if get("search", "method", SearchConfig.method) == "pdarts":
        add(["space.layers"], "P-DARTS takes each phase's cells from pdarts.layers")
    else:
        add((f"pdarts.{f}" for f in PDartsConfig.__dataclass_fields__), "search.method is not pdarts")
    order, coupling = get("engine", "order", EngineConfig.order), get("engine", "coupling", EngineConfig.coupling)
    if order == 1:  # the hypergradient is taken at the current weights: no HVP, no virtual step in it
        add(["engine.hvp", "engine.fd_eps"], "a first-order hypergradient takes no Hessian-vector product")
        if coupling != "copy":  # (copy takes each stage's gradient at the previous stage's virtual step)
            add(["engine.virtual_momentum"], "a first-order hypergradient takes no virtual step")
    elif get("engine", "hvp", EngineConfig.hvp) == "exact":
        add(["engine.fd_eps"], "engine.hvp=exact takes no finite differences")
    if len(get("data", "tasks", DataConfig.tasks)) * get("search", "rounds", SearchConfig.rounds) == 1:
        add(["engine.coupling", "engine.lam", "engine.allow_unstable"],
            "a single stage has none before it to couple to")
    else:
        if coupling in ("none", "copy"):
            add(["engine.lam"], f"engine.coupling={coupling} has no lambda")
        if coupling != "gd":
            add(["engine.allow_unstable"], "only engine.coupling=gd reads it")
    return unused


def _unread_data_settings(tasks: tuple[str, ...], pipeline: str, training: bool) -> dict[str, str]:
    """The data and image-pipeline settings that ``tasks`` never read (``unused_settings``): the image side of tasks
    that take theirs elsewhere, the folder settings without an image folder, and in a re-training the settings of
    the pipeline its task does not go through (in memory: cutout; streamed: the ImageNet recipe's)."""
    unused: dict[str, str] = {}
    if not any(t.startswith("imagefolder:") for t in tasks):
        unused["data.folder_pipeline"] = "no task is an image folder"
    sides = {side_setting(t, pipeline) for t in tasks}
    if "data.image_size" not in sides:
        unused["data.image_size"] = ("CIFAR keeps its 32x32 images" if sides == {None} else
                                     "a streamed image folder is cut to train.resolution")
        unused["data.memory_limit_gb"] = "no task is held in memory at data.image_size (CIFAR keeps its own " \
                                         "32x32 images, a streamed image folder is read from its files)"
    if not training:
        return unused
    if is_streamed(tasks[0], pipeline):
        unused["train.cutout"] = f"{tasks[0]} is streamed with the ImageNet recipe's augmentation, which has no cutout"
    else:
        unused.update(dict.fromkeys(("train.resolution", "train.color_jitter", "train.workers", "train.decode"),
                                    f"{tasks[0]} is held in memory: only streamed image folders read it"))
    return unused


def validate_network(net: NetworkConfig) -> None:
    """The network section's values (also those a model card holds)."""
    _positive("network", net, ("layers", "channels"))
    _at_most("network", net, ("layers",), MAX_CELLS)
    _at_most("network", net, ("channels",), MAX_CHANNELS)
    if net.style not in known_styles():
        raise NotRegistered(f"network.style must be one of {', '.join(known_styles())}, got {net.style!r} (one of "
                            f"your own: ilnas.register_network in a module that ILNAS_PLUGINS names)")
    if net.auxiliary_weight < 0:
        raise IlnasError(f"network.auxiliary_weight must be >= 0, got {net.auxiliary_weight}")
    if not 0.0 <= net.drop_path < 1.0:
        raise IlnasError(f"network.drop_path must lie in [0, 1), got {net.drop_path}")


def _validate_train(t: TrainConfig) -> None:
    _positive("train", t, ("resolution",))
    _at_most("train", t, ("resolution",), MAX_IMAGE_SIDE)
    _non_negative("train", t, ("checkpoint_minutes",))
    if not 0.0 <= t.label_smoothing < 1.0:
        raise IlnasError(f"train.label_smoothing must lie in [0, 1), got {t.label_smoothing}")
    if t.cutout < 0 or t.workers < 0:
        raise IlnasError("train.cutout and train.workers must be >= 0")
    _at_most("train", t, ("workers",), MAX_WORKERS)
    if t.decode not in ("workers", "device"):
        raise IlnasError(f"train.decode must be workers or device, got {t.decode!r}")
    if t.compile_mode is not None:
        if t.compile != "inductor":
            raise IlnasError(f"train.compile_mode is inductor's; it needs train.compile=inductor, got {t.compile}")
        if t.compile_mode not in COMPILE_MODES:
            raise IlnasError(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {t.compile_mode!r}")


def check_device_name(name: str, what: str = "device") -> None:
    """``name`` is a device as settings and options give it (auto, cpu, cuda or cuda:N); refused in one line
    otherwise (whether that device is there is for ``ilnas.distributed.pick_device`` to say)."""
    if name not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d{1,3}", name):
        raise IlnasError(f"{what} must be {DEVICES}, got {name!r}")
