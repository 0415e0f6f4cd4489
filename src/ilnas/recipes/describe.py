"""Size of the evaluation network a genotype gives under an evaluation preset."""
from __future__ import annotations

import torch

from ilnas.config import EvalRunConfig
from ilnas.data.tasks import task_info
from ilnas.space.genotype import Genotype
from ilnas.space.network import build_network, count_parameters, multiply_adds


def describe(genotype: Genotype, cfg: EvalRunConfig) -> dict:
    d = cfg.data
    info = task_info(d.tasks[0], d)
    classes, channels, resolution = info.classes, info.channels, info.resolution or cfg.train.resolution
    with torch.device("meta"):  # shapes only: any width is described at once, without its memory
        model = build_network(genotype, classes, channels, resolution, **cfg.network.build_args())
        macs = multiply_adds(model, channels, resolution)
    return {"genotype": genotype.to_string(), "task": cfg.data.tasks[0],
            "network": f"{cfg.network.style}, {cfg.network.layers} cells, C={cfg.network.channels}",
            "params": count_parameters(model), "params_total": count_parameters(model, include_auxiliary=True),
            "macs": macs, "resolution": resolution}
