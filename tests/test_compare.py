"""ilnas compare on hand-made run directories: grouping by everything but the seed, means and stds."""
from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from helpers import call, ilnas_here, listed_the_other_way, snapshot
from ilnas.config import resolve, to_dict
from ilnas.recipes.compare import compare, mean_std, rows
from ilnas.space.genotype import zoo

CELL = zoo()["DARTS_V2"].to_string()


def _search_run(path, framework: str, seed: int, hours: float, extra: tuple[str, ...] = ()) -> None:
    overrides = [f"search.seed={seed}", *extra] + (["search.framework=mtl", "search.rounds=1", "engine.coupling=none"]
                                                   if framework == "mtl" else [])
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(to_dict(resolve("demo", overrides=overrides))))
    (path / "provenance.json").write_text(json.dumps({"sessions": []}))
    (path / "summary.json").write_text(json.dumps({"genotype": CELL, "search_hours": hours, "steps": 60}))


def _training_run(path, source: str, task: str, error: float, seed: int = 0, params: float = 1.5e6,
                  extra: tuple[str, ...] = ()) -> None:
    path.mkdir(parents=True)
    config = {**to_dict(resolve("eval-digits", kind="eval", overrides=[f"train.seed={seed}", f"data.tasks=[{task}]",
                                                                      *extra])), "genotype": CELL}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "provenance.json").write_text(json.dumps({"genotype_source": source, "sessions": []}))
    (path / "result.json").write_text(json.dumps({"task": task, "final_test_error": error, "best_test_error": error,
                                                  "params": params, "macs": 2e8, "hours": 0.1}))


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for seed, (err_digits, err_mnist) in enumerate([(0.10, 0.20), (0.12, 0.22), (0.14, 0.30)]):
        _search_run(root / f"il-{seed}" / "search", "il", seed, hours=0.5 + seed)
        _training_run(root / f"il-{seed}" / "digits", str(root / f"il-{seed}" / "search"), "digits", err_digits)
        _training_run(root / f"il-{seed}" / "mnist5k", str(root / f"il-{seed}" / "search" / "genotype.json"),
                      "mnist5k", err_mnist)
    for seed, err in enumerate([0.20, 0.30]):
        _search_run(root / f"mtl-{seed}" / "search", "mtl", seed, hours=2.0)
        _training_run(root / f"mtl-{seed}" / "digits", str(root / f"mtl-{seed}" / "search"), "digits", err)
    _training_run(root / "zoo", "DARTS_V2", "digits", 0.05, params=3.3e6)
    for seed, err in ((1, 0.40), (2, 0.50)):  # the random-cell control: one row over its seeds
        _training_run(root / f"random-{seed}", f"random:{seed}", "digits", err)
    (root / "broken").mkdir()
    (root / "broken" / "config.yaml").write_text(yaml.safe_dump(to_dict(resolve("demo"))))  # never finished
    (root / "broken" / "provenance.json").write_text(json.dumps({"sessions": []}))
    (root / "saved").mkdir()  # a configuration saved by hand (ilnas config demo > saved/config.yaml): no run
    (root / "saved" / "config.yaml").write_text(yaml.safe_dump(to_dict(resolve("demo"))))
    return root


def test_groups_by_everything_but_the_seed_with_means_and_stds(runs):
    c = compare([runs])
    assert c.tasks == ["digits", "mnist5k"]
    assert {p.name: s for p, s in c.unfinished.items()} == {"broken": "not started"}
    by_framework = {r["framework"]: r for r in rows(c) if r["method"] != "random cell"}
    il, mtl, zoo_row = by_framework["il"], by_framework["mtl"], by_framework["-"]
    assert il["seeds"] == 3 and il["method"] == "DARTS-2nd"
    assert math.isclose(il["error_digits"]["mean"], 12.0) and math.isclose(il["error_digits"]["std"], 2.0)
    assert math.isclose(il["error_digits"]["best"], 10.0)
    assert math.isclose(il["error_mnist5k"]["mean"], 24.0) and math.isclose(il["error_mnist5k"]["std"], math.sqrt(28))
    assert math.isclose(il["search_hours"], 1.5) and math.isclose(il["params_m"], 1.5)
    assert math.isclose(mtl["error_digits"]["std"], math.sqrt(50)) and mtl["error_mnist5k"]["n"] == 0
    assert zoo_row["method"] == "DARTS_V2" and zoo_row["error_digits"]["mean"] == pytest.approx(5.0)
    assert math.isnan(zoo_row["search_hours"])
    (random_row,) = [r for r in rows(c) if r["method"] == "random cell"]
    assert random_row["seeds"] == 2 and random_row["error_digits"]["mean"] == pytest.approx(45.0)
    # the method and framework columns tell IL from MTL: no setting beside them, where none varies within one
    assert c.varying == [] and {r["settings"] for r in rows(c)} == {""}


def test_one_cells_trainings_under_two_recipes_are_two_rows_and_how_a_run_ran_tells_none_apart(runs):
    """Seeds 0 and 1 of the IL search re-trained a second time, longer: a row of their own (before, the two
    recipes were pooled as more seeds, and the pairing kept one error of each). A fourth IL search and the long
    trainings also differ in settings that say only how they ran: those split nothing."""
    for seed, err in ((0, 0.02), (1, 0.04)):
        _training_run(runs / f"il-{seed}" / "long", str(runs / f"il-{seed}" / "search"), "digits", err,
                      extra=("train.epochs=900", "train.checkpoint_minutes=5", "train.compile=inductor"))
    _search_run(runs / "il-3" / "search", "il", 3, hours=1.0, extra=(
        "search.log_every=10", "search.checkpoint_minutes=1", "engine.batched_sets=1", "search.amp=true"))
    c = compare([runs])
    assert "eval:train.epochs" in c.varying and not {"eval:train.checkpoint_minutes", "eval:train.compile",
                                                     "search.log_every", "engine.batched_sets"} & set(c.varying)
    (default, long) = [r for r in rows(c) if r["framework"] == "il"]
    assert "eval:train.epochs=900" in long["settings"] and "eval:train.epochs=" in default["settings"]
    assert default["error_digits"]["n"] == 3 and default["error_digits"]["mean"] == pytest.approx(12.0)
    assert long["error_digits"]["n"] == 2 and long["error_digits"]["mean"] == pytest.approx(3.0)
    assert (default["seeds"], long["seeds"]) == (3, 2)  # the searches are 4: the rows count what they average
    assert default["error_mnist5k"]["n"] == 3 and long["error_mnist5k"]["n"] == 0
    assert default["search_hours"] == long["search_hours"] == pytest.approx((0.5 + 1.5 + 2.5 + 1.0) / 4)
    from ilnas.recipes.compare import paired

    (pair,) = [p for p in paired(c) if p["a"].startswith("DARTS-2nd il") and p["b"].startswith("DARTS-2nd il")]
    assert pair["pairs"] == 2 and abs(pair["mean_diff"]) == pytest.approx(8.0)
    # the long IL trainings share seeds 0 and 1 with MTL's too, but under another recipe: that pair tells neither
    # the cells nor the recipes apart, and is neither tested nor counted in Holm's adjustment
    short, long = "DARTS-2nd il [eval:train.epochs=10]", "DARTS-2nd il [eval:train.epochs=900]"
    assert [(p["a"], p["b"]) for p in paired(c)] == [(short, long), (short, "DARTS-2nd mtl"), (short, "random cell")]
    # a third recipe, in a directory found first: a cell's recipes are rows in the order of their settings
    _training_run(runs / "il-0" / "a-mid", str(runs / "il-0" / "search"), "digits", 0.05, extra=("train.epochs=50",))
    assert [r["settings"] for r in rows(compare([runs])) if r["framework"] == "il"] == [
        "eval:train.epochs=10", "eval:train.epochs=50", "eval:train.epochs=900"]


