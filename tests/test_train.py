"""Re-training: schedules, sharding, torchrun/DDP on gloo, image folders, CIFAR-100, kill + resume."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ilnas.data.loader import BatchMaker, ShardedEpochs
from ilnas.config import DataConfig
from ilnas.data.tasks import create_task
from ilnas.optim import SGD
from helpers import TINY_TRAIN as TINY, call, folder_training, ilnas_here, snapshot, write_image_folder
from helpers import RENDEZVOUS, ranks_stderr, write_cifar

def test_schedules_follow_their_formulas():
    assert SGD(lr=0.025).lr_at(0, 600) == 0.025
    assert math.isclose(SGD(lr=0.025).lr_at(300, 600), 0.0125)
    assert math.isclose(SGD(lr=0.025, lr_min=0.001).lr_at(150, 600), 0.001 + 0.024 * (1 + math.cos(math.pi / 4)) / 2)
    # ImageNet: 5 warm-up epochs to 0.5, then linear decay
    linear = SGD(lr=0.5, schedule="linear", warmup_epochs=5)
    assert [linear.lr_at(e, 250) for e in range(5)] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert math.isclose(linear.lr_at(125, 250), 0.25)
    assert math.isclose(SGD(lr=0.1, schedule="step", step_size=1, gamma=0.97).lr_at(10, 250), 0.1 * 0.97 ** 10)


def test_a_warm_up_as_long_as_the_training_is_refused_naming_the_epochs_setting():
    """eval-imagenet warms up for 5 epochs: a one-epoch trial of it is refused, saying which epochs."""
    from ilnas.config import resolve
    from ilnas.errors import IlnasError

    with pytest.raises(IlnasError, match=r"^optimizer.warmup_epochs must lie in \[0, train.epochs=1\), got 5$"):
        resolve("eval-imagenet", kind="eval", overrides=["train.epochs=1"])



@pytest.mark.parametrize("schedule", ["cosine", "linear", "step"])
def test_a_schedule_reads_its_own_settings_only(schedule):
    """The other schedules' settings are what config.schema.unused_settings leaves out of compare's rows."""
    from dataclasses import replace

    from ilnas.config.schema import unused_settings
    from ilnas.optim import SCHEDULE_SETTINGS

    base = SGD(lr=0.1, lr_min=0.01, schedule=schedule, warmup_epochs=3, step_size=4, gamma=0.9)
    changed = {"lr_min": 0.02, "warmup_epochs": 5, "step_size": 7, "gamma": 0.5}
    unused = {k.split(".")[1] for k in unused_settings({"kind": "eval", "optimizer": {"schedule": schedule}})
              if k.startswith("optimizer.")}
    assert unused == set(changed) - SCHEDULE_SETTINGS[schedule]
    for name, value in changed.items():
        rates = [replace(base, **{name: value}).lr_at(e, 20) for e in range(20)]
        assert (rates == [base.lr_at(e, 20) for e in range(20)]) == (name in unused), name

def test_two_ranks_see_exactly_the_global_batches_of_one_process():
    task = create_task("digits", DataConfig())
    maker = BatchMaker(task, task.train, torch.device("cpu"), torch.float32, augment=True, cutout=4)
    one = list(ShardedEpochs(maker, 32, seed=5).epoch(3))
    ranks = [list(ShardedEpochs(maker, 16, seed=5, rank=r, world=2).epoch(3)) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 700 // 32
    key = lambda x, y: sorted(zip(x.flatten(1).tolist(), y.tolist()))  # noqa: E731
    for (x, y), (x0, y0), (x1, y1) in zip(one, *ranks):
        assert key(x, y) == key(torch.cat([x0, x1]), torch.cat([y0, y1]))  # same images, same augmentation
    assert not torch.equal(one[0][0], list(ShardedEpochs(maker, 32, seed=5).epoch(4))[0][0])


def run_json(out: Path) -> tuple[dict, list[dict]]:
    result = json.loads((out / "result.json").read_text())
    return result, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_ranks_match_one_process(tmp_path):
    common = ["train", "--genotype", "DARTS_V2", "--preset", "eval-digits", *TINY, "--set", "network.drop_path=0.0",
              "--set", "train.cutout=0"]
    single = ilnas_here(*common, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "ilnas", *common, "--out", str(tmp_path / "ddp")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, ranks_stderr(r.stderr)
    one, one_epochs = run_json(tmp_path / "single")
    two, two_epochs = run_json(tmp_path / "ddp")
    assert two["world_size"] == 2 and two["replica_divergence"] == 0.0
    assert one["params"] == two["params"]
    # Same global batches; only BatchNorm differs (statistics per rank's half-batch).
    for a, b in zip(one_epochs, two_epochs):
        assert a["images"] == b["images"] == 48
        assert abs(a["train_loss"] - b["train_loss"]) < 0.1 * a["train_loss"]


UNUSED_NETWORK = """
import torch, ilnas

