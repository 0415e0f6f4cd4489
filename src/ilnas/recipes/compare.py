"""Compare runs: search runs and the training runs of their cells, grouped by everything but the seed,
in the layout of the paper's tables: method | framework | test error per task (mean ± std over seeds) |
best | parameters | multiply-adds | search cost | how alike its seeds' cells are; and, asked for, every two rows
paired over the runs they share (same seeds and task) with paired t and Wilcoxon p-values and the share of choices
their cells of the same seed make alike, and every row ranked among the random cells re-trained by its recipe
(unpaired: Mann-Whitney U). Reads run directories only; writes nothing."""
from __future__ import annotations

import base64
import csv
import functools
import html
import io
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ilnas.config.schema import canonical, flat_settings, unused_settings
from ilnas.errors import IlnasError
from ilnas.recipes.status import run_status
from ilnas.report.tables import html_table, in_millions, latex_table, markdown_table
from ilnas.runs import find_runs, is_finished, read_config, read_json, read_record, with_defaults
from ilnas.space.genotype import Genotype, cells_by_name, parse_genotype, shared_choices
from ilnas.space.layout import PRIMITIVES

# Settings that say where or how a run ran, not what it is: never a reason to tell two runs apart.
IGNORED = {"description", "data.data_dir", "data.download", "data.verify", "data.memory_limit_gb", "search.device",
           "train.device", "train.workers", "train.decode", "train.amp", "train.channels_last", "train.deterministic",
           "train.compile", "train.compile_mode", "train.checkpoint_minutes", "search.threads", "train.threads",
           "search.channels_last", "search.deterministic", "search.amp", "search.log_every",
           "search.checkpoint_minutes", "engine.batched_sets"}
SEEDS = {"search.seed", "train.seed"}
# A training's own settings (its recipe) stand beside its cell's under this prefix, since a search's sections
# and a training's share names (data, optimizer). Its task is a column of the table and its cell is named by
# the search or the given genotype, so neither tells recipes apart.
RECIPE, NOT_RECIPE = "eval:", {"kind", "genotype", "data.tasks"}
# What the table reads of a finished run's final record, and its types.
SUMMARY_FIELDS = {"search_hours": float, "genotype": str}
RESULT_FIELDS = {"task": str, "final_test_error": float, "params": float, "macs": float}


RANDOM_CELL = "random cell"  # the method column of the row of cells drawn uniformly (genotype random:N), the control


def method_name(config: dict) -> str:
    """The base method as the paper names it: DARTS-1st, DARTS-2nd, P-DARTS or PC-DARTS."""
    if config.get("search", {}).get("method") == "pdarts":
        return "P-DARTS"
    if config.get("space", {}).get("partial_channels", 1) > 1:
        return "PC-DARTS"
    return "DARTS-1st" if config.get("engine", {}).get("order") == 1 else "DARTS-2nd"


@dataclass
class Group:
    """Runs that differ only in their seeds: one search configuration (or one given cell) and the
    training runs of its cells under one training recipe (a search's runs stand in each of its rows)."""

    method: str
    framework: str
    settings: dict[str, object]
    searches: list[dict] = field(default_factory=list)  # summary.json of each finished search
    trainings: dict[str, list[dict]] = field(default_factory=dict)  # task -> result.json of each training
    # (cell seed, training seed, task) -> test error in %: what pairs two groups' runs
    errors: dict[tuple, float] = field(default_factory=dict)
    # cell seed (None: a given cell) -> the cells found with it: one per search run, one for a random cell
    cells: dict[object, list[Genotype]] = field(default_factory=dict)
    cell_key: str = ""  # the row's search configuration or given cell ("": a row without trainings)
    recipe_key: str = ""  # the row's training recipe ("": a row without trainings)


@dataclass
class Comparison:
    groups: list[Group]
    tasks: list[str]
    # (method, framework) -> the settings that tell groups of that method and framework apart: a row's
    # method and framework columns tell the others apart, so only these are shown beside them
    varying_within: dict[tuple[str, str], list[str]]
    unfinished: dict[Path, str]  # each run left out, and its state as ilnas status gives it

    @property
    def varying(self) -> list[str]:
        """Every setting that tells two groups of one method and framework apart."""
        return sorted({k for keys in self.varying_within.values() for k in keys})

    def settings_of(self, g: Group) -> str:
        """What tells ``g`` from the other groups of its method and framework, as ``key=value, ...``."""
        return ", ".join(f"{k}={_show(g.settings[k])}" for k in self.varying_within[g.method, g.framework]
                         if k in g.settings)


