"""From a folder of one's own images to deployable models: search and re-training on image folders, the
model artifact (safetensors + model.json), load_model, evaluate, predict, export, torch.hub, create_model."""
from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.torch_version import TorchVersion

from helpers import FOUR_OPS, call, ilnas_here, snapshot, write_image_folder
from ilnas.errors import IlnasError
from ilnas.models import create_model
from ilnas.fileio import umask
from ilnas.exporters import require_onnx_export
from ilnas.recipes.export import export_model
from ilnas.space.genotype import zoo

REPO = Path(__file__).resolve().parents[1]
TINY_SEARCH = ["--quiet", "--no-report", "--set", "space.layers=3", "--set", "space.channels=4",
               "--set", "search.batch_size=8", "--set", "search.steps_per_epoch=2", "--set", "search.epochs=2",
               "--set", "data.image_size=16", "--set", FOUR_OPS]
TINY_TRAIN = ["--quiet", "--no-report", "--preset", "eval-digits", "--set", "network.layers=3",
              "--set", "network.channels=4", "--set", "train.batch_size=6", "--set", "train.epochs=3",
              "--set", "data.image_size=16", "--set", "train.cutout=0"]


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory) -> dict[str, Path]:
    """Two image folders of PNGs, an IL search over both (K=2, M=2), and the found cell re-trained on the
    first: the documented path, command by command."""
    root = tmp_path_factory.mktemp("own")
    write_image_folder(root / "pets", classes=("cat", "dog", "eel"), per_class=6)
    write_image_folder(root / "fruit", classes=("apple", "fig"), per_class=8)
    pets, fruit = f"imagefolder:{root / 'pets'}", f"imagefolder:{root / 'fruit'}"
    r = ilnas_here("search", *TINY_SEARCH, "--set", f"data.tasks=[{pets}, {fruit}]", "--out", str(root / "search"))
    assert r.returncode == 0, r.stderr
    r = ilnas_here("train", "--genotype", str(root / "search"), *TINY_TRAIN, "--set", f"data.tasks=[{pets}]",
                   "--out", str(root / "train"))
    assert r.returncode == 0, r.stderr
    return {"root": root, "pets": root / "pets", "search": root / "search", "train": root / "train"}


def test_a_search_over_two_image_folders_finishes_with_both_learners(folder_runs):
    summary = json.loads((folder_runs["search"] / "summary.json").read_text())
    assert summary["genotype"].startswith("Genotype(")
    last = [json.loads(line) for line in (folder_runs["search"] / "metrics.jsonl").read_text().splitlines()][-1]
    assert set(last["val_acc"]) == {f"imagefolder:{folder_runs['root'] / n}" for n in ("pets", "fruit")}
    tasks = json.loads((folder_runs["search"] / "tasks.json").read_text())
    assert [t["classes"] for t in tasks] == [["cat", "dog", "eel"], ["apple", "fig"]]
    assert [t["splits"] for t in tasks] == [{"train": 9, "val": 9, "test": 6}, {"train": 8, "val": 8, "test": 4}]
    assert all(t["input_shape"] == [3, 16, 16] and len(t["mean"]) == len(t["std"]) == 3 for t in tasks)


