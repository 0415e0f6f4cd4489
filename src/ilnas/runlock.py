"""One process at a time per run directory: an exclusive lock on ``<run>/.lock``, whose line names the holder
("pid N on HOST, since T: COMMAND") for whoever is refused.

The lock is an ``flock``, which the kernel drops when its process ends, however it ends. Some cluster
filesystems have no file locks (Lustre mounted without ``flock``, some NFS set-ups: ``flock`` fails with
ENOSYS, ENOLCK or EOPNOTSUPP). There the line itself is the lock, kept alive as a lease: its process renews
the file's time every ``RENEW_S``, and a line stands for a live holder while it is younger than ``LEASE_S``
and, where it names this host, its process exists (a process killed on this host frees the run at once, one
on a lost node after the lease). A process takes a lease by replacing the file with its line (a rename, so a
reader never sees half a line), waits ``SETTLE_S`` and reads it back: of two processes that found the run free
in the same instant, the one whose line was written last holds it and the other is refused. Only a write held
up for longer than ``SETTLE_S`` (a stalled file server) could still let both through; the holder's renewal
notices that it lost the lease and says so. ilnas warns once per run that it is on a lease.

Some filesystems grant an ``flock`` that holds only on the node that took it (BeeGFS by default, Lustre mounted
with ``localflock``, NFS with ``local_lock`` or ``nolock``): a process on another node would get it too. So every
holder renews its line's time as a lease holder does, and a process granted the ``flock`` while the line names
another host and is younger than the lease watches it for two renewals: renewed, that holder is alive and the
run is refused; not renewed, it is gone (it died without releasing) and the run is taken. Released, the line is
emptied, so a run ended cleanly is taken at once from any node.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

from ilnas.errors import IlnasError
from ilnas.fileio import atomic_write_text, umask

LOCK = ".lock"
LEASE_S, RENEW_S = 120.0, 30.0  # without file locks: a line older than the lease is a dead holder's
SETTLE_S = 2.0  # without file locks: how long a new lease's line must stand before its process holds the run
BUSY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)  # flock: held by another process

_HELD: set[int] = set()  # the descriptors of the run locks this process holds
_GONE: dict[Path, str] = {}  # lock file -> another host's line whose process this one found dead


def _unlock_in_child() -> None:
    """A forked child (a DataLoader worker) shares its parent's flock; it lets go of its copy, so that the run
    is free as soon as the parent ends, not when the last worker notices and exits."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)  # the child's copy only: the parent keeps the lock
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_unlock_in_child)


