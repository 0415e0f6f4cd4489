"""Figures of a run from its files: learning curves from ``metrics.jsonl`` and the evolution of the
architecture weights from ``arch_history.npz``; and of a comparison of runs, their test errors side by side.
Pure matplotlib (object API, no global state)."""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ilnas.report.cells import CELLS, OP_COLORS
from ilnas.space.genotype import Genotype, parse_genotype, shared_choices
from ilnas.space.layout import PARAMETER_FREE, PRIMITIVES


def _finite(points: Iterable[tuple[float, float | None]]) -> tuple[list[float], list[float]]:
    """Drop the null (non-finite when logged) values of a diverged step."""
    kept = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
    return [x for x, _ in kept], [y for _, y in kept]


def _series(records: list[dict], key: str, x: str = "step") -> dict[str, tuple[list[float], list[float]]]:
    """``key`` of every record, one series per label where the value is a mapping (stage or task)."""
    out: dict[str, list] = {}
    for r in records:
        value = r.get(key)
        if isinstance(value, dict):
            for label, v in value.items():
                out.setdefault(label, []).append((r[x], v))
        elif key in r:
            out.setdefault(key, []).append((r[x], value))
    return {label: _finite(points) for label, points in out.items()}


def _plot(ax, series: dict, title: str, log: bool = False, phase_starts: list[int] = ()) -> None:
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 3 else None, markersize=3)
    for x in phase_starts:
        ax.axvline(x, color="#9e9e9e", linestyle=":", linewidth=1)
    ax.set_title(title, fontsize=10)
    if log and any(y > 0 for _, ys in series.values() for y in ys):
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def search_curves(records: list[dict]) -> Figure:
    """Per stage: train loss; per learner: validation loss and accuracy; the learning rate, the alphas'
    entropy and the hypergradient norm; x = the global step, dotted lines where a P-DARTS phase begins."""
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    starts = [r["step"] for r, prev in zip(steps[1:], steps) if r["phase"] != prev["phase"]]
    fig = Figure(figsize=(15, 8))
    fig.subplots_adjust(left=0.05, right=0.98, top=0.95, bottom=0.07, hspace=0.3, wspace=0.2)
    axes = fig.subplots(2, 3)
    _plot(axes[0, 0], _series(steps, "train_loss"), "train loss per stage (round/task)", phase_starts=starts)
    _plot(axes[0, 1], _series(steps, "val_loss"), "validation loss per learner (final round)", phase_starts=starts)
    _plot(axes[0, 2], _series(epochs, "val_acc"), "validation accuracy per learner", phase_starts=starts)
    _plot(axes[1, 0], _series(epochs, "lr"), "weight learning rate", phase_starts=starts)
    _plot(axes[1, 1], _series(epochs, "alpha_entropy"), "alpha entropy per cell (nats)", phase_starts=starts)
    _plot(axes[1, 2], _series(steps, "hypergrad_norm"), "hypergradient norm", log=True, phase_starts=starts)
    for ax in axes.flat:
        ax.set_xlabel("step", fontsize=8)
    return fig


def training_curves(records: list[dict]) -> Figure:
    """Train loss, train and test accuracy, and the learning rate per epoch of a re-training run."""
    epochs = [{**r, "epoch": r["epoch"] + 1} for r in records if r.get("kind") == "epoch"]
    fig = Figure(figsize=(15, 4))
    fig.subplots_adjust(left=0.05, right=0.98, top=0.9, bottom=0.15, wspace=0.2)
    axes = fig.subplots(1, 3)
    _plot(axes[0], _series(epochs, "train_loss", "epoch"), "train loss")
    accuracy = {k: v for key in ("train_acc", "test_top1", "test_top5") for k, v in _series(epochs, key, "epoch").items()}
    _plot(axes[1], accuracy, "accuracy")
    _plot(axes[2], _series(epochs, "lr", "epoch"), "learning rate")
    for ax in axes:
        ax.set_xlabel("epoch", fontsize=8)
    return fig


def epoch_cells(records: list[dict]) -> tuple[list[Genotype], list[int]]:
    """The cell every search epoch ended with (``metrics.jsonl``), in order, and the positions in that list where
    a P-DARTS phase begins."""
    epochs = [r for r in records if r.get("kind") == "epoch" and isinstance(r.get("genotype"), str)]
    starts = [i for i in range(1, len(epochs)) if epochs[i].get("phase") != epochs[i - 1].get("phase")]
    return [parse_genotype(r["genotype"]) for r in epochs], starts


