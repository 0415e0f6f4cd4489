"""Export a trained model for deployment: ONNX (checked by onnxruntime), TorchScript or a torch.export
ExportedProgram, each with a dynamic batch dimension and checked against PyTorch on the same inputs.

The exported graph takes what the network takes, normalised images (N, C, H, W), and returns logits;
the card (class names, input size, mean/std, resize) is written beside it as ``<name>.json``.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ilnas.card import CARD_FORMAT
from ilnas.errors import IlnasError
from ilnas.fileio import atomic_write_text, load_json, reachable, require_writable, umask
from ilnas.runs import refuse_among_run_files

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "exported-program": "model.pt2"}


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
    # torch loads only now, once the arguments are checked: a refusal takes no torch start-up (seconds)
    from ilnas.exporters import CHECK_BATCHES, require_onnx_export, write_checked
    from ilnas.models import load_model

    if fmt == "onnx":  # after the arguments: what is wrong with them holds on any machine
        require_onnx_export()
    model = load_model(run, which, "cpu")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_path(target, Path(FORMATS[fmt]).suffix) as tmp:
            runtime, difference = write_checked(model, fmt, tmp)
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
