"""Quantized bases (bitsandbytes Linear4bit: nf4/fp4, with or without double quantization; Linear8bitLt) for
MoLF-Efficient: the base stays quantized and frozen, only the LoRA experts train (the QLoRA recipe).

bitsandbytes is optional (`pip install molf[quant]`) and imported only when a quantized layer is
dequantized: recognising a layer reads class names, so `import molf` never needs it.
"""
from __future__ import annotations

import torch
from torch import nn

KINDS = {"Linear4bit": "4-bit", "Linear8bitLt": "8-bit"}


def quant_kind(m: nn.Module) -> str | None:
    """"4-bit" for a bitsandbytes Linear4bit (LinearNF4, LinearFP4 included), "8-bit" for Linear8bitLt, else None."""
    for cls in type(m).__mro__:
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in KINDS:
            return KINDS[cls.__name__]
    return None


def describe(m: nn.Module) -> str:
    """"bitsandbytes 4-bit nf4 (double quantization)", for messages and repr."""
    kind = quant_kind(m)
    if kind == "4-bit":
        state = getattr(m.weight, "quant_state", None)
        qtype = getattr(state, "quant_type", None) or getattr(m.weight, "quant_type", "?")
        nested = getattr(state, "nested", False) or getattr(m.weight, "compress_statistics", False)
        return f"bitsandbytes 4-bit {qtype}" + (" (double quantization)" if nested else "")
    return f"bitsandbytes {kind}"


def compute_dtype(m: nn.Module) -> torch.dtype:
    """The float dtype the LoRA experts of a quantized base live in: the layer's compute dtype (4-bit:
    bnb_4bit_compute_dtype), else the dtype the weight had before quantization, else the bias's, else fp32."""
    for dtype in (getattr(m, "compute_dtype", None), getattr(getattr(m.weight, "quant_state", None), "dtype", None),
                  m.bias.dtype if getattr(m, "bias", None) is not None else None):
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    return torch.float32


def check_quantized(m: nn.Module, name: str) -> None:
    """A clear error when a quantized layer has not been quantized yet (its weight still on the meta device
    or in float: bitsandbytes quantizes when the layer moves to its device)."""
    kind = quant_kind(m)
    w = m.weight
    if kind == "4-bit" and getattr(w, "quant_state", None) is None:
        raise ValueError(f"{name} is a bitsandbytes Linear4bit whose weight is not quantized yet (no quant_state): "
                         "move the model to its device first (model.to('cuda'), or load it with "
                         "quantization_config) and wrap it then")
    if kind == "8-bit" and (w.dtype != torch.int8 or getattr(w, "SCB", None) is None) and \
            getattr(getattr(m, "state", None), "SCB", None) is None:
        raise ValueError(f"{name} is a bitsandbytes Linear8bitLt whose weight is not quantized yet (dtype "
                         f"{w.dtype}, no SCB); has_fp16_weights=True layers train their own weight and are not "
                         "supported: load with load_in_8bit=True (has_fp16_weights=False) and move it to its device")


@torch.no_grad()
def dequantize(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight W (out_features x in_features) in `dtype`, a new tensor; the quantized storage is
    only read."""
    import bitsandbytes.functional as bnb_f

    w = m.weight
    if quant_kind(m) == "4-bit":
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            return _read_through_matmul(m, dtype)
        return bnb_f.dequantize_4bit(w.data, w.quant_state).to(dtype).reshape(m.out_features, m.in_features)
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = m.state.SCB
    cb = w.data if w.dtype == torch.int8 else m.state.CB
    return bnb_f.int8_vectorwise_dequant(cb, scb).to(dtype)


def _read_through_matmul(m: nn.Module, dtype: torch.dtype, rows: int = 1024) -> torch.Tensor:
    """W of a 4-bit layer that bitsandbytes repacked for its CPU inference kernels (an eval-mode forward
    without gradients does it, in place): W^T = I W^T through bitsandbytes' own matmul, in blocks of rows
    of I. Not bitsandbytes' inverse of that packing: in 0.50.2 it corrupts layers with in_features > 64
    (tests/test_quant.py shows it), and it would rewrite the layer's storage."""
    import bitsandbytes as bnb

    w, k = m.weight, m.in_features
    compute = getattr(m, "compute_dtype", None) or torch.float32
    parts = []
    for r in range(0, k, rows):
        eye = torch.zeros(min(rows, k - r), k, dtype=compute, device=w.device)
        eye[:, r:r + rows].fill_diagonal_(1.0)
        parts.append(bnb.matmul_4bit(eye, w, quant_state=w.quant_state))
    return torch.cat(parts).t().to(dtype).contiguous()
