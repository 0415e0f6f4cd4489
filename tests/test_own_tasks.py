"""Tasks of one's own: arrays a registered loader returns (ilnas.register_task), searched, re-trained, evaluated
and resumed as the built-in tasks are, and refused in one line where they cannot be."""
from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch

import ilnas
from helpers import SEARCH3, TINY_TRAIN, call, snapshot
from ilnas.config import DataConfig
from ilnas.data import names, tasks as tasks_module
from ilnas.data.tasks import create_task, task_info
from ilnas.errors import IlnasError


def bars(n: int, seed: int, side: int = 12, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(N, side, side, 3) uint8, NHWC as numpy keeps images: class k has a bright row at 2k + 1 over noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 60, (n, side, side, 3)).astype(np.uint8)
    x[np.arange(n), 2 * y + 1] = 230
    return x, y


@pytest.fixture
def registry(monkeypatch):
    """The task registry as it is; whatever a test registers goes with the test."""
    monkeypatch.setattr(tasks_module, "TASKS", dict(tasks_module.TASKS))
    monkeypatch.setattr(names, "_REGISTERED", dict(names._REGISTERED))


PLUGIN = '''
import numpy as np
import ilnas

def grey(n, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 60, (n, 20, 20)).astype(np.uint8)
    x[np.arange(n), 3 * y + 4] = 230
    return x, y

@ilnas.register_task("grey-rows", classes=3, channels=1)
def grey_rows(data):
    x, y = grey(30, 1)
    x[0, 0, 0] = int(open(data.data_dir + "/pixel").read())
    return ilnas.TaskArrays(train=grey(120, 0), test=(x, y), class_names=["top", "middle", "bottom"])
'''


def test_a_task_of_ones_own_is_searched_re_trained_evaluated_and_held_against_a_resume_on_other_data(
        tmp_path, monkeypatch, registry):
    """Through ILNAS_PLUGINS, as a user runs it: an interleaving search of the task with mnist5k (its 20x20 images
    resized to the digits' 16x16), a re-training on it, its evaluation by name. The search records the arrays'
    SHA-256; a resume whose loader returns other arrays (here one pixel of a test image, which changes no split and
    no statistic) is refused, the run untouched, and so is the re-training's; on the same arrays again both resume to
    their ends."""
    (tmp_path / "grey_plugin.py").write_text(PLUGIN)
    (tmp_path / "pixel").write_text("0")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ILNAS_PLUGINS", "grey_plugin")
    run = tmp_path / "s"
    data = ["--set", f"data.data_dir={tmp_path}"]
    code, _, err = call(*SEARCH3, *data, "--set", "data.tasks=[grey-rows,mnist5k]", "--out", str(run))
    assert code == 0, err
    record = json.loads((run / "tasks.json").read_text())[0]
    import grey_plugin

    digest = hashlib.sha256()
    test = grey_plugin.grey(30, 1)
    test[0][0, 0, 0] = 0
    for part, pair in (("train", grey_plugin.grey(120, 0)), ("test", test)):
        for array in (torch.from_numpy(pair[0])[:, None], torch.from_numpy(pair[1]).long()):
            digest.update(f"{part}{tuple(array.shape)}".encode())
            digest.update(array.contiguous().numpy().tobytes())
    assert record["splits"] == {"train": 60, "val": 60, "test": 30} and record["input_shape"] == [1, 16, 16]
    assert record["classes"] == ["top", "middle", "bottom"] and record["data_sha256"] == digest.hexdigest()
    train = tmp_path / "t"
    code, _, err = call("train", "--genotype", str(run), "--preset", "eval-digits", *TINY_TRAIN, *data,
                        "--set", "data.tasks=[grey-rows]", "--out", str(train))
    assert code == 0, err
    assert json.loads((train / "model.json").read_text())["classes"] == ["top", "middle", "bottom"]
    code, out, err = call("evaluate", str(train), "--data", "grey-rows")
    assert code == 0 and "grey-rows (test split): 30 images" in out, err
    elsewhere = tmp_path / "elsewhere"  # --data-dir: the task's files are looked for there, not in the run's data_dir
    elsewhere.mkdir()
    code, _, err = call("evaluate", str(train), "--data", "grey-rows", "--data-dir", str(elsewhere))
    assert code == 2 and f"{elsewhere}/pixel" in err, err
    (elsewhere / "pixel").write_text("0")
    code, out, err = call("evaluate", str(train), "--data", "grey-rows", "--data-dir", str(elsewhere))
    assert code == 0 and "grey-rows (test split): 30 images" in out, err
    for data_dir, data, message in [(tmp_path / "nowhere", "grey-rows", "is no directory"),
                                    ("", "grey-rows", "--data-dir is empty (an unset shell variable?)"),
                                    (elsewhere, str(elsewhere), "is a folder of images itself"),
                                    (elsewhere, "imagenet",  # was a FileNotFoundError's traceback
                                     f"no validation images of imagenet: {elsewhere}/imagenet/val is no directory")]:
        code, _, err = call("evaluate", str(train), "--data", data, "--data-dir", str(data_dir))
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    (run / "summary.json").unlink()  # interrupted before its end
    before = snapshot(run)
    (tmp_path / "pixel").write_text("1")
    code, _, err = call("search", "--resume", "--out", str(run), "--quiet", "--no-report")
    assert code == 2 and "was started on other data than it would resume on (tasks.json [0].data_sha256: " in err, err
    assert snapshot(run) == before
    (train / "result.json").unlink()
    before = snapshot(train)
    code, _, err = call("train", "--resume", "--out", str(train), "--quiet", "--no-report")
    assert code == 2 and "(provenance.json data.data_sha256: " in err, err
    assert snapshot(train) == before
    (tmp_path / "pixel").write_text("0")
    for kind, path, final in (("search", run, "summary.json"), ("train", train, "result.json")):
        code, _, err = call(kind, "--resume", "--out", str(path), "--quiet", "--no-report")
        assert code == 0 and (path / final).is_file(), err


