"""``python -m ilnas ARGS`` for torchrun, except that rank FAIL_RANK's search fails in its step FAIL_STEP: an
error of one rank alone (its device lost, its disk full) that the other ranks only see as a gone peer."""
import os
import sys

from ilnas import cli
from ilnas.errors import RunFailed
from ilnas.recipes import search

steps = [0]
step = search.search_step


def failing_step(*args, **kwargs):
    steps[0] += 1
    if os.environ["RANK"] == os.environ["FAIL_RANK"] and steps[0] == int(os.environ["FAIL_STEP"]):
        raise RunFailed(f"rank {os.environ['RANK']} cannot go on (a fault made for this test)")
    return step(*args, **kwargs)


search.search_step = failing_step
sys.exit(cli.main(sys.argv[1:]))
