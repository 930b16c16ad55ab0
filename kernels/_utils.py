"""Small helpers shared by the kernel families; version differences live here, as feature checks."""
import functools
import inspect
import os

import torch
import triton
import triton.language as tl

from ._env import interpreting, to_device  # noqa: F401  (re-exported for the kernel families)

TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def autocast_dtype(device_type: str):
    """The autocast dtype active for device_type, or None (torch.get_autocast_dtype is torch >= 2.4)."""
    if not torch.is_autocast_enabled(device_type):
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def config(pre_hook=None, **kw):
    num_warps, num_stages = kw.pop("num_warps", 4), kw.pop("num_stages", 3)
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages, pre_hook=pre_hook)


@functools.lru_cache(maxsize=None)
def tensor_descriptor_class():
    """Triton's host-side TMA descriptor class (triton.tools.tensor_descriptor, Triton >= 3.4), or None: the
    one compatibility point for the descriptor paths (feature-checked, not version-compared)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor if hasattr(TensorDescriptor, "from_tensor") else None


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """x cast to DTYPE with round-to-nearest-even (explicit: Triton's interpreter truncates fp32 -> bf16)."""
    if DTYPE == tl.float32:
        return x
    else:
        return x.to(DTYPE, fp_downcast_rounding="rtne")


def tuning_configs(configs, default: int):
    """The configs autotuning tries; MOLF_AUTOTUNE=0 keeps configs[default] alone (no tuning: the first call of
    a shape compiles one kernel instead of len(configs); the GPU test suite sets it)."""
    flag = os.environ.get("MOLF_AUTOTUNE", "1")
    if flag not in ("0", "1"):
        raise ValueError(f"MOLF_AUTOTUNE must be 0 (one fixed config) or 1 (autotune), got {flag!r}")
    return [configs[default]] if flag == "0" else configs


def _tuning_bench(kernel_call, quantiles=None):
    """Autotuning's timer: Triton's do_bench with a 5 ms warm-up and 25 ms of repeats (its default, 25 and 100,
    spends about a second per key on 8 configs; the layer meets a new key per (M bucket, shape, flags))."""
    from triton.testing import do_bench
    return do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def autotune(configs, key, **kw):
    """triton.autotune with the shorter tuning timer where this Triton takes one (feature-checked)."""
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        kw.setdefault("do_bench", _tuning_bench)
    return triton.autotune(configs=configs, key=key, **kw)