def test_settings_a_run_never_read_or_that_did_not_exist_yet_tell_no_runs_apart(runs):
    """A third MTL search with lambda 1 (MTL has no coupling to read it) and another step_size (its schedule is
    cosine) is the MTL row's third seed, a fourth with its loss weights spelled out as all 1 its fourth; IL
    searches with lambda 1 are a row of their own. A config.yaml written before a setting existed (here
    engine.update_order and search.deterministic) compares as its default."""
    _search_run(runs / "mtl-2" / "search", "mtl", 2, hours=2.0, extra=("engine.lam=1", "optimizer.step_size=7"))
    _training_run(runs / "mtl-2" / "digits", str(runs / "mtl-2" / "search"), "digits", 0.25)
    _search_run(runs / "mtl-3" / "search", "mtl", 3, hours=2.0,  # the default loss weights, spelled out
                extra=("engine.val_weights=[1, 1]", "engine.train_weights=[1.0, 1.0]"))
    _training_run(runs / "mtl-3" / "digits", str(runs / "mtl-3" / "search"), "digits", 0.25)
    _search_run(runs / "mtl-half" / "search", "mtl", 0, hours=2.0, extra=("engine.val_weights=[1, 0.5]",))
    _training_run(runs / "mtl-half" / "digits", str(runs / "mtl-half" / "search"), "digits", 0.25)
    _search_run(runs / "il-lam1" / "search", "il", 0, hours=1.0, extra=("engine.lam=1",))
    _training_run(runs / "il-lam1" / "digits", str(runs / "il-lam1" / "search"), "digits", 0.5)
    old = runs / "il-2" / "search" / "config.yaml"
    config = yaml.safe_load(old.read_text())
    del config["engine"]["update_order"], config["search"]["deterministic"]
    old.write_text(yaml.safe_dump(config))
    c = compare([runs])
    assert "engine.lam" in c.varying and "optimizer.step_size" not in c.varying
    assert "engine.val_weights" in c.varying and "engine.train_weights" not in c.varying
    mtl, half = sorted((r for r in rows(c) if r["framework"] == "mtl"), key=lambda r: -r["seeds"])
    assert mtl["seeds"] == 4 and mtl["error_digits"]["mean"] == pytest.approx(25.0) and "lam" not in mtl["settings"]
    assert half["seeds"] == 1 and half["settings"] == "engine.val_weights=1.0,0.5"
    il = {g.settings["engine.lam"]: r for g, r in zip(c.groups, rows(c)) if r["framework"] == "il"}
    assert sorted(il) == [1.0, 100.0] and il[100.0]["seeds"] == 3 and il[1.0]["seeds"] == 1
    # each row names what tells it from its own framework's other rows, not what the other frameworks vary
    assert il[1.0]["settings"] == "engine.lam=1.0" and mtl["settings"] == "engine.val_weights=null"

def test_trainings_find_their_searches_after_the_runs_moved_together(runs, tmp_path):
    """Runs copied off a cluster: the absolute paths trainings recorded lead nowhere. A training made now also
    records the search's path from itself; one that recorded only the absolute path finds the search of the same
    name beside it in its cell (a sweep's layout). Before, each became a row of its own, named by a dead path."""
    from ilnas.recipes.train import source_record

    _search_run(runs / "elsewhere" / "il-9", "il", 9, hours=1.0)
    (runs / "trained" / "il-9").mkdir(parents=True)
    _training_run(runs / "trained" / "il-9" / "digits", str(runs / "elsewhere" / "il-9"), "digits", 0.16)
    record = source_record(str(runs / "elsewhere" / "il-9"), runs / "trained" / "il-9" / "digits")
    assert record["genotype_source_relative"] == "../../../elsewhere/il-9"
    provenance = runs / "trained" / "il-9" / "digits" / "provenance.json"
    provenance.write_text(json.dumps({**json.loads(provenance.read_text()), **record}))
    before = rows(compare([runs]))
    moved = tmp_path / "copied" / "runs"
    shutil.move(str(runs), str(moved))
    after = rows(compare([moved]))
    assert after == before
    (il,) = [r for r in after if r["framework"] == "il"]
    assert il["seeds"] == 4 and il["error_digits"]["mean"] == pytest.approx(13.0)

def test_trainings_of_cells_searched_elsewhere_carry_their_searches_hours(runs):
    """A re-training sweep of cells searched in another sweep: its rows give what the cells cost to find, each search
    counted once however many trainings it has (two tasks here), as when the searches are compared too."""
    trainings = [runs / f"il-{seed}" / task for seed in range(3) for task in ("digits", "mnist5k")]
    (il,) = rows(compare(trainings))
    (whole,) = [r for r in rows(compare([runs])) if r["framework"] == "il"]
    assert math.isclose(il["search_hours"], 1.5) and il["search_hours"] == whole["search_hours"]
    assert il["seeds"] == whole["seeds"] == 3 and il["cell_agreement"] == whole["cell_agreement"] == 1.0


def test_the_command_prints_markdown_csv_and_json(runs):
    r = ilnas_here("compare", str(runs))
    assert r.returncode == 0, r.stderr
    assert "| DARTS-2nd | il |" in r.stdout and "12.00 ± 2.00" in r.stdout and "25.00 ± 7.07" in r.stdout
    assert "| 1.50 | 200 | 1.500 | 1.00 | 3 |" in r.stdout  # params (M), MACs (M), search hours, cell agreement, seeds
    assert f"1 unfinished run(s) left out (`ilnas status` tells more): {runs / 'broken'} (not started)" in r.stdout
    table = list(csv.reader(io.StringIO(ilnas_here("compare", str(runs), "--csv").stdout)))
    assert table[0][:2] == ["method", "framework"] and "error digits (%)" in table[0] and len(table) == 5
    data = json.loads(ilnas_here("compare", str(runs / "il-0"), str(runs / "il-1"), "--json").stdout)
    (row,) = data["rows"]
    assert row["seeds"] == 2 and row["error_digits"]["mean"] == pytest.approx(11.0)


