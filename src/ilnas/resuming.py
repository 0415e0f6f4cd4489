"""Reading a checkpoint back into live objects before a resumed run writes anything.

A checkpoint's checksum proves that its bytes are the ones written, not that this version can continue from
them: another ilnas version may have laid its payload out otherwise, and a file can be made by hand with a
valid checksum. The recipes read every entry back here (each one checked against the fresh object it
replaces) before they open the run directory, so such a payload is refused in one line and the run is left
as it was, instead of a traceback at the first step or, worse, metrics truncated by a foreign line count.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ilnas.errors import IlnasError, allocation_failure, first_line


@contextlib.contextmanager
def restoring(path: Path) -> Iterator[None]:
    """While the checkpoint of the run in ``path`` is read back: whatever its payload's layout makes fail
    becomes one line (memory running out stays what it is: the recipes name the settings to lower)."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, IlnasError) as e:
        if allocation_failure(e) is not None:
            raise
        what = f"it has no {e.args[0]!r}" if isinstance(e, KeyError) else first_line(e, 200)
        raise IlnasError(f"the checkpoint in {path} cannot be continued from ({what}): it was written by another "
                         f"ilnas version, or by an operation or network of your own (ILNAS_PLUGINS) whose code has "
                         f"changed since, or changed by hand; restore the run's own checkpoint or code, or start it "
                         f"again with --force") from None


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} entr{'y' if len(value) == 1 else 'ies'}"
    return repr(value)[:40] if isinstance(value, (int, float, str, type(None))) else f"a {type(value).__name__}"


def require_number(value: Any, kind: type, where: str, low: float = 0, high: float = math.inf) -> Any:
    """``value`` if it is an ``int`` (not a bool) or, for ``float``, any finite real number, within
    [``low``, ``high``]; else ValueError naming ``where``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and math.isfinite(value) and low <= value <= high and (kind is float or isinstance(value, int))
    if not ok:
        wanted = "an integer" if kind is int else "a finite number"
        span = f" from {low:g}" + ("" if high == math.inf else f" to {high:g}")
        raise ValueError(f"its {where} is {describe(value)}, where {wanted}{span} belongs")
    return value


def require_tensors_like(saved: Any, fresh: Sequence[torch.Tensor], where: str) -> list[torch.Tensor]:
    """``saved`` as a list if it holds as many tensors as ``fresh``, each of the same shape and dtype;
    else ValueError naming ``where``."""
    if not isinstance(saved, (list, tuple)) or len(saved) != len(fresh):
        raise ValueError(f"its {where} is {describe(saved)}, where a list of {len(fresh)} tensors belongs")
    return [require_tensor_like(s, f, f"{where} [{i}]") for i, (s, f) in enumerate(zip(saved, fresh))]


def require_tensor_like(saved: Any, fresh: torch.Tensor, where: str) -> torch.Tensor:
    if not isinstance(saved, torch.Tensor) or saved.shape != fresh.shape or saved.dtype != fresh.dtype:
        raise ValueError(f"its {where} is {describe(saved)}, where {describe(fresh)} belongs")
    return saved


def load_module_state(module: torch.nn.Module, saved: Any, where: str) -> None:
    """``module.load_state_dict(saved)`` where ``saved`` has exactly the module's entries, each of its shape
    and dtype (torch would cast another dtype silently, and names only the first line of a mismatch)."""
    fresh = module.state_dict()
    if not isinstance(saved, dict):
        raise ValueError(f"its {where} is {describe(saved)}, where the network's state belongs")
    missing, foreign = [k for k in fresh if k not in saved], [k for k in saved if k not in fresh]
    if missing or foreign:
        raise ValueError(f"its {where} " + (f"is missing the network's {missing[0]!r}" if missing else
                                            f"includes {foreign[0]!r}, which the network has not"))
    for name, value in fresh.items():
        require_tensor_like(saved[name], value, f"{where} {name!r}")
    module.load_state_dict(saved)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any, where: str) -> None:
    """``optimizer.load_state_dict(saved)`` (which checks the parameter groups), and every per-parameter
    buffer (momentum, Adam's moments) of its parameter's shape."""
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                    raise ValueError(f"its {where}'s {name} is {describe(value)}, where a tensor of shape "
                                     f"{tuple(p.shape)} belongs")


def require_rng_states(saved: Any, fresh: dict[str, torch.Tensor], where: str) -> list[dict]:
    """``saved``: every rank's global generators (stopping.global_rng_state), each with the CPU's and any
    other generator ``fresh`` has of ``fresh``'s layout (a run taken from one device type to another keeps
    only the CPU's)."""
    if not isinstance(saved, (list, tuple)):
        raise ValueError(f"its {where} is {describe(saved)}, where a list of generator states belongs")
    for i, state in enumerate(saved):
        if not isinstance(state, dict) or "cpu" not in state:
            raise ValueError(f"its {where} [{i}] is {describe(state)}, where the CPU's generator state belongs")
        for name in set(state) & set(fresh):
            require_tensor_like(state[name], fresh[name], f"{where} [{i}] {name!r}")
    return list(saved)
