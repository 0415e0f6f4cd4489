"""The re-training recipe, top to bottom: a genotype -> its evaluation network -> trained from scratch.

Runs as one process or under ``torchrun`` (DistributedDataParallel; NCCL on GPUs, gloo on CPUs): the
global batch is split over ranks, metrics are summed across ranks, only rank 0 writes. Every epoch
reseeds its randomness from (seed, epoch, rank), and a checkpoint part-way through an epoch (every
``train.checkpoint_minutes``, and on a stop signal: ilnas/stopping.py) keeps the ranks' generators and
running sums, so a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ilnas import distributed, ranks
from ilnas.card import CARD_FILE, WEIGHT_FILES, ModelCard
from ilnas.config import EvalRunConfig, checked
from ilnas.data.names import CIFAR_SIDE, side_setting
from ilnas.data.training import Sharding, TrainData, create_train_data
from ilnas.determinism import deterministic_algorithms
from ilnas.errors import IlnasError, RunFailed
from ilnas.memory import parameter_count, require_fit, saved_activation_bytes
from ilnas.models import state_dict_bytes
from ilnas.resuming import (describe, load_module_state, load_optimizer_state, require_number, require_rng_states,
                            restoring)
from ilnas.runs import (PROVENANCE, RunDir, check, config_dict, is_finished, load_checkpoint, out_of_memory,
                        read_config, read_metrics, require_same_data)
from ilnas.seeds import derive_seed
from ilnas.stopping import StepGuard, global_rng_state, set_global_rng_state, stopped
from ilnas.threads import set_threads
from ilnas.space.genotype import Genotype, load_genotype
from ilnas.space.layout import NETWORK_STYLES
from ilnas.space.network import build_network, check_input_size, count_parameters, multiply_adds
from ilnas.space.ops import check_ops

log = logging.getLogger(__name__)  # epoch lines; the CLI prints them, a library user routes them

LOSS_CHECK_STEPS = 50  # steps between the host's looks at the running loss (each look waits for the device)


def unfinished_search(source: str | None) -> Path | None:
    """The search run ``source`` names (its directory or its genotype.json), where that search has not finished."""
    if not source:
        return None
    path = Path(source)
    run = path.parent if path.name == "genotype.json" else path
    try:
        searched = (run / "config.yaml").is_file() and read_config(run)["kind"] == "search"
    except (IlnasError, OSError):
        return None
    return run if searched and not is_finished(run) else None


def run_train(cfg: EvalRunConfig, genotype: Genotype | str, out: Path, resume: bool = False, force: bool = False,
              progress: bool = True, genotype_source: str | None = None, report: bool = True,
              check_only: bool = False) -> dict | None:
    """Train ``genotype``'s network into ``out``; returns result.json's content (on every rank). ``genotype``: a
    Genotype, or what ``load_genotype`` reads (a zoo name, a search run, a file, a literal: its source).
    ``genotype_source`` (a zoo name, a search run, a file) is recorded in the run's provenance;
    ``report``: plots/ and report.html at the end (recipes/report.py). ``check_only``: validate everything a
    training validates before it writes (run directory, checkpoint, data, network, memory), then return None,
    nothing written."""
    cfg = checked(cfg, "eval")
    if isinstance(genotype, str):
        genotype, genotype_source = load_genotype(genotype), genotype_source or genotype
    elif not isinstance(genotype, Genotype):
        raise IlnasError(f"genotype must be a Genotype or what load_genotype reads (a zoo name, a run, a file, a "
                         f"literal), got {type(genotype).__name__}")
    t, world = cfg.train, ranks.world_size()
    if t.batch_size % world:
        raise IlnasError(f"train.batch_size={t.batch_size} is not divisible by the {world} ranks")
    if cfg.network.auxiliary and t.batch_size // world < 2:  # its BatchNorm sees one value per channel
        who = f"each of the {world} ranks" if world > 1 else "the network"
        raise IlnasError(f"train.batch_size={t.batch_size} gives {who} one image a step; the auxiliary head's "
                         f"BatchNorm needs two: raise it or set network.auxiliary=false")
    check_compile_backend(t.compile)
    process = distributed.start(t.device)
    set_threads(t.threads, "train.threads")
    unfinished = unfinished_search(genotype_source)
    if unfinished is not None and process.main:
        log.warning(f"the search in {unfinished} has not finished: its genotype.json holds the cell of its latest "
                    f"epoch, not the one it will end with")
    try:
        with (StepGuard(t.checkpoint_minutes, process) as guard, deterministic_algorithms(t.deterministic),
              out_of_memory("network.channels, network.layers or train.batch_size")):
            result = _run(cfg, genotype, Path(out), resume, force, progress, process, genotype_source, guard,
                          check_only)
        distributed.closing_barrier(process)
    finally:
        distributed.stop()
    if report and process.main and not check_only:
        from ilnas.recipes.report import report_at_end  # matplotlib: only for runs that draw

        report_at_end(Path(out))
    return result


def source_record(source: str | None, out: Path) -> dict:
    """Where the cell came from, for provenance.json: a zoo name or literal as given; a file or search run by its
    absolute path and by its path from the training run, which still leads to it once both have moved together
    (a sweep copied off a cluster)."""
    record: dict = {"genotype_source": source}
    if source is not None and Path(source).is_absolute():
        record["genotype_source_relative"] = os.path.relpath(source, Path(out).absolute())
    return record


def _other_images(cfg: EvalRunConfig, larger: bool = True) -> str:
    """What makes a re-training's images larger (or of another side), for a network that cannot take them."""
    task = cfg.data.tasks[0]
    setting = side_setting(task, cfg.data.folder_pipeline)
    if setting is None:
        return f"{task}'s images are {CIFAR_SIDE}x{CIFAR_SIDE}: use another network.style"
    return f"use {'larger images' if larger else 'another side'} ({setting}) or another network.style"


