"""Size of the evaluation network a genotype gives under an evaluation preset, or of a training run's own."""
from __future__ import annotations

import torch

from ilnas.card import ModelCard
from ilnas.config import EvalRunConfig
from ilnas.data.tasks import task_info
from ilnas.errors import IlnasError, fault
from ilnas.space.genotype import Genotype, parse_genotype, shared_choices
from ilnas.space.network import build_network, count_parameters, multiply_adds
from ilnas.space.ops import check_ops


def describe(genotype: Genotype, cfg: EvalRunConfig) -> dict:
    d = cfg.data
    info = task_info(d.tasks[0], d)
    return _size(genotype, cfg.data.tasks[0], info.classes, info.channels, info.resolution or cfg.train.resolution,
                 cfg.network.build_args())


def describe_trained(card: ModelCard) -> dict:
    """The network a training run trained, from its card: its own task, input size and width."""
    channels, resolution, _ = card.input_size
    return _size(parse_genotype(card.genotype), card.task, card.num_classes, channels, resolution, card.network)


def _size(genotype: Genotype, task: str, classes: int, channels: int, resolution: int, network: dict) -> dict:
    check_ops([op for op, _ in genotype.normal + genotype.reduce], channels=network["channels"])
    try:
        with torch.device("meta"):  # shapes only: any width is described at once, without its memory
            model = build_network(genotype, classes, channels, resolution, **network)
            macs = multiply_adds(model, channels, resolution)
    except IlnasError:
        raise
    except Exception as e:  # an operation of one's own that cannot run on shapes alone, or at this size
        raise IlnasError(f"the network cannot be measured on {resolution}x{resolution} images ({fault(e, 120)})"
                         ) from None
    return {"genotype": genotype.to_string(), "task": task,
            "network": f"{network['style']}, {network['layers']} cells, C={network['channels']}",
            "params": count_parameters(model), "params_total": count_parameters(model, include_auxiliary=True),
            "macs": macs, "resolution": resolution}


def shared_with(genotype: Genotype, others: dict[str, Genotype]) -> dict[str, dict[str, int]]:
    """Per named cell, how many of ``genotype``'s (op, input) choices it makes too, per cell and in all (``of``:
    how many there are): space.genotype.shared_choices."""
    out = {}
    for name, other in others.items():
        per_cell = {cell: shared_choices(genotype, other, cells=(cell,)) for cell in ("normal", "reduce")}
        out[name] = {**per_cell, "shared": sum(per_cell.values()), "of": genotype.choices}
    return out