def _search_of(training: Path, cell: object) -> Path | None:
    """The search run a training run's cell came from (provenance genotype_source), if it was one and ``cell``
    (the training's genotype) is the cell it ended with: found by its path from the training run (runs moved
    together, e.g. a sweep copied off a cluster), by its absolute path, or, for a run that recorded only that,
    as the sibling of the same name in a moved sweep's cell. A search since started again with --force (another
    seed or setting: another cell), or one that had not finished when its latest cell was trained, did not
    find this cell: the training is then a given cell's, not a result of that search's configuration."""
    provenance = read_json(training, "provenance.json") or {}
    source, relative = provenance.get("genotype_source"), provenance.get("genotype_source_relative")
    if not isinstance(source, str):
        return None
    candidates = [training / relative] if isinstance(relative, str) else []
    candidates.append(Path(source) if Path(source).is_absolute() else training / source)
    recorded = Path(source).parent if Path(source).name == "genotype.json" else Path(source)
    if recorded.parent.name == training.resolve().parent.name:  # <cell>/search beside <cell>/train-<task>
        candidates.append(training.resolve().parent / recorded.name)
    for p in candidates:
        p = p.parent if p.name == "genotype.json" else p
        if (p / "config.yaml").is_file() and read_config(p)["kind"] == "search":
            found = (read_json(p, "summary.json") or {}).get("genotype")
            return p.resolve() if found == cell else None
    return None


def _settings(config: dict, prefix: str = "", leave_out: frozenset[str] = frozenset()) -> dict[str, object]:
    """What tells a run apart: its settings at today's defaults where it predates one, less how it ran, its seed and
    the settings it never read (two MTL searches that differ only in engine.lam are one configuration) and in one
    spelling of what they mean (loss weights all 1 or null)."""
    config = canonical(with_defaults(config))
    left_out = IGNORED | SEEDS | leave_out | set(unused_settings(config))
    return {prefix + k: v for k, v in flat_settings(config).items() if k not in left_out}


