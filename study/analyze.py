"""Tables, paired tests and figures of the study (study/README.md) from its sweep directories.

    python study/analyze.py runs/study/main runs/study/ablations --figures docs/results

Per sweep: test error per arm (the grid's labels other than the seed) and task, mean ± std over seeds (and
training seeds), search minutes; for every pair of arms a paired comparison over (seed, task), a cell's trainings
at several training seeds averaged: mean difference, paired t-test and Wilcoxon signed-rank p-values (scipy),
between arms whose labels differ in one (a sweep with train.recipes makes an arm of each recipe, and pairs il at
x4 with mtl at x4, not with mtl at x16); per recipe and task, how the re-trained networks' parameters and errors
correlate (Spearman), and where cells were re-trained at several training seeds, how much of the spread is the
cells' and how much the seeds'; where a sweep re-trains published cells of the zoo beside random cells, how each
published cell ranks among the random ones, and the cells of the other sweeps' arms re-trained by the same recipe
(the positive control). Across sweeps: how many of the (op, input) choices of each cell an arm shares with
the main IL arm's cell of the same seed. Per arm, its cells: how alike its seeds' cells are, how many normal-cell
edges hold a parameter-free op, and how far the final normal-cell architecture weights have moved from uniform
(op entropy, the strongest op's weight). Figures: error per arm and task, for a sweep with recipes error against
the recipe, and for the control each cell among the random cells (<sweep>-against-random.png).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import re
import statistics
import sys
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import yaml
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from ilnas.data.names import task_slug
from ilnas.recipes.compare import cell_agreement, paired_difference, paired_units, rank_among
from ilnas.report.figures import softmax
from ilnas.space.genotype import Genotype, parse_genotype, shared_choices, zoo
from ilnas.space.layout import PARAMETER_FREE

# (seed, training seed, task) -> error in %; ("hours", "") -> search hours; ("cell", seed) -> genotype dict;
# ("alphas", seed) -> the normal cell's architecture logits after the last epoch (edges x ops); ("source", seed) ->
# how a given cell was named to its trainings (random:N, a zoo name, a run's path); ("params", seed,
# training seed, task) -> the re-trained network's parameters; LABELS -> the arm's grid labels but the seed; RECIPE ->
# the recipes its trainings ran by (_recipe_signature).
# The training seed is "" where the sweep re-trains once per task (train-<task>/), else the s of train-<task>-seed-<s>/.
# A sweep with train.recipes (train-<task>-<recipe>/) makes one arm of every recipe: its labels add recipe=<name>.
Arm = dict
LABELS = ("labels", "")
RECIPE = ("recipe", "")


class StudyError(Exception):
    """A sweep record that cannot be read: said in one line, exit code 2."""


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A record missing, damaged or lacking a field, as one line that names it rather than a traceback."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, zipfile.BadZipFile) as e:
        raise StudyError(f"{path} cannot be read as ilnas writes it ({type(e).__name__}: {e})") from None


def _json(path: Path):
    with _reading(path):
        return json.loads(path.read_text())


def load(sweep: Path) -> dict[str, Arm]:
    arms: dict[str, Arm] = {}
    with _reading(sweep / "sweep.json"):
        record = _json(sweep / "sweep.json")
        if not record.get("final", True):  # written as the sweep goes: the trainings finished so far
            done = sum(all(v.startswith("finished") for v in c["runs"].values()) for c in record["cells"])
            print(f"{sweep}: the sweep has not ended ({done} of {len(record['cells'])} cells finished); "
                  f"tables of the trainings finished so far", file=sys.stderr)
        cells = [(c["cell"], {k.split(".")[-1]: str(v) for k, v in c["labels"].items() if k != "search.seed"},
                  int(c["labels"].get("search.seed", 0))) for c in record["cells"]]
    for name, labels, seed in cells:
        own: list[Arm] = []  # this cell's arms, one per recipe
        for train in sorted((sweep / name).glob("train-*/result.json")):
            with _reading(train):
                result = _json(train)
                task, error = result["task"], 100 * float(result["final_test_error"])
            recipe, training_seed = _training(train.parent.name, task)
            arm = _arm(arms, {**labels, **({"recipe": recipe} if recipe else {})})
            arm[(seed, training_seed, task)] = error
            arm.setdefault(RECIPE, set()).add(_recipe_signature(train.parent / "config.yaml"))
            if "params" in result:
                arm[("params", seed, training_seed, task)] = result["params"]
            if all(a is not arm for a in own):
                own.append(arm)
        for arm in own or [_arm(arms, labels)]:
            _add_cell(arm, sweep / name, seed)
    return dict(sorted(arms.items(), key=lambda kv: _recipe_order(kv[1][LABELS].get("recipe", ""))))  # x1 first


def _recipe_signature(config: Path) -> str:
    """A training's recipe: its config but the cell, the task and the training seed ("" where it has no config)."""
    if not config.is_file():
        return ""
    cfg = yaml.safe_load(config.read_text())
    cfg.pop("genotype", None)
    cfg.get("data", {}).pop("tasks", None)
    cfg.get("train", {}).pop("seed", None)
    return json.dumps(cfg, sort_keys=True)


