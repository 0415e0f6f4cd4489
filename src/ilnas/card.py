"""The model card of a trained network (``model.json``) and where a training run keeps its weights.

The card holds everything needed to rebuild the network and feed it: genotype, network arguments, class names
in label order, input size, normalisation, resize. Reading and checking it needs no torch, so a command given a
run that holds no trained model (a typo, a search run, an unfinished training) is refused before torch loads.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ilnas.errors import IlnasError, NotRegistered
from ilnas.fileio import load_json, reachable

if TYPE_CHECKING:
    import torch
    from torch import nn

CARD_FILE = "model.json"
WEIGHT_FILES = {"last": "model.safetensors", "best": "model-best.safetensors"}
CARD_FORMAT = "ilnas-model/1"


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
        import torch

        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, device=images.device).view(shape)
        std = torch.tensor(self.std, device=images.device).view(shape)
        return (images.float() / 255.0 - mean) / std

    def read_images(self, paths: Sequence[Path]) -> torch.Tensor:
        """Image files -> uint8 (N, C, H, W) at the input size: scaled to ``resize``, centre-cropped."""
        import torch

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


def require_trained_model(run: str | Path, which: str) -> ModelCard:
    """The card of a training run that holds the ``which`` weights (last or best), read and checked; otherwise
    the one-line refusal of a command that uses the trained model (evaluate, predict, export)."""
    card = read_card(run)
    weights_file(run, which)
    return card