def _key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def compare(paths: Sequence[str | Path]) -> Comparison:
    """A row per cell (a search configuration, or a given cell) and training recipe: trainings of one cell
    under two recipes (other epochs, network sizes, learning rates) are two rows, never pooled as seeds."""
    runs = find_runs(paths)
    unfinished = {r: _state(r) for r in runs if not is_finished(r)}
    cells: dict[str, tuple[str, str, dict]] = {}  # cell key -> method, framework, settings (first seen first)
    searches: dict[str, list[dict]] = {}  # search configuration key -> summary.json of each finished search
    # cell key -> cell seed -> the search run that found the cell (None: a random or given cell) -> the cell
    found: dict[str, dict[object, dict[Path | None, Genotype]]] = {}
    recipes: dict[str, dict[str, Group]] = {}  # cell key -> training recipe key -> its group

    def cell_of(settings: dict, method: str, framework: str) -> str:
        key = _key(settings)
        cells.setdefault(key, (method, framework, settings))
        return key

    def add_search(run: Path, config: dict) -> str:
        """A finished search, counted once, whether among ``paths`` or only a training's source: its cell key."""
        key = cell_of(_settings(config), method_name(config), config["search"]["framework"])
        if not any(run.resolve() in by_run for by_run in found.get(key, {}).values()):
            summary = read_record(run, "summary.json", SUMMARY_FIELDS)
            searches.setdefault(key, []).append(summary)
            found.setdefault(key, {}).setdefault(config["search"]["seed"], {})[run.resolve()] = \
                _cell(run / "summary.json", summary["genotype"])
        return key

    for run in runs:
        if not is_finished(run):
            continue
        config = read_config(run)
        if config["kind"] == "search":
            add_search(run, config)
            continue
        result = read_record(run, "result.json", RESULT_FIELDS)
        search = _search_of(run, config.get("genotype"))
        cell_seed = None  # a given cell's runs differ only in their training seed
        if search is not None:  # its hours count where it lies outside ``paths`` too (cells searched elsewhere)
            scfg = read_config(search)
            key, cell_seed = add_search(search, scfg), scfg["search"]["seed"]
        else:
            source = str((read_json(run, "provenance.json") or {}).get("genotype_source") or "given cell")
            if drawn := re.fullmatch(r"random:(\d+)(?::(.*))?", source, re.DOTALL):  # the random-cell control: one
                # row for all its seeds (and one for each other space of operations they are drawn from)
                ops = tuple(op.strip() for op in drawn[2].split(",")) if drawn[2] is not None else PRIMITIVES
                key = cell_of({"cell": "random", "space.ops": ops}, RANDOM_CELL, "-")
                cell_seed = int(drawn[1])
            else:
                key = cell_of({"cell": config.get("genotype")}, source, "-")
        if search not in found.setdefault(key, {}).setdefault(cell_seed, {}):  # the search's run may be left out
            found[key][cell_seed][search] = _cell(run / "config.yaml", config.get("genotype"))
        method, framework, settings = cells[key]
        recipe = _settings(config, RECIPE, frozenset(NOT_RECIPE))
        group = recipes.setdefault(key, {}).setdefault(_key(recipe), Group(method, framework, {**settings, **recipe},
                                                                           cell_key=key, recipe_key=_key(recipe)))
        group.trainings.setdefault(result["task"], []).append(result)
        group.errors[(cell_seed, config["train"]["seed"], result["task"])] = 100 * result["final_test_error"]
    groups = []
    for key, (method, framework, settings) in cells.items():
        for group in sorted(recipes.get(key, {}).values(), key=_recipe_order) or [Group(method, framework, settings)]:
            group.searches = searches.get(key, [])
            group.cells = {seed: list(by_run.values()) for seed, by_run in found.get(key, {}).items()}
            groups.append(group)
    tasks = sorted({t for g in groups for t in g.trainings})
    return Comparison(groups, tasks, _varying(groups), unfinished)


def _recipe_order(group: Group) -> list[tuple]:
    """One cell's training recipes in the order of their settings, numbers by value (train.epochs=16 before 64)."""
    def value(v: object) -> tuple:
        is_number = isinstance(v, (int, float)) and not isinstance(v, bool)
        return (0, v, "") if is_number else (1, 0, json.dumps(v, sort_keys=True, default=str))

    return [(k, value(v)) for k, v in sorted(group.settings.items()) if k.startswith(RECIPE)]


def _cell(file: Path, text: object) -> Genotype:
    """The cell a run's record names, refused in one line that names the record where it cannot be read (damaged).
    Its operations are taken by their names: a table of runs of operations of one's own needs no plugin."""
    try:
        with cells_by_name():
            return parse_genotype(str(text))
    except IlnasError as e:
        raise IlnasError(f"{file}: its genotype cannot be read ({e})") from None


def _state(run: Path) -> str:
    """An unfinished run's state (running, interrupted, failed, not started): why a table leaves it out."""
    try:
        return run_status(run)["state"]
    except IlnasError as e:
        return f"unreadable: {e}"


def _varying(groups: list[Group]) -> dict[tuple[str, str], list[str]]:
    """For each method and framework, the settings that two of its groups both have and set differently (a given
    cell's group has only ``cell``)."""
    families: dict[tuple[str, str], list[Group]] = {}
    for g in groups:
        families.setdefault((g.method, g.framework), []).append(g)
    varying = {}
    for family, members in families.items():
        keys = sorted({k for g in members for k in g.settings} - {"cell"})
        varying[family] = [k for k in keys if len({json.dumps(g.settings[k], default=str)
                                                     for g in members if k in g.settings}) > 1]
    return varying


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    v = list(values)
    if not v:
        return math.nan, math.nan, 0
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return mean, std, len(v)


