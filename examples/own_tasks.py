"""Tasks of one's own for the command line: a module that ILNAS_PLUGINS names registers them.

    ILNAS_PLUGINS=own_tasks PYTHONPATH=examples ilnas search --preset demo \
        --set "data.tasks=[fashion-mnist,mnist5k]" --set data.data_dir=data --set data.download=true

- ``fashion-mnist``: Zalando's Fashion-MNIST through torchvision (downloaded to data.data_dir where
  data.download is true), 28x28 grey images resized to data.image_size;
- ``arrays``: a NumPy file of one's own, ``<data.data_dir>/arrays.npz`` holding ``x_train``, ``y_train`` and
  optionally ``x_test``, ``y_test`` and ``class_names`` (RGB uint8 images, (N, H, W, 3) or (N, 3, H, W)).
"""
from pathlib import Path

import numpy as np

import ilnas


@ilnas.register_task("fashion-mnist", classes=10, channels=1)
def fashion_mnist(data) -> ilnas.TaskArrays:
    from torchvision.datasets import FashionMNIST

    train, test = (FashionMNIST(data.data_dir, train=part, download=data.download) for part in (True, False))
    return ilnas.TaskArrays(train=(train.data, train.targets), test=(test.data, test.targets),
                            class_names=train.classes)


@ilnas.register_task("arrays", classes=10, channels=3, flip=True)
def arrays(data) -> ilnas.TaskArrays:
    with np.load(Path(data.data_dir) / "arrays.npz") as f:
        test = (f["x_test"], f["y_test"]) if "x_test" in f else None
        names = [str(n) for n in f["class_names"]] if "class_names" in f else None
        return ilnas.TaskArrays(train=(f["x_train"], f["y_train"]), test=test, class_names=names)