def _training(folder: str, task: str) -> tuple[str, str]:
    """(recipe, training seed) of a training run's folder, train-<task>[-<recipe>][-seed-<s>]; "" where absent."""
    rest = folder[len(f"train-{task_slug(task)}"):]
    rest, _, training_seed = rest.rpartition("-seed-") if "-seed-" in rest else (rest, "", "")
    return rest.removeprefix("-"), training_seed


def _arm(arms: dict[str, Arm], labels: dict[str, str]) -> Arm:
    name = ", ".join(f"{k}={v}" for k, v in labels.items()) or "all"
    return arms.setdefault(name, {LABELS: labels})


def _add_cell(arm: Arm, cell: Path, seed: int) -> None:
    """The cell a sweep cell searched (its search hours and final architecture weights) or was given (random:SEED, a
    run's path: the cell its trainings trained)."""
    search = cell / "search"
    trained = sorted(cell.glob("train-*/config.yaml"))
    if not search.is_dir() and trained:
        with _reading(trained[0]):
            arm[("cell", seed)] = parse_genotype(yaml.safe_load(trained[0].read_text())["genotype"]).to_dict()
        provenance = trained[0].parent / "provenance.json"
        if provenance.is_file():
            with _reading(provenance):
                arm[("source", seed)] = str(_json(provenance).get("genotype_source"))
    if (search / "summary.json").is_file():
        with _reading(search / "summary.json"):
            arm.setdefault(("hours", ""), []).append(float(_json(search / "summary.json")["search_hours"]))
        arm[("cell", seed)] = _json(search / "genotype.json")
    if (search / "arch_history.npz").is_file():
        with _reading(search / "arch_history.npz"), np.load(search / "arch_history.npz") as history:
            last = max(k for k in history.files if k.endswith("/alphas_normal"))  # the last P-DARTS phase
            arm[("alphas", seed)] = history[last][-1]


def _is_error(key: tuple) -> bool:
    return len(key) == 3


def _tasks(arms: dict[str, Arm]) -> list[str]:
    return sorted({k[2] for arm in arms.values() for k in arm if _is_error(k)})


def _errors(arm: Arm, task: str) -> list[float]:
    return [e for k, e in sorted(arm.items(), key=lambda kv: str(kv[0])) if _is_error(k) and k[2] == task]


