"""One rank of a data-parallel engine run, started by tests/test_parallel_search.py under torchrun (gloo):
each rank steps on its half of every batch of the float64 test problem and saves what it ends with."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from torch import nn

from ilnas import distributed
from ilnas.config import DataConfig
from ilnas.data.loader import BatchMaker
from ilnas.data.tasks import create_task
from ilnas.recipes.search import accuracy
from ilnas.search.engine import Stage, search_step
from ilnas.search.task_net import FunctionalTaskNet
from ilnas.space.supernet import Supernet, init_arch
from parallel_cases import CASES, STEPS, problem


def main(out: Path) -> None:
    process = distributed.start("cpu")
    reduce = distributed.mean_over_ranks(process)
    results = {}
    for name, (cfg, sgd, lr) in CASES.items():
        p = problem()
        train = [distributed.shard(b, process) for b in p.train]
        val = [distributed.shard(b, process) for b in p.val]
        metrics = [search_step(p.state, p.learners, train, val, cfg, sgd, lr, reduce=reduce) for _ in range(STEPS)]
        tensors = [*p.state.arch, *(t for st in p.state.stages for t in (*st.w, *st.h))]
        results[name] = {"arch": [a.detach() for a in p.state.arch], "w": [st.w for st in p.state.stages],
                         "h": [st.h for st in p.state.stages], "metrics": metrics,
                         "divergence": distributed.replica_divergence(tensors, process)}
    drifted = [a.detach() + (1e-3 if process.rank == 1 else 0.0) for a in p.state.arch]
    results["drift"] = distributed.replica_divergence(drifted, process)
    results["accuracy"] = dealt_accuracy(process)
    torch.save(results, out / f"rank{process.rank}.pt")
    distributed.barrier(process)
    distributed.stop()


def dealt_accuracy(process: distributed.Process) -> tuple[float, float]:
    """The search's validation accuracy of an untrained supernet on 5 digits batches: computed whole on
    this rank, and dealt out over the ranks."""
    task = create_task("digits", DataConfig())
    maker = BatchMaker(task, task.val, torch.device("cpu"), torch.float32, augment=False)
    torch.manual_seed(0)
    encoder = Supernet(1, 4, 2)
    net = FunctionalTaskNet(encoder, nn.Linear(encoder.out_features, 10), 10)
    stage = Stage(0, [t.detach() for t in encoder.parameters()], [t.detach() for t in net.head.parameters()])
    arch = init_arch(encoder.num_ops, generator=torch.Generator().manual_seed(0))
    return (accuracy(net, arch, stage, maker, 32, 5), accuracy(net, arch, stage, maker, 32, 5, process))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