def test_the_latex_output_is_the_same_tables_escaped_for_a_paper(runs):
    code, out, err = call("compare", str(runs), "--latex", "--paired")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:2] == [r"\begin{tabular}{llrrrrrrrrr}", r"\toprule"]
    assert out.count(r"\begin{tabular}") == 3  # the rows, the pairs and the rows against the random cells
    assert r"method & framework & error digits (\%) & error mnist5k (\%) & best digits (\%)" in lines[2]
    assert r"DARTS-2nd & il & 12.00 $\pm$ 2.00 & 24.00 $\pm$ 5.29 & 10.00 & 20.00 & 1.50 & 200 & 1.500 & 1.00 & 3 \\" \
        in lines
    assert r"DARTS\_V2 & - & 5.00 & - & 5.00 & - & 3.30 & 200 & - & - & 1 \\" in lines  # a zoo cell, by its name
    assert r"A & B & pairs & mean A $-$ B & 95\% CI & paired t p" in out and lines[-1].startswith("% 1 unfinished run")
    from ilnas.report.tables import latex_table

    assert latex_table(["x"], [["a\\b&c%d$e#f_g{h}i~j^k"]])[4] == \
        r"a\textbackslash{}b\&c\%d\$e\#f\_g\{h\}i\textasciitilde{}j\textasciicircum{}k \\"


def test_the_html_page_holds_the_tables_the_errors_and_every_rows_cells_escaped(runs, tmp_path, monkeypatch):
    import base64
    import xml.etree.ElementTree as ET
    from html.parser import HTMLParser

    from ilnas.report import cells

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.text = [], []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs))

        def handle_data(self, data):
            self.text.append(data)

    provenance = json.loads((runs / "zoo" / "provenance.json").read_text())
    (runs / "zoo" / "provenance.json").write_text(json.dumps({**provenance, "genotype_source": "cells/<b>.txt"}))
    drawings = []
    monkeypatch.setattr(cells, "cell_figure", lambda cell, part, draw=cells.cell_figure: drawings.append(part) or
                        draw(cell, part))
    code, out, err = call("compare", str(runs), "--html", str(tmp_path / "page.html"), "--figure",
                          str(tmp_path / "errors.png"))
    assert code == 0 and (tmp_path / "errors.png").read_bytes().startswith(b"\x89PNG"), err
    # every run here holds DARTS_V2 (the random rows' configurations too): drawn once, not once per seed and row
    assert drawings == ["normal", "reduce"]
    raw = (tmp_path / "page.html").read_text()
    page = Page()
    page.feed(raw)
    text = " ".join(page.text)
    assert "<b>" not in raw and "cells of cells/<b>.txt" in text  # the given cell's source, escaped in the file
    assert "12.00 ± 2.00" in text and "[-64.82, +36.82]" in text and "(agreement 1.00)" in text
    assert "against random cells" in text and "0.0 of 2" in text  # IL, MTL and the zoo cell ranked among them
    # the errors drawn, then a normal and a reduction cell per cell: IL seeds 0-2, MTL 0-1, the zoo cell, random 1-2
    assert len(page.images) == 1 + 2 * (3 + 2 + 1 + 2)
    drawn = ET.fromstring(base64.b64decode(page.images[1]["src"].split(",", 1)[1]))
    labels = " ".join(t.text or "" for t in drawn.iter() if t.tag.endswith("text"))
    assert page.images[1]["alt"] == "normal cell" and all(op in labels for op, _ in zoo()["DARTS_V2"].normal)
    code, _, err = call("compare", str(runs), "--html", str(tmp_path / "missing" / "page.html"))
    assert code == 2 and err.startswith("ilnas: error: cannot write --html ") and err.count("\n") == 1
    run = next(runs.rglob("config.yaml")).parent  # a slip that names a run's own file, or a spec, writes nothing
    before = snapshot(run)
    for option, name, says in (("--html", run / "config.yaml", "the file must end in .html or .htm"),
                               ("--html", run / "report.html", "lies in run directory"),
                               ("--figure", run / "curves.png", "lies in run directory")):
        code, _, err = call("compare", str(runs), option, str(name))
        assert code == 2 and says in err and err.count("\n") == 1, err
    assert snapshot(run) == before


def test_the_runs_left_out_are_named_with_their_state(runs):
    """A failed run is no run to resume, an interrupted one is: the line under the table tells them apart."""
    sessions = {"failed": {"resumed": False, "end": "2026-01-01T00:00:00", "outcome": "failed: the loss diverged"},
                "interrupted": {"resumed": False, "end": "2026-01-01T00:00:00", "outcome": "stopped by SIGTERM"}}
    for name, session in sessions.items():
        shutil.copytree(runs / "broken", runs / name)
        (runs / name / "provenance.json").write_text(json.dumps({"sessions": [session]}))
    code, out, err = call("compare", str(runs))
    assert code == 0 and out.splitlines()[-1] == (
        f"3 unfinished run(s) left out (`ilnas status` tells more): {runs / 'broken'} (not started), "
        f"{runs / 'failed'} (failed), {runs / 'interrupted'} (interrupted)"), err
    code, out, err = call("compare", str(runs), "--json")
    assert json.loads(out)["unfinished_states"] == {str(runs / n): s for n, s in (
        ("broken", "not started"), ("failed", "failed"), ("interrupted", "interrupted"))}, err


def test_a_training_counts_for_a_search_only_if_it_trained_the_cell_that_search_ended_with(runs):
    """A search started again with --force (another seed, say) ends with another cell; the trainings of its
    first cell used to count for the new search's configuration and seed. They are now a given cell's row,
    named by where the cell came from; and so are trainings of a search that has not finished."""
    other = zoo()["PDARTS"].to_string()
    summary = runs / "il-0" / "search" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "genotype": other}))
    (runs / "mtl-1" / "search" / "summary.json").unlink()  # running again, not finished yet
    c = compare([runs])
    by_method = {(r["method"], r["framework"]): r for r in rows(c)}
    il = by_method[("DARTS-2nd", "il")]
    assert il["seeds"] == 2 and math.isclose(il["error_digits"]["mean"], 13.0)  # seeds 1 and 2 only
    assert math.isclose(il["search_hours"], 1.5)  # the searches still count as searches: all three finished
    assert by_method[("DARTS-2nd", "mtl")]["seeds"] == 1
    # every cell here is DARTS_V2: the two searches' trainings join the given DARTS_V2's (5%), one cell's row
    (given,) = [r for r in rows(c) if r["framework"] == "-" and r["method"] != "random cell"]
    assert given["error_digits"]["n"] == 3 and given["error_digits"]["mean"] == pytest.approx((10 + 30 + 5) / 3)
    assert given["error_mnist5k"]["mean"] == pytest.approx(20.0)


