"""Export a trained model for deployment: ONNX (checked by onnxruntime), TorchScript or a torch.export
ExportedProgram, each with a dynamic batch dimension and checked against PyTorch on the same inputs.

The exported graph takes what the network takes, normalised images (N, C, H, W), and returns logits;
the card (class names, input size, mean/std, resize) is written beside it as ``<name>.json``.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

from ilnas.card import CARD_FORMAT
from ilnas.errors import IlnasError, RunFailed
from ilnas.fileio import atomic_write_text, load_json, reachable, require_writable, umask
from ilnas.models import load_model
from ilnas.runs import refuse_among_run_files

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "exported-program": "model.pt2"}
TOLERANCE = 1e-4  # the largest |exported - PyTorch| logit difference accepted, relative to max(1, |logits|)
ONNX_TORCH = (2, 7)  # the oldest torch whose ONNX export of these networks was seen to work (2.7.1)
CHECK_BATCHES = (1, 3)  # checked at more than one batch size: the batch dimension is dynamic

Runner = Callable[[torch.Tensor], torch.Tensor]


def export_model(run: str | Path, fmt: str, out: str | Path | None = None, which: str = "last") -> dict:
    """Write ``run``'s model in ``fmt`` to ``out`` (default <run>/export/<model file>), reload it with its own
    runtime and compare its logits with PyTorch's. Returns where it went and the largest difference."""
    if fmt not in FORMATS:
        raise IlnasError(f"format must be {', '.join(FORMATS)}, got {fmt!r}")
    target = reachable(run, "run directory") / "export" / FORMATS[fmt] if out is None else _target(out, fmt)
    if target.suffix == ".json":
        raise IlnasError(f"--out {target} ends in .json, the name its card is written to (<name>.json beside the "
                         f"model); give the model another suffix, e.g. {target.with_suffix(Path(FORMATS[fmt]).suffix)}")
    refuse_among_run_files([target, target.with_suffix(".json")], "--out")
    _refuse_replacing_other_files(target)
    require_writable(target.parent, "the export's folder")
    if fmt == "onnx":  # after the arguments: what is wrong with them holds on any machine
        require_onnx_export()
    model = load_model(run, which, "cpu")
    example = torch.randn(2, *model.card.input_size, generator=torch.Generator().manual_seed(0))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_path(target, Path(FORMATS[fmt]).suffix) as tmp:
            runner, runtime = EXPORTERS[fmt](model, example, tmp)
            difference = _difference(model, runner)
        atomic_write_text(target.with_suffix(".json"), model.card.to_json())
    except OSError as e:
        raise IlnasError(f"cannot write {target}: {e.strerror or e}") from None
    return {"format": fmt, "path": str(target), "card": str(target.with_suffix(".json")), "runtime": runtime,
            "max_abs_difference": difference, "batch_sizes_checked": list(CHECK_BATCHES)}


def _target(out: str | Path, fmt: str) -> Path:
    """``out``, or where it names a folder (one that exists, or any ending in /, as ``cp`` reads it) the format's
    file in it: a folder had been taken for the model's own name ('/' and '.' ended in a traceback)."""
    if str(out).endswith(("/", os.sep)) or reachable(out, "--out").is_dir():
        return reachable(Path(out) / FORMATS[fmt], "--out")
    return Path(out)


def _refuse_replacing_other_files(target: Path) -> None:
    """An export replaces an earlier export only, a model whose card (<name>.json beside it) is ilnas's: a file of
    another kind at ``target``, or at its card's name, is someone's own and is not overwritten."""
    card = reachable(target.with_suffix(".json"), "--out")
    if not (reachable(target, "--out").exists() or card.exists()) or _is_an_ilnas_card(card):
        return
    found = target if target.exists() else card
    raise IlnasError(f"--out {target}: {found} exists and is no earlier ilnas export (whose model card {card.name} "
                     f"would lie beside it); choose another --out, or remove it")


def _is_an_ilnas_card(path: Path) -> bool:
    try:
        return load_json(path.read_bytes()).get("format") == CARD_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _atomic_path(target: Path, suffix: str):
    """A temporary file beside ``target`` for an exporter to write; moved into place only on success. It ends in
    the format's own ``suffix``, whatever the target's: torch.export.save insists on .pt2, and ONNX picks its
    serialisation by the suffix (a .txt or .json name would be written as text, which onnxruntime cannot load)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())  # a new file's permissions, not mkstemp's owner-only ones
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _difference(model: torch.nn.Module, runner: Runner) -> float:
    """max |exported - PyTorch| over inputs of every checked batch size; refused above the tolerance."""
    worst = 0.0
    gen = torch.Generator().manual_seed(1)
    for n in CHECK_BATCHES:
        x = torch.randn(n, *model.card.input_size, generator=gen)
        with torch.no_grad():
            expected = model(x)
        got = runner(x)
        scale = max(1.0, float(expected.abs().max()))
        worst = max(worst, float((got - expected).abs().max()))
        if not got.shape == expected.shape or worst > TOLERANCE * scale:
            raise RunFailed(f"the exported model disagrees with PyTorch at batch size {n} (max |difference| "
                            f"{worst:.3g}); it is not kept")
    return worst


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=65536)


def require_onnx_export() -> None:
    """Refuse, before anything is written, an ONNX export this installation cannot make: the onnx extra
    missing, or a torch older than ``ONNX_TORCH``, whose ``torch.onnx.export`` has no torch.export-based path
    (2.4) or one that fails on BatchNorm with current onnxscript releases (2.5.1, 2.6)."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise IlnasError("ONNX export needs the onnx extra: pip install 'ilnas[onnx]'") from None
    if torch.__version__ < ONNX_TORCH:
        raise IlnasError(f"ONNX export needs torch >= {'.'.join(map(str, ONNX_TORCH))} (this is torch "
                         f"{torch.__version__}); the torchscript and exported-program formats work with it")


def _onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> tuple[Runner, str]:
    import onnxruntime
    import onnxscript

    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        try:
            # external_data=False: one self-contained file (torch's default wrote some weights to a second file
            # named after the temporary one, which a copied model.onnx then lacked)
            torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["images"],
                              output_names=["logits"], dynamic_shapes=({0: _batch_dim()},), external_data=False)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - the exporter's error types differ from one torch release to the next
            reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise IlnasError(f"torch.onnx cannot export this network with torch {torch.__version__} and onnxscript "
                             f"{onnxscript.__version__} ({reason[:200]}); the torchscript and exported-program "
                             f"formats do not need it") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]),
            f"onnxruntime {onnxruntime.__version__}")


def _torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> tuple[Runner, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in recent releases; still served
        torch.jit.save(torch.jit.trace(model, example), str(path))
        loaded = torch.jit.load(str(path))
    return (lambda x: loaded(x).detach()), f"torch.jit {torch.__version__}"


def _exported_program(model: torch.nn.Module, example: torch.Tensor, path: Path) -> tuple[Runner, str]:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return (lambda x: loaded(x).detach()), f"torch.export {torch.__version__}"


EXPORTERS = {"onnx": _onnx, "torchscript": _torchscript, "exported-program": _exported_program}