def test_every_layout_of_the_same_images_gives_the_same_task(registry):
    """NHWC numpy, NCHW tensors, and (N, H, W) for one channel: the same uint8 images, split with a fixed seed
    (half and half for the search, a fifth held out where no test split is given), resized to data.image_size
    through the centre square, normalised by the training split's statistics."""
    x, y = bars(50, 0, side=12)
    read_only = x.copy()
    read_only.flags.writeable = False  # as np.frombuffer or a memory map gives them: torch warns of such arrays
    layouts = {"nhwc": (x, y), "nchw": (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)),
               "read-only": (read_only, list(y))}
    for name, train in layouts.items():
        ilnas.register_task(name, classes=4, channels=3, flip=True, crop_padding=1)(
            lambda data, train=train: ilnas.TaskArrays(train=train))
    source = DataConfig(image_size=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b, c = (create_task(name, source) for name in layouts)
    assert a.digest == c.digest
    assert (len(a.train), len(a.val), len(a.test)) == (20, 20, 10)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x) and torch.equal(getattr(a, split).y,
                                                                                     getattr(b, split).y)
    assert a.digest == b.digest and a.flip and a.crop_padding == 1 and a.classes == ("0", "1", "2", "3")
    assert a.mean == pytest.approx(tuple((a.train.x.double() / 255).mean(dim=(0, 2, 3)).tolist()))
    assert task_info("nhwc", source).channels == 3 and task_info("nhwc", DataConfig(image_size=8)).resolution == 8
    wide = np.zeros((8, 6, 10, 3), np.uint8)  # 6 x 10: the centre square is columns 2..7
    wide[:, :, 2:8] = 200
    ilnas.register_task("wide", classes=2, channels=3)(
        lambda data: ilnas.TaskArrays(train=(wide, np.arange(8) % 2), val=(wide[:2], np.array([0, 1])),
                                      test=(wide[:2], np.array([1, 0]))))
    small = create_task("wide", DataConfig(image_size=3))
    assert (small.train.x == 200).all() and small.input_shape == (3, 3, 3) and small.crop_padding == 0
    assert small.val.y.tolist() == [0, 1] and small.test.y.tolist() == [1, 0] and len(small.train) == 8
    grey, labels = bars(10, 1, side=8)
    ilnas.register_task("grey", classes=4, channels=1)(lambda data: ilnas.TaskArrays(train=(grey[..., 0], labels),
                                                                                    val=(grey[:4, ..., 0], labels[:4])))
    one = create_task("grey", DataConfig(image_size=8))
    assert (len(one.train), len(one.val), len(one.test)) == (8, 4, 2) and one.input_shape == (1, 8, 8)
    changed = grey.copy()
    changed[0, 0, 0, 0] += 1  # one pixel
    ilnas.register_task("grey", classes=4, channels=1)(lambda data: ilnas.TaskArrays(train=(changed[..., 0], labels),
                                                                                    val=(grey[:4, ..., 0], labels[:4])))
    assert create_task("grey", DataConfig(image_size=8)).digest != one.digest