def rows(c: Comparison) -> list[dict]:
    """One row per group: plain numbers (errors in %, parameters in M, multiply-adds in M, hours)."""
    out = []
    for g in c.groups:
        row: dict = {"method": g.method, "framework": g.framework, "settings": c.settings_of(g)}
        for task in c.tasks:
            results = g.trainings.get(task, [])
            mean, std, n = mean_std(100 * r["final_test_error"] for r in results)
            row[f"error_{task}"] = {"mean": mean, "std": std, "n": n,
                                    "best": min((100 * r["final_test_error"] for r in results), default=math.nan)}
        trained = [r for results in g.trainings.values() for r in results]
        row["params_m"] = mean_std(r["params"] / 1e6 for r in trained)[0]
        row["macs_m"] = mean_std(r["macs"] / 1e6 for r in trained)[0]
        row["search_hours"] = mean_std(s["search_hours"] for s in g.searches)[0]
        row["cell_agreement"] = cell_agreement([cell for found in g.cells.values() for cell in found])
        # what the errors are over where the row has trainings (a recipe may have re-trained some seeds only)
        row["seeds"] = max(len(r) for r in g.trainings.values()) if g.trainings else len(g.searches)
        out.append(row)
    return out


def cell_agreement(cells: Sequence[Genotype]) -> float:
    """How alike the cells are: over every two of them, the mean share of (op, input) choices they make alike
    (space.genotype.shared_choices). 1 where all are one cell; 0.092 expected of cells drawn uniformly from the
    DARTS space; nan for fewer than two cells."""
    return mean_std(shared_choices(a, b) / a.choices for a, b in itertools.combinations(cells, 2))[0]


def paired(c: Comparison) -> list[dict]:
    """Every two rows with at least two units in common (``paired_units``: a cell's runs on a task) that differ
    in their cells or in their training recipe, not in both (IL against MTL under one recipe, IL under one recipe
    against IL under another; not IL under one against MTL under another, which tells neither apart): the
    mean difference of their test errors (points, first minus second) over those units, and the p-values of
    a paired t-test and of a Wilcoxon signed-rank test (None where every difference is the same); and
    ``cells_shared``, the mean share of (op, input) choices their cells of the same seed make alike (None where
    they have no cell seed in common: a given cell's row)."""
    labels = [_label(c, g) for g in c.groups]
    out = []
    for (i, a), (j, b) in itertools.combinations(enumerate(c.groups), 2):
        ea, eb = paired_units(a.errors, b.errors)
        if len(ea) >= 2 and (a.cell_key == b.cell_key or a.recipe_key == b.recipe_key):
            seeds = [s for s in a.cells if s is not None and s in b.cells]
            shared = mean_std(mean_std(shared_choices(x, y) / x.choices for x in a.cells[s] for y in b.cells[s])[0]
                              for s in seeds)[0]
            out.append({"a": labels[i], "b": labels[j], "pairs": len(ea), **paired_difference(ea, eb),
                        "cells_shared": None if math.isnan(shared) else shared})
    for test in ("t_p", "wilcoxon_p"):  # the table tests many pairs at once: each p also adjusted for all of them
        for p, adjusted in zip(out, holm([p[test] for p in out])):
            p[f"{test}_holm"] = adjusted
    return out


def against_random(c: Comparison) -> list[dict]:
    """Every row re-trained by the recipe of a random-cell row (``genotype=random:N``: cells drawn uniformly from the
    space, the control a searched cell must beat), against the random cells, per task; unpaired, so that a given
    cell (DARTS_V2, say), which shares no cell seed with them, is compared too. A cell is one unit, its mean over
    the training seeds it was re-trained at. ``mean_diff``: the row's cells' mean minus the random cells' (points);
    ``better``: how many random cells re-trained better than one of the row's cells, on average; ``u_p``: the
    two-sided Mann-Whitney U test of the row's cells against the random cells (one cell: the share of the random
    cells' ranks at least as extreme as its own; None where every error is the same), also Holm-adjusted
    (``u_p_holm``) over the table."""
    labels = {id(g): _label(c, g) for g in c.groups}
    out = []
    for control in (g for g in c.groups if g.method == RANDOM_CELL):
        for g in (g for g in c.groups if g.recipe_key == control.recipe_key and g.method != RANDOM_CELL and
                  _space(g) == _space(control)):
            for task in c.tasks:
                mine, drawn = _cell_means(g.errors, task), _cell_means(control.errors, task)
                if mine and len(drawn) >= 2:
                    out.append({"row": labels[id(g)], "random": labels[id(control)], "task": task, "cells": len(mine),
                                "random_cells": len(drawn), **rank_among(mine, drawn)})
    for row, adjusted in zip(out, holm([row["u_p"] for row in out])):
        row["u_p_holm"] = adjusted
    return out