def test_a_pipe_in_a_task_or_a_path_stays_in_its_markdown_cell(runs, tmp_path):
    """An image folder named a|b (a task's name is in the header) and a run directory under it: the compare and
    status tables keep one value per column."""
    task = f"imagefolder:{tmp_path / 'a|b'}"
    _training_run(tmp_path / "x|y" / "train", "DARTS_V2", task, 0.1)
    for command in ("compare", "status"):
        code, out, err = call(command, str(tmp_path / "x|y"))
        assert code == 0, err
        lines = out.splitlines()
        cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in lines if line.startswith("|")]
        assert len(cells) == 3 and len({len(c) for c in cells}) == 1, out
        assert ("a\\|b" if command == "compare" else "x\\|y") in out


def test_a_folder_with_a_configuration_saved_by_hand_is_searched_for_runs_not_taken_for_one(runs):
    """``ilnas compare .`` (and status) in a project folder that holds a saved config.yaml beside its runs
    once showed the folder as one unfinished run, and none of the runs below it."""
    (runs / "config.yaml").write_text((runs / "saved" / "config.yaml").read_text())
    code, out, err = call("compare", str(runs), "--json")
    assert code == 0 and [Path(p).name for p in json.loads(out)["unfinished"]] == ["broken"], err
    code, out, err = call("status", str(runs), "--json")
    listed = {Path(row["run"]).relative_to(runs).as_posix(): row["state"] for row in json.loads(out)}
    assert code == 0 and "saved" not in listed and "." not in listed and listed["broken"] == "not started", err
    assert len(listed) == 17 and listed["il-0/search"] == "finished", listed
    code, _, err = call("compare", str(runs / "saved"))
    assert code == 2 and err == f"ilnas: error: no ilnas runs in {runs / 'saved'}\n"


def test_nothing_to_compare_is_one_line(tmp_path):
    r = ilnas_here("compare", str(tmp_path))
    assert r.returncode == 2 and "no ilnas runs in" in r.stderr and len(r.stderr.splitlines()) == 1


def test_multiply_adds_are_whole_millions_as_papers_give_them_and_two_digits_below_ten():
    from ilnas.report.tables import in_millions

    assert [in_millions(n) for n in (5.74e8, 2e8, 1.2e7, 2.1e6, 4.6e5)] == ["574", "200", "12", "2.1", "0.46"]


def test_holm_adjusts_p_values_tested_together_step_down():
    from ilnas.recipes.compare import holm

    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> never below the one before: 0.06
    assert holm([0.01, 0.04, 0.03, None, 0.005]) == pytest.approx([0.03, 0.06, 0.06, None, 0.02])
    assert holm([0.6, 0.7]) == [1.0, 1.0] and holm([]) == [] and holm([None]) == [None]


def test_mean_std_of_one_and_of_none():
    assert mean_std([3.0]) == (3.0, 0.0, 1)
    assert mean_std([])[2] == 0


def test_paired_rows_over_the_runs_they_share_with_t_and_wilcoxon_p(runs):
    """IL and MTL share seeds 0 and 1 on digits (10 vs 20, 12 vs 30: differences -10, -18), IL and the random
    cells seeds 1 and 2 (12 vs 40, 14 vs 50: -28, -36); MTL and random one run, a given cell none: not paired.
    With two pairs, t = mean / (sd / sqrt 2) has one degree of freedom (a Cauchy law: p = 1 - 2 atan|t| / pi),
    and the exact Wilcoxon p of two same-signed differences is 2 / 4."""
    from ilnas.recipes.compare import paired

    pairs = paired(compare([runs]))
    assert [(p["a"].split(" [")[0], p["b"].split(" [")[0], p["pairs"]) for p in pairs] == [
        ("DARTS-2nd il", "DARTS-2nd mtl", 2), ("DARTS-2nd il", "random cell", 2)]
    for p, mean, t in zip(pairs, (-14.0, -32.0), (3.5, 8.0)):
        assert p["mean_diff"] == pytest.approx(mean)
        assert p["t_p"] == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-9)
        assert p["wilcoxon_p"] == pytest.approx(0.5)
    # 95 % interval of the mean difference: both pairs' differences lie 8 apart (sd 4 sqrt 2, standard error 4),
    # and Student's t with one degree of freedom is Cauchy's law, whose 0.975 quantile is tan(0.475 pi)
    for p, mean in zip(pairs, (-14.0, -32.0)):
        assert p["ci95"] == pytest.approx([mean - 4 * math.tan(0.475 * math.pi), mean + 4 * math.tan(0.475 * math.pi)])
    # Holm over the two pairs: the smaller p (IL - random) doubled, the larger kept where that is not below it
    assert pairs[1]["t_p_holm"] == pytest.approx(2 * pairs[1]["t_p"]) and pairs[0]["t_p_holm"] == pairs[0]["t_p"]
    assert pairs[0]["wilcoxon_p_holm"] == pairs[1]["wilcoxon_p_holm"] == 1.0
    code, out, err = call("compare", str(runs), "--paired")
    assert code == 0, err
    assert "| 2 | -14.00 | [-64.82, +36.82] | 0.177 | 0.500 | 0.177 | 1.000 |" in out
    assert "| random cell | 2 | -32.00 | [-82.82, +18.82] | 0.079 | 0.500 | 0.158 | 1.000 |" in out
    assert json.loads(call("compare", str(runs), "--paired", "--json")[1])["paired"][0]["pairs"] == 2
    assert call("compare", str(runs), "--paired", "--csv") == (2, "", "ilnas: error: --paired adds a second table, "
                                                               "which CSV cannot hold: use the Markdown output, "
                                                               "--latex or --json\n")


def test_rows_re_trained_alike_rank_among_the_random_cells_unpaired(runs):
    """On digits the random cells re-trained 40 and 50; IL's three cells 10, 12, 14, MTL's two 20, 30 and the given
    DARTS_V2 5 (a second training seed's 7: one cell, mean 6). None is beaten by a random cell, so U = 0, whose exact
    two-sided p is 2 / C(n + 2, 2): 2 / 10, 2 / 6 and 2 / 3; Holm: 0.6, then 0.667 twice. IL's mnist5k trainings
    have no random cells to rank among, and a recipe of their own leaves the random cells' rows out."""
    from ilnas.recipes.compare import against_random

    _training_run(runs / "zoo-seed-1", "DARTS_V2", "digits", 0.07, seed=1)
    _training_run(runs / "il-0" / "digits-x4", str(runs / "il-0" / "search"), "digits", 0.01,
                  extra=("train.epochs=40",))
    ranked = {r["row"].split(" [")[0]: r for r in against_random(compare([runs]))}
    assert list(ranked) == ["DARTS-2nd il", "DARTS-2nd mtl", "DARTS_V2"]
    for row, cells, diff, p, holm in (("DARTS-2nd il", 3, -33, 2 / 10, 0.6), ("DARTS-2nd mtl", 2, -20, 2 / 6, 2 / 3),
                                      ("DARTS_V2", 1, -39, 2 / 3, 2 / 3)):
        r = ranked[row]
        assert (r["task"], r["cells"], r["random_cells"], r["better"]) == ("digits", cells, 2, 0.0)
        assert r["mean_diff"] == pytest.approx(diff) and r["u_p"] == pytest.approx(p) and r["u_p_holm"] == \
            pytest.approx(holm)
    code, out, err = call("compare", str(runs), "--paired")
    assert code == 0 and "| DARTS_V2 | digits | 1 | 2 | -39.00 | 0.0 of 2 | 0.667 | 0.667 |" in out, err
    assert json.loads(call("compare", str(runs), "--paired", "--json")[1])["against_random"][0]["cells"] == 3
    assert "% Against the random cells" in call("compare", str(runs), "--paired", "--latex")[1]
    assert "Against the random cells" not in call("compare", str(runs))[1]  # only with --paired