def test_a_training_run_leaves_a_model_that_loads_ready_to_use(folder_runs):
    from ilnas import load_model
    from ilnas.config import DataConfig
    from ilnas.data.tasks import create_task
    from ilnas.runs import read_checkpoint

    run = folder_runs["train"]
    card = json.loads((run / "model.json").read_text())
    task = create_task(f"imagefolder:{folder_runs['pets']}", DataConfig(image_size=16))
    assert card["classes"] == ["cat", "dog", "eel"] and card["input_size"] == [3, 16, 16]
    assert card["mean"] == list(task.mean) and card["std"] == list(task.std) and card["resize"] == 16
    assert card["genotype"] == (folder_runs["search"] / "genotype.txt").read_text().strip()
    model = load_model(run)
    assert not model.training and model.card.classes == ("cat", "dog", "eel")
    logits = model(model.card.normalize(task.test.x))
    assert isinstance(logits, torch.Tensor) and logits.shape == (6, 3)  # plain logits, no auxiliary output
    saved = read_checkpoint(run / "checkpoint.pt")["model"]  # the last epoch's state, as the checkpoint holds it
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_evaluate_reproduces_the_runs_test_error_from_a_task_and_from_the_folder(folder_runs):
    run = folder_runs["train"]
    result = json.loads((run / "result.json").read_text())
    r = ilnas_here("evaluate", str(run), "--data", f"imagefolder:{folder_runs['pets']}", "--json")
    assert r.returncode == 0, r.stderr
    by_task = json.loads(r.stdout)
    assert by_task["images"] == 6 and by_task["top1"] == pytest.approx(1 - result["final_test_error"], abs=1e-9)
    out = Path(by_task["out"])
    confusion = np.loadtxt(out / "confusion.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3))
    assert confusion.sum() == 6 and confusion.trace() / 6 == pytest.approx(by_task["top1"])
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    per_class = (out / "per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,images,accuracy" and len(per_class) == 4
    # The folder itself: its val/ decoded by the card's preprocessing gives the same pixels, the same answer.
    r = ilnas_here("evaluate", str(run), "--data", str(folder_runs["pets"]), "--weights", "best", "--json",
                   "--out", str(folder_runs["root"] / "eval-best"))
    assert r.returncode == 0, r.stderr
    best = json.loads(r.stdout)
    assert best["top1"] == pytest.approx(1 - result["best_test_error"], abs=1e-9)
    assert (folder_runs["root"] / "eval-best" / "evaluation.json").is_file()


def test_two_folders_of_one_name_each_keep_their_evaluation(folder_runs, tmp_path):
    """a/val and b/val both make <run>/evaluations/val-last: the second replaced the first's files. It goes
    to val-last-2 instead; evaluating a/val again brings its own folder up to date."""
    import shutil

    run = tmp_path / "train"
    shutil.copytree(folder_runs["train"], run)
    for name in ("a", "b"):
        shutil.copytree(folder_runs["pets"] / "val", tmp_path / name / "val")
    outs = []
    for name in ("a", "b", "a"):
        code, out, err = call("evaluate", str(run), "--data", str(tmp_path / name / "val"), "--json")
        assert code == 0, err
        outs.append(json.loads(out))
    assert [Path(o["out"]).name for o in outs] == ["val-last", "val-last-2", "val-last"]
    for o in outs:
        assert json.loads((Path(o["out"]) / "evaluation.json").read_text())["data"] == o["data"]
    assert outs[0]["data"] == str((tmp_path / "a" / "val").resolve()) != outs[1]["data"]


def test_predict_names_the_top_classes_with_the_models_probabilities(folder_runs):
    from ilnas import load_model

    run, images = folder_runs["train"], sorted((folder_runs["pets"] / "val").rglob("*.png"))[:3]
    r = ilnas_here("predict", str(run), *map(str, images), "--top-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    model = load_model(run)
    with torch.no_grad():
        probs = model(model.card.normalize(model.card.read_images(images))).softmax(-1)
    for item, p in zip(found, probs):
        assert len(item["top"]) == 2 and item["top"][0]["class"] == model.card.classes[int(p.argmax())]
        assert item["top"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-6)
    r = ilnas_here("predict", str(run), str(images[0]))
    assert r.returncode == 0 and r.stdout.startswith(f"{images[0]}: ") and r.stdout.count(",") == 2


def test_predict_reads_and_classifies_a_batch_at_a_time_with_the_same_result(folder_runs, monkeypatch):
    from ilnas.card import ModelCard
    from ilnas.recipes.evaluate import predict

    images = sorted((folder_runs["pets"] / "val").rglob("*.png"))
    whole = predict(folder_runs["train"], images, top_k=3)
    read = []
    reader = ModelCard.read_images
    monkeypatch.setattr(ModelCard, "read_images", lambda card, paths: read.append(len(paths)) or reader(card, paths))
    batched = predict(folder_runs["train"], images, top_k=3, batch_size=4)
    assert read == [4, 2] and len(images) == 6
    assert [r["image"] for r in batched] == [r["image"] for r in whole]
    for a, b in zip(batched, whole):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in b["top"]], abs=1e-6)


def test_predict_prints_one_line_per_image_whatever_its_name(folder_runs, tmp_path):
    """A file name may hold a line break; the text output keeps one image a line (it is escaped)."""
    odd = tmp_path / "two\nlines.png"
    shutil.copy(sorted((folder_runs["pets"] / "val").rglob("*.png"))[0], odd)
    rc, out, err = call("predict", str(folder_runs["train"]), str(odd), str(odd), "--top-k", "1")
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{tmp_path}/two\\nlines.png: ") for line in lines), out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported-program"])
def test_every_export_format_agrees_with_pytorch(folder_runs, fmt, tmp_path):
    from ilnas import load_model

    if fmt == "onnx":
        try:
            require_onnx_export()
        except IlnasError as e:  # an older torch: its refusal is tested below
            pytest.skip(str(e))
    """Whatever --out's suffix (ONNX picked a text serialisation by it), the model is one self-contained file:
    moved alone to another folder it still loads (ONNX kept some weights in a second file, named after the
    temporary one), and readable by others as any new file is (not mkstemp's owner-only mode)."""
    out = tmp_path / "export" / "m.model"
    r = ilnas_here("export", str(folder_runs["train"]), "--format", fmt, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "max |logit difference|" in r.stdout and json.loads(out.with_suffix(".json").read_text())["classes"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.json", "m.model"]
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask()
    out = out.rename(tmp_path / {"onnx": "m.onnx", "torchscript": "m.pt", "exported-program": "m.pt2"}[fmt])
    model = load_model(folder_runs["train"])
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(x)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in recent releases
            got = torch.jit.load(str(out))(x)
    else:
        got = torch.export.load(str(out)).module()(x)
    assert got.shape == (5, 3) and torch.allclose(got, expected, atol=1e-4, rtol=0)


def test_onnx_export_on_an_older_torch_is_refused_before_writing(folder_runs, tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")  # without the onnx extra, its absence is said first
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.5.1"))
    out = tmp_path / "deploy" / "m.onnx"
    with pytest.raises(IlnasError, match=r"ONNX export needs torch >= 2\.\d+ \(this is torch 2\.5\.1\); the "
                                         r"torchscript and exported-program formats work"):
        export_model(folder_runs["train"], "onnx", out)
    assert not (tmp_path / "deploy").exists()


def test_an_onnx_exporter_failure_is_one_line_and_leaves_no_file(folder_runs, tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")

    def failing_export(*args, **kwargs):
        raise RuntimeError("Failed to convert the exported program to an ONNX model.\n\n## Exception summary\n...")

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.14.1"))
    monkeypatch.setattr(torch.onnx, "export", failing_export)
    out = tmp_path / "m.onnx"
    with pytest.raises(IlnasError) as e:
        export_model(folder_runs["train"], "onnx", out)
    assert "\n" not in str(e.value) and str(e.value).startswith("torch.onnx cannot export this network with torch "
                                                                 "2.14.1 and onnxscript ")
    assert "(Failed to convert the exported program to an ONNX model.)" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_torch_hub_builds_the_zoo_with_published_sizes_and_refuses_pretrained():
    hub = torch.hub.load(str(REPO), "darts_v2", source="local", num_classes=10, trust_repo=True, verbose=False)
    assert sum(p.numel() for p in hub.parameters()) == 3_349_342  # the official "param size = 3.349342MB"
    assert hub(torch.zeros(2, 3, 32, 32))[0].shape == (2, 10)  # a fresh module is in training mode
    big = torch.hub.load(str(REPO), "pdarts", source="local", num_classes=1000, style="imagenet", verbose=False)
    assert round(sum(p.numel() for p in big.parameters()) / 1e6, 1) == 4.9  # P-DARTS, ImageNet: 4.9M
    with pytest.raises(ValueError, match="no pretrained weights"):
        torch.hub.load(str(REPO), "darts_v2", source="local", pretrained=True, verbose=False)


def test_create_model_builds_any_genotype_by_name_or_run(folder_runs):
    from ilnas import create_model
    from ilnas.space.genotype import load_genotype
    from ilnas.space.network import NetworkCIFAR

    found = create_model(str(folder_runs["search"]), num_classes=3)
    same = NetworkCIFAR(load_genotype(str(folder_runs["search"])), 3, 20, 36, auxiliary=False)
    assert [p.shape for p in found.parameters()] == [p.shape for p in same.parameters()]
    assert isinstance(create_model("random:3", 100, layers=8, channels=16), NetworkCIFAR)
    with pytest.raises(IlnasError, match="style must be"):
        create_model("DARTS_V2", style="mobile")


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": 2}, "layers must be at least 3, got 2: with fewer cells the network has no normal cell"),
    ({"num_classes": True}, "num_classes must be a positive integer, got True"),
    ({"num_classes": 10.0}, "num_classes must be a positive integer, got 10.0"),
    ({"channels": 2.5}, "channels must be an integer, got 2.5"),
    ({"resolution": 0}, "resolution must be a positive integer of at most 1024, got 0"),
    # a classifier of 2.6e14 bytes, more than any address space: torch's allocator error, said as ilnas says it
    ({"num_classes": 10 ** 12, "layers": 3, "channels": 4}, "the network cannot be built: out of memory (")])
def test_create_model_checks_its_arguments_as_ilnas_train_checks_its_network(kwargs, message):
    """Through torch.hub too: two cells made a network of reduction cells only (the genotype's normal cell in
    none of them), which `ilnas train` refuses; a float or a bool came back as a TypeError from inside torch, and a
    network too large for the machine as the allocator's RuntimeError."""
    with pytest.raises(IlnasError, match=f"^{re.escape(message)}"):
        torch.hub.load(str(REPO), "darts_v2", source="local", verbose=False, **{"num_classes": 10, **kwargs})
    small = create_model("DARTS_V2", np.int64(10), resolution=np.int32(16))  # numpy's integers are integers
    assert small(torch.zeros(1, 3, 16, 16))[0].shape == (1, 10)


@pytest.mark.parametrize("args, message", [
    (["evaluate", "__RUN__", "--data", "digits"], "digits's images are 1x16x16, the model takes 3x16x16"),
    (["evaluate", "__RUN__", "--data", "__OTHER__"], "has classes the model does not know (apple"),
    (["evaluate", "__RUN__", "--data", "no-such-thing"], "is neither a folder nor a task"),
    (["evaluate", "__SEARCH__", "--data", "digits"], "holds no model.json"),
    (["predict", "__RUN__", "nowhere.png"], "no image file nowhere.png"),
    (["predict", "__RUN__", "__ROOT__"], "; it is a folder: `ilnas evaluate RUN --data FOLDER` takes a folder of "
                                         "labelled images, predict takes image files (FOLDER/*.jpg)"),
    (["predict", "__RUN__", "__RUN__/model.json"], "cannot read image"),
    (["export", "__RUN__", "--format", "tflite"], "invalid choice: 'tflite'"),
    (["predict", "__RUN__", "x.png", "--device", "gpu"], "device must be auto, cpu, cuda or cuda:N"),
    # an export or evaluation written over the run's own files: its weights, or (the card beside an export) its result
    (["export", "__RUN__", "--format", "torchscript", "--out", "__RUN__/model.safetensors"],
     "model.safetensors lies in run directory"),
    (["export", "__RUN__", "--format", "torchscript", "--out", "__RUN__/result.pt"], "result.pt lies in run directory"),
    (["export", "__RUN__", "--format", "torchscript", "--out", "__SEARCH__/x.pt"], "x.pt lies in run directory"),
    # a path through a folder below the run and back up: the folder written in is the run's own
    (["export", "__RUN__", "--format", "torchscript", "--out", "__RUN__/export/../model.safetensors"],
     "model.safetensors lies in run directory"),
    # the model and its card under one name
    (["export", "__RUN__", "--format", "onnx", "--out", "__ROOT__/m.json"], "ends in .json, the name its card"),
    (["evaluate", "__RUN__", "--data", "__OTHER__", "--out", "__RUN__"], "evaluation.json lies in run directory"),
])
def test_bad_model_commands_are_one_line_and_touch_no_run(folder_runs, args, message):
    run, search = folder_runs["train"], folder_runs["search"]
    before = {p: snapshot(p) for p in (run, search)}
    args = [a.replace("__RUN__", str(run)).replace("__SEARCH__", str(search))
            .replace("__OTHER__", str(folder_runs["root"] / "fruit")).replace("__ROOT__", str(folder_runs["root"]))
            for a in args]
    rc, _, err = call(*args)
    assert rc == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert {p: snapshot(p) for p in (run, search)} == before


def test_an_export_or_evaluation_replaces_only_its_own_earlier_files(folder_runs, tmp_path):
    """--out names a file or folder that may hold a user's own files: an export replaces an earlier export (a model
    whose ilnas card lies beside it), an evaluation an earlier evaluation, and neither anything else."""
    run, photo, notes = folder_runs["train"], tmp_path / "photo.png", tmp_path / "notes.json"
    photo.write_bytes(b"\x89PNG a photo")
    notes.write_text('{"mine": true}')
    exports = [["export", str(run), "--format", "torchscript", "--out", str(out)]
               for out in (photo, tmp_path / "notes.pt", tmp_path / "model.pt")]
    for argv, kept in zip(exports, (photo, notes)):
        code, _, err = call(*argv)
        assert code == 2 and "exists and is no earlier ilnas export (whose model card " in err, err
        assert photo.read_bytes() == b"\x89PNG a photo" and notes.read_text() == '{"mine": true}'
    assert call(*exports[2])[0] == 0 and call(*exports[2])[0] == 0  # its own export, replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "confusion.png").write_bytes(b"my figure")
    evaluate = ["evaluate", str(run), "--data", str(folder_runs["pets"])]
    code, _, err = call(*evaluate, "--out", str(tmp_path / "mine"))
    assert code == 2 and err.startswith(f"ilnas: error: --out {tmp_path / 'mine'} holds confusion.png and no earlier "
                                        f"ilnas evaluation"), err
    assert (tmp_path / "mine" / "confusion.png").read_bytes() == b"my figure"
    for _ in range(2):  # its own evaluation, brought up to date
        assert call(*evaluate, "--out", str(tmp_path / "eval"))[0] == 0


def test_an_export_into_a_folder_takes_the_formats_file_name_there(folder_runs, tmp_path, monkeypatch):
    """A folder as --out (one that exists, or any ending in /): '.' ended in a traceback ("has an empty name"),
    an existing folder was refused as someone's file, and 'new/' was written as a file named new."""
    monkeypatch.chdir(tmp_path)
    run = str(folder_runs["train"])
    for out, folder in ((".", tmp_path), ("new/", tmp_path / "new"), (str(tmp_path / "new"), tmp_path / "new")):
        code, printed, err = call("export", run, "--format", "torchscript", "--out", out)
        assert code == 0, err
        assert (folder / "model.torchscript.pt").is_file() and (folder / "model.torchscript.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.torchscript.json", "model.torchscript.pt", "new"]


def test_an_evaluation_or_export_that_could_not_be_written_is_refused_before_it_is_made(folder_runs, tmp_path,
                                                                                      monkeypatch):
    """An --out that is a file (or lies below one) was found only once every image had been classified, or the
    model exported and checked ("File exists")."""
    from ilnas import models

    monkeypatch.setattr(models, "load_model", lambda *a: pytest.fail("evaluated or exported before --out was checked"))
    (tmp_path / "notes.txt").write_text("mine")
    run, data = str(folder_runs["train"]), str(folder_runs["pets"])
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "eval"):
        code, _, err = call("evaluate", run, "--data", data, "--out", str(out))
        assert (code, err) == (2, f"ilnas: error: cannot create the evaluation's folder {out}: "
                                  f"{tmp_path / 'notes.txt'} is a file\n")
    code, _, err = call("export", run, "--format", "torchscript", "--out", str(tmp_path / "notes.txt" / "m.pt"))
    assert (code, err) == (2, f"ilnas: error: cannot create the export's folder {tmp_path / 'notes.txt'}: "
                              f"{tmp_path / 'notes.txt'} is a file\n")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kind", ["search", "train"])
def test_a_run_is_not_resumed_on_other_data_than_it_started_on(folder_runs, tmp_path, monkeypatch, kind):
    """Images added to a folder between two sessions (or another folder under the same relative path) change
    the splits and the normalisation under a run that went on as if nothing had happened. Here the folder's
    statistics are made to come out otherwise, as more images would make them: the resume is refused before
    anything is written, naming the difference."""
    from ilnas.data import tasks

    run = tmp_path / kind
    shutil.copytree(folder_runs[kind], run)
    for name in ("summary.json", "result.json"):
        (run / name).unlink(missing_ok=True)
    before = snapshot(run)
    stats = tasks._stats
    monkeypatch.setattr(tasks, "_stats", lambda x: (stats(x)[0], tuple(v * 1.01 for v in stats(x)[1])))
    code, _, err = call(kind, "--resume", "--out", str(run), "--quiet", "--no-report")
    where = "tasks.json [0].std[0]" if kind == "search" else "model.json std[0]"
    assert code == 2 and err.startswith(f"ilnas: error: {run} was started on other data than it would resume on "
                                        f"({where}: 0."), err
    assert err.endswith("now); restore the data it started on (a relative path is read from the directory the "
                        "command runs in), or start a new run\n") and len(err.splitlines()) == 1, err
    assert snapshot(run) == before


@pytest.mark.parametrize("kind", ["search", "train"])
def test_an_image_moved_to_another_class_is_held_against_a_resume(tmp_path, kind):
    """A folder of identical images (duplicates are common in scraped data): one moved to another class changes
    no image count, no split size and no statistic, only its label. The run's listing of the folder's files
    and labels (files_sha256) tells: the resume is refused; with the image moved back, it resumes to its end."""
    from PIL import Image

    for split, n in (("train", 6), ("val", 2)):
        for c in ("cat", "dog", "eel"):
            (tmp_path / "pets" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 20), (90, 120, 200)).save(tmp_path / "pets" / split / c / f"{i}.png")
    run, final = tmp_path / kind, "summary.json" if kind == "search" else "result.json"
    argv = [kind, *(TINY_SEARCH if kind == "search" else ["--genotype", "DARTS_V2", *TINY_TRAIN]),
            "--set", f"data.tasks=[imagefolder:{tmp_path / 'pets'}]", "--out", str(run)]
    code, _, err = call(*argv)
    assert code == 0, err
    (run / final).unlink()  # interrupted before its end
    before, moved = snapshot(run), tmp_path / "pets" / "train" / "dog" / "6.png"
    (tmp_path / "pets" / "train" / "cat" / "5.png").rename(moved)
    code, _, err = call(kind, "--resume", "--out", str(run), "--quiet", "--no-report")
    where = "tasks.json [0].files_sha256" if kind == "search" else "provenance.json data.files_sha256"
    assert code == 2 and f"was started on other data than it would resume on ({where}: '" in err, err
    assert snapshot(run) == before
    moved.rename(tmp_path / "pets" / "train" / "cat" / "5.png")
    code, _, err = call(kind, "--resume", "--out", str(run), "--quiet", "--no-report")
    assert code == 0 and (run / final).is_file(), err


