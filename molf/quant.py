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
    or in float: bitsandbytes quantizes when the layer moves to its device), or was repacked (repacked_problem)."""
    kind = quant_kind(m)
    w = m.weight
    if kind == "4-bit" and getattr(w, "quant_state", None) is None:
        raise ValueError(f"{name} is a bitsandbytes Linear4bit whose weight is not quantized yet (no quant_state): "
                         "move the model to its device first (model.to('cuda'), or load it with "
                         "quantization_config) and wrap it then")
    repacked = repacked_problem(m, name)
    if repacked:
        raise ValueError(repacked)
    if kind == "8-bit" and (w.dtype != torch.int8 or getattr(w, "SCB", None) is None) and \
            getattr(getattr(m, "state", None), "SCB", None) is None:
        raise ValueError(f"{name} is a bitsandbytes Linear8bitLt whose weight is not quantized yet (dtype "
                         f"{w.dtype}, no SCB); has_fp16_weights=True layers train their own weight and are not "
                         "supported: load with load_in_8bit=True (has_fp16_weights=False) and move it to its device")


def cpu_repacked(m: nn.Module) -> bool:
    """Whether bitsandbytes repacked this 4-bit layer in place for its CPU inference kernels (on an eval-mode
    forward without gradients, on CPUs with AVX512-BF16)."""
    return bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))


def repacked_problem(m: nn.Module, name: str) -> str | None:
    """Why a 4-bit layer bitsandbytes has repacked (cpu_repacked) cannot be in a model that trains; None when it
    is not one."""
    if quant_kind(m) != "4-bit" or not cpu_repacked(m):
        return None
    return (f"{name} was repacked by bitsandbytes for its CPU inference kernels (an eval-mode forward without "
            "gradients ran before molf.wrap); bitsandbytes computes no gradient through a repacked layer (0.50.2: "
            "silently wrong input gradients, an error with a bias), so it cannot sit in a model that trains: load "
            "the model again and wrap it before running it")


def keep_cpu_trainable(model: nn.Module) -> None:
    """Turn off that repacking for every 4-bit layer of `model` (wrapped bases and the layers between them): after
    it bitsandbytes 0.50.2 computes no gradient through the layer, so the experts before it would train on wrong
    gradients, silently. Only the CPU inference fast path is lost; a GPU never repacks."""
    for m in model.modules():
        if quant_kind(m) == "4-bit" and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


@torch.no_grad()
def dequantize(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight W (out_features x in_features) in `dtype`, a new tensor; the quantized storage is
    only read."""
    import bitsandbytes.functional as bnb_f

    w = m.weight
    if quant_kind(m) == "4-bit":
        return bnb_f.dequantize_4bit(w.data, w.quant_state).to(dtype).reshape(m.out_features, m.in_features)
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = m.state.SCB
    cb = w.data if w.dtype == torch.int8 else m.state.CB
    return bnb_f.int8_vectorwise_dequant(cb, scb).to(dtype)
