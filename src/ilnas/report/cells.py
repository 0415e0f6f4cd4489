"""Cell diagrams of a genotype: Graphviz ``.dot`` text, and SVG/PNG drawn with matplotlib alone, so that
they render after ``pip install`` on any machine (Graphviz's ``dot`` renders the ``.dot`` too where it
is installed)."""
from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from ilnas.fileio import atomic_write_bytes, atomic_write_text
from ilnas.space.genotype import Edge, Genotype
from ilnas.space.layout import BUILT_IN_OPS, node_name

OP_COLORS = dict(zip(BUILT_IN_OPS, ("#9e9e9e", "#8d6e63", "#a1887f", "#607d8b", "#1e88e5", "#3949ab",
                                    "#43a047", "#2e7d32", "#8e24aa", "#f4511e")))
CELLS = ("normal", "reduce")


def cell_edges(genotype: Genotype, cell: str) -> tuple[tuple[Edge, ...], tuple[int, ...]]:
    """The (op, input) pairs of ``cell`` (normal | reduce), two per intermediate node, and its concat."""
    return getattr(genotype, cell), getattr(genotype, f"{cell}_concat")


def cell_dot(genotype: Genotype, cell: str) -> str:
    """Graphviz text of one cell: inputs on the left, the output c_{k} on the right, edges named by op."""
    edges, concat = cell_edges(genotype, cell)
    nodes = len(edges) // 2
    lines = [f'digraph "{cell}" {{', "  rankdir=LR;", '  node [shape=box, style="rounded,filled", fontname=Helvetica];',
             '  "c_{k-2}" [fillcolor=darkseagreen2];', '  "c_{k-1}" [fillcolor=darkseagreen2];',
             '  "c_{k}" [fillcolor=palegoldenrod];']
    lines += [f'  "{i}" [fillcolor=lightblue];' for i in range(nodes)]
    for position, (op, j) in enumerate(edges):
        lines.append(f'  "{node_name(j)}" -> "{position // 2}" [label="{op}", fillcolor=gray];')
    lines += [f'  "{node_name(j)}" -> "c_{{k}}" [fillcolor=gray];' for j in concat]
    return "\n".join(lines + ["}"]) + "\n"


def _positions(nodes: int) -> dict[str, tuple[float, float]]:
    pos = {"c_{k-2}": (0.0, 1.2), "c_{k-1}": (0.0, -1.2), "c_{k}": (nodes + 1.2, 0.0)}
    for i in range(nodes):
        pos[str(i)] = (i + 1.0, 0.9 if i % 2 == 0 else -0.9)
    return pos


def cell_figure(genotype: Genotype, cell: str, title: str | None = None) -> Figure:
    """One cell drawn as a graph: each incoming edge of a node labelled with its op (coloured by op)."""
    edges, concat = cell_edges(genotype, cell)
    nodes = len(edges) // 2
    pos = _positions(nodes)
    fig = Figure(figsize=(1.2 * (nodes + 2.8), 4.8))
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.92))
    ax.set_axis_off()
    ax.set_aspect("equal")
    ax.set_xlim(-0.8, nodes + 2.0)
    ax.set_ylim(-2.0, 2.0)
    ax.set_title(title or f"{cell} cell")
    arrow = dict(arrowstyle="-|>", mutation_scale=12, shrinkA=16, shrinkB=16, linewidth=1.4)
    for position, (op, j) in enumerate(edges):
        start, end = pos[node_name(j)], pos[str(position // 2)]
        bend = 0.25 if position % 2 else -0.25
        ax.add_patch(FancyArrowPatch(start, end, connectionstyle=f"arc3,rad={bend}",
                                     color=OP_COLORS.get(op, "black"), **arrow))
        # the midpoint of matplotlib's arc3 curve: the chord's midpoint + bend/2 * (dy, -dx)
        dx, dy = end[0] - start[0], end[1] - start[1]
        mid = ((start[0] + end[0]) / 2 + bend * dy / 2, (start[1] + end[1]) / 2 - bend * dx / 2)
        ax.text(*mid, op, fontsize=7, ha="center", va="center", color=OP_COLORS.get(op, "black"),
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
    for j in concat:
        ax.add_patch(FancyArrowPatch(pos[node_name(j)], pos["c_{k}"], color="#bdbdbd", **arrow))
    for name, (x, y) in pos.items():
        color = "#c8e6c9" if name.startswith("c_{k-") else "#fff59d" if name == "c_{k}" else "#bbdefb"
        ax.text(x, y, name, fontsize=10, ha="center", va="center",
                bbox=dict(boxstyle="round,pad=0.4", fc=color, ec="#424242"))
    return fig


def figure_data(fig: Figure, ext: str, dpi: int = 90) -> bytes:
    """The figure as a PNG, SVG or PDF file's bytes; an SVG's text stays text (searchable, selectable) and carries
    no date, so that drawing the same figure again gives the same file."""
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format=ext, dpi=dpi, metadata={"Date": None} if ext == "svg" else None)
    return buf.getvalue()


def save_figure(fig: Figure, base: Path, formats: tuple[str, ...] = ("svg", "png")) -> list[Path]:
    """``base.svg`` and ``base.png``, each written whole or not at all."""
    paths = []
    for ext in formats:
        atomic_write_bytes(base.with_suffix(f".{ext}"), figure_data(fig, ext))
        paths.append(base.with_suffix(f".{ext}"))
    return paths


def save_cells(genotype: Genotype, out: Path, stem: str, title: str = "") -> list[Path]:
    """``{stem}_{normal,reduce}.{svg,png,dot}`` in ``out`` (and ``.graphviz.svg`` where ``dot`` is on the PATH)."""
    written = []
    for cell in CELLS:
        base = out / f"{stem}_{cell}"
        fig = cell_figure(genotype, cell, f"{title}{cell} cell".strip())
        written += save_figure(fig, base)
        dot = cell_dot(genotype, cell)
        atomic_write_text(base.with_suffix(".dot"), dot)
        written.append(base.with_suffix(".dot"))
        if shutil.which("dot"):
            rendered = base.with_suffix(".graphviz.svg")
            if subprocess.run(["dot", "-Tsvg", "-o", str(rendered)], input=dot, text=True,
                              capture_output=True, timeout=60).returncode == 0:
                written.append(rendered)
    return written