def _space(g: Group) -> frozenset[str]:
    """The operations a row's cells are made of: its searches' space.ops, or its random cells' (random:N:OPS);
    DARTS's for a given cell. A cell never holds none."""
    ops = g.settings.get("space.ops")
    return frozenset(ops if isinstance(ops, (list, tuple)) else PRIMITIVES) - {"none"}


def rank_among(cells: Sequence[float], random: Sequence[float]) -> dict:
    """Cells' errors against random cells' (unpaired): ``mean_diff``, the cells' mean minus the random cells';
    ``better``, how many random cells have a lower error than one of the cells, on average; ``u_p``, the two-sided
    Mann-Whitney U test's p (None where every error is the same)."""
    from scipy.stats import mannwhitneyu

    tested = len({*cells, *random}) > 1
    return {"mean_diff": sum(cells) / len(cells) - sum(random) / len(random),
            "better": sum(r < c for c in cells for r in random) / len(cells),
            "u_p": float(mannwhitneyu(cells, random, alternative="two-sided").pvalue) if tested else None}


def _cell_means(errors: dict[tuple, float], task: str) -> list[float]:
    """A row's errors on ``task`` as one value per cell (its cell seed; a given cell's runs are one cell), the mean
    over its training seeds."""
    cells: dict[object, list[float]] = {}
    for (cell_seed, _, t), error in sorted(errors.items(), key=lambda kv: str(kv[0])):
        if t == task:
            cells.setdefault(cell_seed, []).append(error)
    return [sum(v) / len(v) for v in cells.values()]


def paired_units(a: dict[tuple, float], b: dict[tuple, float]) -> tuple[list[float], list[float]]:
    """Two rows' errors (keyed (cell seed, training seed, task)) on the runs they share, as paired units: a cell's
    runs on one task at several training seeds are one unit, their mean, since they re-train one cell, which
    pairing each would count as that many independent cells; a given cell's runs (cell seed None), which differ
    only in their training seed, are a unit each."""
    units: dict[tuple, list[tuple]] = {}
    for key in set(a) & set(b):
        cell_seed, _, task = key
        units.setdefault(key if cell_seed is None else (cell_seed, task), []).append(key)
    order = sorted(units, key=str)
    return ([sum(a[k] for k in units[u]) / len(units[u]) for u in order],
            [sum(b[k] for k in units[u]) / len(units[u]) for u in order])


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of p-values tested together (None: not tested, and not counted): the i-th
    smallest of m is multiplied by m - i + 1, capped at 1 and never below the one before it. A pair whose adjusted
    p lies below 0.05 differs at that level with every pair of the table considered."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        out[i] = running
    return out


def paired_difference(x: Sequence[float], y: Sequence[float]) -> dict:
    """``mean_diff``, the mean of x - y, with its 95 % confidence interval (``ci95``, Student's t over the
    differences: how large a difference the runs allow, where a p-value only says whether it is zero), and the
    p-values of a paired t-test (``t_p``) and of a Wilcoxon signed-rank test (``wilcoxon_p``) of x against y; the
    p-values are None where every difference is the same (neither test is defined there)."""
    from scipy import stats

    diffs = [u - v for u, v in zip(x, y, strict=True)]
    mean, std, n = mean_std(diffs)
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    varied = len(set(diffs)) > 1
    return {"mean_diff": mean, "ci95": [mean - half, mean + half],
            "t_p": float(stats.ttest_rel(x, y).pvalue) if varied else None,
            "wilcoxon_p": float(stats.wilcoxon(x, y).pvalue) if varied else None}


def figure_bytes(c: Comparison, suffix: str) -> bytes:
    """The rows' test errors drawn side by side, one panel per task (report.figures), as PNG, SVG or PDF."""
    from ilnas.report.cells import figure_data
    from ilnas.report.figures import comparison_figure

    if not c.tasks:
        raise IlnasError("--figure draws test errors, and no finished training run was found")
    drawn = [(_label(c, g), {task: [100 * r["final_test_error"] for r in g.trainings.get(task, [])]
                             for task in c.tasks}) for g in c.groups if g.trainings]
    return figure_data(comparison_figure(drawn, c.tasks), suffix, dpi=120)