def _run(cfg: EvalRunConfig, genotype: Genotype, out: Path, resume: bool, force: bool, progress: bool,
         process: distributed.Process, genotype_source: str | None, guard: StepGuard,
         check_only: bool = False) -> dict | None:
    t = cfg.train
    check(out, resume, force, "eval")
    config = config_dict(cfg, genotype=genotype.to_string())
    ckpt = load_checkpoint(out, "eval", config) if resume else None
    distributed.barrier(process)  # every rank has checked before rank 0 creates anything
    shard = Sharding(t.batch_size // process.world, process.rank, process.world, process.device, t.seed,
                     t.steps_per_epoch)
    data = create_train_data(cfg.data.tasks[0], cfg.data, shard, cutout=t.cutout, resolution=t.resolution,
                             color_jitter=t.color_jitter, workers=t.workers, decode=t.decode)
    if resume:
        card = asdict(model_card(cfg, genotype, data))
        require_same_data(out, CARD_FILE, {k: card[k] for k in ("task", "classes", "input_size", "mean", "std")})
        require_same_data(out, PROVENANCE, {"data": data.listing})
    check_ops([op for op, _ in genotype.normal + genotype.reduce], channels=cfg.network.channels,
              device=process.device)
    require_network_memory(cfg, genotype, data, process.device)
    check_input_size(genotype, data.num_classes, data.in_channels, data.resolution, **cfg.network.build_args(),
                     device=process.device, remedy=_other_images(cfg), side_remedy=_other_images(cfg, larger=False))
    torch.manual_seed(derive_seed(t.seed))  # identical initial weights on every rank
    model = build_network(genotype, data.num_classes, data.in_channels, data.resolution, **cfg.network.build_args())
    sizes = {"params": count_parameters(model), "params_total": count_parameters(model, include_auxiliary=True),
             "macs": multiply_adds(model, data.in_channels, data.resolution)}
    cuda = process.device.type == "cuda"
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model = model.to(process.device, memory_format=memory_format)
    require_network_memory(cfg, genotype, data, process.device, model)
    if t.compile is not None:
        model.compile(backend=t.compile, mode=t.compile_mode)  # in place: the state_dict keeps its keys
    sgd = cfg.optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay)
    start_epoch, best, elapsed, within = 0, 0.0, 0.0, None
    if ckpt is not None:
        with restoring(out):
            start_epoch, best, elapsed, within = _read_back(ckpt, model, optimizer, t.epochs, data.steps,
                                                            process.device)
    if check_only:
        return None

    run = None
    if process.main:
        provenance = {"data": data.listing} if resume else {**source_record(genotype_source, out), "data": data.listing}
        run = RunDir.open(out, "eval", config, resume, force, provenance, process.device)
    with run or contextlib.nullcontext():  # closed, and a failure recorded, on every way out
        if process.main:
            if not resume:
                run.save_genotype(genotype)
            run.write_text(CARD_FILE, model_card(cfg, genotype, data).to_json())
            run.truncate_metrics(ckpt["metrics_lines"] if ckpt else 0)
        distributed.barrier(process)
        # a network of one's own may hold parameters its loss does not use: DDP must look for them each step
        ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[process.device.index] if cuda else None,
                                                         find_unused_parameters=cfg.network.style not in NETWORK_STYLES)
               if process.world > 1 else model)
        loop = TrainLoop(cfg, data, model, ddp, optimizer, process, memory_format, progress, run, resume, guard)
        with (run.out_of_memory("train.batch_size") if run is not None else contextlib.nullcontext(),
              _eager_fallback(t.compile)):
            record, best, elapsed = loop.epochs(start_epoch, best, elapsed, within)
        return _finish(cfg, genotype, data, model, process, run, record, best, elapsed, sizes)


