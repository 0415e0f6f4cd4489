"""Trained networks as artifacts, and evaluation networks by name.

A training run leaves its weights as safetensors (``model.safetensors``: the last epoch;
``model-best.safetensors``: the epoch of the best test top-1) and ``model.json``, the card: everything
needed to rebuild the network and feed it (genotype, network arguments, class names in label order,
input size, normalisation, resize). ``load_model`` turns them into a ready module in evaluation mode;
``create_model`` builds the untrained evaluation network of any genotype (zoo name, run, file, literal).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ilnas.errors import IlnasError, NotRegistered, positive_integer
from ilnas.fileio import load_json, reachable

CARD_FILE = "model.json"
WEIGHT_FILES = {"last": "model.safetensors", "best": "model-best.safetensors"}
CARD_FORMAT = "ilnas-model/1"
STYLE_DEFAULTS = {"cifar": (20, 36, 32), "imagenet": (14, 48, 224)}  # layers, channels, input side


@dataclass(frozen=True)
class ModelCard:
    """What a trained network needs besides its weights.

    Args:
        genotype: the cell in the official ``Genotype(...)`` string form.
        network: ``build_network``'s style, layers, channels and auxiliary.
        classes: the class names, in label order.
        input_size: (channels, height, width) of the network's input.
        mean, std: per-channel normalisation of pixels scaled to [0, 1].
        resize: an image's shorter side is scaled to this, then the centre ``input_size`` square is cut.
        task: the task it was trained on.
    """

    genotype: str
    network: dict
    classes: tuple[str, ...]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int
    task: str
    format: str = CARD_FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def build(self) -> nn.Module:
        """The untrained network this card describes."""
        from ilnas.space.genotype import parse_genotype
        from ilnas.space.network import build_network

        channels, side, _ = self.input_size
        return build_network(parse_genotype(self.genotype), self.num_classes, channels, side, **self.network)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) -> the network's float input."""
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, device=images.device).view(shape)
        std = torch.tensor(self.std, device=images.device).view(shape)
        return (images.float() / 255.0 - mean) / std

    def read_images(self, paths: Sequence[Path]) -> torch.Tensor:
        """Image files -> uint8 (N, C, H, W) at the input size: scaled to ``resize``, centre-cropped."""
        from ilnas.data.tasks import decode_image

        channels, side, _ = self.input_size
        offset = (self.resize - side) // 2
        crops = [decode_image(Path(p), self.resize, channels)[:, offset:offset + side, offset:offset + side]
                 for p in paths]
        return torch.stack(crops) if crops else torch.empty(0, channels, side, side, dtype=torch.uint8)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: Path) -> ModelCard:
        """The card in ``text`` (read from ``where``), every value checked: a card edited by hand, or damaged,
        is refused in one line before it builds anything."""
        from ilnas.config import from_dict

        try:
            raw = load_json(text)
            if not isinstance(raw, dict) or raw.get("format") != CARD_FORMAT:
                raise ValueError(f"format {raw.get('format') if isinstance(raw, dict) else None!r}, expected "
                                 f"{CARD_FORMAT!r}")
            card = from_dict(cls, raw)
            card.check()
        except NotRegistered as e:  # a card of code of one's own, whose plugin is not loaded: no damaged card
            raise NotRegistered(f"{where}: {e}") from None
        except (ValueError, IlnasError) as e:
            raise IlnasError(f"{where} is not an ilnas model card ({str(e)[:160]})") from None
        return card

    def check(self) -> None:
        """The values a network and its input can be built from (ValueError or IlnasError otherwise)."""
        from ilnas.config import MAX_IMAGE_SIDE, NetworkConfig, from_dict, validate_network
        from ilnas.space.genotype import parse_genotype

        network = from_dict(NetworkConfig, self.network, "network.")
        if self.network.keys() != network.build_args().keys():
            raise ValueError(f"network must hold {', '.join(network.build_args())}, got {', '.join(self.network)}")
        validate_network(network)
        parse_genotype(self.genotype)
        channels, height, width = self.input_size
        if channels not in (1, 3) or not 1 <= height == width <= MAX_IMAGE_SIDE:
            raise ValueError(f"input_size must be (1 or 3, side, side) with a side of at most {MAX_IMAGE_SIDE}, "
                             f"got {list(self.input_size)}")
        if not height <= self.resize <= 2 * MAX_IMAGE_SIDE:
            raise ValueError(f"resize must lie in [{height}, {2 * MAX_IMAGE_SIDE}], got {self.resize}")
        if len(self.mean) != channels or len(self.std) != channels or not all(s > 0 for s in self.std):
            raise ValueError(f"mean and std need {channels} value(s) each, std positive")
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct names, at least one, got {len(self.classes)} "
                             f"({len(set(self.classes))} distinct)")


def read_card(run: str | Path) -> ModelCard:
    """The card of a training run (or of a folder holding model.json and the weights)."""
    path = reachable(run, "run directory") / CARD_FILE
    if not Path(run).is_dir():
        raise IlnasError(f"no run directory {run}")
    if not path.is_file():
        raise IlnasError(f"{run} holds no {CARD_FILE}: not a training run of this ilnas version (`ilnas train` "
                         f"writes it when the run starts)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise IlnasError(f"cannot read {path}: {e}") from None
    return ModelCard.from_json(text, path)


def weights_file(run: str | Path, which: str) -> Path:
    if which not in WEIGHT_FILES:
        raise IlnasError(f"which must be {' or '.join(WEIGHT_FILES)}, got {which!r}")
    path = Path(run) / WEIGHT_FILES[which]
    if not path.is_file():
        when = "when the run finishes" if which == "last" else "at the first epoch's test"
        raise IlnasError(f"{run} holds no {WEIGHT_FILES[which]} yet (written {when})")
    return path


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
    return build_network(load_genotype(str(name_or_run)), num_classes, in_channels, resolution,
                         **network.build_args())
