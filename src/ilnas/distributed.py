"""torchrun / DistributedDataParallel plumbing: who am I, reduce metrics, keep replicas honest."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from ilnas.config.schema import check_device_name
from ilnas.errors import IlnasError
from ilnas.ranks import env_count, launch

WAIT_NOTE_S = 60.0  # joining takes well under this where every rank is up
STOP_SETTLE_S = 0.1  # after the closing barrier, before the process group is destroyed


@dataclass(frozen=True)
class Process:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    control: object = None  # the group for small CPU messages (gloo; None: the default group, gloo on CPUs)

    @property
    def main(self) -> bool:
        return self.rank == 0


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective of a several-rank job failing because another rank is gone (it failed or
    was stopped): what every surviving rank meets then, in a transport's words that say nothing of the cause."""
    if (env_count("WORLD_SIZE", 1) or 0) < 2 or not isinstance(e, RuntimeError):
        return False
    if isinstance(e, getattr(dist, "DistError", ())) or "by peer" in str(e):  # the latter: gloo inside backward
        return True
    inside = f"{os.sep}torch{os.sep}distributed{os.sep}"
    return any(inside in frame.filename for frame in traceback.extract_tb(e.__traceback__))


def pick_device(name: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device, refused in one line when it is not there;
    under torchrun (``world`` > 1) every rank takes ``cuda:<local rank>``."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    index = int(name[5:]) if name.startswith("cuda:") and world == 1 else local_rank
    _require_cuda(index, f"device={name}", "; use device=cpu or auto")
    return torch.device(f"cuda:{index}")


def _require_cuda(index: int, said: str, hint: str = "") -> None:
    """CUDA device ``index`` is visible to this process, refused in one line otherwise (``said``: the device as
    it was asked for)."""
    if not torch.cuda.is_available():
        raise IlnasError(f"{said} but no CUDA device is available{hint}")
    if index >= torch.cuda.device_count():
        raise IlnasError(f"{said} but only {torch.cuda.device_count()} CUDA devices are visible")


def as_device(device: object, what: str = "device") -> torch.device:
    """A device given in Python (``"cpu"``, ``"cuda:1"``, a torch.device) that this process can use, refused in one
    line otherwise (torch says it on the first tensor placed there, if at all: ``to(1.5)`` is accepted)."""
    try:
        found = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except RuntimeError:
        found = None
    if found is None:
        raise IlnasError(f"{what} must be a torch.device or its name (cpu, cuda, cuda:1, ...), got {device!r}"[:200])
    if found.type == "cuda":
        _require_cuda(found.index or 0, f"{what} {found}")
    return found


def start(device: str) -> Process:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPUs);
    a plain process is rank 0 of 1."""
    rank, world, local = launch()
    dev = pick_device(device, local, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        with _waiting_note(rank, world):
            store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world))
            # Keys of their own per attempt: torchrun's restarts (--max-restarts) may keep its store, where the
            # previous attempt's addresses would send a new rank to a dead peer ("Connection refused").
            attempt = dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=attempt, rank=rank,
                                    world_size=world)
    # NCCL moves only device tensors: the ranks' agreement on when to stop goes through gloo, without a
    # device synchronisation.
    control = dist.new_group(backend="gloo") if world > 1 and dev.type == "cuda" else None
    return Process(rank, world, local, dev, control)


@contextlib.contextmanager
def _waiting_note(rank: int, world: int) -> Iterator[None]:
    """One line on stderr where joining the group takes longer than WAIT_NOTE_S: a rank whose peers never
    come (torchrun's variables left in a shell) otherwise waits out torch's timeout, half an hour, in silence.
    The wait itself goes on: on a cluster the other ranks may start minutes later."""
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    note = threading.Timer(WAIT_NOTE_S, lambda: print(
        f"ilnas: rank {rank} of {world} is still waiting for the other ranks at {where} (RANK, WORLD_SIZE, "
        f"MASTER_ADDR and MASTER_PORT come from the environment: unset them to run one process)",
        file=sys.stderr, flush=True))
    note.daemon = True
    note.start()
    try:
        yield
    finally:
        note.cancel()


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], process: Process) -> list[float]:
    """Sum each value over ranks (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=process.device)
    if process.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def max_over_ranks(values: list[int], process: Process) -> list[int]:
    """Each integer's maximum over the ranks, through the CPU (no device synchronisation)."""
    if process.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=process.control)
    return t.tolist()


def gather_to_main(obj: object, process: Process) -> list | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the others."""
    if process.world == 1:
        return [obj]
    out = [None] * process.world if process.main else None
    dist.gather_object(obj, out, dst=0, group=process.control)
    return out


def barrier(process: Process) -> None:
    if process.world > 1:
        dist.barrier()


def closing_barrier(process: Process) -> None:
    """The end of a run: no rank tears the process group down (``stop``) while another still uses it. Gloo's
    process group joins its worker threads in its destructor while holding the GIL, and a worker retiring the
    barrier's work needs the GIL to free the tensors of the collectives before it, which Python has let go of:
    before torch's fix (pytorch PR 154976) the two could wait on each other for ever (torch 2.4.1 here: one
    all-reduce, barrier and destroy cycle in under 20). A moment without the GIL lets the workers retire them.
    Only here: a rank that fails tears its group down at once, which is how the others learn it is gone."""
    if process.world > 1:
        dist.barrier()
        time.sleep(STOP_SETTLE_S)


def mean_over_ranks(process: Process) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """The search engine's ``reduce`` under torchrun: each tensor's mean over the ranks, one all-reduce of
    one flat buffer per call (a plain process gets the tensors back)."""
    def reduce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if process.world == 1 or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat.div_(process.world)
        return [chunk.view(t.shape) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
    return reduce


def shard(batch: tuple[torch.Tensor, ...], process: Process) -> tuple[torch.Tensor, ...]:
    """This rank's contiguous slice of a global batch whose size the ranks divide."""
    n = len(batch[0]) // process.world
    return tuple(t[process.rank * n:(process.rank + 1) * n] for t in batch)


def replica_divergence(tensors: Iterable[torch.Tensor], process: Process) -> float:
    """max |x_rank - x_other| over every element: 0 when the ranks hold identical replicas."""
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    if process.world == 1:
        return 0.0
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())