def require_network_memory(cfg: EvalRunConfig, genotype: Genotype, data: TrainData, device: torch.device,
                           model: torch.nn.Module | None = None) -> None:
    """Refuse a network whose weights, their gradients and SGD's momentum (all there from the first step on)
    cannot fit on ``device``: counted on the meta device before it is built, and once ``model`` is built with
    what a training pass of one rank's batch keeps for its backward."""
    build_args = cfg.network.build_args()
    one = torch.get_default_dtype().itemsize * (
        sum(p.numel() for p in model.parameters()) if model is not None else
        parameter_count(lambda: build_network(genotype, data.num_classes, data.in_channels, data.resolution,
                                              **build_args)))
    momentum = cfg.optimizer.momentum > 0
    copies = 3 if momentum else 2
    weights = (f"the network's weights ({one / 1e9:.2f} GB a copy; the weights, their gradients"
               f"{' and momentum' if momentum else ''} at once)")
    if model is None:
        require_fit(weights, copies * one, device, "network.channels or network.layers")
        return
    batch = cfg.train.batch_size // ranks.world_size()
    kept = saved_activation_bytes(lambda n, side: _training_pass(model, cfg, data, device, n, side), batch,
                                  data.resolution)
    require_fit(weights, copies * one, device, "network.channels, network.layers or train.batch_size", kept,
                f"what one pass of {batch} images keeps for its backward")


def _training_pass(model: torch.nn.Module, cfg: EvalRunConfig, data: TrainData, device: torch.device, n: int,
                   side: int):
    """A training-mode forward pass of ``n`` blank images of ``side`` x ``side``, leaving the model's mode, its buffers
    (BatchNorm's running statistics) and every random generator as they were."""
    state = {k: p.detach().requires_grad_() for k, p in model.named_parameters()}
    state.update({k: b.clone() for k, b in model.named_buffers()})
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    x = torch.zeros(n, data.in_channels, side, side, device=device).to(memory_format=fmt)
    mode, cuda = model.training, device.type == "cuda"
    try:
        with (torch.random.fork_rng(devices=[device] if cuda else []),
              torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.train.amp)):  # as the steps run
            return torch.func.functional_call(model.train(), state, (x, cfg.network.drop_path))
    finally:
        model.train(mode)


def _read_back(ckpt: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epochs: int, steps: int,
               device: torch.device) -> tuple[int, float, float, dict | None]:
    """The checkpoint's weights and optimizer state loaded, and where it stands (epochs done, best top-1,
    seconds, and the part of the next epoch done where it was taken part-way through one), every entry
    checked against what a run of this configuration holds, before anything is written (ilnas/resuming.py)."""
    load_module_state(model, ckpt["model"], "network state")
    load_optimizer_state(optimizer, ckpt["optimizer"], "optimizer")
    start = require_number(ckpt["epoch"], int, "epoch count", 0, epochs)
    best = require_number(ckpt["best_top1"], float, "best top-1 accuracy", 0, 1)
    elapsed = require_number(ckpt["elapsed"], float, "training time")
    require_number(ckpt["metrics_lines"], int, "metrics line count")
    within = ckpt.get("within_epoch")
    if within is not None:
        _check_epoch_part(within, steps, device)
    return start, best, elapsed, within