@ilnas.register_network("spare")
def spare(genotype, classes, in_channels, resolution, layers, channels, auxiliary):
    return Spare(genotype, classes, in_channels, channels)

class Spare(torch.nn.Module):
    def __init__(self, genotype, classes, in_channels, channels):
        super().__init__()
        self.stem = torch.nn.Conv2d(in_channels, channels, 3, padding=1)
        self.cell = ilnas.EvalCell(genotype.normal, genotype.normal_concat, channels, channels, channels, False, False)
        self.classifier = torch.nn.Linear(self.cell.out_channels, classes)
        self.spare = torch.nn.Linear(3, 3)  # built and never used: DDP must be told to look for such parameters

    def forward(self, x, drop_path_rate=0.0):
        s = self.stem(x)
        logits = self.classifier(self.cell(s, s, drop_path_rate).mean((2, 3)))
        return (logits, None) if self.training else logits
"""


def test_torchrun_trains_a_network_of_ones_own_with_parameters_its_loss_leaves_unused(tmp_path):
    """DistributedDataParallel stops at the second step of a network with such parameters unless told to look for
    them, which it is for every network of one's own."""
    (tmp_path / "spare_net.py").write_text(UNUSED_NETWORK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ILNAS_PLUGINS": "spare_net",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "ilnas", "train", "--genotype", "DARTS_V2", "--preset", "eval-digits", *TINY,
                        "--set", "network.style=spare", "--out", str(tmp_path / "ddp")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, ranks_stderr(r.stderr)
    result, epochs = run_json(tmp_path / "ddp")
    assert result["world_size"] == 2 and result["replica_divergence"] == 0.0 and epochs[-1]["images"] == 48


def test_image_folder_training(tmp_path):
    write_image_folder(tmp_path / "imgs")
    r = ilnas_here("train", "--genotype", "PC_DARTS_image", "--preset", "eval-imagefolder",
                   "--set", f"data.tasks=[imagefolder:{tmp_path / 'imgs'}]", "--set", "train.resolution=64",
                   "--set", "network.auxiliary=false", "--set", "train.workers=0", "--set", "train.epochs=1",
                   "--set", "optimizer.warmup_epochs=0",
                   "--set", "network.layers=3", "--set", "network.channels=8", "--set", "train.batch_size=6",
                   "--quiet", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    result, epochs = run_json(tmp_path / "run")
    assert result["task"].startswith("imagefolder:") and epochs[0]["images"] == 18
    assert 0.0 <= result["final_test_error"] <= 1.0


def test_a_streamed_folder_is_listed_by_its_files_below_it(tmp_path):
    """What a resumed streamed training must find again: the splits' image counts and a digest of the files'
    names below the folder and their labels, the same for a copy elsewhere, another for one file renamed."""
    from ilnas.data.training import Sharding, create_train_data

    write_image_folder(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    stream = DataConfig(folder_pipeline="stream")
    listing = [create_train_data(f"imagefolder:{tmp_path / name}", stream, Sharding(2), resolution=32,
                                 workers=0).listing for name in ("a", "elsewhere/b")]
    assert listing[0] == listing[1] and (listing[0]["train_images"], listing[0]["test_images"]) == (18, 6)
    (tmp_path / "a" / "train" / "cat" / "0.png").rename(tmp_path / "a" / "train" / "cat" / "9.png")
    renamed = create_train_data(f"imagefolder:{tmp_path / 'a'}", stream, Sharding(2), resolution=32, workers=0).listing
    assert renamed["train_images"] == 18 and renamed["files_sha256"] != listing[0]["files_sha256"]


def test_a_streamed_training_is_not_resumed_on_other_files(tmp_path):
    """A streamed folder's images were never held against a resume (its normalisation is ImageNet's, fixed):
    images added, or renamed (the same count), since the run started changed its batches under it. Now the
    resume is refused before anything is written, naming the difference."""
    write_image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    r = ilnas_here(*folder_training(tmp_path / "imgs", out, batch=6))
    assert r.returncode == 0, r.stderr
    (out / "result.json").unlink()  # interrupted before its end
    cat = tmp_path / "imgs" / "train" / "cat"

    def refused(where: str) -> None:
        before = snapshot(out)
        code, _, err = call("train", "--resume", "--out", str(out), "--quiet")
        assert code == 2 and f"was started on other data than it would resume on (provenance.json {where}" in err
        assert snapshot(out) == before and len(err.splitlines()) == 1, err

    shutil.copy(cat / "0.png", cat / "6.png")  # an image added
    refused("data.train_images: 18 then, 19 now")
    (cat / "6.png").unlink()
    (cat / "5.png").rename(cat / "9.png")  # one renamed: as many images
    refused("data.files_sha256: ")
    (cat / "9.png").rename(cat / "5.png")
    code, _, err = call("train", "--resume", "--out", str(out), "--quiet")
    assert code == 0 and (out / "result.json").is_file(), err


@pytest.mark.parametrize("pipeline", ["stream", "memory"])
def test_a_flat_validation_folder_is_refused_with_what_to_do(tmp_path, pipeline):
    """ImageNet's validation images come as one flat folder (their labels in the devkit): the refusal says so,
    where it said only that the class folders differ."""
    write_image_folder(tmp_path / "imgs")
    val = tmp_path / "imgs" / "val"
    for image in val.glob("*/*.png"):
        image.rename(val / f"{image.parent.name}-{image.name}")
    for folder in [f for f in val.iterdir() if f.is_dir()]:
        folder.rmdir()
    code, _, err = call(*folder_training(tmp_path / "imgs", tmp_path / "run", batch=6, pipeline=pipeline))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.rstrip().endswith("; its 6 images lie in no class folder, as ImageNet's validation images come: sort "
                                 "them into one folder per class (torchvision.datasets.ImageNet(root, split='val') "
                                 "does so from the devkit)"), err
    assert not (tmp_path / "run").exists()


START_METHOD = """import multiprocessing, sys
from ilnas import cli
if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1], force=True)
    sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="fork: Linux")
def test_loader_workers_started_by_forkserver_train_as_forked_ones_do(tmp_path):
    """Python 3.14 starts DataLoader workers by forkserver on Linux (macOS and Windows spawn them): they get the
    image folder, its loader and its transforms by pickling, where a forked worker inherits them. The same
    weights come out, bit for bit."""
    write_image_folder(tmp_path / "imgs")
    (tmp_path / "start.py").write_text(START_METHOD)
    weights = []
    for method in ("fork", "forkserver"):
        out = tmp_path / method
        r = subprocess.run([sys.executable, str(tmp_path / "start.py"), method,
                            *folder_training(tmp_path / "imgs", out, batch=6)], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        weights.append((out / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


def test_cifar100_training_reports_top5(tmp_path):
    write_cifar(tmp_path / "data", "cifar100")
    r = ilnas_here("train", "--genotype", "PDARTS", "--preset", "eval-cifar100", *TINY, "--set", "train.epochs=1",
                   "--set", f"data.data_dir={tmp_path / 'data'}", "--set", "data.download=false",
                   "--set", "data.verify=false", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    result, epochs = run_json(tmp_path / "run")
    assert "final_test_error_top5" in result and "test_top5" in epochs[0]
    assert result["final_test_error_top5"] <= result["final_test_error"]


@pytest.mark.parametrize("args, env, message", [
    (["--genotype", "NOT_A_CELL"], {}, "unknown genotype 'NOT_A_CELL'"),
    (["--genotype", "Genotype(normal=[('laser_conv', 0), ('sep_conv_3x3', 1)], normal_concat=[2], "
                    "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])"], {},
     "unknown operation 'laser_conv'"),
    (["--genotype", "DARTS_V2", "--preset", "eval-cifar10", "--set", "data.data_dir=__TMP__",
      "--set", "data.download=false"], {}, "no cifar10 data in"),
    (["--genotype", "DARTS_V2", "--preset", "eval-imagefolder", "--set", "data.tasks=[imagefolder:__TMP__]"], {},
     "no image folder"),
    (["--genotype", "DARTS_V2", "--preset", "eval-digits", "--set", "train.batch_size=15"],
     {"WORLD_SIZE": "2", "RANK": "0", **RENDEZVOUS}, "train.batch_size=15 is not divisible by the 2 ranks"),
    (["--genotype", "DARTS_V2", "--preset", "eval-digits", "--set", "train.batch_size=1"], {},
     "train.batch_size=1 gives the network one image a step; the auxiliary head's BatchNorm needs two"),
    (["--genotype", "DARTS_V2", "--preset", "eval-digits", "--set", "train.batch_size=2"],
     {"WORLD_SIZE": "2", "RANK": "0", **RENDEZVOUS}, "train.batch_size=2 gives each of the 2 ranks one image a step"),
    (["--preset", "eval-digits"], {}, "train needs --genotype"),
    (["--genotype", "DARTS_V2", "--preset", "eval-digits", "--set", "train.decode=gpu"], {},
     "train.decode must be workers or device"),
    (["--genotype", "DARTS_V2", "--preset", "demo"], {},
     "preset demo is a search configuration (kind: search), not a training one: `ilnas search` runs it"),
    (["--genotype", "DARTS_V2", "--preset", "eval-digits", "--set", "train.compile=tensorrt_xyz"], {},
     "train.compile='tensorrt_xyz' is not a torch.compile backend"),
    (["--genotype", "DARTS_V2", "--preset", "eval-digits", "--set", "train.compile=aot_eager",
      "--set", "train.compile_mode=reduce-overhead"], {}, "it needs train.compile=inductor"),
])
def test_bad_training_input_is_one_line_and_exit_2(tmp_path, monkeypatch, args, env, message):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.yaml").write_text("kind: eval\nkept: true\n")
    (existing / "provenance.json").write_text('{"sessions": []}\n')
    before = snapshot(existing)
    args = [a.replace("__TMP__", str(tmp_path / "nothing")) for a in args]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rc, _, err = call("train", *args, "--out", str(existing), "--force")
    assert rc == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(existing) == before


def test_compiled_training_matches_eager_and_a_failing_compiler_falls_back(tmp_path):
    """train.compile: the network through torch.compile (aot_eager here: it traces forward and backward like
    inductor, without generating code) trains to the same numbers as eager, across a drop-path ramp; a backend
    that fails runs the same graphs eagerly and gives eager's numbers exactly."""
    from safetensors.torch import load_file
    from torch._dynamo import register_backend
    from torch._dynamo.utils import counters

    from ilnas import run_train
    from ilnas.config import resolve
    from ilnas.space.genotype import zoo

    @register_backend
    def ilnas_test_broken(gm, inputs):
        raise RuntimeError("no compiler on this machine")

    base = {"network.layers": 3, "network.channels": 4, "network.drop_path": 0.3, "train.batch_size": 16,
            "train.steps_per_epoch": 3, "train.epochs": 3}
    runs = {}
    for backend in (None, "aot_eager", "ilnas_test_broken"):
        torch._dynamo.reset()
        counters.clear()
        cfg = resolve("eval-digits", overrides={**base, "train.compile": backend}, kind="eval")
        run_train(cfg, zoo()["DARTS_V2"], tmp_path / str(backend), progress=False, report=False)
        runs[backend] = (load_file(tmp_path / str(backend) / "model.safetensors"), run_json(tmp_path / str(backend))[1],
                         counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    (eager, eager_epochs, _), (compiled, compiled_epochs, graphs), (fallback, fallback_epochs, _) = runs.values()
    assert graphs >= 2  # the compiled run really ran compiled graphs: training (every epoch's rate) and eval
    assert [e["drop_path"] for e in compiled_epochs] == pytest.approx([0.0, 0.1, 0.2])
    for a, b in zip(eager_epochs, compiled_epochs):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-5)
    assert eager.keys() == compiled.keys() == fallback.keys()
    for name in eager:
        assert torch.allclose(eager[name], compiled[name], rtol=1e-4, atol=1e-5), name
        assert torch.equal(eager[name], fallback[name]), name
    assert [e["train_loss"] for e in eager_epochs] == [e["train_loss"] for e in fallback_epochs]
