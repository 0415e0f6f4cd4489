"""A run's pictures and one-page report, from its files alone: ``plots/`` (cell diagrams of the final
genotype and of every P-DARTS phase, learning curves, the evolution of the architecture weights) and
``report.html`` beside them. Runs at the end of every search and training run, and as ``ilnas plot``
on any run directory, finished or still running (it reads, and writes only plots/ and report.html)."""
from __future__ import annotations

import html
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ilnas.config.schema import KIND_NAMES
from ilnas.errors import IlnasError, first_line
from ilnas.fileio import atomic_write_text, reachable
from ilnas.report.cells import CELLS, save_cells, save_figure
from ilnas.report.figures import alpha_figures, cell_evolution, epoch_cells, search_curves, training_curves
from ilnas.runs import holds_run_files, read_config, read_json, read_metrics, read_record
from ilnas.space.genotype import Genotype, cells_by_name, load_genotype, parse_genotype, unchanged_for

PLOTS, REPORT = "plots", "report.html"
# What the report reads of a finished run's final record, and its types.
SUMMARY_FIELDS = {"search_hours": float, "steps": int}
RESULT_FIELDS = {"task": str, "final_test_error": float, "best_test_error": float, "params": float, "macs": float,
                 "hours": float}


@dataclass
class Report:
    """What the page shows: a title, rows of facts, and sections of figures (paths relative to the run)."""

    title: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    sections: list[tuple[str, list[str]]] = field(default_factory=list)
    config: str = ""
    cells: list[tuple[Genotype, str, str]] = field(default_factory=list)  # to draw: (genotype, file stem, title)

    def add_cells(self, genotype: Genotype, stem: str, title: str) -> None:
        self.cells.append((genotype, stem, title))
        self.sections.append((title.strip() or "cells", [f"{PLOTS}/{stem}_{cell}.svg" for cell in CELLS]))


def make_report(path: Path, writer=None) -> Path:
    """Write ``plots/`` and ``report.html`` for the run in ``path``; also to TensorBoard as images when
    ``writer`` (a SummaryWriter) is given. Returns the report's path."""
    path = reachable(path, "run directory")
    if not holds_run_files(path):  # a config.yaml saved by hand in a project folder, say: no plots/ there
        raise IlnasError(f"{path} is not an ilnas run directory (no config.yaml with the provenance.json a run "
                         f"writes)")
    config = read_config(path)
    report = Report(f"ilnas {KIND_NAMES[config['kind']]} run {path.name}",
                    config=yaml.safe_dump(config, sort_keys=False))
    # Every input is read (and a damaged one refused) before anything is written. Cells are drawn by their
    # operations' names: a run of operations of one's own is drawn without their plugin.
    with cells_by_name():
        figures = _search_report(path, config, report) if config["kind"] == "search" else \
            _training_report(path, report)
    plots, out = path / PLOTS, path / REPORT
    try:
        plots.mkdir(exist_ok=True)
        for genotype, stem, title in report.cells:
            save_cells(genotype, plots, stem, title)
        for name, fig in figures.items():
            save_figure(fig, plots / name)
            if writer is not None:
                writer.add_figure(f"report/{name}", fig)
        atomic_write_text(out, render_html(report))
    except OSError as e:
        raise IlnasError(f"cannot write the report in {path} ({e.strerror or e})") from None
    return out


def report_at_end(path: Path, writer=None) -> None:
    """The report a finished run writes; a failure here costs the run nothing, so it is a warning."""
    try:
        make_report(path, writer)
    except (IlnasError, OSError, ValueError, RuntimeError) as e:
        print(f"ilnas: warning: the report of {path} was not written ({str(e).splitlines()[0][:160]}); "
              f"try `ilnas plot {path}`", file=sys.stderr)


def _state(path: Path) -> str:
    """Finished, running (by whom), failed (with its error), or interrupted, as ``ilnas status`` says it."""
    from ilnas.recipes.status import run_status, state_in_words

    try:
        return state_in_words(run_status(path))
    except IlnasError as e:
        return f"unknown ({e})"


def _genotype(path: Path) -> Genotype | None:
    return load_genotype(str(path / "genotype.json")) if (path / "genotype.json").is_file() else None