def _check_epoch_part(within: dict, steps: int, device: torch.device) -> None:
    """A checkpoint's record of an epoch it was taken part-way through: steps, seconds, and each rank's
    generators and running sums (``TrainLoop.checkpoint_within``)."""
    require_number(within["steps"], int, "step within its epoch", 1, steps - 1)
    require_number(within["seconds"], float, "time within its epoch")
    if not isinstance(within["ranks"], list):
        raise ValueError(f"its ranks' part of the epoch is {describe(within['ranks'])}, where a list belongs")
    require_rng_states([r["rng"] for r in within["ranks"]], global_rng_state(device), "generator list")
    for r in within["ranks"]:
        if not (isinstance(r["totals"], list) and len(r["totals"]) == 2):
            raise ValueError(f"its epoch's sums are {describe(r['totals'])}, where a list of two numbers belongs")
        for total in r["totals"]:
            require_number(total, float, "epoch's loss or hit sum")
        require_number(r["seen"], int, "epoch's image count")


def check_compile_backend(backend: str | None) -> None:
    """Refuse a ``train.compile`` that names no ``torch.compile`` backend, before anything is written."""
    if backend is None:
        return
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise IlnasError(f"train.compile={backend!r} is not a torch.compile backend; choose from "
                         f"{', '.join(b for b in backends if 'TESTING' not in b)}")


def _eager_fallback(backend: str | None) -> contextlib.AbstractContextManager:
    """While the epochs run with a compiled network: a graph its backend fails to compile runs eagerly
    (torch logs a warning for it), so a compiler missing or failing on the machine never stops a long run."""
    if backend is None:
        return contextlib.nullcontext()
    import torch._dynamo

    return torch._dynamo.config.patch(suppress_errors=True)