X, Y = bars(20, 0)
BAD_LOADERS = [
    (lambda data: (X, Y), "its loader returned tuple, not ilnas.TaskArrays"),
    (lambda data: ilnas.TaskArrays(train=(X / 255.0, Y)), "train images are float64, not uint8 (0..255); convert"),
    (lambda data: ilnas.TaskArrays(train=(X[..., :2], Y)),
     r"train images have shape (20, 12, 12, 2); 3-channel images are (N, 3, H, W) or (N, H, W, 3), N > 0"),
    (lambda data: ilnas.TaskArrays(train=(X, Y + 1)), "train labels must lie in 0..3; found 1..4"),
    (lambda data: ilnas.TaskArrays(train=(X, Y.astype(float))), "train labels must be 20 integers, one per image"),
    (lambda data: ilnas.TaskArrays(train=(X, Y[:5])), "train labels must be 20 integers, one per image"),
    (lambda data: ilnas.TaskArrays(train=(X, Y % 2)), "no training image of class(es) 2, 3"),
    (lambda data: ilnas.TaskArrays(train=(X, Y), test=X), "test must be a pair (images, labels), got ndarray"),
    (lambda data: ilnas.TaskArrays(train=(X[:0], Y[:0])), "train images have shape (0, 3, 12, 12)"),
    (lambda data: ilnas.TaskArrays(train=(["a.png"], [0])), "train is not an array of images and one of labels"),
    (lambda data: ilnas.TaskArrays(train=(X[:3], Y[:3] % 3)), "no training image of class(es) 3"),
    (lambda data: ilnas.TaskArrays(train=(X, Y), class_names=["a", "b"]), "class_names must be 4 different strings"),
    (lambda data: ilnas.TaskArrays(train=(X, Y), class_names="abcd"), "class_names must be 4 different strings"),
    (lambda data: ilnas.TaskArrays(train=(X, Y), class_names=["a", "b", "a", "c"]), "must be 4 different strings"),
    (lambda data: ilnas.TaskArrays(train=(X, Y), class_names=["a", "b", "c", "d", "a"]), "must be 4 different strings"),
    (lambda data: ilnas.TaskArrays(train=(X, Y), class_names=4), "class_names must be 4 different strings"),
    (lambda data: exit(1), "its loader failed (SystemExit: 1)"),
    (lambda data: open(data.data_dir + "/nowhere"), "its loader failed (FileNotFoundError: "),
]


@pytest.mark.parametrize("loader, message", BAD_LOADERS, ids=[m[:24] for _, m in BAD_LOADERS])
def test_what_a_loader_of_ones_own_returns_is_checked_in_one_line(loader, message, registry, tmp_path):
    ilnas.register_task("mine", classes=4, channels=3)(loader)
    with pytest.raises(IlnasError) as caught:
        create_task("mine", DataConfig(data_dir=str(tmp_path), image_size=12))
    assert str(caught.value).startswith("task 'mine': ") and message in str(caught.value), caught.value
    assert "\n" not in str(caught.value)


def test_a_task_of_ones_own_too_large_for_the_memory_limit_once_resized_is_refused_before_it_is(registry):
    ilnas.register_task("mine", classes=4, channels=3)(lambda data: ilnas.TaskArrays(train=(X, Y), test=(X, Y)))
    with pytest.raises(IlnasError, match=r"^task 'mine' takes 0\.13 GB held in memory at 1024x1024, over "
                                         r"data\.memory_limit_gb=0\.1; lower data\.image_size or raise the limit$"):
        create_task("mine", DataConfig(image_size=1024, memory_limit_gb=0.1))


@pytest.mark.parametrize("name, settings, message", [
    ("cifar10", {}, "none of cifar10, cifar100"), ("imagefolder", {}, "none of"), ("My Task", {}, "lower-case"),
    ("a:b", {}, "lower-case"), ("ok", {"classes": 1}, "classes must be an integer of at least 2, got 1"),
    ("ok", {"channels": 0}, "channels must be an integer of at least 1"),
    ("ok", {"crop_padding": -1}, "crop_padding must be an integer of at least 0"),
    ("ok", {"flip": "yes"}, "flip must be true or false")])
def test_a_task_of_ones_own_is_registered_only_under_a_name_and_facts_that_can_be(name, settings, message, registry):
    before = dict(tasks_module.TASKS)
    with pytest.raises(IlnasError, match=message.replace("(", r"\(")):
        ilnas.register_task(name, **{"classes": 3, "channels": 1, **settings})
    assert tasks_module.TASKS == before