def _search_report(path: Path, config: dict, report: Report) -> dict:
    search, engine, data = config.get("search", {}), config.get("engine", {}), config.get("data", {})
    summary = read_record(path, "summary.json", SUMMARY_FIELDS)
    genotype = _genotype(path)
    phase_genotypes = _phase_genotypes(path, summary)
    metrics = read_metrics(path)
    history = _arch_history(path / "arch_history.npz") if (path / "arch_history.npz").is_file() else None
    report.facts += [("status", _state(path)),
                     ("tasks (learner order)", " -> ".join(data.get("tasks", []))),
                     ("framework, method", f"{search.get('framework')}, {search.get('method')}"),
                     ("rounds M, coupling, lambda", f"{search.get('rounds')}, {engine.get('coupling')}, "
                                                    f"{engine.get('lam')}"),
                     ("order, hvp", f"{engine.get('order')}, {engine.get('hvp')}")]
    if summary:
        report.facts += [("search hours", f"{summary['search_hours']:.3f}"), ("steps", str(summary["steps"])),
                         ("device", summary.get("device", ""))]
    if genotype is not None:
        report.facts.append(("genotype" if summary else "current genotype", genotype.to_string()))
        report.facts += _network_size(genotype, data)
        report.add_cells(genotype, "cell", "final " if summary else "current ")
    for p, phase_genotype in enumerate(phase_genotypes if len(phase_genotypes) > 1 else []):
        report.add_cells(phase_genotype, f"cell_phase{p + 1}", f"phase {p + 1} ")
    figures = {"curves": search_curves(metrics)}
    cells, phase_starts = epoch_cells(metrics)
    if cells:
        figures["cell_evolution"] = cell_evolution(cells, phase_starts)
        report.facts.append(("cell unchanged since", f"epoch {len(cells) - unchanged_for(cells) + 1} of {len(cells)}"
                                                     + (" (over all phases)" if phase_starts else "")))
        report.sections.append(("the cell over the epochs", [f"{PLOTS}/cell_evolution.svg"]))
    if history is not None:
        figures.update(alpha_figures(history))
    report.sections.insert(0, ("learning curves", [f"{PLOTS}/curves.svg"]))
    report.sections.append(("architecture weights",
                            [f"{PLOTS}/{name}.svg" for name in figures if name.startswith("alphas_")]))
    return figures


def _phase_genotypes(path: Path, summary: dict | None) -> list[Genotype]:
    """The cell each P-DARTS phase ended with (none before the search has finished)."""
    texts = (summary or {}).get("phase_genotypes", [])
    if not (isinstance(texts, list) and all(isinstance(text, str) for text in texts)):
        raise IlnasError(f"{path / 'summary.json'} is damaged: its 'phase_genotypes' is not a list of genotypes")
    return [parse_genotype(text) for text in texts]


def _arch_history(path: Path) -> dict[str, np.ndarray]:
    """The architecture weights the search recorded each epoch: an .npz archive of plain arrays."""
    try:
        loaded = np.load(path)  # allow_pickle=False: pickled objects are refused, never run
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array, not an .npz archive")
        with loaded as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        # numpy takes any file it does not recognise for a pickle, and offers to load it unsafely: say what it is
        why = "not an .npz archive of plain arrays" if "pickle" in str(e) else first_line(e)
        raise IlnasError(f"{path} cannot be read ({why})") from None


def _network_size(genotype: Genotype, data: dict) -> list[tuple[str, str]]:
    """Parameters and multiply-adds of the cell's evaluation network (DARTS CIFAR: 20 cells, C=36) on the
    first task; nothing when its size cannot be known without its files."""
    from ilnas.config import DataConfig, EvalRunConfig, from_dict
    from ilnas.recipes.describe import describe

    try:
        cfg = EvalRunConfig(data=from_dict(DataConfig, {**data, "tasks": data["tasks"][:1]}))
        size = describe(genotype, cfg)
    except (IlnasError, KeyError, TypeError):
        return []
    return [("evaluation network", f"{size['network']} on {size['task']}: {size['params'] / 1e6:.2f} M parameters "
                                   f"(without the auxiliary head), {size['macs'] / 1e6:.0f} M multiply-adds")]


def _training_report(path: Path, report: Report) -> dict:
    result = read_record(path, "result.json", RESULT_FIELDS)
    provenance = read_json(path, "provenance.json") or {}
    genotype = _genotype(path)
    metrics = read_metrics(path)
    report.facts.append(("status", _state(path)))
    report.facts.append(("cell from", str(provenance.get("genotype_source", "unknown"))))
    if result:
        report.facts += [("task", result["task"]), ("final test error", f"{result['final_test_error']:.4f}"),
                         ("best test error", f"{result['best_test_error']:.4f}"),
                         ("parameters", f"{result['params'] / 1e6:.3f} M (without the auxiliary head)"),
                         ("multiply-adds", f"{result['macs'] / 1e6:.1f} M"), ("hours", f"{result['hours']:.3f}")]
    if genotype is not None:
        report.facts.append(("genotype", genotype.to_string()))
        report.add_cells(genotype, "cell", "")
    report.sections.insert(0, ("learning curves", [f"{PLOTS}/curves.svg"]))
    return {"curves": training_curves(metrics)}


def render_html(report: Report) -> str:
    """One self-contained page: the facts, each section's figures (linked to plots/), the configuration."""
    e = html.escape
    rows = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in report.facts)
    sections = "\n".join(f"<h2>{e(title)}</h2>\n" + "\n".join(
        f'<a href="{e(src)}"><img src="{e(src)}" alt="{e(src)}"></a>' for src in images)
        for title, images in report.sections if images)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(report.title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}th{{text-align:left;padding-right:1em;
vertical-align:top}}td{{font-family:monospace;word-break:break-all}}img{{max-width:100%;margin:.5em 0}}
pre{{background:#f5f5f5;padding:1em;overflow:auto}}</style></head>
<body><h1>{e(report.title)}</h1>
<table>
{rows}
</table>
{sections}
<h2>configuration</h2>
<pre>{e(report.config)}</pre>
</body></html>
"""
