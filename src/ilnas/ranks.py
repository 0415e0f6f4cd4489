"""Who this process is in a torchrun job, from the environment alone: no torch, so that commands that only
read files (status, compare) start in a fraction of a second, and every command speaks once, from rank 0."""
from __future__ import annotations

import os
import re

from ilnas.errors import IlnasError


def launch() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun describes them in the environment ((0, 1, 0) for a plain
    process), refused in one line where they describe no rank of a job that can start: values left over
    in a shell or set by hand, which gave tracebacks or an empty batch slice."""
    found = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        found[name] = env_count(name, default)
        if found[name] is None:
            raise IlnasError(f"{name}={os.environ[name][:40]!r} is not a rank index or count; torchrun sets it "
                             f"(unset it to run one process)")
    rank, world, local = found["RANK"], found["WORLD_SIZE"], found["LOCAL_RANK"]
    if not 0 <= rank < world:
        raise IlnasError(f"RANK={rank} with WORLD_SIZE={world} is no rank of the job; torchrun sets both (unset "
                         f"them to run one process)")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not os.environ.get(name)]
    if missing:
        raise IlnasError(f"WORLD_SIZE={world} but {missing[0]} is not set: start the ranks with torchrun, which "
                         f"sets both, or unset WORLD_SIZE to run one process")
    return rank, world, local


def env_count(name: str, default: int) -> int | None:
    """The environment's ``name`` as a non-negative integer (``default`` where unset); None where it is none."""
    text = os.environ.get(name)
    return default if text is None else int(text) if re.fullmatch(r"\d{1,6}", text) else None


def world_size() -> int:
    """The number of ranks torchrun started (1 for a plain process), known before any group exists."""
    return launch()[1]


def is_main_rank() -> bool:
    """Rank 0 of what torchrun started (a plain process is): the one that speaks and writes. Never raises
    (it decides who reports an error): a RANK that is no number counts as rank 0."""
    return env_count("RANK", 0) in (0, None)
