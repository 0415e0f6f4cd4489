"""Tables and paired tests of the study (study/README.md) from its sweep directories.

    python study/analyze.py runs/study/main [runs/study/lambda ...]

For every sweep directory: test error per arm (the grid's labels other than the seed) and task, mean ±
std over seeds, and for every pair of arms a paired comparison over (seed, task): mean difference,
paired t-test and Wilcoxon signed-rank p-values (scipy). Search cost per arm from the runs' summaries.
"""
from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path

from scipy import stats


def load(sweep: Path) -> dict[str, dict[tuple[int, str], float]]:
    """arm -> {(seed, task): final test error in %}; plus arm -> search hours under key ("hours", "")."""
    arms: dict[str, dict] = {}
    for cell in json.loads((sweep / "sweep.json").read_text())["cells"]:
        labels = dict(cell["labels"])
        seed = int(labels.pop("search.seed", labels.pop("seed", 0)))
        arm = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in labels.items()) or "all"
        for train in sorted((sweep / cell["cell"]).glob("train-*/result.json")):
            result = json.loads(train.read_text())
            arms.setdefault(arm, {})[(seed, result["task"])] = 100 * result["final_test_error"]
        summary = sweep / cell["cell"] / "search" / "summary.json"
        if summary.is_file():
            arms.setdefault(arm, {}).setdefault(("hours", ""), []).append(json.loads(summary.read_text())["search_hours"])
    return arms


def table(arms: dict) -> list[str]:
    tasks = sorted({t for errors in arms.values() for (_, t) in errors if t})
    lines = ["| arm | " + " | ".join(f"{t} error (%)" for t in tasks) + " | search (min) | seeds |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for arm, errors in arms.items():
        cells = []
        for t in tasks:
            v = [e for (s, task), e in errors.items() if task == t]
            cells.append(f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else
                         (f"{v[0]:.2f}" if v else "-"))
        hours = errors.get(("hours", ""), [])
        seeds = len({s for (s, t) in errors if t})
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {60 * statistics.mean(hours):.1f} | {seeds} |"
                     if hours else f"| {arm} | " + " | ".join(cells) + f" | - | {seeds} |")
    return lines


def paired(arms: dict) -> list[str]:
    lines = ["| A | B | pairs | mean(A - B) (points) | t-test p | Wilcoxon p |", "|---|---|---|---|---|---|"]
    for a, b in itertools.combinations(arms, 2):
        keys = sorted(k for k in arms[a] if k in arms[b] and k[1])
        if len(keys) < 3:
            continue
        x, y = [arms[a][k] for k in keys], [arms[b][k] for k in keys]
        diff = [p - q for p, q in zip(x, y)]
        t = stats.ttest_rel(x, y).pvalue
        w = stats.wilcoxon(x, y).pvalue if any(diff) else float("nan")
        lines.append(f"| {a} | {b} | {len(keys)} | {statistics.mean(diff):+.2f} | {t:.3f} | {w:.3f} |")
    return lines


def main(paths: list[str]) -> None:
    for path in map(Path, paths):
        arms = load(path)
        print(f"### {path.name}\n")
        print("\n".join(table(arms)) + "\n")
        print("\n".join(paired(arms)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
