"""Backend choice: "eager" (torch ops), "triton" (the fused kernels) or "auto"."""
from __future__ import annotations

import os

import torch

from .kernels._env import interpreting  # noqa: F401  (one definition, shared with the kernels)

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


def resolve(backend: str, device: torch.device) -> str:
    """The backend that runs on `device`: MOLF_BACKEND overrides "auto"."""
    if backend == "auto":
        env = os.environ.get("MOLF_BACKEND", "auto")
        backend = check_backend(env, "MOLF_BACKEND")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "eager"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which is not importable")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"backend='triton' got tensors on {device}; Triton kernels run on CUDA tensors, "
                "or on CPU tensors under the interpreter (set TRITON_INTERPRET=1 before importing molf)"
            )
    return backend