def test_cells_of_another_space_rank_among_random_cells_of_that_space(runs):
    """Random cells drawn from another set of operations (random:N:OPS) make a row of their own; a search of that
    space (space.ops) ranks among them and not among DARTS's random cells, and the rows of DARTS's space as before."""
    from ilnas.recipes.compare import against_random

    ops = "none,skip_connect,sep_conv_7x7"
    for seed, err in ((1, 0.01), (2, 0.03)):
        _training_run(runs / f"random7-{seed}", f"random:{seed}:{ops}", "digits", err)
    _search_run(runs / "il7-0" / "search", "il", 0, hours=1.0, extra=(f"space.ops=[{ops}]",))
    _training_run(runs / "il7-0" / "digits", str(runs / "il7-0" / "search"), "digits", 0.02)
    c = compare([runs])
    drawn = [r for r in rows(c) if r["method"] == "random cell"]
    assert sorted((r["seeds"], r["error_digits"]["mean"]) for r in drawn) == [(2, pytest.approx(2.0)),
                                                                             (2, pytest.approx(45.0))]
    ranked = [(r["row"].split(" [")[0], r["random_cells"], r["mean_diff"]) for r in against_random(c)]
    assert [(row, n) for row, n, _ in ranked] == [("DARTS-2nd il", 2), ("DARTS-2nd mtl", 2), ("DARTS_V2", 2),
                                                  ("DARTS-2nd il", 2)]
    assert ranked[0][2] == pytest.approx(-33) and ranked[-1][2] == pytest.approx(0.0)  # 2 among 1 and 3
    darts, own = "none,max_pool_3x3,avg_pool_3x3,skip_connect,sep_conv_3x3,sep_conv_5x5,dil_conv_3x3,dil_conv_5x5", ops
    assert [(r["row"], r["random"]) for r in against_random(c)][::3] == [
        (f"DARTS-2nd il [space.ops={darts}]", f"random cell [space.ops={darts}]"),
        (f"DARTS-2nd il [space.ops={own}]", f"random cell [space.ops={own}]")]


def _give_cell(run: Path, genotype: str) -> None:
    """Make ``run`` a search or training of ``genotype``: its summary's cell, or the one its config trains."""
    if (run / "summary.json").is_file():
        (run / "summary.json").write_text(json.dumps({**json.loads((run / "summary.json").read_text()),
                                                      "genotype": genotype}))
    else:
        config = yaml.safe_load((run / "config.yaml").read_text())
        (run / "config.yaml").write_text(yaml.safe_dump({**config, "genotype": genotype}))


def test_a_cells_trainings_at_several_training_seeds_pair_as_one_unit_their_mean(tmp_path):
    """Each of two IL and two MTL cells re-trained at training seeds 0 and 1: IL 10, 12 and 20, 22, MTL 11, 15 and
    24, 30. The seeds re-train one cell, so each cell is one unit, its mean (IL 11, 21; MTL 13, 27): differences -2
    and -6, so t = -4 / (2 sqrt 2 / sqrt 2) = -2 with one degree of freedom (p = 1 - 2 atan 2 / pi). Paired run by
    run, the four differences would count each cell twice."""
    from ilnas.recipes.compare import paired

    root = tmp_path / "runs"
    for framework, errors in (("il", ((0.10, 0.12), (0.20, 0.22))), ("mtl", ((0.11, 0.15), (0.24, 0.30)))):
        for seed, by_training_seed in enumerate(errors):
            _search_run(root / f"{framework}-{seed}" / "search", framework, seed, hours=1.0)
            for training_seed, error in enumerate(by_training_seed):
                _training_run(root / f"{framework}-{seed}" / f"digits-{training_seed}",
                              str(root / f"{framework}-{seed}" / "search"), "digits", error, seed=training_seed)
    (pair,) = paired(compare([root]))
    assert pair["pairs"] == 2 and pair["mean_diff"] == pytest.approx(-4.0)
    assert pair["t_p"] == pytest.approx(1 - 2 * math.atan(2) / math.pi, rel=1e-9)


def test_rows_say_how_alike_their_seeds_cells_are_and_pairs_how_alike_their_cells_of_one_seed(runs):
    """IL's seeds find DARTS_V2, DARTS_V1 (11 of V2's 16 choices: tests/test_genotype.py) and V2 with each node's
    edges listed the other way round (all 16): (11 + 11 + 16) / 3 pairs / 16 = 0.79 alike. MTL's two seeds both
    find V2; the random cells are V2 (seed 1) and V1 (seed 2); a given cell is one cell: no agreement to give."""
    from itertools import combinations

    from ilnas.recipes.compare import paired
    from ilnas.space.genotype import shared_choices

    v1, v2 = zoo()["DARTS_V1"], zoo()["DARTS_V2"]
    for seed, cell in ((1, v1), (2, listed_the_other_way(v2))):
        for run in ("search", "digits", "mnist5k"):  # a training counts for its search only with the search's cell
            _give_cell(runs / f"il-{seed}" / run, cell.to_string())
    _give_cell(runs / "random-2", v1.to_string())
    c = compare([runs])
    agreement = {(r["method"], r["framework"]): r["cell_agreement"] for r in rows(c)}
    assert agreement[("DARTS-2nd", "il")] == pytest.approx(38 / 48) and agreement[("DARTS-2nd", "mtl")] == 1.0
    assert agreement[("random cell", "-")] == pytest.approx(11 / 16) and math.isnan(agreement[("DARTS_V2", "-")])
    shared = {(p["a"], p["b"]): p["cells_shared"] for p in paired(c)}
    # IL and MTL: seed 0 V2 and V2, seed 1 V1 and V2; IL and random: seed 1 V1 and V2, seed 2 V2 (swapped) and V1
    assert shared == {("DARTS-2nd il", "DARTS-2nd mtl"): pytest.approx((16 + 11) / 32),
                      ("DARTS-2nd il", "random cell"): pytest.approx(11 / 16)}
    code, out, err = call("compare", str(runs), "--paired")
    assert code == 0, err
    assert "| search (h) | cell agreement | seeds |" in out and "| 1.500 | 0.79 | 3 |" in out and "| - | - | 1 |" in out
    assert "| 2 | -14.00 | [-64.82, +36.82] | 0.177 | 0.500 | 0.177 | 1.000 | 0.84 |" in out
    assert "| random cell | 2 | -32.00 | [-82.82, +18.82] | 0.079 | 0.500 | 0.158 | 1.000 | 0.69 |" in out
    as_json = json.loads(call("compare", str(runs), "--paired", "--json")[1])
    assert [r["cell_agreement"] for r in as_json["rows"] if r["framework"] == "mtl"] == [1.0]
    assert [r["cell_agreement"] for r in as_json["rows"] if r["method"] == "DARTS_V2"] == [None]
    # a second search of seed 0 (a repeat on a GPU, say) that found PDARTS: one more cell, not one in place of the other
    shutil.copytree(runs / "il-0" / "search", runs / "il-0-again")
    _give_cell(runs / "il-0-again", zoo()["PDARTS"].to_string())
    found = [v2, zoo()["PDARTS"], v1, listed_the_other_way(v2)]
    c = compare([runs])
    (il,) = [r for r in rows(c) if r["framework"] == "il"]
    assert il["cell_agreement"] == pytest.approx(sum(shared_choices(x, y) for x, y in combinations(found, 2)) / 6 / 16)
    seed_0 = (16 + shared_choices(zoo()["PDARTS"], v2)) / 32  # IL's V2 and PDARTS against MTL's V2
    assert paired(c)[0]["cells_shared"] == pytest.approx((seed_0 + 11 / 16) / 2)
    _give_cell(runs / "mtl-1" / "search", "Genotype(normal=[('sep_conv_3x3', 0)]")  # damaged: refused, named
    code, out, err = call("compare", str(runs))
    assert code == 2 and err.startswith(f"ilnas: error: {runs / 'mtl-1' / 'search' / 'summary.json'}: its genotype "
                                        f"cannot be read (malformed genotype") and err.count("\n") == 1, err


