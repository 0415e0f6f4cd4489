"""Deterministic kernels for the length of a run (``search.deterministic``, ``train.deterministic``).

On CPUs a run repeats bit for bit anyway. On CUDA some kernels accumulate with atomics, in whatever order
the threads arrive, and cuDNN may pick another convolution algorithm each time; there
``torch.use_deterministic_algorithms`` restricts torch to kernels that give the same bits every time (slower
ones), and refuses any operation that has none. In older torch releases (2.4; no longer 2.14) that includes
every cuBLAS call unless ``CUBLAS_WORKSPACE_CONFIG`` fixes cuBLAS's workspaces, so it is set here (where the
user has not) before the run's first matrix product. Everything is put back as it was when the run ends, so
that the Python API leaves the process as it found it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

CUBLAS_WORKSPACE = ":4096:8"  # one of the two settings cuBLAS documents as reproducible (the larger, faster one)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """While the block runs: deterministic kernels only, where ``enabled``; otherwise nothing changes."""
    if not enabled:
        yield
        return
    import torch

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False  # its timing-based choice of algorithm can differ from run to run
    try:
        yield
    finally:
        enabled_before, warn_only, benchmark, workspace = before
        torch.use_deterministic_algorithms(enabled_before, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace
