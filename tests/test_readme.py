"""The READMEs as printed: every ilnas command line of their shell blocks parses, names presets, settings and
published cells that exist, and resolves to a configuration; the README's sweep spec loads into the cells its
text describes, and so do the study's specs. A renamed flag, preset or setting fails here rather than in a
reader's terminal."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from helpers import call
from ilnas.cli import _parser
from ilnas.config import resolve
from ilnas.recipes.sweep import load_spec
from ilnas.space.genotype import zoo

REPO = Path(__file__).parents[1]
README = (REPO / "README.md").read_text()
STUDY = sorted((REPO / "study").glob("*.yaml"))
KINDS = {"search": "search", "train": "eval", "describe": "eval", "config": None}
DEFAULT_PRESETS = {"search": "demo", "train": "eval-cifar10", "describe": "eval-cifar10", "config": "demo"}


def _command_lines() -> list[str]:
    """The ilnas arguments of each command in the READMEs' bash blocks (``a && ilnas b`` gives ``b``; torchrun's
    own options dropped)."""
    commands = []
    text = README + (REPO / "study" / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a continued line as one
            words = shlex.split(line, comments=True)
            while words:
                part, words = (words[:words.index("&&")], words[words.index("&&") + 1:]) if "&&" in words \
                    else (words, [])
                if part[:1] == ["torchrun"]:
                    part = part[part.index("-m") + 1:]
                if part[:1] == ["ilnas"]:
                    commands.append(shlex.join(part[1:]))
    return commands


COMMANDS = _command_lines()


def test_the_readme_shows_the_commands_of_every_kind_it_describes():
    assert len(COMMANDS) >= 20
    assert {shlex.split(c)[0] for c in COMMANDS} >= {"search", "train", "config", "presets", "plot", "compare",
                                                      "status", "sweep", "describe", "evaluate", "export"}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_command_parses_and_resolves(command):
    try:
        args = _parser().parse_args(shlex.split(command))
    except SystemExit:
        pytest.fail(f"the README's `ilnas {command}` is refused by the parser")
    kind = args.command
    if getattr(args, "genotype", None) and "/" not in args.genotype:  # a published cell, by name
        assert args.genotype in zoo(), f"`ilnas {command}`: no published cell {args.genotype}"
    if kind not in KINDS or getattr(args, "resume", False) or getattr(args, "config", None):
        return
    preset = args.preset if args.preset is not None else getattr(args, "preset_option", None)
    cfg = resolve(preset or DEFAULT_PRESETS[kind], None, args.overrides, KINDS[kind])
    for override in args.overrides:  # each --set landed where the command says
        key, value = override.split("=", 1)
        section, name = key.split(".", 1)
        got = getattr(getattr(cfg, section), name)
        assert (list(got) if isinstance(got, tuple) else got) == yaml.safe_load(value) or str(got) == value, command


def test_the_readme_sweep_spec_makes_the_cells_its_text_names(tmp_path):
    spec = yaml.safe_load(re.search(r"```yaml\n(out: .*?)```", README, re.S).group(1))
    spec["out"] = str(tmp_path / "study")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))  # the axes in order
    sweep = load_spec(tmp_path / "study.yaml")
    assert len(sweep.cells) == 5 * 3 and sweep.parallel == 2 and sweep.executor == "local"
    assert "seed-1_framework-il" in [cell.name for cell in sweep.cells]  # the name the text's progress line shows
    assert {tuple(run.out.name for run in cell.runs) for cell in sweep.cells} == {
        ("search", "train-digits", "train-mnist5k")}
    code, out, err = call("sweep", str(tmp_path / "study.yaml"), "--dry-run")
    assert code == 0 and out.startswith(f"15 cells (45 runs, 0 finished) in {tmp_path / 'study'}, 2 at a time "
                                        "(local)"), err


@pytest.mark.parametrize("spec", STUDY, ids=[p.name for p in STUDY])
def test_the_study_specs_load_or_name_the_sweep_whose_cells_they_re_train(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # their genotype=runs/study/long/... paths are relative to where they are run
    code, out, err = call("sweep", str(spec), "--dry-run")
    if "runs/study/long/" in spec.read_text():  # seeds, retrain, seeds-x16: they need long.yaml's searches
        assert code == 2 and "genotype runs/study/long/seed-0_framework-il/search: no such file or run directory" \
            in err, err
    else:
        assert code == 0 and re.match(r"\d+ cells \(\d+ runs, 0 finished\) in ", out), err
