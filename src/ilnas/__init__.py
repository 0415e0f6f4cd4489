"""ilnas: interleaving learning (K learners, M rounds, one shared architecture) for DARTS-family NAS.

The public names load on first use (PEP 562), so ``import ilnas`` and ``ilnas --help`` do not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from ilnas.errors import IlnasError, RunFailed

__version__ = "0.1.0"

_PUBLIC = {  # name -> module that defines it
    "Task": "ilnas.data.tasks", "create_task": "ilnas.data.tasks", "register_task": "ilnas.data.tasks",
    "TaskArrays": "ilnas.data.tasks",
    "run_search": "ilnas.recipes.search", "run_train": "ilnas.recipes.train",
    "EngineConfig": "ilnas.search.config", "SGD": "ilnas.optim", "hypergradient": "ilnas.search.engine",
    "FunctionalTaskNet": "ilnas.search.task_net", "Learner": "ilnas.search.engine", "SearchState": "ilnas.search.engine",
    "Stage": "ilnas.search.engine", "search_step": "ilnas.search.engine", "create_state": "ilnas.search.engine",
    "SupernetSearch": "ilnas.search.supernet_search", "Adam": "ilnas.optim", "resolve": "ilnas.config",
    "SpaceConfig": "ilnas.config", "init_arch": "ilnas.space.supernet",
    "Genotype": "ilnas.space.genotype", "derive_genotype": "ilnas.space.genotype",
    "load_genotype": "ilnas.space.genotype", "parse_genotype": "ilnas.space.genotype", "zoo": "ilnas.space.genotype",
    "NetworkCIFAR": "ilnas.space.network", "NetworkImageNet": "ilnas.space.network",
    "Supernet": "ilnas.space.supernet", "register_op": "ilnas.space.ops",
    "register_network": "ilnas.space.network", "EvalCell": "ilnas.space.network",
    "load_model": "ilnas.models", "create_model": "ilnas.models", "ModelCard": "ilnas.card",
}

__all__ = ["IlnasError", "RunFailed", "__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ilnas' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
