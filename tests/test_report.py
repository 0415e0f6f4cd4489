"""Seeing a run: cell diagrams, curves, alpha evolution and report.html from real (tiny) runs."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import matplotlib.image
import numpy as np

import pytest

from helpers import ilnas_here, snapshot
from ilnas.report.cells import cell_dot
from ilnas.report.figures import alpha_figures
from ilnas.runs import read_metrics
from ilnas.space.genotype import load_genotype, parse_genotype, zoo
from ilnas.space.layout import PARAMETER_FREE


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("src", "href")]


def _links(report) -> list[str]:
    parser = _Links()
    parser.feed(report.read_text())
    return parser.links


def _svg_text(path) -> str:
    return " ".join(t.text or "" for t in ET.parse(path).getroot().iter() if t.tag.endswith("text"))


def test_a_finished_search_draws_its_cells_curves_and_alphas(finished_run):
    plots, genotype = finished_run / "plots", load_genotype(str(finished_run / "genotype.json"))
    for cell in ("normal", "reduce"):
        text = _svg_text(plots / f"cell_{cell}.svg")
        for op, _ in getattr(genotype, cell):
            assert op in text  # every op of the genotype is named in its diagram
        assert "c_{k-2}" in text and "c_{k}" in text
        dot = (plots / f"cell_{cell}.dot").read_text()
        assert dot.count("->") == 8 + 4 and dot.startswith("digraph")
    for name in ("cell_normal", "curves", "cell_evolution", "alphas_p0_normal", "alphas_p0_reduce"):
        image = matplotlib.image.imread(plots / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0  # a real, non-blank picture
        ET.parse(plots / f"{name}.svg")
    assert "r2/digits" in _svg_text(plots / "curves.svg")  # curves per stage, labelled by round and task
    assert "c_{k-1} -> 1" in _svg_text(plots / "alphas_p0_normal.svg")  # edges named by their endpoints


def test_report_html_links_resolve_and_show_the_summary(finished_run):
    report = finished_run / "report.html"
    links = _links(report)
    assert len(links) >= 8 and all((finished_run / link).is_file() for link in links)
    text = report.read_text()
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["genotype"].replace("'", "&#x27;") in text
    assert re.search(r"M parameters \(without the auxiliary head\), \d+ M multiply-adds", text)
    assert "search hours" in text and "kind: search" in text
    assert re.search(r"cell unchanged since</th><td>epoch [123] of 3<", text)


def test_the_search_sends_its_figures_to_tensorboard(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(finished_run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert {"report/curves", "report/alphas_p0_normal", "report/cell_evolution"} <= set(acc.Tags()["images"])
    # and, every epoch, the skip-connects and parameter-free ops of the epoch's cell (metrics.jsonl's genotype)
    cells = [parse_genotype(r["genotype"]) for r in read_metrics(finished_run, "epoch")]
    for part in ("normal", "reduce"):
        skips = [e.value for e in acc.Scalars(f"cell/skip_connects/{part}")]
        free = [e.value for e in acc.Scalars(f"cell/parameter_free/{part}")]
        assert skips == [sum(op == "skip_connect" for op, _ in getattr(g, part)) for g in cells]
        assert free == [sum(op in PARAMETER_FREE for op, _ in getattr(g, part)) for g in cells]


def test_plot_redraws_a_training_run_without_touching_anything_else(finished_training):
    before = {k: v for k, v in snapshot(finished_training).items() if not k.startswith(("plots", "report.html"))}
    r = ilnas_here("plot", str(finished_training))
    assert r.returncode == 0, r.stderr
    assert {k: v for k, v in snapshot(finished_training).items()
            if not k.startswith(("plots", "report.html"))} == before
    assert all((finished_training / link).is_file() for link in _links(finished_training / "report.html"))
    assert "accuracy" in _svg_text(finished_training / "plots" / "curves.svg")
    assert "best test error" in (finished_training / "report.html").read_text()


@pytest.mark.parametrize("holding", ["nothing", "a configuration saved by hand"])
def test_plot_refuses_what_is_not_a_run_and_writes_nothing_there(tmp_path, holding):
    if holding != "nothing":  # a project folder: plot once wrote its plots/ and report.html there
        (tmp_path / "config.yaml").write_text(ilnas_here("config", "demo").stdout)
    before = sorted(tmp_path.iterdir())
    r = ilnas_here("plot", str(tmp_path))
    assert r.returncode == 2 and r.stderr == (f"ilnas: error: {tmp_path} is not an ilnas run directory (no "
                                              f"config.yaml with the provenance.json a run writes)\n"), r.stderr
    assert sorted(tmp_path.iterdir()) == before


def test_dot_text_and_alpha_figures_follow_their_inputs():
    dot = cell_dot(zoo()["DARTS_V2"], "normal")
    assert '"c_{k-1}" -> "0" [label="sep_conv_3x3"' in dot and '"3" -> "c_{k}"' in dot
    history = {"p0/alphas_normal": np.zeros((2, 14, 8), np.float32), "p1/alphas_reduce": np.zeros((1, 14, 3)),
               "p1/reduce_ops": np.array([["none", "skip_connect", "sep_conv_3x3"]] * 14)}
    assert set(alpha_figures(history)) == {"alphas_p0_normal", "alphas_p1_reduce"}


def test_the_cell_over_the_epochs_counts_choices_kept_and_parameter_free_ops():
    """Epochs ending with DARTS_V1, then V2 (11 of its 16 choices: 5 normal, 6 reduce; tests/test_genotype.py),
    V2 listed the other way round, and V2, the last two in a second phase: the cell is V2 from epoch 2 on.
    Skip-connects: V1's normal cell 3, reduce 3; V2's 2 and 3. Every reduction edge of both is a pool or a
    skip-connect; their normal cells have no pool."""
    from helpers import listed_the_other_way
    from ilnas.report.figures import cell_evolution, epoch_cells
    from ilnas.space.genotype import unchanged_for

    v1, v2 = zoo()["DARTS_V1"], zoo()["DARTS_V2"]
    records = [{"kind": "step", "phase": 0, "step": 1}]
    records += [{"kind": "epoch", "phase": int(e > 1), "epoch": e % 2, "genotype": g.to_string()}
                for e, g in enumerate((v1, v2, listed_the_other_way(v2), v2))]
    cells, starts = epoch_cells(records)
    assert cells[1] == v2 and starts == [2] and unchanged_for(cells) == 3
    assert unchanged_for(cells[:1]) == 1 and unchanged_for([v2, v1]) == 1 and unchanged_for([]) == 0
    fig = cell_evolution(cells, starts)
    lines = {(ax.get_title().split(" (")[0], line.get_label()): list(line.get_ydata())
             for ax in fig.axes for line in ax.lines if not line.get_label().startswith("_")}
    assert lines == {("choices shared with the last epoch's cell", "normal"): [5, 8, 8, 8],
                     ("choices shared with the last epoch's cell", "reduce"): [6, 8, 8, 8],
                     ("parameter-free ops", "normal"): [3, 2, 2, 2], ("parameter-free ops", "reduce"): [8, 8, 8, 8],
                     ("skip-connects", "normal"): [3, 2, 2, 2], ("skip-connects", "reduce"): [3, 3, 3, 3]}

