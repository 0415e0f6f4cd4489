"""The search recipe, top to bottom: tasks -> supernet and heads -> stages -> epochs of engine steps.

Everything the run needs to continue bit-exactly is in the per-epoch checkpoint; every batch stream
is seeded by (seed, epoch, task, split), so a resumed run draws the same data as an uninterrupted one.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ilnas.config import SearchRunConfig, engine_config, to_dict
from ilnas.data.loader import BatchMaker
from ilnas.data.tasks import DataSource, Task, create_task
from ilnas.errors import IlnasError
from ilnas.runs import RunDir
from ilnas.search.engine import Learner, SearchState, Stage, search_step, stage_learners, final_stages
from ilnas.space.functional import FunctionalTaskNet, fresh_parameters
from ilnas.space.genotype import Genotype, derive_genotype, save_genotype
from ilnas.space.supernet import Supernet, alpha_entropy, init_alphas, mixing_weights, num_edges
from ilnas.train.schedules import cosine


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise IlnasError(f"search.device={name} but no CUDA device is available")
    return torch.device(name)


def load_tasks(cfg: SearchRunConfig) -> list[Task]:
    source = DataSource(cfg.data.data_dir, cfg.data.download, cfg.data.verify, cfg.data.image_size)
    tasks = [create_task(name, source) for name in cfg.data.tasks]
    shapes = {t.input_shape[0] for t in tasks}
    if len(shapes) > 1:
        raise IlnasError(f"the tasks' images have different channel counts {sorted(shapes)}; "
                         f"a shared encoder needs one")
    return tasks


def build_nets(cfg: SearchRunConfig, tasks: Sequence[Task], device: torch.device,
               dtype: torch.dtype) -> tuple[list[FunctionalTaskNet], callable, list[callable]]:
    """One supernet module shared by all tasks, one linear head per task; builders for fresh weights."""
    sp = cfg.space
    channels = tasks[0].input_shape[0]

    def build_encoder() -> Supernet:
        return Supernet(channels, sp.channels, sp.layers, stem_multiplier=sp.stem_multiplier).to(device, dtype)

    encoder = build_encoder()
    head_builders = [lambda t=t: nn.Linear(encoder.out_features, t.num_classes).to(device, dtype) for t in tasks]
    nets = [FunctionalTaskNet(encoder, hb(), t.num_classes) for t, hb in zip(tasks, head_builders)]
    return nets, build_encoder, head_builders


def init_state(cfg: SearchRunConfig, build_encoder, head_builders, num_ops: int, device: torch.device,
               dtype: torch.dtype) -> SearchState:
    s = cfg.search
    order = list(range(len(cfg.data.tasks)))
    stages = [Stage(k, fresh_parameters(build_encoder, s.seed * 1000 + i),
                    fresh_parameters(head_builders[k], s.seed * 1000 + 500 + i))
              for i, k in enumerate(stage_learners(order, s.rounds))]
    gen = torch.Generator().manual_seed(s.seed)
    arch = [a.to(device, dtype).requires_grad_() for a in init_alphas(num_edges(), num_ops, gen, dtype)]
    adam = torch.optim.Adam(arch, lr=s.arch_lr, betas=s.arch_betas, weight_decay=s.arch_weight_decay)
    return SearchState(arch, adam, stages)


def state_dict(state: SearchState) -> dict:
    return {"arch": [a.detach().cpu() for a in state.arch], "arch_optimizer": state.arch_optimizer.state_dict(),
            "step": state.step,
            "stages": [{"learner": st.learner, "w": st.w, "h": st.h, "buf_w": st.buf_w, "buf_h": st.buf_h}
                       for st in state.stages]}


def load_state_dict(state: SearchState, d: dict, device: torch.device) -> None:
    with torch.no_grad():
        for a, saved in zip(state.arch, d["arch"]):
            a.copy_(saved)
    state.arch_optimizer.load_state_dict(d["arch_optimizer"])
    state.step = d["step"]
    move = lambda ts: None if ts is None else [t.to(device) for t in ts]  # noqa: E731
    state.stages = [Stage(s["learner"], move(s["w"]), move(s["h"]), move(s["buf_w"]), move(s["buf_h"]))
                    for s in d["stages"]]


def stream_seed(seed: int, epoch: int, task: int, split: int) -> int:
    return ((seed * 1_000_003 + epoch) * 101 + task) * 2 + split


@torch.no_grad()
def accuracy(net: FunctionalTaskNet, arch, stage: Stage, maker: BatchMaker, batch_size: int,
             max_batches: int | None) -> float:
    correct = total = 0
    for i, (x, y) in enumerate(maker.ordered(batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        correct += int((net.logits(arch, stage.w, stage.h, x).argmax(-1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


def run_search(cfg: SearchRunConfig, out: Path, resume: bool = False, force: bool = False,
               progress: bool = True) -> Genotype:
    """Run (or continue) a search into ``out``; returns the final genotype."""
    RunDir.check(out, resume, force)
    s = cfg.search
    device, dtype = pick_device(s.device), getattr(torch, s.dtype)
    tasks = load_tasks(cfg)
    nets, build_encoder, head_builders = build_nets(cfg, tasks, device, dtype)
    learners = [Learner(t.name, net.loss) for t, net in zip(tasks, nets)]
    train = [BatchMaker(t, t.train, device, dtype, augment=True) for t in tasks]
    val = [BatchMaker(t, t.val, device, dtype, augment=False) for t in tasks]
    for m in train + val:
        if len(m) < s.batch_size:
            raise IlnasError(f"task {m.task.name} has a split of {len(m)} images, fewer than "
                             f"search.batch_size={s.batch_size}")
    steps = s.steps_per_epoch or max(len(m) // s.batch_size for m in train)
    primitives = nets[0].encoder.primitives

    state = init_state(cfg, build_encoder, head_builders, len(primitives), device, dtype)
    run = RunDir(out) if resume else RunDir.create(out, to_dict(cfg), force)
    ckpt = run.load_checkpoint() if resume else None
    start_epoch, history, elapsed = 0, [], 0.0
    if ckpt is not None:
        load_state_dict(state, ckpt["state"], device)
        start_epoch, history, elapsed = ckpt["epoch"], list(ckpt["alphas"]), ckpt["elapsed"]
    run.truncate_metrics(ckpt["metrics_lines"] if ckpt else 0)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run.path / "tb"), purge_step=state.step)
    ecfg = engine_config(s)
    genotype = None
    for epoch in range(start_epoch, s.epochs):
        t_epoch = time.perf_counter()
        lr = cosine(epoch, s.epochs, s.lr, s.lr_min)
        streams = [(m.stream(s.batch_size, stream_seed(s.seed, epoch, k, 0)),
                    v.stream(s.batch_size, stream_seed(s.seed, epoch, k, 1)))
                   for k, (m, v) in enumerate(zip(train, val))]
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{s.epochs}", file=sys.stderr, leave=False,
                   disable=None if progress else True)
        for _ in bar:
            t0 = time.perf_counter()
            batches = [(next(tr), next(va)) for tr, va in streams]
            metrics = search_step(state, learners, [b[0] for b in batches], [b[1] for b in batches], ecfg, lr)
            metrics.update(kind="step", epoch=epoch, step=state.step, step_time=time.perf_counter() - t0)
            run.log(metrics)
            writer.add_scalar("search/train_loss", float(np.mean(metrics["train_loss"])), state.step)
            writer.add_scalar("search/val_loss", float(np.mean(metrics["val_loss"])), state.step)
            writer.add_scalar("search/hypergrad_norm", metrics["hypergrad_norm"], state.step)
            bar.set_postfix(val_loss=f"{np.mean(metrics['val_loss']):.3f}")
        bar.close()

        arch = [a.detach() for a in state.arch]
        final = final_stages(state, len(tasks))
        val_acc = {tasks[state.stages[i].learner].name: accuracy(nets[state.stages[i].learner], arch, state.stages[i],
                                                                  val[state.stages[i].learner], s.batch_size,
                                                                  s.eval_batches) for i in final}
        genotype = derive_genotype(mixing_weights(arch[0]), mixing_weights(arch[1]), primitives)
        entropy = {"normal": alpha_entropy(arch[0]), "reduce": alpha_entropy(arch[1])}
        elapsed += time.perf_counter() - t_epoch
        record = {"kind": "epoch", "epoch": epoch, "step": state.step, "lr": lr, "val_acc": val_acc,
                  "alpha_entropy": entropy, "epoch_time": time.perf_counter() - t_epoch,
                  "genotype": genotype.to_string()}
        run.log(record)
        for name, acc in val_acc.items():
            writer.add_scalar(f"val_acc/{name}", acc, epoch)
        writer.add_scalar("search/lr", lr, epoch)
        writer.add_scalar("alpha_entropy/normal", entropy["normal"], epoch)
        writer.add_scalar("alpha_entropy/reduce", entropy["reduce"], epoch)
        writer.flush()
        history.append(torch.stack([a.cpu().float() for a in arch]).numpy())
        save_genotype(genotype, run.path)
        run.save_array("alphas.npy", np.stack(history))  # (epochs, 2, E, O) logits, normal and reduce
        run.save_checkpoint({"epoch": epoch + 1, "state": state_dict(state), "alphas": history,
                             "metrics_lines": run.metrics_lines(), "elapsed": elapsed})
        print(f"epoch {epoch + 1}/{s.epochs}  lr {lr:.4f}  val acc "
              + "  ".join(f"{k} {v:.3f}" for k, v in val_acc.items())
              + f"  ({record['epoch_time']:.1f}s)", flush=True)
    writer.close()
    if genotype is None:  # resumed a run whose last epoch had finished before the summary was written
        history_arch = torch.from_numpy(history[-1])
        genotype = derive_genotype(mixing_weights(history_arch[0]), mixing_weights(history_arch[1]), primitives)
    hours = elapsed / 3600.0
    run.finish({"genotype": genotype.to_string(), "epochs": s.epochs, "steps": state.step,
                "search_hours": hours, "device": str(device),
                "gpu_hours": hours if device.type == "cuda" else 0.0})
    return genotype