@dataclass
class TrainLoop:
    """The epochs of one training run: what stays fixed while they run."""

    cfg: EvalRunConfig
    data: TrainData
    model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    process: distributed.Process
    memory_format: torch.memory_format
    progress: bool
    run: RunDir | None  # rank 0 only
    resumed: bool
    guard: StepGuard

    def autocast(self):
        if self.process.device.type == "cuda" and self.cfg.train.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def epochs(self, start_epoch: int, best: float, elapsed: float, within: dict | None) -> tuple[dict, float, float]:
        """``within``: the part of epoch ``start_epoch`` a checkpoint taken part-way through it has done."""
        t, run = self.cfg.train, self.run
        writer = None
        if run is not None:
            # Resumed: drop the events an interrupted run logged after its checkpoint (epochs >= start).
            writer = run.tensorboard(purge_step=start_epoch if self.resumed else None)
        record: dict = {}
        try:
            for epoch in range(start_epoch, t.epochs):
                record, best, elapsed = self.epoch(epoch, best, elapsed, writer, within)
                within = None
        finally:
            if writer is not None:
                writer.close()
        if not record:  # resumed a run whose epochs had all finished
            record = read_metrics(self.run.path)[-1] if self.run is not None else {}
        return record, best, elapsed

    def epoch(self, epoch: int, best: float, elapsed: float, writer, within: dict | None
              ) -> tuple[dict, float, float]:
        t, model, run, process = self.cfg.train, self.model, self.run, self.process
        t0 = time.perf_counter() - (within["seconds"] if within else 0.0)
        lr = self.cfg.optimizer.lr_at(epoch, t.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        drop_path_rate = self.cfg.network.drop_path * epoch / t.epochs  # ramped linearly, as in DARTS
        torch.manual_seed(derive_seed(t.seed, epoch, process.rank))  # drop-path masks
        part = EpochPart(0, [0.0, 0.0], 0)
        if within and len(within["ranks"]) == process.world:  # another world size cannot repeat the run anyway
            mine = within["ranks"][process.rank]
            set_global_rng_state(mine["rng"], process.device)
            part = EpochPart(within["steps"], mine["totals"], mine["seen"])
        train, signum = self.train_epoch(epoch, drop_path_rate, part, t0, best, elapsed)
        train_time = time.perf_counter() - t0
        test = evaluate(model, self.data, self.autocast, self.memory_format, process)
        elapsed += time.perf_counter() - t0
        previous_best, best = best, max(best, test["top1"])
        record = {"kind": "epoch", "epoch": epoch, "lr": lr, "drop_path": drop_path_rate, **train,
                  **{f"test_{k}": v for k, v in test.items()}, "images_per_s": train["images"] / train_time,
                  "epoch_time": time.perf_counter() - t0}
        if run is not None:
            _require_finite_weights(model, epoch)
            run.log(record)
            if test["top1"] > previous_best or epoch == 0:  # the best epoch's weights, before the checkpoint
                run.write_bytes(WEIGHT_FILES["best"], state_dict_bytes(model))
            for key in ("train_loss", "train_acc", "test_top1", "test_top5", "lr", "images_per_s"):
                if key in record:
                    writer.add_scalar(f"train/{key}", record[key], epoch)
            writer.flush()
            run.save_checkpoint({"epoch": epoch + 1, "model": model.state_dict(),
                                 "optimizer": self.optimizer.state_dict(), "best_top1": best, "elapsed": elapsed,
                                 "metrics_lines": run.metrics_lines()})
            if self.progress:
                log.info(f"epoch {epoch + 1}/{t.epochs}  lr {lr:.4f}  train loss {train['train_loss']:.3f} "
                         f"acc {train['train_acc']:.3f}  test top-1 {test['top1']:.4f}  "
                         f"({record['images_per_s']:.0f} img/s)")
        self.guard.saved()
        distributed.barrier(process)
        if signum:
            raise stopped(signum, epoch, self.data.steps, self.data.steps)
        return record, best, elapsed

    def train_epoch(self, epoch: int, drop_path_rate: float, part: EpochPart, t0: float, best: float,
                    elapsed: float) -> tuple[dict, int]:
        """The epoch's steps from ``part`` on: its training metrics, and the stop signal that came (else 0)."""
        t, aux_weight, process, cfg = self.cfg.train, self.cfg.network.auxiliary_weight, self.process, self.cfg
        self.ddp.train()
        # the loss sum and correct count stay on the device, so no step waits for the GPU to finish it
        totals = torch.tensor(part.totals, dtype=torch.float64, device=process.device)
        seen, step, steps = part.seen, part.steps, self.data.steps
        # a tensor: a compiled network keeps one graph for every epoch's rate (space/network.py:drop_path)
        rate = torch.tensor(drop_path_rate, device=process.device)
        bar = tqdm(self.data.epoch(epoch, part.steps), initial=part.steps, total=steps,
                   desc=f"epoch {epoch + 1}/{t.epochs}", file=sys.stderr, leave=False,
                   disable=None if (self.progress and process.main) else True)
        signum = 0
        for step, (x, y) in enumerate(bar, part.steps + 1):
            x = x.contiguous(memory_format=self.memory_format)
            with self.autocast():
                logits, aux = self.ddp(x, drop_path_rate=rate)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=t.label_smoothing)
                if aux is not None and aux_weight > 0:
                    loss = loss + aux_weight * F.cross_entropy(aux.float(), y, label_smoothing=t.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optimizer.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.ddp.parameters(), cfg.optimizer.grad_clip)
            self.optimizer.step()
            totals += torch.stack([loss.detach().double() * len(y), (logits.argmax(-1) == y).sum().double()])
            seen += len(y)
            if step % LOSS_CHECK_STEPS == 0:
                _require_finite_loss(float(totals[0]), epoch, step)
            decision = self.guard.poll()
            if decision.checkpoint and step < steps:  # at the epoch's last step its own checkpoint follows
                self.checkpoint_within(epoch, EpochPart(step, totals.tolist(), seen), time.perf_counter() - t0,
                                       best, elapsed)
            if decision.stop:
                signum = decision.signum
                break
        bar.close()
        if signum and step < steps:
            raise stopped(signum, epoch, step, steps)
        _require_finite_loss(float(totals[0]), epoch, step)
        loss_sum, correct, seen = distributed.all_sum([*totals.tolist(), seen], process)
        return {"train_loss": loss_sum / seen, "train_acc": correct / seen, "images": seen}, signum

    def checkpoint_within(self, epoch: int, part: EpochPart, seconds: float, best: float, elapsed: float) -> None:
        """A checkpoint after step ``part.steps`` of ``epoch``: every rank's generators and running sums
        (gathered on rank 0, which writes it)."""
        _require_finite_loss(part.totals[0], epoch, part.steps)
        ranks = distributed.gather_to_main({"rng": global_rng_state(self.process.device), "totals": part.totals,
                                            "seen": part.seen}, self.process)
        if self.run is not None:
            _require_finite_weights(self.model, epoch)
            self.run.save_checkpoint({"epoch": epoch, "model": self.model.state_dict(),
                                      "optimizer": self.optimizer.state_dict(), "best_top1": best,
                                      "elapsed": elapsed, "metrics_lines": self.run.metrics_lines(),
                                      "within_epoch": {"steps": part.steps, "seconds": seconds, "ranks": ranks}})
        self.guard.saved()