def test_a_crop_padding_as_wide_as_the_images_is_refused_at_their_size(registry):
    ilnas.register_task("mine", classes=4, channels=3, crop_padding=12)(lambda data: ilnas.TaskArrays(train=(X, Y)))
    assert create_task("mine", DataConfig(image_size=16)).crop_padding == 12
    with pytest.raises(IlnasError, match=r"^task 'mine': crop_padding 12 must be less than data.image_size 12: a "
                                         r"crop could hold no pixel of its image$"):
        create_task("mine", DataConfig(image_size=12))


def test_a_search_on_a_task_its_plugin_does_not_register_is_refused_naming_ilnas_plugins(tmp_path):
    code, _, err = call(*SEARCH3, "--set", "data.tasks=[grey-rows,mnist5k]", "--out", str(tmp_path / "s"))
    assert code == 2 and "unknown task 'grey-rows'" in err and "ILNAS_PLUGINS" in err, err
    assert not (tmp_path / "s").exists()


def _idx(path, array: np.ndarray) -> None:
    """An IDX file as Fashion-MNIST ships them: magic (0, 0, dtype 0x08 = ubyte, dims), big-endian sizes, bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_the_example_plugins_read_fashion_mnist_files_and_a_numpy_file(registry, tmp_path):
    """examples/own_tasks.py on small files in the real formats: Fashion-MNIST's IDX files where torchvision
    looks for them (FashionMNIST/raw), and an .npz of (N, H, W, 3) images without a test split."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("own_tasks", Path(__file__).parents[1] / "examples" / "own_tasks.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    for part, n in (("train", 40), ("t10k", 10)):
        _idx(raw / f"{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{part}-labels-idx1-ubyte", np.arange(n) % 10)
    source = DataConfig(data_dir=str(tmp_path), download=False, image_size=14)
    fashion = create_task("fashion-mnist", source)
    assert fashion.input_shape == (1, 14, 14)
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (20, 20, 10)
    assert fashion.classes[0] == "T-shirt/top" and fashion.test.y.tolist() == list(range(10))
    x, y = bars(30, 0, classes=10, side=24)
    np.savez(tmp_path / "arrays.npz", x_train=x, y_train=y, class_names=np.array([f"c{i}" for i in range(10)]))
    own = create_task("arrays", source)
    assert own.input_shape == (3, 14, 14) and (len(own.train), len(own.val), len(own.test)) == (12, 12, 6)
    assert own.classes[-1] == "c9" and own.flip and "data_sha256" in own.digest


def test_the_readmes_plugins_run_as_written(registry, monkeypatch, tmp_path):
    """The README's my_ops.py, my_tasks.py and my_nets.py, executed as printed: an operation that passes the
    check, a task read from a NumPy file, and a network that re-trains a cell on that task's images."""
    import re
    from pathlib import Path

    from ilnas.space import layout, network, ops
    from ilnas.space.genotype import zoo
    from ilnas.space.network import check_input_size

    monkeypatch.setattr(ops, "OPS", dict(ops.OPS))
    monkeypatch.setattr(layout, "_REGISTERED", dict(layout._REGISTERED))
    monkeypatch.setattr(network, "NETWORKS", dict(network.NETWORKS))
    monkeypatch.setattr(layout, "_STYLES", dict(layout._STYLES))
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in ("my_ops", "my_tasks", "my_nets"):
        code = re.search(rf"```python\n(# {name}\.py\n.*?)```", readme, re.S).group(1)
        exec(compile(code, f"README.md:{name}.py", "exec"), {"__name__": name})
    ops.check_ops(["conv_1x1"])
    x, y = bars(40, 0, side=20, classes=4)
    np.savez(tmp_path / "scans.npz", x_train=x[..., 0], y_train=y, x_test=x[:8, ..., 0], y_test=y[:8])
    task = create_task("scans", DataConfig(data_dir=str(tmp_path), image_size=16))
    assert task.classes[2] == "malignant" and task.input_shape == (1, 16, 16) and len(task.test) == 8
    check_input_size(zoo()["DARTS_V2"], 4, 1, 16, style="plain", layers=2, channels=8, auxiliary=False)


def test_presets_lists_the_tasks_built_in_and_registered_without_torch(registry):
    """The names `ilnas presets` lists are those a run accepts: the in-memory tasks tasks.py loads, then one's own,
    then the image-folder tasks; known without torch, as `presets` starts without it."""
    assert sorted(names.BUILT_IN_TASKS) == sorted(tasks_module.TASKS)
    ilnas.register_task("scans", classes=3, channels=1)(lambda data: None)
    listed = "cifar10, cifar100, digits, mnist5k, scans, imagenet, imagefolder:<path>"
    assert call("presets")[1].splitlines()[-1] == f"tasks a run may learn (data.tasks): {listed}"
    assert names.known_tasks() == listed
