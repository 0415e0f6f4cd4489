"""The search recipe, top to bottom: tasks -> phases -> (supernet and heads -> stages -> epochs of
engine steps). The base method (search/methods.py) decides the phases, the skip-connect dropout of
each epoch, the ops of the next phase and the final genotype; this recipe is the same for all.

Everything needed to continue bit-exactly is in the checkpoint, written at every epoch's end and part-way
through one (every ``search.checkpoint_minutes``, and at once on a stop signal: ilnas/stopping.py); every batch
stream and every dropout mask is seeded by (seed, phase, epoch, ...), and a checkpoint part-way keeps where the
streams stand and the ranks' generators, so a resumed run repeats an uninterrupted one.

Under ``torchrun`` the search is data-parallel: every rank draws the same global batches and steps on its
own slice of each; the engine averages every gradient over the ranks (distributed.mean_over_ranks), so
all ranks hold the same architecture and weights, which each epoch verifies. Only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ilnas.config import SearchRunConfig, checked
from ilnas.data.loader import BatchMaker
from ilnas.data.tasks import Task, create_task, require_in_memory, task_info
from ilnas import distributed, ranks
from ilnas.determinism import deterministic_algorithms
from ilnas.errors import IlnasError, RunFailed, allocation_failure, fault
from ilnas.memory import parameter_count, require_search_memory, saved_activation_bytes
from ilnas.resuming import (describe, load_optimizer_state, require_number, require_rng_states, require_tensors_like,
                            restoring)
from ilnas.runs import RunDir, check, config_dict, load_checkpoint, out_of_memory, require_same_data
from ilnas.search.engine import (Learner, SearchState, Stage, create_state, final_stages, label_metrics,
                                 search_step, to_host, widest_pass)
from ilnas.search.methods import Darts, Phase, create_method
from ilnas.search.task_net import FreshParameters, FunctionalTaskNet, fresh_parameters
from ilnas.seeds import derive_seed
from ilnas.stopping import StepGuard, global_rng_state, set_global_rng_state, stopped
from ilnas.threads import set_threads
from ilnas.space.genotype import Genotype, derive_genotype, parse_genotype
from ilnas.space.layout import BUILT_IN_OPS, PARAMETER_FREE, edge_names, full_edge_ops
from ilnas.space.ops import check_ops
from ilnas.space.supernet import (Supernet, alpha_entropy, init_arch, ranking_weights, uneven_side,
                                  use_channels_last)

log = logging.getLogger(__name__)  # epoch lines; the CLI prints them, a library user routes them
ARCH_NAMES = ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce")
# build_nets': the supernets (one per task, one encoder module), the stages' fresh encoder weights, head builders
Built = tuple[list[FunctionalTaskNet], FreshParameters, list[Callable[[], nn.Module]]]


@dataclass
class Progress:
    """Where the search stands: all of it goes into the checkpoint."""

    normal_ops: list  # each edge's candidate operations in this phase (alpha column order)
    reduce_ops: list
    phase: int = 0
    epoch: int = 0  # completed epochs of the phase
    global_step: int = 0
    epoch_steps: int = 0  # completed steps of the running epoch (a checkpoint part-way through it)
    epoch_seconds: float = 0.0  # the time those steps took
    history: dict = field(default_factory=dict)  # "p{phase}/{name}" -> list of per-epoch arrays
    history_ops: dict = field(default_factory=dict)  # "p{phase}/normal_ops" -> the ops of each edge (labels)
    phase_genotypes: list = field(default_factory=list)
    final_genotype: str | None = None  # set once the last phase has ended
    elapsed: float = 0.0

    @classmethod
    def first(cls, cfg: SearchRunConfig) -> Progress:
        """Before the first step: every edge of both cells offers every operation of the space."""
        return cls(normal_ops=full_edge_ops(cfg.space.ops), reduce_ops=full_edge_ops(cfg.space.ops))


@dataclass
class SearchContext:
    """What stays fixed for a whole search: configuration, data, run directory, device."""

    cfg: SearchRunConfig
    method: Darts
    tasks: list[Task]
    train: list[BatchMaker]
    val: list[BatchMaker]
    run: RunDir | None  # rank 0 only
    writer: object  # runs.Events (a SummaryWriter), rank 0 only
    process: distributed.Process
    dtype: torch.dtype
    progress: bool  # progress bars and epoch lines
    guard: StepGuard  # checkpoints part-way through an epoch, and stop signals
    probed: Built | None = None  # the first phase's supernets, as probe_supernet built and tried them

    @property
    def device(self) -> torch.device:
        return self.process.device


def load_tasks(cfg: SearchRunConfig) -> list[Task]:
    """The tasks, once their static facts agree: one shared encoder takes one image shape."""
    infos = [require_in_memory(task_info(name, cfg.data)) for name in cfg.data.tasks]
    shapes = {(i.channels, i.resolution) for i in infos}
    if len(shapes) > 1:
        listed = ", ".join(f"{i.name} {i.channels}x{i.resolution}x{i.resolution}" for i in infos)
        raise IlnasError(f"the tasks' images differ in shape ({listed}); one shared encoder needs one: pick tasks of "
                         f"the same channel count and set data.image_size to the others' side")
    return [create_task(name, cfg.data) for name in cfg.data.tasks]


def task_record(task: Task) -> dict:
    """What the run keeps of a task: its classes, image shape, the normalisation computed for it, split sizes,
    and an image folder's listing (its files and their labels: an image moved to another class changes none
    of the rest)."""
    return {"name": task.name, "classes": list(task.classes), "input_shape": list(task.input_shape),
            "mean": list(task.mean), "std": list(task.std),
            "splits": {"train": len(task.train), "val": len(task.val), "test": len(task.test)},
            **task.digest}


def cells_setting(cfg: SearchRunConfig) -> str:
    """The setting that holds the supernet's cell count: one per phase for P-DARTS (space.layers goes unread)."""
    return "pdarts.layers" if cfg.search.method == "pdarts" else "space.layers"


