"""torch.hub entry points: the evaluation network of every published cell in the ilnas zoo.

    model = torch.hub.load("<owner>/ilnas", "darts_v2", num_classes=10)           # CIFAR style: 20 cells, C=36
    model = torch.hub.load("<owner>/ilnas", "pdarts", num_classes=1000, style="imagenet")  # 14 cells, C=48

These are architectures only: no pretrained weights ship with ilnas, and ``pretrained=True`` is refused.
Train one with ``ilnas train --genotype DARTS_V2`` and load it with ``ilnas.load_model(run_dir)``.
"""
import sys
from pathlib import Path

try:
    import ilnas  # noqa: F401  (installed)
except ImportError:  # a plain checkout: torch.hub puts the repository, not src/, on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from ilnas.models import create_model
from ilnas.space.genotype import zoo

dependencies = ["torch", "numpy"]


def _entry(genotype: str):
    def build(num_classes: int = 10, pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"no pretrained weights ship with ilnas; {genotype} is architecture only "
                             f"(train it with `ilnas train --genotype {genotype}`)")
        return create_model(genotype, num_classes, **kwargs)

    build.__name__ = genotype.lower()
    build.__doc__ = (f"The {genotype} evaluation network, untrained. kwargs: style (cifar | imagenet), layers, "
                     f"channels, auxiliary, in_channels, resolution (see ilnas.create_model).")
    return build


for _name in zoo():
    globals()[_name.lower()] = _entry(_name)
