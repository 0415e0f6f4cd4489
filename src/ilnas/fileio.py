"""Atomic writes (a file is either its old self or its new self, never half of each), and paths a user
gave looked up with one-line errors.

Files are created with the permissions the umask allows (like ``open``), not ``mkstemp``'s 0600.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from ilnas.errors import IlnasError


def reachable(path: str | Path, what: str) -> Path:
    """``path`` as a Path, once the filesystem can say whether something is there: a name too long, or a
    parent directory that may not be searched, is refused in one line naming ``what`` the path is for
    (pathlib's ``exists`` and ``is_dir`` raise for those, where an absent path is simply False)."""
    if not isinstance(path, (str, os.PathLike)):  # os.stat would take an integer for a file descriptor
        raise IlnasError(f"{what} must be a path, got {type(path).__name__}")
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # absent; its names must still fit where it will be made
        if max(map(len, map(os.fsencode, Path(path).parts)), default=0) > _name_max(Path(path)):
            raise IlnasError(f"{what} {shortened(str(path))} cannot be made (File name too long)") from None
    except OSError as e:
        raise IlnasError(f"{what} {shortened(str(path))} cannot be looked up ({e.strerror or e})") from None
    except ValueError:  # a NUL byte
        raise IlnasError(f"{what} {shortened(str(path))!r} holds a NUL byte") from None
    return Path(path)


def require_writable(path: Path, what: str) -> None:
    """Refuse a ``path`` to be made below a file, on a read-only file system or without write permission, before
    any work whose result it is to hold is done."""
    base = path.absolute()
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise IlnasError(f"cannot create {what} {path}: {base} is a file")
    try:  # a probe file, removed at once: the only reliable test (root ignores permission bits)
        with open(os.open(base / f".ilnas-probe-{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                  "wb"):
            pass
        os.unlink(base / f".ilnas-probe-{os.getpid()}")
    except OSError as e:
        reason = "read-only file system" if e.errno == errno.EROFS else (e.strerror or str(e)).lower()
        raise IlnasError(f"cannot write to {base} ({reason}); choose another --out") from None


def _name_max(path: Path) -> int:
    """The longest file name (bytes) the filesystem of ``path``'s nearest existing ancestor takes."""
    existing = path.absolute()
    while not os.path.isdir(existing) and existing != existing.parent:
        existing = existing.parent
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or the filesystem will not say
        return 255


def load_json(text: str | bytes) -> Any:
    """``json.loads``, with nesting too deep for the parser (a RecursionError, not a ValueError) reported as
    the JSONDecodeError any other damage gives."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None


def shortened(text: str, limit: int = 160) -> str:
    """``text`` as an error line shows it: its start and end around an ellipsis where it is longer than ``limit``."""
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 4:]} ({len(text)} characters)"


def umask() -> int:
    """The process's umask (read without changing it for longer than an instant)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path: Path, write: Callable[[BinaryIO], object], keep_previous: Path | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, keep_previous: Path | None = None) -> None:
    """Write ``data`` to ``path`` atomically; with ``keep_previous``, the old file moves there first."""
    _atomic(path, lambda f: f.write(data), keep_previous)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