def _study_analysis():
    import importlib.util

    spec = importlib.util.spec_from_file_location("analyze", Path(__file__).parents[1] / "study" / "analyze.py")
    analyze = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(analyze)
    return analyze


def test_the_study_analysis_tabulates_and_pairs_its_sweeps_arms(tmp_path, capsys):
    """study/analyze.py on a sweep directory as `ilnas sweep` leaves it: two arms, three seeds, one task.
    IL 10, 12, 15 and MTL 11, 14, 19 (differences -1, -2, -4): t^2 = 7 with two degrees of freedom, whose
    two-sided p is 1 - |t| / sqrt(t^2 + 2); the exact Wilcoxon p of three same-signed differences is 2 / 8."""
    import numpy as np

    from ilnas.space.genotype import random_genotype
    from ilnas.space.layout import PARAMETER_FREE

    analyze = _study_analysis()
    cells, v2 = [], zoo()["DARTS_V2"]
    # MTL's cells list each node's two edges the other way round: the same cells (overlap 1.00)
    cell = {"il": v2, "mtl": listed_the_other_way(v2)}
    for framework, errors in (("il", (10, 12, 15)), ("mtl", (11, 14, 19))):
        for seed, error in enumerate(errors):
            name = f"{framework}-{seed}"
            cells.append({"cell": name, "labels": {"search.seed": seed, "framework": framework}})
            (tmp_path / name / "train-digits").mkdir(parents=True)
            (tmp_path / name / "train-digits" / "result.json").write_text(
                json.dumps({"task": "digits", "final_test_error": error / 100}))
            (tmp_path / name / "search").mkdir()
            (tmp_path / name / "search" / "summary.json").write_text(json.dumps({"search_hours": 0.1 * (seed + 1)}))
            (tmp_path / name / "search" / "genotype.json").write_text(json.dumps(cell[framework].to_dict()))
    (tmp_path / "sweep.json").write_text(json.dumps({"cells": cells}))
    arms = analyze.load(tmp_path)
    assert analyze.table(arms)[2:] == ["| framework=il | 12.33 ± 2.52 | 12.0 | 3 |",
                                       "| framework=mtl | 14.67 ± 4.04 | 12.0 | 3 |"]
    # as written while the sweep runs (one cell pending): the trainings finished so far, and a line that says so
    running = [{**c, "runs": {"train-digits": "pending" if c["cell"] == "mtl-2" else "finished"}} for c in cells]
    (tmp_path / "sweep.json").write_text(json.dumps({"final": False, "cells": running}))
    arms = analyze.load(tmp_path)
    assert capsys.readouterr().err == f"{tmp_path}: the sweep has not ended (5 of 6 cells finished); tables of the " \
                                      f"trainings finished so far\n"
    assert analyze.table(arms)[2:] == ["| framework=il | 12.33 ± 2.52 | 12.0 | 3 |",
                                       "| framework=mtl | 14.67 ± 4.04 | 12.0 | 3 |"]
    t = math.sqrt(7)
    assert analyze.paired(arms)[2:] == [f"| framework=il | framework=mtl | 3 | -2.33 | {1 - t / 3:.3f} | 0.250 |"]
    assert analyze.overlap(arms["framework=il"], arms)[2:] == ["| framework=il | 3 | 1.00 |",
                                                              "| framework=mtl | 3 | 1.00 |"]
    # a second training seed of IL seed 0's cell (train.seeds): one more run, where it used to replace the first
    (tmp_path / "il-0" / "train-digits-seed-1").mkdir()
    (tmp_path / "il-0" / "train-digits-seed-1" / "result.json").write_text(
        json.dumps({"task": "digits", "final_test_error": 0.17}))
    arms = analyze.load(tmp_path)
    assert analyze.table(arms)[2] == "| framework=il | 13.50 ± 3.11 | 12.0 | 3 |"
    assert analyze.paired(arms)[2].startswith("| framework=il | framework=mtl | 3 | -2.33 |")
    # the main IL arm against an ablation sweep's arms, on that sweep's seeds (here MTL with seeds 0 and 1 only):
    # IL's runs of those seeds are 10, 12 and the second training seed's 17
    mtl = {k: v for k, v in arms["framework=mtl"].items() if k[0] != 2 and k[-1] != 2}
    lines = analyze.against(arms["framework=il"], {"framework=mtl": mtl})
    assert lines[2] == "| main IL | 13.00 ± 3.61 | 12.0 | 2 |" and lines[6] == "| main IL | 2 | 1.00 | 0.25 | - | - |"
    assert analyze.against(arms["framework=il"], arms)[-1].startswith("| main IL | framework=mtl | 3 | -2.33 |")
    # the cells: IL seed 0's final normal weights uniform (entropy log 8, strongest op 1/8); a random cell, the
    # control, read from its training's config; DARTS_V2's normal cell holds 2 skip-connects on its 8 edges
    np.savez(tmp_path / "il-0" / "search" / "arch_history.npz", **{"p0/alphas_normal": np.zeros((2, 14, 8))})
    random_cell = random_genotype(0)
    (tmp_path / "random-0" / "train-digits").mkdir(parents=True)
    (tmp_path / "random-0" / "train-digits" / "config.yaml").write_text(
        yaml.safe_dump({"genotype": random_cell.to_string()}))
    (tmp_path / "random-0" / "train-digits" / "result.json").write_text(
        json.dumps({"task": "digits", "final_test_error": 0.2}))
    cells.append({"cell": "random-0", "labels": {"search.seed": 0, "framework": "random"}})
    (tmp_path / "sweep.json").write_text(json.dumps({"cells": cells}))
    free = sum(op in PARAMETER_FREE for op, _ in random_cell.normal) / 8
    assert analyze.cells(analyze.load(tmp_path))[2:] == [
        f"| framework=il | 3 | 1.00 | 0.25 | {math.log(8):.5f} | 0.1250 |", "| framework=mtl | 3 | 1.00 | 0.25 | - | - |",
        f"| framework=random | 1 | - | {free:.2f} | - | - |"]