def as_html(c: Comparison) -> str:
    """One self-contained page of the comparison: the table, the pairs, the test errors drawn, and every row's
    cells (each seed's normal and reduction cell), the pictures inlined, so that the file can be sent alone."""
    from ilnas.report.cells import CELLS, cell_figure, figure_data

    def picture(data: bytes, alt: str, wide: bool = False) -> str:
        css = ' class="wide"' if wide else ""
        return f'<img{css} alt="{html.escape(alt)}" src="data:image/svg+xml;base64,{base64.b64encode(data).decode()}">'

    @functools.cache  # a cell that several seeds found (or several rows share) is drawn once
    def cell_picture(cell, part: str) -> str:
        return picture(figure_data(cell_figure(cell, part), "svg"), f"{part} cell")

    pairs = paired(c)
    parts = ["<h1>ilnas comparison</h1>", html_table(*_table(c)),
             f"<h2>pairs</h2>\n<p>{html.escape(PAIRED if pairs else NO_PAIRS)}</p>"]
    parts += [html_table(*_paired_table(pairs))] if pairs else []
    if ranked := against_random(c):
        parts += [f"<h2>against random cells</h2>\n<p>{html.escape(AGAINST_RANDOM)}</p>",
                  html_table(*_random_table(ranked))]
    parts += ["<h2>test errors</h2>", picture(figure_bytes(c, "svg"), "test errors per row", wide=True)] if c.tasks \
        else []
    for g in c.groups:
        found = [(seed, cell) for seed, cells in sorted(g.cells.items(), key=lambda kv: str(kv[0])) for cell in cells]
        agreement = cell_agreement([cell for _, cell in found])
        parts.append(f"<h2>cells of {html.escape(_label(c, g))}"
                     + ("" if math.isnan(agreement) else f" (agreement {agreement:.2f})") + "</h2>")
        parts += [f"<h3>{'given cell' if seed is None else f'seed {seed}'}</h3>\n"
                  + "".join(cell_picture(cell, part) for part in CELLS)
                  for seed, cell in found]
    if c.unfinished:
        parts.append(f"<h2>left out</h2>\n<p>{len(c.unfinished)} unfinished run(s) (`ilnas status` tells more): "
                     + html.escape(", ".join(f"{run} ({state})" for run, state in c.unfinished.items())) + "</p>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ilnas comparison</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:2em auto}}table{{border-collapse:collapse}}
th,td{{border-bottom:1px solid #ddd;padding:.2em .6em;text-align:left}}img{{max-width:48%;margin:.3em}}
img.wide{{max-width:100%}}</style>
</head><body>
{chr(10).join(parts)}
</body></html>
"""


def _label(c: Comparison, g: Group) -> str:
    """A row's name: its method, framework and the settings that tell it from rows of the same method and
    framework."""
    settings = c.settings_of(g)
    return " ".join(part for part in (g.method, g.framework if g.framework != "-" else "",
                                      f"[{settings}]" if settings else "") if part)


PAIRED = ("Paired over runs with the same cell seed, training seed and task (test error, points; Holm: adjusted for "
          "all the pairs below)")
NO_PAIRS = "Paired: no two rows share two runs (the same cell seed, training seed and task)."


def _paired_table(pairs: list[dict]) -> tuple[list[str], list[list[object]]]:
    header = ["A", "B", "pairs", "mean A − B", "95% CI", "paired t p", "Wilcoxon p", "t p, Holm", "Wilcoxon p, Holm",
              "cells shared"]
    return header, [[p["a"], p["b"], p["pairs"], f"{p['mean_diff']:+.2f}", "[{:+.2f}, {:+.2f}]".format(*p["ci95"]),
                     _num(p["t_p"], 3), _num(p["wilcoxon_p"], 3), _num(p["t_p_holm"], 3),
                     _num(p["wilcoxon_p_holm"], 3), _num(p["cells_shared"], 2)] for p in pairs]


def _paired_markdown(pairs: list[dict]) -> list[str]:
    return ["", PAIRED + ":", "", *markdown_table(*_paired_table(pairs))] if pairs else ["", NO_PAIRS]


AGAINST_RANDOM = ("Against the random cells re-trained alike (unpaired, a cell its mean over training seeds; test "
                  "error, points; Mann-Whitney U, two-sided; Holm: adjusted over this table)")


def _random_table(ranked: list[dict]) -> tuple[list[str], list[list[object]]]:
    header = ["row", "task", "cells", "random cells", "mean − random", "random cells better", "Mann-Whitney p",
              "Holm"]
    return header, [[r["row"], r["task"], r["cells"], r["random_cells"], f"{r['mean_diff']:+.2f}",
                     f"{r['better']:.1f} of {r['random_cells']}", _num(r["u_p"], 3), _num(r["u_p_holm"], 3)]
                    for r in ranked]


def _show(value: object) -> str:
    """A setting's value as --set spells it (null, true), a list as its items joined by commas."""
    if isinstance(value, tuple):
        return ",".join(map(_show, value))
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _num(x: float, digits: int) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _millions(m: float) -> str:
    return "-" if math.isnan(m) else in_millions(m * 1e6)


def _error(cell: dict) -> str:
    if not cell["n"]:
        return "-"
    return f"{cell['mean']:.2f} ± {cell['std']:.2f}" if cell["n"] > 1 else f"{cell['mean']:.2f}"


def _table(c: Comparison) -> tuple[list[str], list[list[str]]]:
    header = ["method", "framework", *(["settings"] if c.varying else []),
              *(f"error {t} (%)" for t in c.tasks), *(f"best {t} (%)" for t in c.tasks),
              "params (M)", "MACs (M)", "search (h)", "cell agreement", "seeds"]
    body = []
    for r in rows(c):
        body.append([r["method"], r["framework"], *([r["settings"]] if c.varying else []),
                     *(_error(r[f"error_{t}"]) for t in c.tasks), *(_num(r[f"error_{t}"]["best"], 2) for t in c.tasks),
                     _num(r["params_m"], 2), _millions(r["macs_m"]), _num(r["search_hours"], 3),
                     _num(r["cell_agreement"], 2), str(r["seeds"])])
    return header, body


def markdown(c: Comparison, with_pairs: bool = False) -> str:
    lines = markdown_table(*_table(c))
    if with_pairs:
        lines += _paired_markdown(paired(c))
        ranked = against_random(c)
        lines += ["", AGAINST_RANDOM + ":", "", *markdown_table(*_random_table(ranked))] if ranked else []
    if c.unfinished:
        lines.append(f"\n{len(c.unfinished)} unfinished run(s) left out (`ilnas status` tells more): "
                     + ", ".join(f"{run} ({state})" for run, state in c.unfinished.items()))
    return "\n".join(lines) + "\n"


def latex(c: Comparison, with_pairs: bool = False) -> str:
    """The table (and the pairs) as LaTeX tabulars in booktabs rules, for a paper; what they leave out in comments."""
    lines = latex_table(*_table(c))
    if with_pairs:
        pairs = paired(c)
        lines += ["", f"% {PAIRED}", *latex_table(*_paired_table(pairs))] if pairs else ["", f"% {NO_PAIRS}"]
        ranked = against_random(c)
        lines += ["", f"% {AGAINST_RANDOM}", *latex_table(*_random_table(ranked))] if ranked else []
    if c.unfinished:
        lines.append(f"% {len(c.unfinished)} unfinished run(s) left out (`ilnas status` tells more): "
                     + " ".join(", ".join(f"{run} ({state})" for run, state in c.unfinished.items()).splitlines()))
    return "\n".join(lines) + "\n"


def as_csv(c: Comparison) -> str:
    header, body = _table(c)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(body)
    return buf.getvalue()


def as_json(c: Comparison, with_pairs: bool = False) -> str:
    def clean(x):
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return x
    extra = {"paired": [clean(p) for p in paired(c)], "against_random": against_random(c)} if with_pairs else {}
    return json.dumps({"tasks": c.tasks, "varying": c.varying, "rows": [clean(r) for r in rows(c)], **extra,
                       "unfinished": [str(p) for p in c.unfinished],
                       "unfinished_states": {str(p): state for p, state in c.unfinished.items()}}, indent=1) + "\n"