def test_data_alike_to_rounding_is_the_same_data(tmp_path):
    """Statistics summed in another order (another torch) differ by ~1e-16: the same data; and a field that a
    record of another version lacks is no difference. A class renamed, or an image more, is."""
    from ilnas.runs import require_same_data

    record = [{"classes": ["cat", "dog"], "mean": [0.1, 0.2], "splits": {"train": 9}}]
    (tmp_path / "tasks.json").write_text(json.dumps(record))
    require_same_data(tmp_path, "tasks.json", [{**record[0], "mean": (0.1 + 1e-16, 0.2)}])
    require_same_data(tmp_path / "nowhere", "tasks.json", [])  # nothing written yet: nothing to hold against
    require_same_data(tmp_path, "tasks.json", [{**record[0], "new": 1}])
    for changed, where in (({"mean": [0.1, 0.2001]}, "[0].mean[1]"), ({"classes": ["cat", "eel"]}, "[0].classes[1]"),
                           ({"splits": {"train": 10}}, "[0].splits.train")):
        with pytest.raises(IlnasError, match=rf"\(tasks\.json {re.escape(where)}: "):
            require_same_data(tmp_path, "tasks.json", [{**record[0], **changed}])


def _edited_copy(run: Path, where: Path, keys: tuple[str, ...], value) -> Path:
    """A copy of a training run whose model.json has ``value`` at ``keys``."""
    shutil.copytree(run, where)
    card = json.loads((where / "model.json").read_text())
    inner = card
    for k in keys[:-1]:
        inner = inner[k]
    inner[keys[-1]] = value
    (where / "model.json").write_text(json.dumps(card))
    return where