def test_the_study_analysis_makes_an_arm_of_each_re_training_recipe_and_correlates_size_with_error(tmp_path):
    """A sweep that re-trains every cell by two recipes (train-<task>-<recipe>/): one arm per framework and recipe,
    pairs only between arms that differ in one label, and per recipe Spearman's rho of parameters against error.
    Parameters 100..600 against errors 10, 12, 15, 11, 14, 19 (x1): rank differences 0, 1, 2, 2, 1, 0, so
    rho = 1 - 6 * 10 / (6 * 35) = 0.71; against errors falling with the parameters (x4): -1."""
    from scipy.stats import spearmanr

    analyze = _study_analysis()
    errors = {"x1": {"il": (10, 12, 15), "mtl": (11, 14, 19)}, "x4": {"il": (9, 8, 7), "mtl": (6, 5, 3)}}
    cells = []
    for f, framework in enumerate(("il", "mtl")):
        for seed in range(3):
            name = f"{framework}-{seed}"
            cells.append({"cell": name, "labels": {"search.seed": seed, "framework": framework}})
            for recipe, error in errors.items():
                run = tmp_path / name / f"train-digits-{recipe}"
                run.mkdir(parents=True)
                result = {"task": "digits", "final_test_error": error[framework][seed] / 100,
                          "params": 100 * (3 * f + seed + 1)}
                run.joinpath("result.json").write_text(json.dumps(result))
    (tmp_path / "sweep.json").write_text(json.dumps({"cells": cells}))
    arms = analyze.load(tmp_path)
    assert list(arms) == ["framework=il, recipe=x1", "framework=mtl, recipe=x1", "framework=il, recipe=x4",
                          "framework=mtl, recipe=x4"]  # the recipes in their order, x1 before x4 (and x16)
    il1, mtl1, il4, mtl4 = arms
    assert [line.split(" | ")[:2] for line in analyze.paired(arms)[2:]] == [  # not il at x1 against mtl at x4
        [f"| {il1}", mtl1], [f"| {il1}", il4], [f"| {mtl1}", mtl4], [f"| {il4}", mtl4]]
    assert analyze.sizes(arms)[2:] == ["| x1 | digits | 6 | +0.71 | 0.111 |", "| x4 | digits | 6 | -1.00 | 0.000 |"]
    # IL seed 0's cell re-trained at a second training seed (x4, error 3): still one cell, with its mean error 6
    run = tmp_path / "il-0" / "train-digits-x4-seed-1"
    run.mkdir()
    run.joinpath("result.json").write_text(json.dumps({"task": "digits", "final_test_error": 0.03, "params": 100}))
    rho, p = spearmanr([100, 200, 300, 400, 500, 600], [6, 8, 7, 6, 5, 3])
    assert analyze.sizes(analyze.load(tmp_path))[-1] == f"| x4 | digits | 6 | {rho:+.2f} | {p:.3f} |"
    assert analyze._training("train-imagefolder-pets-x16-seed-2", "imagefolder:/data/pets/") == ("x16", "2")
    assert analyze._training("train-digits-seed-1", "digits") == ("", "1")
    assert sorted(["x16", "x4", "long", "x1"], key=analyze._recipe_order) == ["x1", "x4", "x16", "long"]


def test_the_study_analysis_parts_an_arms_spread_into_its_cells_and_the_training_seeds():
    """Two cells re-trained at three training seeds each, 1, 2, 3 and 4, 5, 6: within a cell a variance of 1 (MSW),
    the means 2 and 5 (variance 4.5, MSB 3 * 4.5), so the intraclass correlation is (13.5 - 1) / (13.5 + 2) = 0.81.
    An unbalanced arm (one cell at one seed) gets no row."""
    analyze = _study_analysis()
    balanced = {(cell, str(s), "digits"): 1.0 + 3 * cell + s for cell in (0, 1) for s in range(3)}
    unbalanced = {**balanced, (2, "0", "digits"): 9.0}
    assert analyze.noise({"il": balanced, "mtl": unbalanced})[2:] == [
        f"| il | digits | 2 x 3 | 1.00 | {math.sqrt(4.5):.2f} | 0.81 |"]
    # over every arm's cells: il's two and mtl's cells 0 and 1 (the same errors), means 2, 5, 2, 5 (variance 3, MSB 9)
    twice = {k: v for k, v in unbalanced.items() if k[0] != 2}
    assert analyze.noise({"il": balanced, "mtl": twice})[-1] == "| every arm | digits | 4 x 3 | 1.00 | 1.73 | 0.73 |"


def _trained_cells(sweep: Path, errors: dict[str, tuple], epochs: int = 16, framework: str | None = None) -> None:
    """A sweep directory of given cells, each re-trained on digits at training seeds 0, 1, ... with these errors (%):
    each cell an arm of its own, or with ``framework`` one arm whose cells are its seeds 0, 1, ..."""
    from ilnas.space.genotype import random_genotype

    cells = []
    for seed, (source, seeds) in enumerate(errors.items()):
        name = Path(source).parent.name if "/" in source else source.replace(":", "-")  # a search's cell: its run's
        cells.append({"cell": name, "labels": {"search.seed": seed, "framework": framework} if framework else
                      {"cell": name}})
        for training_seed, error in enumerate(seeds):
            run = sweep / name / f"train-digits-seed-{training_seed}"
            run.mkdir(parents=True)
            run.joinpath("result.json").write_text(json.dumps({"task": "digits", "final_test_error": error / 100}))
            run.joinpath("provenance.json").write_text(json.dumps({"genotype_source": source}))
            genotype = zoo().get(source) or random_genotype(int(source[7:]) if source.startswith("random:") else 9)
            run.joinpath("config.yaml").write_text(yaml.safe_dump(
                {"genotype": genotype.to_string(), "train": {"seed": training_seed, "epochs": epochs}}))
    (sweep / "sweep.json").write_text(json.dumps({"cells": cells}))


