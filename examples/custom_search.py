"""Interleaving-learning search on your own tensors with your own task heads, in plain Python.

Two tasks from the 8x8 UCI digits that ship with scikit-learn: "digit" (ten classes, a two-layer MLP head)
and "parity" (odd or even, a linear head, trained with label smoothing). Both share one searchable DARTS
cell; each keeps its own encoder weights and head. Run:  python examples/custom_search.py [--steps 30]
"""
import argparse
import functools

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from ilnas import SGD, EngineConfig, SpaceConfig, SupernetSearch


class MLPHead(nn.Module):
    """Any module works as a head: it maps the supernet's pooled features (N, width) to logits."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int):
    """Endless shuffled (images, targets) batches."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - size + 1, size):
            yield x[perm[i:i + size]], y[perm[i:i + size]]


def main(steps: int) -> None:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x = (x - x.mean()) / x.std()
    targets = {"digit": torch.tensor(digits.target), "parity": torch.tensor(digits.target % 2)}
    half = len(x) // 2  # the first half trains the weights, the second is the validation set of the architecture
    train = {task: batches(x[:half], y[:half], 32, seed=k) for k, (task, y) in enumerate(targets.items())}
    val = {task: batches(x[half:], y[half:], 32, seed=10 + k) for k, (task, y) in enumerate(targets.items())}

    search = SupernetSearch(
        {"digit": lambda width: MLPHead(width, 10), "parity": lambda width: nn.Linear(width, 2)},
        in_channels=1,
        space=SpaceConfig(channels=8, layers=3),
        rounds=2,                                     # M: digit, parity, digit, parity
        engine=EngineConfig(lam=100.0),               # lambda of the coupling between consecutive stages
        sgd=SGD(lr=0.025, momentum=0.9, weight_decay=3e-4),
        criteria={"parity": functools.partial(F.cross_entropy, label_smoothing=0.1)},  # (logits, targets)
    )
    for step in range(steps):
        metrics = search.step({t: next(b) for t, b in train.items()}, {t: next(b) for t, b in val.items()})
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step + 1}: val loss " + ", ".join(f"{t} {v:.3f}" for t, v in metrics["val_loss"].items()))
    accuracy = (search.logits("digit", x[half:]).argmax(-1) == targets["digit"][half:]).float().mean()
    print(f"digit accuracy of the final stage on the held-out half: {accuracy:.3f}")
    print(f"genotype = {search.genotype().to_string()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    main(parser.parse_args().steps)
