"""The cgroups a process runs in, where a container or a scheduler sets its limits (``docker run --memory
--cpus``, a SLURM allocation): the folders, on cgroup v2's single hierarchy or v1's per controller, whose
files hold them. ``memory.py`` reads the memory limits, ``threads.py`` the CPU quota."""
from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_folders(controller: str, root: Path = CGROUP_ROOT, membership: str | None = None) -> list[tuple[Path, bool]]:
    """Every folder on the path up from this process's cgroup to its hierarchy's root (where a limit set on an
    ancestor binds it too), for ``controller`` (``memory``, ``cpu``; v1 mounts each under its name), each with
    whether it is cgroup v2's. ``membership``: the text of /proc/self/cgroup (default: read it)."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            return []
    folders = []
    for line in membership.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        v2 = controllers == ""
        if not v2 and controller not in controllers.split(","):
            continue
        base = root if v2 else root / controller
        own = base / path.strip().lstrip("/")
        folders += [(folder, v2) for folder in [own, *(p for p in own.parents if p == base or base in p.parents)]]
    return folders
