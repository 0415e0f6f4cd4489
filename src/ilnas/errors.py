"""The exception types a user sees: the CLI prints each as one line and exits with its ``exit_code``; and how a
one-line error quotes another failure."""
from __future__ import annotations

import numbers
import re
import sys
from typing import Any


class IlnasError(Exception):
    """A bad input (configuration, genotype, data, run directory) described in one line; nothing was written."""

    exit_code = 2


class NotRegistered(IlnasError):
    """A name of code of one's own (an operation, a task, a network style) that no module imported by this process
    has registered: the plugin that does is not in ILNAS_PLUGINS here, or the name is mistyped. A record naming
    one is no damaged record: whoever reads it passes this on with the record's name in front."""


class RunFailed(IlnasError):
    """A run stopped part-way (divergence, a failed write); its last good checkpoint is kept."""

    exit_code = 3


class Stopped(Exception):
    """A run asked to stop by a signal (a cluster's preemption or time-limit notice) that wrote a checkpoint
    between two steps and can be continued; the CLI exits with 128 + the signal's number, as the shell does."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def first_line(e: BaseException, width: int | None = None) -> str:
    """What a one-line error quotes of a failure: the first line of its message (its type's name where it has
    none), cut to ``width`` characters."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:width]


def fault(e: BaseException, width: int = 160) -> str:
    """A failure of one's own code (a plugin's) as a one-line error quotes it: its type and first line."""
    return f"{type(e).__name__}: {first_line(e, width)}" if str(e).strip() else type(e).__name__


def allocation_failure(e: BaseException) -> str | None:
    """"out of [device] memory (N GB at once)" where ``e`` is a failed allocation (torch.OutOfMemoryError, or
    the CPU allocator's plain RuntimeError), else None."""
    torch = sys.modules.get("torch")  # not loaded: no allocation of torch's failed
    device = torch is not None and isinstance(e, torch.OutOfMemoryError)
    if not device and "DefaultCPUAllocator: can't allocate memory" not in str(e):
        return None
    found = re.search(r"tried to allocate (\d+) bytes|tried to allocate ([\d.]+ [KMGT]iB)", str(e), re.IGNORECASE)
    size = "" if found is None else (f" ({int(found.group(1)) / 1e9:.1f} GB at once)" if found.group(1) else
                                     f" ({found.group(2)} at once)")
    return f"out of {'device memory' if device else 'memory'}{size}"


def flag(name: str, value: Any, none: bool = False) -> bool | None:
    """A True/False argument of the Python API (None too where ``none``): anything else, "false" or 0 say, would be
    taken for its truth value without a word."""
    if not (isinstance(value, bool) or (none and value is None)):
        raise IlnasError(f"{name} must be True{', False or None' if none else ' or False'}, got {value!r}"[:160])
    return value


def positive_integer(name: str, value: Any, at_most: int | None = None) -> int:
    """An integer argument of the Python API (numpy's integers too) checked as the CLI's parser checks one."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= (at_most or value):
        raise IlnasError(f"{name} must be a positive integer{f' of at most {at_most}' if at_most else ''}, got "
                         f"{value!r}")
    return int(value)
