"""A trained network written in a deployment format (ONNX, TorchScript, torch.export ExportedProgram) with a
dynamic batch dimension, reloaded by that format's own runtime and checked against PyTorch on the same inputs."""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ilnas.errors import IlnasError, RunFailed

TOLERANCE = 1e-4  # the largest |exported - PyTorch| logit difference accepted, relative to max(1, |logits|)
ONNX_TORCH = (2, 7)  # the oldest torch whose ONNX export of these networks was seen to work (2.7.1)
CHECK_BATCHES = (1, 3)  # checked at more than one batch size: the batch dimension is dynamic

Runner = Callable[[torch.Tensor], torch.Tensor]


def write_checked(model: nn.Module, fmt: str, path: Path) -> tuple[str, float]:
    """Write ``model`` (a trained network with its ``card``) in ``fmt`` to ``path``, reload it and compare its
    logits with PyTorch's: (the runtime that ran it, the largest difference); RunFailed above the tolerance."""
    example = torch.randn(2, *model.card.input_size, generator=torch.Generator().manual_seed(0))
    runner, runtime = EXPORTERS[fmt](model, example, path)
    return runtime, _difference(model, runner)


def _difference(model: nn.Module, runner: Runner) -> float:
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


def _onnx(model: nn.Module, example: torch.Tensor, path: Path) -> tuple[Runner, str]:
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


def _torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> tuple[Runner, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in recent releases; still served
        torch.jit.save(torch.jit.trace(model, example), str(path))
        loaded = torch.jit.load(str(path))
    return (lambda x: loaded(x).detach()), f"torch.jit {torch.__version__}"


def _exported_program(model: nn.Module, example: torch.Tensor, path: Path) -> tuple[Runner, str]:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return (lambda x: loaded(x).detach()), f"torch.export {torch.__version__}"


EXPORTERS = {"onnx": _onnx, "torchscript": _torchscript, "exported-program": _exported_program}