def test_the_study_analysis_ranks_the_published_cells_among_the_random_ones(tmp_path):
    """The positive control: DARTS_V2 and PDARTS re-trained at two training seeds (means 2 and 3) beside four random
    cells (means 4, 5, 6, 7). No random cell is better than either; U = 0 of 2 x 4, and of the 15 equally likely
    ways to place two cells among six, one puts both lowest: two-sided p = 2 / 15. Another sweep's arm of two cells
    trained alike (means 4.5 and 6.5) falls among them: 1 and 3 random cells better, U = 4, the centre of its
    distribution (p 1); the same arm re-trained by another recipe is not ranked."""
    analyze = _study_analysis()
    _trained_cells(tmp_path / "control", {"DARTS_V2": (1, 3), "PDARTS": (3, 3),
                                          **{f"random:{i}": (4 + i, 4 + i) for i in range(4)}})
    searched = {"/runs/il-0/search": (4, 5), "/runs/il-1/search": (6, 7)}
    _trained_cells(tmp_path / "searched", searched, framework="il")
    _trained_cells(tmp_path / "longer", searched, epochs=64, framework="il")
    arms = analyze.load(tmp_path / "control")
    others = {f"{sweep}: {name}": arm for sweep in ("searched", "longer")
              for name, arm in analyze.load(tmp_path / sweep).items()}
    assert list(analyze.same_recipe(arms, others)) == ["searched: framework=il"]
    lines = analyze.control({**arms, **analyze.same_recipe(arms, others)})
    assert lines[2:] == [  # one task: no column of the mean over tasks
        "| DARTS_V2 | 1 | 2.00 | 0 of 4 | - |", "| PDARTS | 1 | 3.00 | 0 of 4 | - |",
        f"| published cells | 2 | 2.50 ± 0.71 | 0.0 of 4 | {2 / 15:.3f} |",
        "| searched: framework=il | 2 | 5.50 ± 1.41 | 2.0 of 4 | 1.000 |",
        "| random cells | 4 | 5.50 ± 1.29 (4.00-7.00) | - | - |"]
    fig = analyze.control_figure({**arms, **analyze.same_recipe(arms, others)}, "control")
    ax = fig.axes[0]
    assert [len(c.get_offsets()) for c in ax.collections] == [2, 2, 4]  # a dot per cell: published, il, random
    assert [t.get_text() for t in ax.get_xticklabels()] == ["published cells", "framework=il", "random cells"]
    two_random = {name: arm for name, arm in arms.items() if name not in ("cell=random-2", "cell=random-3")}
    assert analyze.control(two_random) == []  # fewer than three random cells: none to rank among


def test_the_figure_draws_one_dot_per_training_run_beside_each_rows_mean(runs, tmp_path):
    from ilnas.recipes.compare import _label
    from ilnas.report.figures import comparison_figure

    c = compare([runs])
    drawn = [(_label(c, g), {t: [100 * r["final_test_error"] for r in g.trainings.get(t, [])] for t in c.tasks})
             for g in c.groups]
    fig = comparison_figure(drawn, c.tasks)
    from matplotlib.collections import PathCollection

    def dots(ax) -> list[int]:
        return [len(col.get_offsets()) for col in ax.collections if isinstance(col, PathCollection)]

    def means(ax) -> list[float]:
        return [float(line.get_ydata()[0]) for line in ax.lines if line.get_marker() == "o"]

    digits, mnist = fig.axes
    assert dots(digits) == [3, 2, 2, 1] and dots(mnist) == [3, 0, 0, 0]  # a dot per run
    assert means(digits) == pytest.approx([12.0, 25.0, 45.0, 5.0]) and means(mnist) == pytest.approx([24.0])
    assert [t.get_text() for t in digits.get_xticklabels()][-2:] == ["random cell", "DARTS_V2"]
    assert digits.get_xticklabels()[0].get_text() == "DARTS-2nd il"
    for name, magic in (("errors.png", b"\x89PNG"), ("errors.svg", b"<?xml"), ("errors.pdf", b"%PDF")):
        code, out, err = call("compare", str(runs), "--figure", str(tmp_path / name))
        assert code == 0 and "| DARTS-2nd | il |" in out and (tmp_path / name).read_bytes().startswith(magic), err
    assert call("compare", str(runs), "--figure", str(tmp_path / "errors.jpg")) == (
        2, "", f"ilnas: error: --figure {tmp_path / 'errors.jpg'}: the file must end in .png, .svg or .pdf\n")
    code, _, err = call("compare", str(runs), "--figure", str(tmp_path / "missing" / "errors.png"))
    assert code == 2 and err.startswith("ilnas: error: cannot write --figure ") and "No such file" in err


@pytest.mark.parametrize("damage, file, reason", [
    ("missing", "sweep.json", "FileNotFoundError"),
    ("text", "sweep.json", "JSONDecodeError"),
    ("no error", "il-0/train-digits/result.json", "KeyError: 'final_test_error'"),
    ("cut", "il-0/search/arch_history.npz", "BadZipFile"),
    ("no hours", "il-0/search/summary.json", "KeyError: 'search_hours'")])
def test_the_study_analysis_refuses_a_damaged_sweep_record_in_one_line_naming_it(tmp_path, monkeypatch, capsys,
                                                                                damage, file, reason):
    """A sweep record missing, not JSON, lacking a field or an npz archive cut short: 'analyze: error: <file> cannot
    be read ...' and exit code 2, not a traceback."""
    analyze = _study_analysis()
    run = tmp_path / "il-0"
    (run / "train-digits").mkdir(parents=True)
    (run / "search").mkdir()
    result = {"task": "digits", "final_test_error": 0.1}
    (run / "train-digits" / "result.json").write_text(json.dumps(result))
    (run / "search" / "summary.json").write_text(json.dumps({"search_hours": 0.1}))
    (run / "search" / "genotype.json").write_text(json.dumps(zoo()["DARTS_V2"].to_dict()))
    (tmp_path / "sweep.json").write_text(json.dumps({"cells": [{"cell": "il-0", "labels": {"framework": "il"}}]}))
    monkeypatch.setattr(sys, "argv", ["analyze.py", str(tmp_path)])
    analyze.main()  # intact: it reads
    capsys.readouterr()
    target = tmp_path / file
    if damage == "missing":
        target.unlink()
    elif damage == "text":
        target.write_text("not what ilnas writes")
    elif damage == "cut":  # the start of a zip archive, cut short
        target.write_bytes(b"PK\x03\x04" + bytes(20))
    else:
        target.write_text(json.dumps({"task": "digits"} if damage == "no error" else {}))
    with pytest.raises(SystemExit) as exit_:
        analyze.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"analyze: error: {target} cannot be read as ilnas writes it (")
    assert reason in err and err.count("\n") == 1, err