def cell_evolution(cells: list[Genotype], phase_starts: list[int]) -> Figure:
    """Per search epoch (``epoch_cells``): how many of the last epoch's (op, input) choices its cell made already,
    and how many parameter-free ops (pools, skip-connects) and skip-connects each cell had; dotted lines where a
    P-DARTS phase begins. A normal cell filling up with skip-connects is how a DARTS search collapses."""
    x = list(range(1, len(cells) + 1))
    starts = [s + 1 for s in phase_starts]
    last = cells[-1]

    def per_cell(ops) -> dict:
        return {cell: (x, [g.count(cell, ops) for g in cells]) for cell in CELLS}
    shared = {cell: (x, [shared_choices(g, last, cells=(cell,)) for g in cells]) for cell in CELLS}
    fig = Figure(figsize=(15, 4))
    fig.subplots_adjust(left=0.05, right=0.98, top=0.88, bottom=0.15, wspace=0.2)
    axes = fig.subplots(1, 3)
    _plot(axes[0], shared, f"choices shared with the last epoch's cell (of {2 * last.nodes})",
          phase_starts=starts)
    _plot(axes[1], per_cell(PARAMETER_FREE), "parameter-free ops", phase_starts=starts)
    _plot(axes[2], per_cell({"skip_connect"}), "skip-connects", phase_starts=starts)
    for ax in axes:
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylim(-0.3, 2 * last.nodes + 0.3)  # counts of a cell's edges: one scale for all three
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def softmax(x: np.ndarray) -> np.ndarray:
    """The architecture weights of logits (last axis: an edge's candidate ops)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def alpha_figure(history: dict[str, np.ndarray], phase: int, cell: str) -> Figure | None:
    """Per edge (labelled by its endpoints), the softmax weight of each candidate op over the epochs of
    one phase; None when the phase has no recorded epoch."""
    key = f"p{phase}/alphas_{cell}"
    if key not in history:
        return None
    weights = softmax(history[key].astype(np.float64))  # (epochs, E, O)
    n_epochs, n_edges, n_ops = weights.shape
    ops = history.get(f"p{phase}/{cell}_ops", np.array([PRIMITIVES[:n_ops]] * n_edges))
    edges = history.get("edges", np.array([f"edge {e}" for e in range(n_edges)]))
    cols = 5
    rows = math.ceil(n_edges / cols)
    fig = Figure(figsize=(3.2 * cols, 2.3 * rows + 0.8))
    fig.subplots_adjust(left=0.05, right=0.99, top=0.9, bottom=0.12, hspace=0.35, wspace=0.08)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    x = np.arange(1, n_epochs + 1)
    for e, ax in enumerate(axes.flat):
        if e >= n_edges:
            ax.set_axis_off()
            continue
        for o in range(n_ops):
            op = str(ops[e][o])
            ax.plot(x, weights[:, e, o], color=OP_COLORS.get(op, "black"), label=op,
                    marker="o" if n_epochs < 3 else None, markersize=3)
        ax.set_title(str(edges[e]), fontsize=9)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = {op: OP_COLORS.get(op, "black") for op in dict.fromkeys(str(o) for row in ops for o in row)}
    fig.legend([Line2D([0], [0], color=c, linewidth=2) for c in handles.values()], list(handles), loc="lower center", ncols=len(handles),
               fontsize=8)
    fig.suptitle(f"{cell} cell, phase {phase + 1}: softmax weight of each op per epoch")
    return fig


def alpha_figures(history: dict[str, np.ndarray]) -> dict[str, Figure]:
    """``alphas_p{phase}_{cell}`` -> figure, for every phase and cell in the history."""
    phases = sorted({int(k.split("/")[0][1:]) for k in history if k.startswith("p") and "/alphas_" in k})
    out = {}
    for phase in phases:
        for cell in CELLS:
            fig = alpha_figure(history, phase, cell)
            if fig is not None:
                out[f"alphas_p{phase}_{cell}"] = fig
    return out


def comparison_figure(rows: list[tuple[str, dict[str, list[float]]]], tasks: list[str]) -> Figure:
    """One panel per task: each row's test errors (%), one dot per run, beside their mean ± standard deviation
    (``rows``: a label and, per task, the errors)."""
    fig = Figure(figsize=(3 + 1.2 * len(rows), 3.4 * len(tasks)))
    axes = fig.subplots(len(tasks), 1, squeeze=False)[:, 0]
    for ax, task in zip(axes, tasks):
        for x, (_, errors) in enumerate(rows):
            v = errors.get(task, [])
            ax.scatter([x - 0.1] * len(v), v, s=16, alpha=0.7)
            if v:
                ax.errorbar(x + 0.1, np.mean(v), yerr=np.std(v, ddof=1) if len(v) > 1 else 0.0, fmt="o",
                            color="black", capsize=4)
        ax.set_xticks(range(len(rows)), [label.replace(" [", "\n[") for label, _ in rows], rotation=15, ha="right",
                      fontsize=8)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_ylabel(f"{task} test error (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
