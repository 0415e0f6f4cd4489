"""Size of the evaluation network a genotype gives under an evaluation preset."""
from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from ilnas.config import EvalRunConfig
from ilnas.data.tasks import DataSource, task_info
from ilnas.errors import IlnasError
from ilnas.space.genotype import Genotype
from ilnas.space.network import NetworkCIFAR, NetworkImageNet, count_parameters

def build_network(genotype: Genotype, cfg: EvalRunConfig, classes: int, channels: int,
                  resolution: int) -> torch.nn.Module:
    net = cfg.network
    if net.style == "imagenet":
        return NetworkImageNet(genotype, classes, net.layers, net.channels, net.auxiliary, in_channels=channels)
    return NetworkCIFAR(genotype, classes, net.layers, net.channels, net.auxiliary, in_channels=channels,
                        small_images=resolution < 32)


def check_input_size(genotype: Genotype, cfg: EvalRunConfig, classes: int, channels: int, resolution: int) -> None:
    """Refuse images the network style cannot take, before any run directory changes: one training-mode
    forward pass (auxiliary head included) of a narrow copy of the network (same cells, C=8) on two images."""
    narrow = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, channels=8))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model = build_network(genotype, narrow, classes, channels, resolution).train()
        try:
            model(torch.zeros(2, channels, resolution, resolution))
        except RuntimeError as e:
            raise IlnasError(f"{resolution}x{resolution} images are too small for the {cfg.network.style}-style "
                             f"network of {cfg.network.layers} cells ({str(e).splitlines()[0][:100]}); use larger "
                             f"images (train.resolution) or another network.style") from None


def multiply_adds(model: torch.nn.Module, channels: int, resolution: int) -> int:
    """Multiply-adds of one eval-mode forward pass of one image (FLOPs / 2)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, channels, resolution, resolution))
    return counter.get_total_flops() // 2


def describe(genotype: Genotype, cfg: EvalRunConfig) -> dict:
    d = cfg.data
    info = task_info(d.tasks[0], DataSource(d.data_dir, d.download, d.verify, d.image_size))
    classes, channels, resolution = info.classes, info.channels, info.resolution or cfg.train.resolution
    model = build_network(genotype, cfg, classes, channels, resolution)
    return {"genotype": genotype.to_string(), "task": cfg.data.tasks[0],
            "network": f"{cfg.network.style}, {cfg.network.layers} cells, C={cfg.network.channels}",
            "params": count_parameters(model), "params_total": count_parameters(model, include_auxiliary=True),
            "macs": multiply_adds(model, channels, resolution), "resolution": resolution}