@dataclass
class EpochPart:
    """The steps of an epoch done so far, and their sums on this rank (loss x images, correct) and images."""

    steps: int
    totals: list[float]
    seen: int


def _require_finite_weights(model: torch.nn.Module, epoch: int) -> None:
    if not all(bool(torch.isfinite(p).all()) for p in model.state_dict().values() if p.is_floating_point()):
        raise RunFailed(f"training diverged in epoch {epoch + 1}: the weights are not finite; the run is not "
                        f"finished and its last good checkpoint is kept; lower optimizer.lr and start again")


def _finish(cfg: EvalRunConfig, genotype: Genotype, data: TrainData, model: torch.nn.Module,
            process: distributed.Process, run: RunDir | None, record: dict, best: float, elapsed: float,
            sizes: dict) -> dict:
    """result.json: final and best test error, sizes, throughput, cost."""
    hours = elapsed / 3600.0
    result = {"task": data.name, "genotype": genotype.to_string(), "epochs": cfg.train.epochs,
              "final_test_error": 1.0 - record["test_top1"], "best_test_error": 1.0 - best, **sizes,
              "images_per_s": record["images_per_s"], "world_size": process.world, "device": str(process.device),
              "gpu_hours": hours * process.world if process.device.type == "cuda" else 0.0,
              "hours": hours, "replica_divergence": distributed.replica_divergence(model.parameters(), process)}
    if "test_top5" in record:
        result["final_test_error_top5"] = 1.0 - record["test_top5"]
    if run is not None:
        run.write_bytes(WEIGHT_FILES["last"], state_dict_bytes(model))
        run.finish(result, "result.json")
    return result


def model_card(cfg: EvalRunConfig, genotype: Genotype, data: TrainData) -> ModelCard:
    """model.json: what ``ilnas.load_model`` rebuilds the network from and how it feeds it."""
    return ModelCard(genotype.to_string(), cfg.network.build_args(), tuple(data.classes),
                     (data.in_channels, data.resolution, data.resolution), tuple(data.mean), tuple(data.std),
                     data.resize, data.name)


def _require_finite_loss(loss_sum: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss_sum):
        raise RunFailed(f"training diverged in epoch {epoch + 1}: the loss is not finite by step {step}; the run is "
                        f"not finished and its last good checkpoint is kept; lower optimizer.lr and start again")


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TrainData, autocast, memory_format,
             process: distributed.Process) -> dict:
    """Top-1 (and top-5 where there are more than 10 classes) over the whole test split, all ranks."""
    model.eval()
    totals, n = torch.zeros(2, dtype=torch.float64, device=process.device), 0  # top-1 and top-5 hits, on the device
    for x, y in data.test():
        with autocast():
            logits = model(x.contiguous(memory_format=memory_format))
        ranked = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
        totals += torch.stack([(ranked[:, 0] == y).sum().double(), (ranked == y[:, None]).any(-1).sum().double()])
        n += len(y)
    top1, top5, n = distributed.all_sum([*totals.tolist(), n], process)
    out = {"top1": top1 / n}
    if data.num_classes > 10:
        out["top5"] = top5 / n
    return out