def build_nets(cfg: SearchRunConfig, tasks: Sequence[Task], layers: int, progress: Progress,
               device: torch.device, dtype: torch.dtype) -> Built:
    """One supernet module shared by all tasks, one linear head per task; the stages' fresh encoder weights
    (FreshParameters) and head builders. A supernet whose weights cannot fit on ``device`` is refused before any
    of them is made."""
    sp = cfg.space

    def module() -> Supernet:
        return Supernet(tasks[0].input_shape[0], sp.channels, layers, progress.normal_ops, progress.reduce_ops,
                        sp.partial_channels, sp.stem_multiplier,
                        channels_last=use_channels_last(cfg.search.channels_last, device))

    require_search_memory(parameter_count(module) * dtype.itemsize, len(tasks) * cfg.search.rounds, device,
                          f"space.channels or {cells_setting(cfg)}")

    encoder = module().to(device, dtype)
    head_builders = [lambda t=t: nn.Linear(encoder.out_features, t.num_classes).to(device, dtype) for t in tasks]
    nets = [FunctionalTaskNet(encoder, hb(), t.num_classes) for t, hb in zip(tasks, head_builders)]
    return nets, FreshParameters(module, device, dtype), head_builders


def init_state(cfg: SearchRunConfig, phase: int, encoder_init: FreshParameters, head_builders, num_ops: int,
               device: torch.device, dtype: torch.dtype) -> SearchState:
    """Fresh stage weights and a fresh architecture (per P-DARTS phase, too)."""
    s = cfg.search

    def initial(i: int, k: int):
        return (encoder_init(derive_seed(s.seed, phase, i, 0)),
                fresh_parameters(head_builders[k], derive_seed(s.seed, phase, i, 1)))
    gen = torch.Generator().manual_seed(derive_seed(s.seed, phase))
    arch = [a.to(device, dtype) for a in init_arch(num_ops, cfg.space.edge_normalization, gen, dtype)]
    return create_state(arch, initial, len(cfg.data.tasks), s.rounds, cfg.arch_optimizer)


def state_dict(state: SearchState) -> dict:
    return {"arch": [a.detach().cpu().clone() for a in state.arch], "arch_optimizer": state.arch_optimizer.state_dict(),
            "step": state.step,
            "stages": [{"learner": st.learner, "w": st.w, "h": st.h, "buf_w": st.buf_w, "buf_h": st.buf_h}
                       for st in state.stages]}


def load_state_dict(state: SearchState, d: dict, device: torch.device) -> None:
    """``d`` (``state_dict``'s) into ``state``, a fresh state of the same phase and configuration; every entry
    must have the layout of the one it replaces (else ValueError, ilnas/resuming.py)."""
    arch = require_tensors_like(d["arch"], [a.detach() for a in state.arch], "architecture")
    if not isinstance(d["stages"], list) or len(d["stages"]) != len(state.stages):
        raise ValueError(f"its stages are {describe(d['stages'])}, where a list of {len(state.stages)} belongs")
    stages = [_saved_stage(saved, fresh, f"stage {i + 1}", device)
              for i, (saved, fresh) in enumerate(zip(d["stages"], state.stages))]
    step = require_number(d["step"], int, "architecture step count")
    load_optimizer_state(state.arch_optimizer, d["arch_optimizer"], "architecture optimizer")
    with torch.no_grad():
        for a, saved in zip(state.arch, arch):
            a.copy_(saved)
    state.step, state.stages = step, stages


def _saved_stage(saved: dict, fresh: Stage, where: str, device: torch.device) -> Stage:
    if saved["learner"] != fresh.learner:
        raise ValueError(f"its {where} belongs to learner {describe(saved['learner'])}, where {fresh.learner} "
                         f"belongs")

    def tensors(name: str, like: list[torch.Tensor]) -> list[torch.Tensor] | None:
        if name.startswith("buf") and saved[name] is None:  # momentum buffers: None before the first step
            return None
        return [t.to(device) for t in require_tensors_like(saved[name], like, f"{where}'s {name}")]
    return Stage(fresh.learner, tensors("w", fresh.w), tensors("h", fresh.h), tensors("buf_w", fresh.w),
                 tensors("buf_h", fresh.h))


