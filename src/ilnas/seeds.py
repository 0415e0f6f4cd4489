"""One rule for every derived seed: a run's base seed and the keys of a stream (phase, epoch, task, ...)
map to a 63-bit seed, so that any valid base seed gives valid, unrelated streams."""
from __future__ import annotations

import hashlib
import numbers

from ilnas.errors import IlnasError

MAX_SEED = 2**32  # base seeds lie in [0, MAX_SEED)


def checked_seed(value: object, name: str) -> int:
    """A base seed (``name``: the setting or argument that gave it), refused in one line unless it is an integer
    in [0, MAX_SEED)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < MAX_SEED:
        raise IlnasError(f"{name} must be an integer in [0, 2**32), got {value!r}"[:120])
    return int(value)


def derive_seed(*keys: int) -> int:
    """A seed in [0, 2**63) determined by ``keys``; distinct key tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
