"""Backend choice: "eager" (torch ops), "triton" (the fused kernels) or "auto"."""
from __future__ import annotations

import os

import torch

from .kernels._env import KERNEL_DTYPES, interpreting  # noqa: F401  (one definition, shared with the kernels)

BACKENDS = ("auto", "eager", "triton")


def check_backend(backend: str, arg: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{arg} must be one of {BACKENDS}, got {backend!r}")
    return backend


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


_TRITON = _probe_triton()


def triton_available() -> bool:
    return _TRITON


def requested(backend: str) -> str:
    """The backend asked for: MOLF_BACKEND overrides "auto"."""
    if backend == "auto":
        return check_backend(os.environ.get("MOLF_BACKEND", "auto"), "MOLF_BACKEND")
    return backend


def resolve(backend: str, device: torch.device, dtypes=()) -> str:
    """The backend that runs on `device` for tensors of `dtypes`: MOLF_BACKEND overrides "auto"; "auto" takes
    torch ops where the kernels lack the dtype (float64), "triton" raises a TypeError there."""
    backend = requested(backend)
    if backend == "auto":
        fits = all(d in KERNEL_DTYPES for d in dtypes)
        return "triton" if device.type == "cuda" and triton_available() and fits else "eager"
    if backend == "triton":
        for odd in dtypes:  # a loop: torch 2.7's torch.compile cannot trace next(generator)
            if odd not in KERNEL_DTYPES:
                raise TypeError(f"backend='triton': the Triton kernels compute in float32, float16 and bfloat16, "
                                f"got {odd} tensors; use backend='eager', or 'auto' (torch ops for {odd})")
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which is not importable")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"backend='triton' got tensors on {device}; Triton kernels run on CUDA tensors, "
                "or on CPU tensors under the interpreter (set TRITON_INTERPRET=1 before importing molf)"
            )
    return backend