@pytest.mark.parametrize("keys, value, message", [
    (("network", "layers"), "x", "network.layers must be an integer, got 'x'"),
    (("network", "layers"), 10 ** 9, "network.layers must be at most 1000"),
    (("network", "channels"), -4, "network.channels must be positive"),
    (("network", "style"), "mobile",  # a style of one's own whose plugin is not loaded: no damaged card
     "model.json: network.style must be one of cifar, imagenet, got 'mobile' (one of your own: ilnas.register_network"),
    (("genotype",), zoo()["DARTS_V2"].to_string().replace("sep_conv_3x3", "laser_conv"),
     "model.json: unknown operation 'laser_conv' in the normal cell; known: max_pool_3x3,"),
    (("network", "auxiliary_weight"), 0.4, "network must hold style, layers, channels, auxiliary"),
    (("network",), 5, "network must be a mapping"),
    (("input_size",), [3, 10 ** 6, 10 ** 6], "input_size must be (1 or 3, side, side)"),
    (("resize",), 10 ** 9, "resize must lie in"),
    (("std",), [0.2, 0.0, 0.2], "std positive"),
    (("classes",), ["cat", "cat", "eel"], "classes must be distinct"),
    (("genotype",), "Genotype(normal=[], normal_concat=[], reduce=[], reduce_concat=[])", "malformed genotype"),
    (("classes",), ["cat", "dog", "eel", "fox"], "4 tensor(s) differ, the first 'auxiliary.classifier.bias' "
                                                 "(3 in the file, 4 in the network)"),
    (("network", "auxiliary"), False, "absent in the network"),
])
def test_a_model_card_edited_out_of_step_with_its_weights_is_refused_in_one_line(folder_runs, tmp_path, keys,
                                                                                   value, message):
    """model.json by hand: every value is checked, and the network it describes must hold the weights file's
    tensors, shape for shape, before a network is built (on the meta device first)."""
    run = _edited_copy(folder_runs["train"], tmp_path / "run", keys, value)
    before = snapshot(run)
    rc, _, err = call("predict", str(run), str(next((folder_runs["pets"] / "val" / "cat").iterdir())))
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "model.json: " not in message or "is not an ilnas model card" not in err, err  # code not loaded here
    assert snapshot(run) == before


def test_a_model_card_far_wider_than_its_weights_builds_nothing_of_its_size(folder_runs, tmp_path):
    """C=3000 in the card of a C=4 network: 10 GB of weights, refused under a 4 GB address-space limit."""
    run = _edited_copy(folder_runs["train"], tmp_path / "run", ("network", "channels"), 3000)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2 ** 30, 4 * 2 ** 30))
    r = subprocess.run([sys.executable, "-m", "ilnas", "evaluate", str(run), "--data", str(folder_runs["pets"])],
                       capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().endswith("does not hold the weights of the network model.json describes: "
                                     "98 tensor(s) differ, the first 'auxiliary.features.2.weight' (128x64x1x1 in "
                                     "the file, 128x48000x1x1 in the network)"), r.stderr


def test_image_shapes_are_checked_before_anything_is_written(tmp_path):
    write_image_folder(tmp_path / "pets")
    pets = f"imagefolder:{tmp_path / 'pets'}"
    r = ilnas_here("search", *TINY_SEARCH, "--set", f"data.tasks=[{pets}, digits]", "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "differ in shape" in r.stderr and "digits 1x16x16" in r.stderr, r.stderr
    r = ilnas_here("train", "--genotype", "DARTS_V2", *TINY_TRAIN, "--set", f"data.tasks=[{pets}]",
                   "--set", "network.style=imagenet", "--out", str(tmp_path / "t"))
    assert r.returncode == 2 and "too small for the imagenet-style network" in r.stderr, r.stderr
    assert r.stderr.rstrip().endswith("use larger images (data.image_size) or another network.style"), r.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()