def table(arms: dict[str, Arm]) -> list[str]:
    tasks = _tasks(arms)
    lines = ["| arm | " + " | ".join(f"{t} error (%)" for t in tasks) + " | search (min) | seeds |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for name, arm in arms.items():
        cells = []
        for t in tasks:
            v = _errors(arm, t)
            cells.append(f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else
                         (f"{v[0]:.2f}" if v else "-"))
        hours = arm.get(("hours", ""), [])
        minutes = f"{60 * statistics.mean(hours):.1f}" if hours else "-"
        seeds = len({k[0] for k in arm if _is_error(k)})
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {minutes} | {seeds} |")
    return lines


def paired(arms: dict[str, Arm]) -> list[str]:
    lines = ["| A | B | pairs (seed, task) | mean A - B (points) | paired t p | Wilcoxon p |",
             "|---|---|---|---|---|---|"]
    for a, b in itertools.combinations(arms, 2):
        if _differing(arms[a], arms[b]) > 1:  # il at one re-training length against mtl at another: no question
            continue
        # a cell's trainings at several training seeds pair as one unit, their mean (compare.paired_units)
        x, y = paired_units(*({k: e for k, e in arms[n].items() if _is_error(k)} for n in (a, b)))
        if len(x) < 3:
            continue
        d = paired_difference(x, y)
        lines.append(f"| {a} | {b} | {len(x)} | {d['mean_diff']:+.2f} | {_p(d['t_p'])} | {_p(d['wilcoxon_p'])} |")
    return lines


def _differing(a: Arm, b: Arm) -> int:
    """How many grid labels two arms differ in (a label only one of them has counts)."""
    la, lb = a.get(LABELS, {}), b.get(LABELS, {})
    return sum(la.get(k) != lb.get(k) for k in {*la, *lb})


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def overlap(reference: Arm, arms: dict[str, Arm]) -> list[str]:
    """Per arm: the mean share of (op, input) choices its cell has in common with the reference cell of the
    same seed (1: the same cell; space.genotype.shared_choices)."""
    lines = ["| arm | seeds | shared (op, input) choices with IL, fd, lambda=100, M=2 |", "|---|---|---|"]
    for name, arm in arms.items():
        shares = [shared_choices(Genotype.from_dict(g), Genotype.from_dict(reference[k])) / 16
                  for k, g in arm.items() if k[0] == "cell" and k in reference]
        if shares:
            lines.append(f"| {name} | {len(shares)} | {statistics.mean(shares):.2f} |")
    return lines


def against(reference: Arm, arms: dict[str, Arm], name: str = "main IL") -> list[str]:
    """The reference arm (the main study's IL arm) on the seeds ``arms`` were run with: its row of ``table``
    and of ``cells``, and its pairs with each of ``arms`` (``paired`` pairs only the runs two arms share)."""
    seeds = {k[0] for arm in arms.values() for k in arm if _is_error(k)}
    own = {k: v for k, v in reference.items() if k[0] in seeds or k[0] == "hours" or (len(k) == 2 and k[1] in seeds)}
    pairs = paired({name: own, **arms})
    return [*table({name: own}), "", *cells({name: own}), "", *pairs[:2],
            *(line for line in pairs[2:] if line.startswith(f"| {name} |"))]


def cells(arms: dict[str, Arm]) -> list[str]:
    """Per arm with cells: how alike its seeds' cells are (compare.cell_agreement: 1 one cell, 0.092 expected of
    uniformly drawn ones), the share of its normal cells' edges that hold a pool or a skip-connect (3 of the 7 ops:
    0.43 expected of uniformly drawn cells), and, from the final architecture weights of the normal cell, the mean
    entropy of an edge's op weights (log 8 = 2.0794 nats when uniform) and the mean weight of an edge's strongest op
    (0.125 when uniform)."""
    lines = ["| arm | cells | cell agreement | parameter-free normal edges | normal op entropy (nats) | strongest op |",
             "|---|---|---|---|---|---|"]
    for name, arm in arms.items():
        genotypes = [Genotype.from_dict(g) for k, g in sorted(arm.items(), key=lambda kv: str(kv[0])) if k[0] == "cell"]
        if not genotypes:
            continue
        agreement = cell_agreement(genotypes)
        free = statistics.mean(g.count("normal", PARAMETER_FREE) / len(g.normal) for g in genotypes)
        weights = [softmax(a.astype(np.float64)) for k, a in arm.items() if k[0] == "alphas"]
        entropy = statistics.mean(float(-(w * np.log(w)).sum(-1).mean()) for w in weights) if weights else math.nan
        strongest = statistics.mean(float(w.max(-1).mean()) for w in weights) if weights else math.nan
        lines.append(f"| {name} | {len(genotypes)} | {_f(agreement, 2)} | {free:.2f} | {_f(entropy, 5)} | "
                     f"{_f(strongest, 4)} |")
    return lines


def sizes(arms: dict[str, Arm]) -> list[str]:
    """Whether the larger networks re-train better or worse: per re-training recipe and task, Spearman's rank
    correlation between the parameters and the test error of every cell of every arm (negative: the larger, the
    better), a cell re-trained at several training seeds counted once, with its mean error."""
    lines = ["| recipe | task | cells | Spearman rho (params, error) | p |", "|---|---|---|---|---|"]
    for recipe in sorted({arm[LABELS].get("recipe", "") for arm in arms.values()}, key=_recipe_order):
        for task in _tasks(arms):
            cells: list[tuple[float, float]] = []  # (parameters, mean error) of every cell of the recipe
            for arm in arms.values():
                if arm[LABELS].get("recipe", "") == recipe:
                    params = {k[1]: v for k, v in arm.items() if k[0] == "params" and k[3] == task}
                    cells += [(params[s], statistics.mean(e)) for s, e in _by_cell(arm, task).items() if s in params]
            if len(cells) < 3:
                continue
            rho, p = spearmanr(*zip(*cells))
            lines.append(f"| {recipe or '-'} | {task} | {len(cells)} | {rho:+.2f} | {_p(float(p))} |")
    return lines


def noise(arms: dict[str, Arm]) -> list[str]:
    """How much of the spread is the cells and how much the re-training's own seed, where cells were re-trained at
    several training seeds: per arm and task, and over every arm's cells of one recipe, the standard deviation over
    training seeds within a cell (pooled), that of the cells' means, and the intraclass correlation of one-way random
    effects, (MSB - MSW) / (MSB + (n - 1) MSW), the share of one training's variance that is the cell's (0: the cells
    differ no more than the seeds; negative where they differ less)."""
    lines = ["| arm | task | cells x training seeds | SD within a cell | SD of the cells' means | ICC |",
             "|---|---|---|---|---|---|"]
    pooled: dict[tuple[str, str], dict] = {}  # (recipe, task) -> (arm, cell seed) -> errors
    for name, arm in arms.items():
        for task in _tasks(arms):
            by_cell = _by_cell(arm, task)
            lines += _icc_row(name, task, by_cell)
            recipe = arm.get(LABELS, {}).get("recipe", "")
            pooled.setdefault((recipe, task), {}).update({(name, c): e for c, e in by_cell.items()})
    if len(arms) > 1:
        for (recipe, task), by_cell in sorted(pooled.items(), key=lambda kv: (_recipe_order(kv[0][0]), kv[0][1])):
            lines += _icc_row("every arm" + (f", recipe={recipe}" if recipe else ""), task, by_cell)
    return lines


def control(arms: dict[str, Arm]) -> list[str]:
    """The positive control: the published cells of the zoo against random cells, each cell's error its mean over
    training seeds, per task and on the mean of the tasks. Rows: each published cell, how many random cells re-trained
    better than it; then the published cells together and every other arm whose trainings name their cells (cells
    searched in another sweep, say), mean ± std over their cells and the Mann-Whitney U test of their cells against
    the random cells (two-sided); last the random cells. Can the re-training tell the cells that a full-scale search
    chose from cells nobody chose, and where do the arms' cells fall? Arms that mix recipes must be left out by the
    caller (``same_recipe``)."""
    groups = _control_groups(arms)
    if not groups:
        return []
    random, published = list(groups.pop("random cells").values()), groups["published cells"]
    columns = [*_tasks(arms), "mean"] if len(_tasks(arms)) > 1 else _tasks(arms)  # the mean of one task is that task
    lines = ["| cells | n | " + " | ".join(f"{t} error (%) | random better | p" for t in columns) + " |",
             "|---|---|" + "---|---|---|" * len(columns)]
    for source, cell in published.items():
        lines.append(f"| {source} | 1 | " + " | ".join(
            f"{cell[t]:.2f} | {sum(r[t] < cell[t] for r in random)} of {len(random)} | -" for t in columns) + " |")
    for row, cells in groups.items():
        lines.append(f"| {row} | {len(cells)} | " + " | ".join(_against_random(list(cells.values()), random, t)
                                                               for t in columns) + " |")
    return [*lines, f"| random cells | {len(random)} | " + " | ".join(
        f"{_mean_std([r[t] for r in random])} ({min(r[t] for r in random):.2f}-{max(r[t] for r in random):.2f}) "
        f"| - | -" for t in columns) + " |"]


def _control_groups(arms: dict[str, Arm]) -> dict[str, dict[str, dict[str, float]]]:
    """``control``'s cells by row, published first and random last: row -> the cell's source -> task (and "mean")
    -> its mean error over training seeds; empty without published cells or with fewer than three random ones."""
    tasks = _tasks(arms)
    groups: dict[str, dict[str, dict[str, float]]] = {"published cells": {}}
    for name, arm in arms.items():
        for (_, seed), source in ((k, v) for k, v in arm.items() if k[0] == "source"):
            errors = {t: statistics.mean(e) for t in tasks if (e := _by_cell(arm, t).get(seed))}
            if len(errors) == len(tasks):
                row = ("random cells" if re.fullmatch(r"random:\d+", source) else
                       "published cells" if source in zoo() else name)
                groups.setdefault(row, {})[source] = {**errors, "mean": statistics.mean(errors.values())}
    if len(groups.get("random cells", {})) < 3 or not groups["published cells"]:
        return {}
    random = groups.pop("random cells")
    return {**groups, "random cells": random}


def control_figure(arms: dict[str, Arm], title: str) -> Figure:
    """``control``'s cells drawn: a dot per cell (its mean error over training seeds) in its row's column, the
    published cells named, one panel per task."""
    groups, tasks = _control_groups(arms), _tasks(arms)
    fig = Figure(figsize=(2.5 + 1.3 * len(groups), 3.4 * len(tasks)))
    axes = fig.subplots(len(tasks), 1, squeeze=False)[:, 0]
    for ax, task in zip(axes, tasks):
        for x, (row, cells) in enumerate(groups.items()):
            errors = [cell[task] for cell in cells.values()]
            ax.scatter([x] * len(errors), errors, s=22, alpha=0.7)
            ax.plot([x - 0.25, x + 0.25], [statistics.mean(errors)] * 2, color="black")
            if row == "published cells":
                for source, cell in cells.items():
                    ax.annotate(source, (x, cell[task]), xytext=(6, 0), textcoords="offset points", fontsize=6,
                                va="center")
        ax.set_xticks(range(len(groups)), [row.split(": ")[-1] for row in groups], rotation=15, fontsize=8)
        ax.set_ylabel(f"{task} test error (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    fig.tight_layout()
    return fig


def _against_random(cells: list[dict], random: list[dict], column: str) -> str:
    """A group's cells on one column: mean ± std, how many random cells re-trained better than one of its cells on
    average, and the Mann-Whitney p of its cells against the random cells (compare.rank_among)."""
    mine, theirs = [c[column] for c in cells], [r[column] for r in random]
    ranked = rank_among(mine, theirs)
    p = ranked["u_p"] if len(mine) > 1 else None  # a single cell's rank is in its own row
    return f"{_mean_std(mine)} | {ranked['better']:.1f} of {len(theirs)} | {_p(p)}"


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def same_recipe(arms: dict[str, Arm], others: dict[str, Arm]) -> dict[str, Arm]:
    """The arms of ``others`` whose trainings ran by the one recipe of every training in ``arms`` (their configs
    equal but for the cell, the task and the training seed) at the same training seeds; none where ``arms`` mix
    recipes or training seeds."""
    def design(arm: Arm) -> tuple[set, set]:
        return arm.get(RECIPE, set()), {k[1] for k in arm if _is_error(k)}

    designs = {json.dumps([sorted(x) for x in design(arm)]) for arm in arms.values()}
    return {name: arm for name, arm in others.items()
            if len(designs) == 1 and json.dumps([sorted(x) for x in design(arm)]) in designs}


def _by_cell(arm: Arm, task: str) -> dict[int, list[float]]:
    """An arm's errors on ``task`` per cell (its seed): one per training seed it was re-trained at."""
    by_cell: dict[int, list[float]] = {}
    for k, e in arm.items():
        if _is_error(k) and k[2] == task:
            by_cell.setdefault(k[0], []).append(e)
    return by_cell


def _icc_row(name: str, task: str, by_cell: dict) -> list[str]:
    """``noise``'s row of cells each re-trained at several seeds, or none where the design is not balanced (every
    cell re-trained at the same number of seeds, at least 2, and at least 2 cells)."""
    n = {len(v) for v in by_cell.values()}
    if len(by_cell) < 2 or len(n) != 1 or min(n) < 2:
        return []
    n_seeds, means = n.pop(), [statistics.mean(v) for v in by_cell.values()]
    within = statistics.mean(statistics.variance(v) for v in by_cell.values())  # MSW
    between = n_seeds * statistics.variance(means)  # MSB
    icc = (between - within) / (between + (n_seeds - 1) * within) if between + within > 0 else math.nan
    return [f"| {name} | {task} | {len(by_cell)} x {n_seeds} | {math.sqrt(within):.2f} | "
            f"{statistics.stdev(means):.2f} | {_f(icc, 2)} |"]


def _recipe_order(recipe: str) -> tuple:
    """x1 < x4 < x16: recipes named by a number sort by it, then the others by name."""
    digits = "".join(c for c in recipe if c.isdigit())
    return (0, int(digits), recipe) if digits else (1, 0, recipe)


def _f(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def figure(arms: dict[str, Arm], title: str) -> Figure:
    tasks = _tasks(arms)
    fig = Figure(figsize=(4 + 1.1 * len(arms), 3.6 * len(tasks)))
    axes = fig.subplots(len(tasks), 1, squeeze=False)[:, 0]
    for ax, task in zip(axes, tasks):
        for x, (name, arm) in enumerate(arms.items()):
            v = _errors(arm, task)
            ax.scatter([x] * len(v), v, s=18, alpha=0.7)
            if v:
                ax.errorbar(x + 0.15, statistics.mean(v), yerr=statistics.stdev(v) if len(v) > 1 else 0,
                            fmt="o", color="black", capsize=4)
        ax.set_xticks(range(len(arms)), list(arms), rotation=20, fontsize=8)
        ax.set_ylabel(f"{task} test error (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    fig.tight_layout()
    return fig


def by_recipe(arms: dict[str, Arm], title: str) -> Figure:
    """Test error against the re-training recipe (in their order: x1, x4, x16), one line per arm's other labels
    (mean over seeds, bars one std), one panel per task."""
    tasks, recipes = _tasks(arms), sorted({arm[LABELS]["recipe"] for arm in arms.values()}, key=_recipe_order)
    lines: dict[str, dict[str, Arm]] = {}
    for arm in arms.values():
        rest = ", ".join(f"{k}={v}" for k, v in arm[LABELS].items() if k != "recipe") or "all"
        lines.setdefault(rest, {})[arm[LABELS]["recipe"]] = arm
    fig = Figure(figsize=(5.5, 3.4 * len(tasks)))
    axes = fig.subplots(len(tasks), 1, squeeze=False)[:, 0]
    for ax, task in zip(axes, tasks):
        for n, (name, line) in enumerate(lines.items()):
            xs = [x + 0.04 * (n - len(lines) / 2) for x, r in enumerate(recipes) if _errors(line.get(r, {}), task)]
            v = [_errors(line[r], task) for r in recipes if _errors(line.get(r, {}), task)]
            ax.errorbar(xs, [statistics.mean(e) for e in v], [statistics.stdev(e) if len(e) > 1 else 0 for e in v],
                        marker="o", capsize=3, label=name)
        ax.set_xticks(range(len(recipes)), recipes)
        ax.set_xlabel("re-training recipe")
        ax.set_ylabel(f"{task} test error (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title(title)
    fig.tight_layout()
    return fig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("sweeps", nargs="+")
    p.add_argument("--figures", help="directory for one PNG per sweep")
    args = p.parse_args()
    try:
        loaded = {Path(s).name: load(Path(s)) for s in args.sweeps}
    except StudyError as e:
        p.exit(2, f"analyze: error: {e}\n")
    main_il = next((arm for arms in loaded.values() for arm in arms.values() if arm[LABELS] == {"framework": "il"}),
                   None)
    for name, arms in loaded.items():
        print(f"### {name}\n\n" + "\n".join(table(arms)) + "\n\n" + "\n".join(paired(arms)) + "\n")
        frameworks = any("framework" in arm[LABELS] for arm in arms.values())
        # a sweep's own IL arm (any of its re-training recipes: the same cells), else the first sweep's
        reference = next((arm for arm in arms.values() if arm[LABELS].get("framework") == "il"), main_il)
        if reference is not None:
            print("\n".join(overlap(reference, arms)) + "\n")
        if main_il is not None and not frameworks:  # an ablation sweep: the main IL arm on its seeds
            print("\n".join(against(main_il, arms)) + "\n")
        if any("params" == k[0] for arm in arms.values() for k in arm):
            print("\n".join(sizes(arms)) + "\n")
        if any(_is_error(k) and k[1] for arm in arms.values() for k in arm):  # re-trained at several seeds
            print("\n".join(noise(arms)) + "\n")
        others = {f"{other}: {n}": arm for other, o in loaded.items() if other != name for n, arm in o.items()}
        ranked = {**arms, **same_recipe(arms, others)}
        if ranking := control(ranked):
            print("\n".join(ranking) + "\n")
        print("\n".join(cells(arms)) + "\n")
        if args.figures:
            Path(args.figures).mkdir(parents=True, exist_ok=True)
            figure(arms, f"study: {name}").savefig(Path(args.figures) / f"{name}.png", dpi=100)
            if ranking:
                control_figure(ranked, f"study: {name}, cells against random cells").savefig(
                    Path(args.figures) / f"{name}-against-random.png", dpi=100)
            if all("recipe" in arm[LABELS] for arm in arms.values()):
                by_recipe(arms, f"study: {name}").savefig(Path(args.figures) / f"{name}-by-recipe.png", dpi=100)


if __name__ == "__main__":
    main()
