"""torchrun / DistributedDataParallel plumbing: who am I, reduce metrics, keep replicas honest."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ilnas.errors import IlnasError


@dataclass(frozen=True)
class Process:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """The number of ranks torchrun started (1 for a plain process), known before any group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(device: str) -> Process:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPUs);
    a plain process is rank 0 of 1."""
    world = world_size()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or device.startswith("cuda:") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise IlnasError(f"train.device={device} but no CUDA device is available; use device=cpu or auto")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise IlnasError(f"train.device={device} but only {torch.cuda.device_count()} CUDA devices are visible")
    if use_cuda:
        dev = torch.device(device if device.startswith("cuda:") and world == 1 else f"cuda:{local}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Process(rank, world, local, dev)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], process: Process) -> list[float]:
    """Sum each value over ranks (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=process.device)
    if process.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def barrier(process: Process) -> None:
    if process.world > 1:
        dist.barrier()


def replica_divergence(model: torch.nn.Module, process: Process) -> float:
    """max |w_rank - w_other| over every parameter: 0 when DDP kept all replicas identical."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    if process.world == 1:
        return 0.0
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())
