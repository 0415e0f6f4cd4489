"""Shared fixtures: a finished search run and a finished training run made through the CLI (session-wide)."""
from __future__ import annotations

import os
from pathlib import Path

# The suite runs in two worker processes (pytest -n 2) on two cores: one OpenMP thread each, for them and the
# runs they start. More torch threads than cores make a search step many times slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from helpers import SEARCH3, TRAIN_ARGS, call, with_report


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A finished three-epoch demo search (IL, K=2, M=2, two steps an epoch) on a tiny supernet, via the CLI,
    with its end-of-run report."""
    out = tmp_path_factory.mktemp("runs") / "demo"
    code, stdout, err = call(*with_report(SEARCH3), "--out", str(out))  # in this process: no torch start-up
    assert code == 0, err
    assert stdout.splitlines()[-4].startswith("genotype = Genotype(") and stdout.splitlines()[-3:] == [
        f"report: {out / 'report.html'}", f"re-train it on mnist5k: ilnas train --genotype {out} --preset eval-digits",
        f"re-train it on digits: ilnas train --genotype {out} --preset eval-digits --set 'data.tasks=[digits]'"]
    return out


@pytest.fixture(scope="session")
def finished_training(tmp_path_factory) -> Path:
    """A finished three-epoch re-training of DARTS_V2 on the digits (3 cells, C=4), run through the CLI."""
    out = tmp_path_factory.mktemp("runs") / "train"
    code, stdout, err = call(*with_report(TRAIN_ARGS), "--out", str(out))
    assert code == 0 and stdout.splitlines()[-1] == f"report: {out / 'report.html'}", err
    return out