class RunLock:
    """The lock of the run directory ``path``: ``acquire`` (or refuse in one line), ``release``, ``holder``."""

    def __init__(self, path: Path):
        self.file = Path(path) / LOCK
        self.fd: int | None = None  # holding the flock
        self._lease: str | None = None  # holding the run (flock or lease): its line, renewed
        self._renewing = threading.Event()  # set to stop renewing it

    def _try(self) -> tuple[int | None, OSError | None]:
        """(the descriptor, now holding the flock; or None where another process holds it) and, where the
        filesystem has no file locks, the error that says so (the descriptor is then open, unlocked)."""
        import fcntl

        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd, None
        except OSError as e:
            if e.errno in BUSY:
                os.close(fd)
                return None, None
            return fd, e

    def _line(self) -> str:
        try:
            return self.file.read_text(errors="replace").strip()
        except OSError:
            return ""

    def _refuse(self, line: str) -> None:
        raise IlnasError(f"{self.file.parent} is in use by another ilnas process ({line or 'unknown process'}); "
                         f"wait for it to end or choose another --out")

    def _lease_holder(self) -> str | None:
        """Without file locks: the line where it stands for a live holder (see the module's text)."""
        line = self._line()
        found = _pid_and_host(line)
        if found is None:
            return None
        pid, host = found
        if host == socket.gethostname():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:  # another user's process: alive
                pass
        try:
            age = time.time() - self.file.stat().st_mtime
        except OSError:
            return None
        return line if age < LEASE_S else None

    def holder(self) -> str | None:
        """Who holds the run now (the lock file's line), or None where no process does. A line of another
        host younger than the lease counts as a holder even where this node's ``flock`` is free."""
        if not self.file.exists():
            return None
        fd, no_locks = self._try()
        if fd is None:
            return self._line() or "unknown process"
        os.close(fd)
        return self._lease_holder() if no_locks else self._other_host()

    def _other_host(self) -> str | None:
        """The line, where it names another host and is younger than the lease."""
        line, here = self._line(), socket.gethostname()
        found = _pid_and_host(line)
        if found is None or found[1] == here:
            return None
        try:
            return line if time.time() - self.file.stat().st_mtime < LEASE_S else None
        except OSError:
            return None

    def _live_other_host(self) -> str | None:
        """``_other_host``'s line where its process is alive: its time moves within two renewals. A line found
        dead once is not watched again (the run's early check, then its lock)."""
        other = self._other_host()
        if other is None or _GONE.get(self.file) == other:
            return None
        if self._renewed():
            return other
        _GONE[self.file] = other
        print(f"ilnas: warning: {self.file.parent} was last held on another host by a process that no longer renews "
              f"its lock ({other}): it ended without releasing it; the run is free", file=sys.stderr, flush=True)
        return None

    def _renewed(self) -> bool:
        """Whether the file's time moves within two renewals (its holder is alive)."""
        try:
            start, deadline = self.file.stat().st_mtime, time.monotonic() + 2 * RENEW_S + min(RENEW_S, 5.0)
            while time.monotonic() < deadline:
                time.sleep(min(RENEW_S / 4, 1.0))
                if self.file.stat().st_mtime != start:
                    return True
        except OSError:
            return False
        return False

    def probe(self) -> None:
        """Refuse now if another process holds the run; hold nothing afterwards."""
        if not self.file.exists():
            return
        fd, no_locks = self._try()
        if fd is None:
            self._refuse(self._line())
        os.close(fd)
        line = self._lease_holder() if no_locks else self._live_other_host()
        if line is not None:
            self._refuse(line)

    def acquire(self) -> None:
        fd, no_locks = self._try()
        if fd is None:
            self._refuse(self._line())
        holder = _holder_line()
        if no_locks:
            os.close(fd)
            self._take_lease(holder, no_locks)
            return
        other = self._live_other_host()
        if other is not None:  # an flock that holds only on this node: the run is in use there
            os.close(fd)
            self._refuse(other)
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
        self.fd = fd
        _HELD.add(fd)
        self._lease = holder
        threading.Thread(target=_renew, args=(self.file, holder, self._renewing), daemon=True,
                         name="ilnas-lock").start()

    def _take_lease(self, holder: str, no_locks: OSError) -> None:
        line = self._lease_holder()
        if line is not None:
            self._refuse(line)
        print(f"ilnas: warning: {self.file.parent} lies on a filesystem without file locks "
              f"({no_locks.strerror or no_locks}); the run is guarded by a lease in {LOCK} instead, renewed "
              f"every {RENEW_S:.0f} s", file=sys.stderr, flush=True)
        try:
            atomic_write_text(self.file, holder + "\n")
        except OSError as e:
            raise IlnasError(f"cannot write the lease {self.file} ({e.strerror or e})") from None
        _settle()
        line = self._line()
        if line != holder:  # another process found the run free in the same instant, and wrote after this one
            self._refuse(line)
        self._lease = holder
        threading.Thread(target=_renew, args=(self.file, holder, self._renewing), daemon=True,
                         name="ilnas-lease").start()

    def release(self) -> None:
        if self._lease is not None:  # stop renewing and, still this process's, leave a line naming nobody
            self._renewing.set()
            if self._line() == self._lease:
                with contextlib.suppress(OSError):
                    if self.fd is not None:
                        os.ftruncate(self.fd, 0)
                    else:
                        atomic_write_text(self.file, "")
            self._lease, self._renewing = None, threading.Event()
        if self.fd is None:
            return
        _HELD.discard(self.fd)
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = None


def _holder_line() -> str:
    """This process's line, as it reads back from the file: one line of single spaces, valid UTF-8."""
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    line = " ".join(f"pid {os.getpid()} on {socket.gethostname()}, since {since}: {' '.join(sys.argv)}".split())
    return line.encode("utf-8", "replace").decode("utf-8")


def _settle() -> None:
    time.sleep(SETTLE_S)


def _renew(file: Path, holder: str, stop: threading.Event) -> None:
    while not stop.wait(RENEW_S):
        try:
            line = file.read_text(errors="replace").strip()
            if line != holder:  # taken over: this process was held up for longer than the lease
                print(f"ilnas: warning: {file.parent} was taken over ({line or 'its line emptied'}) while this "
                      f"process was held up; the run is no longer guarded against that process", file=sys.stderr,
                      flush=True)
                return
            os.utime(file)
        except OSError:  # a passing failure: the next renewal may work
            pass


def lock_holder(path: Path) -> str | None:
    """The process working on the run at ``path`` ("pid N on HOST, since T: COMMAND"), or None."""
    return RunLock(Path(path)).holder()


def holder_pid(path: Path) -> int | None:
    """The pid of the process on this host working on the run at ``path``, or None."""
    return local_pid(lock_holder(path) or "")


def local_pid(holder: str) -> int | None:
    """The pid a lock's line names, where that process runs on this host; else None."""
    found = _pid_and_host(holder)
    return found[0] if found is not None and found[1] == socket.gethostname() else None


def _pid_and_host(line: str) -> tuple[int, str] | None:
    found = re.match(r"pid (\d+) on (\S+), since ", line)
    return (int(found.group(1)), found.group(2)) if found else None