def state_is_finite(state: SearchState) -> bool:
    tensors = [*state.arch, *(t for st in state.stages for part in (st.w, st.h, st.buf_w or [], st.buf_h or [])
                              for t in part)]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def check_step(metrics: dict, step: int, epoch: int) -> None:
    """Stop a diverging search at the first non-finite loss or hypergradient (values the step has already
    brought to the host; weights and alphas are checked once an epoch, before the checkpoint)."""
    bad = [f"train loss of stage {i + 1} ({label})" for i, (label, v) in enumerate(metrics["train_loss"].items())
           if not math.isfinite(v)]
    bad += [f"validation loss of {name}" for name, v in metrics.get("val_loss", {}).items() if not math.isfinite(v)]
    if not math.isfinite(metrics.get("hypergrad_norm", 0.0)):
        bad.append("the hypergradient")
    if bad:
        raise RunFailed(f"the search diverged at step {step} (epoch {epoch + 1}): {bad[0]} is not finite; the run is "
                        f"not finished and its last good checkpoint is kept; lower optimizer.lr or arch_optimizer.lr and "
                        f"start again")


@torch.no_grad()
def accuracy(net: FunctionalTaskNet, arch, stage: Stage, maker: BatchMaker, batch_size: int,
             max_batches: int | None, process: distributed.Process | None = None) -> float:
    """Validation accuracy in evaluation mode (no skip-connect dropout). Under torchrun the batches are
    dealt out to the ranks whole (batch i to rank i mod N) and the counts summed: the same number as one
    process, in 1/N of the time."""
    rank, world = (process.rank, process.world) if process else (0, 1)
    correct = total = 0
    net.encoder.eval()
    try:
        for i, (x, y) in enumerate(maker.ordered(batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            if i % world == rank:
                correct += int((net.logits(arch, stage.w, stage.h, x).argmax(-1) == y).sum())
                total += len(y)
    finally:
        net.encoder.train()
    if process is not None:
        correct, total = distributed.all_sum([correct, total], process)
    return correct / max(total, 1)


def arch_history_arrays(prog: Progress) -> dict[str, np.ndarray]:
    """Per phase: the architecture logits of every epoch, (epochs, E, O) and (epochs, E), with their labels:
    the candidate ops of each edge (E, O) and each edge's endpoints (E,), e.g. "c_{k-1} -> 2"."""
    arrays = {k: torch.stack(v).numpy() for k, v in prog.history.items()}
    arrays.update({k: np.array(v, dtype=str) for k, v in prog.history_ops.items()})
    arrays["edges"] = np.array(edge_names(), dtype=str)
    return arrays


def current_genotype(state: SearchState, progress: Progress) -> Genotype:
    normal, reduce = ranking_weights(state.arch)
    return derive_genotype(normal, reduce, progress.normal_ops, progress.reduce_ops)


def run_search(cfg: SearchRunConfig, out: Path, resume: bool = False, force: bool = False,
               progress: bool = True, report: bool = True, check_only: bool = False) -> Genotype | None:
    """Run (or continue) a search into ``out``; returns the final genotype. Everything is validated
    (run directory, checkpoint against config, device, data, shapes) before anything is written.
    ``report``: plots/ and report.html at the end (recipes/report.py). ``check_only``: validate all that, then
    return None, nothing written."""
    cfg = checked(cfg, "search")
    out, s = Path(out), cfg.search
    if s.batch_size % ranks.world_size():
        raise IlnasError(f"search.batch_size={s.batch_size} is not divisible by the {ranks.world_size()} ranks")
    check(out, resume, force, "search")
    config = config_dict(cfg)
    ckpt = load_checkpoint(out, "search", config) if resume else None
    process = distributed.start(s.device)
    try:
        with (StepGuard(s.checkpoint_minutes, process) as guard, deterministic_algorithms(s.deterministic),
              out_of_memory(f"space.channels, {cells_setting(cfg)} or search.batch_size")):
            genotype = _prepare(cfg, out, config, ckpt, resume, force, progress, report, process, guard,
                                check_only)
        distributed.closing_barrier(process)
    finally:
        distributed.stop()
    return genotype


def _prepare(cfg: SearchRunConfig, out: Path, config: dict, ckpt: dict | None, resume: bool, force: bool,
             progress: bool, report: bool, process: distributed.Process, guard: StepGuard,
             check_only: bool = False) -> Genotype | None:
    """Data, method and shapes checked on every rank; then rank 0 opens the run directory and all search."""
    s, device, dtype = cfg.search, process.device, getattr(torch, cfg.search.dtype)
    set_threads(s.threads, "search.threads")
    tasks = load_tasks(cfg)
    train = [BatchMaker(t, t.train, device, dtype, augment=True) for t in tasks]
    val = [BatchMaker(t, t.val, device, dtype, augment=False) for t in tasks]
    for m in train + val:
        if len(m) < s.batch_size:
            raise IlnasError(f"task {m.task.name} has a split of {len(m)} images, fewer than "
                             f"search.batch_size={s.batch_size}")
    method = create_method(cfg)
    probed = probe_supernet(cfg, tasks, method.phases[0], val, device, dtype)
    ctx = SearchContext(cfg, method, tasks, train, val, None, None, process, dtype, progress and process.main, guard,
                        probed)
    prog, continued = _read_back(ctx, ckpt, out) if ckpt else (Progress.first(cfg), None)
    records = [task_record(t) for t in tasks]
    if ckpt:
        require_same_data(out, "tasks.json", records)
    if process.main:
        warn_of_later_phases(cfg, tasks, method.phases, prog.phase, val, device, dtype)
    distributed.barrier(process)  # every rank has checked before rank 0 creates anything
    if check_only:
        return None
    if not process.main:
        return _search(ctx, prog, continued)

    with RunDir.open(out, "search", config, resume, force, device=device) as run:
        log.info(f"run directory: {out}")  # once it is open: a refused search names none
        run.truncate_metrics(ckpt["metrics_lines"] if ckpt else 0)
        run.write_text("tasks.json", json.dumps(records, indent=1) + "\n")
        # Resumed: drop the events an interrupted run logged after its checkpoint (steps > global_step).
        writer = run.tensorboard(purge_step=prog.global_step + 1 if resume else None)
        try:
            with run.out_of_memory("search.batch_size"):
                genotype = _search(dataclasses.replace(ctx, run=run, writer=writer), prog, continued)
            if report:
                from ilnas.recipes.report import report_at_end  # matplotlib: only for runs that draw

                report_at_end(run.path, writer)
        finally:
            writer.close()
    return genotype


def probe_supernet(cfg: SearchRunConfig, tasks: Sequence[Task], phase: Phase, val: Sequence[BatchMaker],
                   device: torch.device, dtype: torch.dtype) -> Built:
    """The first phase's supernet measured and tried, with the random state untouched, before the run directory
    changes: a batch whose step cannot fit on the device is refused first (measured on small images, memory.py,
    so that a run's large images cannot fill the machine before it is refused); then one forward pass on two
    images of each task at their own size refuses a shape that cannot work. Returns what build_nets built (the
    first phase searches with it: a supernet is not built twice)."""
    check_ops(cfg.space.ops, channels=cfg.space.channels // cfg.space.partial_channels, device=device)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        built, arch = _probe_nets(cfg, tasks, phase.layers, Progress.first(cfg), device, dtype)
        nets = built[0]
        _require_step_memory(cfg, len(tasks), nets[0], arch, val[0], device)
        for net, maker in zip(nets, val):
            x, _ = next(maker.ordered(2))
            with _refusing_shapes(cfg.space.ops, maker.task.name, x):
                net.logits(arch, [p.detach() for p in net.encoder.parameters()],
                           [p.detach() for p in net.head.parameters()], x)
    return built


@contextlib.contextmanager
def _refusing_shapes(ops: Sequence[str], task: str, x: torch.Tensor) -> Iterator[None]:
    """A pass of a supernet over ``ops`` on ``x`` that fails other than for memory: refused in one line. The
    built-in operations take any image size a run may have; one of one's own may fail any way it likes."""
    try:
        yield
    except Exception as e:
        if allocation_failure(e) is not None:  # out of memory: the recipe names the settings
            raise
        own = sorted(set(ops) - set(BUILT_IN_OPS))
        if not own and (why := uneven_side(x.shape[-1])):  # a side data.image_size set: CIFAR's is 32
            raise IlnasError(f"the supernet cannot take {task}'s {tuple(x.shape[1:])} images: {why} "
                             f"(data.image_size)") from None
        blame = f": an operation of your own ({', '.join(own)}) fails at that size" if own else ""
        raise IlnasError(f"the supernet fails on {task}'s {tuple(x.shape[1:])} images ({fault(e, 100)}){blame}") \
            from None


def _probe_nets(cfg: SearchRunConfig, tasks: Sequence[Task], layers: int, progress: Progress, device: torch.device,
                dtype: torch.dtype) -> tuple[Built, list[torch.Tensor]]:
    """build_nets' supernet of ``layers`` cells with ``progress``'s operations, and an architecture, to measure
    (the caller keeps the random state untouched)."""
    built = build_nets(cfg, tasks, layers, progress, device, dtype)
    arch = [a.to(device, dtype) for a in init_arch(built[0][0].encoder.num_ops, cfg.space.edge_normalization,
                                                   torch.Generator().manual_seed(0), dtype)]
    return built, arch


def _require_step_memory(cfg: SearchRunConfig, tasks: int, net: FunctionalTaskNet, arch: list[torch.Tensor],
                         maker: BatchMaker, device: torch.device) -> None:
    """With the weights, the widest pass of a step on one rank's batch and what it keeps for its backward: as many
    weight sets side by side as the engine batches (``widest_pass``), or, with ``engine.hvp=exact``, one set
    whose gradient keeps its own graph for the double backward, whichever keeps more."""
    batch = cfg.search.batch_size // ranks.world_size()
    x, _ = next(maker.ordered(4))
    leaves = [[t.detach().requires_grad_() for t in ts] for ts in (arch, net.encoder.parameters(),
                                                                    net.head.parameters())]

    def forward(n: int, side: int) -> torch.Tensor:
        return net.logits(*leaves, F.interpolate(x[:n], size=(side, side)) if side != x.shape[-1] else x[:n])

    def double_backward(n: int, side: int) -> object:  # as hvp.exact takes it: the gradient's own graph kept
        return torch.autograd.grad(forward(n, side).logsumexp(1).sum(), leaves[1] + leaves[2], create_graph=True)

    sets = widest_pass(cfg.engine, cfg.search.rounds)
    exact = cfg.engine.order == 2 and cfg.engine.hvp == "exact"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.search.amp), _refusing_shapes(
            cfg.space.ops, maker.task.name, x):  # autocast: as the step runs
        kept = saved_activation_bytes(forward, batch, x.shape[-1]) * sets
        kept_exact = saved_activation_bytes(double_backward, batch, x.shape[-1]) if exact else 0
    what = f"what one pass of {batch} images{f' through {sets} weight sets side by side' if sets > 1 else ''} " \
           "keeps for its backward"
    if kept_exact > kept:
        kept, what = kept_exact, f"what one pass of {batch} images keeps for its double backward (engine.hvp=exact)"
    lower = ", search.batch_size or engine.batched_sets (1: a pass a weight set, slower)" if sets > 1 \
        else " or search.batch_size"
    if exact:
        lower = lower.replace(" or ", ", ") + " or engine.hvp (fd: first-order passes only)"
    settings = f"space.channels, {cells_setting(cfg)}{lower}"
    one = sum(p.numel() * p.element_size() for p in net.encoder.parameters())
    require_search_memory(one, tasks * cfg.search.rounds, device, settings, kept, what)


# The built-in operations by what a supernet's pass keeps of them for its backward, most first: a separable
# convolution is two ReLU-convolution-convolution-BatchNorm stacks, a dilated one (and conv_7x1_1x7) a single
# one, a pooling one a pooling and a BatchNorm; a skip-connect is the input itself (or one FactorizedReduce) and
# none nothing. An operation registered by the user, of unknown weight, counts as the heaviest.
HEAVIEST_FIRST = ("sep_conv_7x7", "sep_conv_5x5", "sep_conv_3x3", "conv_7x1_1x7", "dil_conv_5x5", "dil_conv_3x3",
                  "max_pool_3x3", "avg_pool_3x3", "skip_connect", "none")


def heaviest_first(ops: Sequence[str]) -> list[str]:
    return sorted(ops, key=lambda op: HEAVIEST_FIRST.index(op) if op in HEAVIEST_FIRST else -1)


def warn_of_later_phases(cfg: SearchRunConfig, tasks: Sequence[Task], phases: Sequence[Phase], current: int,
                         val: Sequence[BatchMaker], device: torch.device, dtype: torch.dtype) -> None:
    """A P-DARTS phase after ``current`` is deeper than the first, and which operations it keeps is known only
    once the phase before it ends: where it could not fit should its edges keep their heaviest operations, say
    so now rather than hours in (it would stop there, with the previous phase's checkpoint)."""
    for number, phase in enumerate(phases[current + 1:], start=current + 2):
        kept = heaviest_first(cfg.space.ops)[:phase.ops_per_edge]
        ops = [[op for op in edge if op in kept] for edge in full_edge_ops(cfg.space.ops)]
        heaviest = Progress(normal_ops=ops, reduce_ops=[list(edge) for edge in ops])
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                built, arch = _probe_nets(cfg, tasks, phase.layers, heaviest, device, dtype)
                _require_step_memory(cfg, len(tasks), built[0][0], arch, val[0], device)
        except IlnasError as e:
            log.warning(f"phase {number} of {len(phases)} ({phase.layers} cells, {phase.ops_per_edge} operations "
                        f"an edge) may not fit, should its edges keep their heaviest operations: {e}")


@dataclass
class Continued:
    """The phase a checkpoint continues, read back: its supernets (one per task) and state, and where the
    checkpoint was taken part-way through an epoch, every rank's global generators."""

    nets: list[FunctionalTaskNet]
    state: SearchState
    rng: list[dict] | None


def _read_back(ctx: SearchContext, ckpt: dict, out: Path) -> tuple[Progress, Continued | None]:
    """The checkpoint's progress, and the phase it continues unless it was taken at a phase's start; every
    entry checked against what a search of this configuration holds, and read by the code that will use
    it, before anything is written."""
    with restoring(out):
        prog = _saved_progress(ctx, ckpt)
        if prog.phase == len(ctx.method.phases) or not (prog.epoch or prog.epoch_steps):
            return prog, None  # finished, or a phase's start: the phase begins with fresh weights
        nets, state = _phase_state(ctx, prog)
        load_state_dict(state, ckpt["state"], ctx.device)
        if not state_is_finite(state):  # never saved so (every checkpoint is checked first)
            raise ValueError("its weights or architecture are not finite")
        rng = ckpt.get("rng")
        if rng is not None:
            rng = require_rng_states(rng, global_rng_state(ctx.device), "generator list")
    return prog, Continued(nets, state, rng)


def _saved_progress(ctx: SearchContext, ckpt: dict) -> Progress:
    s, phases = ctx.cfg.search, len(ctx.method.phases)
    prog = Progress(**ckpt["progress"])
    require_number(prog.phase, int, "phase", 0, phases)
    require_number(prog.epoch, int, "epoch count", 0, s.epochs)
    require_number(prog.epoch_steps, int, "step within its epoch", 0, _steps_per_epoch(ctx) - 1)
    require_number(prog.global_step, int, "step count")
    require_number(prog.epoch_seconds, float, "epoch time")
    require_number(prog.elapsed, float, "search time")
    require_number(ckpt["metrics_lines"], int, "metrics line count")
    arch_history_arrays(prog)  # what every epoch's end writes of the history
    for genotype in prog.phase_genotypes + ([prog.final_genotype] if prog.phase == phases else []):
        parse_genotype(genotype)
    return prog


def _search(ctx: SearchContext, prog: Progress, continued: Continued | None) -> Genotype:
    cfg, run, method = ctx.cfg, ctx.run, ctx.method
    phases = method.phases
    for p in range(prog.phase, len(phases)):
        state = _run_phase(ctx, prog, continued)
        continued = None
        normal, reduce = ranking_weights(state.arch)
        if p + 1 < len(phases):  # the next phase: its candidate ops; fresh weights and architecture
            prog.normal_ops = method.next_ops(normal, prog.normal_ops, p + 1)
            prog.reduce_ops = method.next_ops(reduce, prog.reduce_ops, p + 1)
        else:
            prog.final_genotype = method.final_genotype(normal, reduce, prog.normal_ops,
                                                        prog.reduce_ops).to_string()
        prog.phase, prog.epoch = p + 1, 0
        _checkpoint(run, prog, state)  # the ended phase's state: kept for the record, not resumed
    genotype = parse_genotype(prog.final_genotype)
    if run is None:
        return genotype
    ctx.writer.flush()
    run.save_genotype(genotype)
    hours = prog.elapsed / 3600.0
    world = ctx.process.world
    run.finish({"genotype": genotype.to_string(), "phase_genotypes": prog.phase_genotypes,
                "phases": len(phases), "epochs_per_phase": cfg.search.epochs, "steps": prog.global_step,
                "search_hours": hours, "device": str(ctx.device), "world_size": world,
                "gpu_hours": hours * world if ctx.device.type == "cuda" else 0.0})
    return genotype


def _require_finite(state: SearchState, prog: Progress) -> None:
    if not state_is_finite(state):
        raise RunFailed(f"the search diverged by step {prog.global_step}: its weights are not finite; the run is "
                        f"not finished and its last good checkpoint is kept; lower optimizer.lr and start again")


def _require_same_replicas(process: distributed.Process, state: SearchState, prog: Progress) -> None:
    """Data-parallel ranks must hold bit-identical architectures and weights (they apply the same averaged
    gradients); a difference means the search is no longer one search, so it stops."""
    if process.world == 1:
        return
    tensors = [*state.arch, *(t for st in state.stages for t in (*st.w, *st.h))]
    diff = distributed.replica_divergence(tensors, process)
    if diff != 0.0:
        raise RunFailed(f"the {process.world} ranks' architectures or weights differ by {diff:.3g} after step "
                        f"{prog.global_step}; the run is not finished and its last good checkpoint is kept")


def _checkpoint(run: RunDir | None, prog: Progress, state: SearchState, rng: list | None = None) -> None:
    """``rng``: part-way through an epoch, every rank's global generators (``gather_to_main``)."""
    _require_finite(state, prog)
    if run is not None:
        run.save_checkpoint({"progress": dataclasses.asdict(prog), "state": state_dict(state),
                             "metrics_lines": run.metrics_lines(), **({"rng": rng} if rng else {})})


def _checkpoint_within_epoch(ctx: SearchContext, prog: Progress, state: SearchState, steps_done: int,
                             seconds: float) -> None:
    """A checkpoint after step ``steps_done`` of the running epoch (on every rank: the generators are gathered)."""
    prog.epoch_steps, prog.epoch_seconds = steps_done, seconds
    _checkpoint(ctx.run, prog, state, distributed.gather_to_main(global_rng_state(ctx.device), ctx.process))
    prog.epoch_steps, prog.epoch_seconds = 0, 0.0
    ctx.guard.saved()


def _phase_state(ctx: SearchContext, prog: Progress) -> tuple[list[FunctionalTaskNet], SearchState]:
    """The phase's supernets (one per task: the first phase's are the probe's), fresh stages and architecture."""
    first = Progress.first(ctx.cfg)
    as_probed = ctx.probed is not None and prog.phase == 0 and \
        (prog.normal_ops, prog.reduce_ops) == (first.normal_ops, first.reduce_ops)
    nets, encoder_init, head_builders = ctx.probed if as_probed else \
        build_nets(ctx.cfg, ctx.tasks, ctx.method.phases[prog.phase].layers, prog, ctx.device, ctx.dtype)
    state = init_state(ctx.cfg, prog.phase, encoder_init, head_builders, nets[0].encoder.num_ops, ctx.device,
                       ctx.dtype)
    return nets, state


def _steps_per_epoch(ctx: SearchContext) -> int:
    return ctx.cfg.search.steps_per_epoch or max(len(m) // ctx.cfg.search.batch_size for m in ctx.train)


def _run_phase(ctx: SearchContext, prog: Progress, continued: Continued | None) -> SearchState:
    """One phase (the whole search for DARTS and PC-DARTS): fresh supernet, stages and architecture, or
    those ``continued`` from a checkpoint (part-way through an epoch when ``prog.epoch_steps``)."""
    s, phases = ctx.cfg.search, ctx.method.phases
    nets, state = (continued.nets, continued.state) if continued else _phase_state(ctx, prog)
    rng = continued.rng if continued else None
    steps = _steps_per_epoch(ctx)
    reduce = distributed.mean_over_ranks(ctx.process)
    tag = f"phase {prog.phase + 1}/{len(phases)} " if len(phases) > 1 else ""
    for epoch in range(prog.epoch, s.epochs):
        start = prog.epoch_steps  # steps done before the checkpoint this epoch continues from (else 0)
        t_epoch = time.perf_counter() - prog.epoch_seconds
        prog.epoch_steps, prog.epoch_seconds = 0, 0.0
        lr = ctx.cfg.optimizer.lr_at(epoch, s.epochs)
        dropout = ctx.method.skip_dropout(prog.phase, epoch, s.epochs, s.warmup_epochs)
        learners = [Learner(t.name, functools.partial(net.loss, skip_dropout=dropout),
                            functools.partial(net.losses, skip_dropout=dropout)) for t, net in zip(ctx.tasks, nets)]
        torch.manual_seed(_rank_seed(derive_seed(s.seed, prog.phase, epoch), ctx.process))  # dropout masks
        if start and rng is not None and len(rng) == ctx.process.world:
            set_global_rng_state(rng[ctx.process.rank], ctx.device)
        update_arch = epoch >= s.warmup_epochs
        # every rank draws the whole global batches (same seeds) and augments only its own slice of them
        rank, world = ctx.process.rank, ctx.process.world
        streams = [(m.stream(s.batch_size, derive_seed(s.seed, prog.phase, epoch, k, 0), rank, world, start),
                    v.stream(s.batch_size, derive_seed(s.seed, prog.phase, epoch, k, 1), rank, world, start))
                   for k, (m, v) in enumerate(zip(ctx.train, ctx.val))]
        bar = tqdm(range(start, steps), desc=f"{tag}epoch {epoch + 1}/{s.epochs}", file=sys.stderr, leave=False,
                   initial=start, total=steps, disable=None if ctx.progress else True)
        pending: list[dict] = []  # steps whose metrics are still on the device
        since = time.perf_counter()
        for i in bar:
            batches = [(next(tr), next(va)) for tr, va in streams]
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=s.amp):
                metrics = search_step(state, learners, [b[0] for b in batches], [b[1] for b in batches],
                                      ctx.cfg.engine, ctx.cfg.optimizer, lr, update_arch, reduce, sync=False)
            prog.global_step += 1
            pending.append({**label_metrics(metrics, state, [t.name for t in ctx.tasks]), "kind": "step",
                            "phase": prog.phase, "epoch": epoch, "step": prog.global_step})
            decision = ctx.guard.poll()
            within = decision.checkpoint and i + 1 < steps  # at the epoch's last step its own checkpoint follows
            if len(pending) == s.log_every or within:
                since = _log_steps(ctx, pending, since, bar)
            if within:
                _checkpoint_within_epoch(ctx, prog, state, i + 1, time.perf_counter() - t_epoch)
            if decision.stop:
                break
        if pending:
            _log_steps(ctx, pending, since, bar)
        bar.close()
        if decision.stop and i + 1 < steps:
            raise stopped(decision.signum, epoch, i + 1, steps, f" (global step {prog.global_step})")
        record = {"kind": "epoch", "phase": prog.phase, "epoch": epoch, "step": prog.global_step, "lr": lr,
                  "skip_dropout": dropout, "arch_updated": update_arch}
        _end_epoch(ctx, nets, state, prog, record, time.perf_counter() - t_epoch, tag)
        if decision.stop:
            raise stopped(decision.signum, epoch, steps, steps, f" (global step {prog.global_step})")
    return state


def _rank_seed(seed: int, process: distributed.Process) -> int:
    """Rank 0 keeps the one-process seed (so one-process runs are unchanged); other ranks draw their own
    masks for their own slices."""
    return seed if process.main else derive_seed(seed, process.rank)


def _log_steps(ctx: SearchContext, pending: list[dict], since: float, bar) -> float:
    """The pending steps' metrics brought to the host in one transfer, then logged and checked in order
    (``since``: when the first of them began). Empties ``pending``; returns the time it did so."""
    records, now = to_host(pending), time.perf_counter()
    pending.clear()
    for metrics in records:
        metrics["step_time"] = (now - since) / len(records)
        if ctx.run is not None:
            ctx.run.log(metrics)  # non-finite values as null: the failing step stays on record
        check_step(metrics, metrics["step"], metrics["epoch"])
        if ctx.writer is not None:
            _log_step(ctx.writer, metrics, metrics["step"])
    bar.set_postfix(train_loss=f"{np.mean(list(records[-1]['train_loss'].values())):.3f}")
    return now


def _log_step(writer, metrics: dict, step: int) -> None:
    for label, value in metrics["train_loss"].items():
        writer.add_scalar(f"train_loss/{label}", value, step)
    for name, value in metrics.get("val_loss", {}).items():
        writer.add_scalar(f"val_loss/{name}", value, step)
    if "hypergrad_norm" in metrics:
        writer.add_scalar("search/hypergrad_norm", metrics["hypergrad_norm"], step)


def _end_epoch(ctx: SearchContext, nets: list[FunctionalTaskNet], state: SearchState, prog: Progress,
               record: dict, seconds: float, tag: str) -> None:
    """Validation accuracy, genotype and architecture history (every rank), then logs, files and the
    checkpoint (rank 0)."""
    s, epoch = ctx.cfg.search, record["epoch"]
    _require_finite(state, prog)
    _require_same_replicas(ctx.process, state, prog)
    arch = [a.detach() for a in state.arch]
    t0 = time.perf_counter()
    val_acc = {}
    for i in final_stages(state, len(ctx.tasks)):
        k = state.stages[i].learner
        val_acc[ctx.tasks[k].name] = accuracy(nets[k], arch, state.stages[i], ctx.val[k], s.batch_size,
                                              s.eval_batches, ctx.process)
    genotype = current_genotype(state, prog)
    entropy = {"normal": alpha_entropy(arch[0]), "reduce": alpha_entropy(arch[1])}
    seconds += time.perf_counter() - t0
    prog.elapsed += seconds
    record.update(val_acc=val_acc, alpha_entropy=entropy, epoch_time=seconds, genotype=genotype.to_string())
    for name, a in zip(ARCH_NAMES, arch):  # a copy: the live alphas move on with every step
        prog.history.setdefault(f"p{prog.phase}/{name}", []).append(a.detach().cpu().float().clone())
    prog.history_ops.update({f"p{prog.phase}/normal_ops": prog.normal_ops, f"p{prog.phase}/reduce_ops": prog.reduce_ops})
    prog.epoch = epoch + 1
    if prog.epoch == s.epochs:
        prog.phase_genotypes.append(genotype.to_string())
    if ctx.run is not None:
        _write_epoch(ctx, record, prog, genotype)
    _checkpoint(ctx.run, prog, state)
    ctx.guard.saved()
    if ctx.progress:
        log.info(f"{tag}epoch {epoch + 1}/{s.epochs}  lr {record['lr']:.4f}  val acc "
                 + "  ".join(f"{k} {v:.3f}" for k, v in val_acc.items()) + f"  ({seconds:.1f}s)")


def _write_epoch(ctx: SearchContext, record: dict, prog: Progress, genotype: Genotype) -> None:
    run, writer, x = ctx.run, ctx.writer, prog.global_step
    run.log(record)
    for name, acc in record["val_acc"].items():
        writer.add_scalar(f"val_acc/{name}", acc, x)
    writer.add_scalar("search/lr", record["lr"], x)
    for part in ("normal", "reduce"):
        writer.add_scalar(f"alpha_entropy/{part}", record["alpha_entropy"][part], x)
        # a normal cell filling with these is a collapsing search
        writer.add_scalar(f"cell/skip_connects/{part}", genotype.count(part, {"skip_connect"}), x)
        writer.add_scalar(f"cell/parameter_free/{part}", genotype.count(part, PARAMETER_FREE), x)
    writer.flush()
    run.save_arrays("arch_history.npz", arch_history_arrays(prog))
    run.save_genotype(genotype)
