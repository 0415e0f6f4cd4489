"""Trained networks as artifacts, and evaluation networks by name.

A training run leaves its weights as safetensors (``model.safetensors``: the last epoch;
``model-best.safetensors``: the epoch of the best test top-1) and ``model.json``, the card
(``ilnas.card.ModelCard``: what rebuilds the network and feeds it). ``load_model`` turns them into a ready module in evaluation mode;
``create_model`` builds the untrained evaluation network of any genotype (zoo name, run, file, literal).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ilnas.card import CARD_FILE, ModelCard, read_card, weights_file
from ilnas.errors import IlnasError, allocation_failure, positive_integer

STYLE_DEFAULTS = {"cifar": (20, 36, 32), "imagenet": (14, 48, 224)}  # layers, channels, input side


def state_dict_bytes(model: nn.Module) -> bytes:
    """The module's weights and buffers as a safetensors file (CPU, contiguous)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()})


def load_model(run: str | Path, which: str = "last", device: str | torch.device = "cpu") -> nn.Module:
    """A trained network, ready to use: built from ``run``'s model.json, its weights loaded (``which``:
    last or best epoch), in evaluation mode on ``device``. Its forward takes normalised images
    (``model.card.normalize``) and returns logits; ``model.card`` holds the class names and preprocessing."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ilnas.distributed import as_device

    device = as_device(device)
    card = read_card(run)
    path = weights_file(run, which)
    _require_weights_of(card, path)
    model = card.build()
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise IlnasError(f"cannot load {path} into the network of {CARD_FILE} ({str(e).splitlines()[0][:120]})") from None
    model.card = card
    return model.to(device).eval()


def _require_weights_of(card: ModelCard, path: Path) -> None:
    """The weights file holds the tensors of the card's network, name for name and shape for shape: compared
    with the network built on the meta device (no memory), before the real one is built, so a card that does
    not belong to its weights never builds a network of its own size."""
    from safetensors import SafetensorError, safe_open

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in card.build().state_dict().items()}
    try:
        with safe_open(str(path), "pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise IlnasError(f"cannot read {path} ({str(e).splitlines()[0][:120]})") from None
    differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if differ:
        k = differ[0]
        raise IlnasError(f"{path} does not hold the weights of the network {CARD_FILE} describes: {len(differ)} "
                         f"tensor(s) differ, the first {k!r} ({_shape(found.get(k))} in the file, "
                         f"{_shape(expected.get(k))} in the network)")


def _shape(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else "x".join(map(str, shape)) or "a scalar"


def create_model(name_or_run: str, num_classes: int = 10, *, style: str = "cifar", layers: int | None = None,
                 channels: int | None = None, auxiliary: bool = False, in_channels: int = 3,
                 resolution: int | None = None) -> nn.Module:
    """The evaluation network (untrained, training mode) of a genotype: a zoo name (``DARTS_V2``), a search or
    training run, a genotype.json, a ``Genotype(...)`` literal or ``random:SEED``. ``style`` cifar (default 20
    cells, C=36), imagenet (14 cells, C=48) or one registered (cifar's defaults); ``resolution`` matters only
    below 32 (cifar style: the auxiliary head pools adaptively). Trained weights: ``load_model``."""
    from ilnas.config import MAX_IMAGE_SIDE, NetworkConfig, from_dict, validate_network
    from ilnas.config.schema import require_normal_cell
    from ilnas.space.genotype import load_genotype
    from ilnas.space.layout import NETWORK_STYLES, known_styles
    from ilnas.space.network import build_network

    if style not in known_styles():
        raise IlnasError(f"style must be one of {', '.join(known_styles())}, got {style!r}")
    default_layers, default_channels, side = STYLE_DEFAULTS.get(style, STYLE_DEFAULTS["cifar"])
    # the checks `ilnas train` makes of its network settings: a float, a bool or too few cells is one line here,
    # not an error from deep inside torch, or a network without the genotype's normal cell
    network = from_dict(NetworkConfig, {"style": style, "auxiliary": auxiliary,
                                        "layers": default_layers if layers is None else layers,
                                        "channels": default_channels if channels is None else channels})
    validate_network(network)
    if style in NETWORK_STYLES:  # one's own network places its cells as it likes
        require_normal_cell("layers", network.layers, "network")
    num_classes = positive_integer("num_classes", num_classes)
    in_channels = positive_integer("in_channels", in_channels)
    resolution = positive_integer("resolution", side if resolution is None else resolution, MAX_IMAGE_SIDE)
    genotype = load_genotype(str(name_or_run))
    try:
        return build_network(genotype, num_classes, in_channels, resolution, **network.build_args())
    except RuntimeError as e:  # the CPU allocator's error: num_classes=10**9, say, asks for a 256 GB classifier
        if (failure := allocation_failure(e)) is None:
            raise
        raise IlnasError(f"the network cannot be built: {failure}; lower num_classes, in_channels, layers or "
                         f"channels") from None
