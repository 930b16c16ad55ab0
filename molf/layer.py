"""MoLFLinear: a linear layer as a base weight plus LoRA experts; wrap() and merge() for whole models.

    y = x W^T + b + sum_i s_i (drop(x) A_i^T) B_i^T,   s_i = alpha_i / sqrt(r_i) (rsLoRA) or alpha_i / r_i
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from typing import Iterable, Sequence

import torch
from torch import nn

from . import _backend, _checks, _cpu, _dist, _plan, quant
from ._math import dropout_keep, dropout_seed
from .kernels._env import column_scales

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_experts(ranks: Sequence[int], alphas: Sequence[float],
                   dropout: float) -> tuple[tuple[int, ...], tuple[float, ...]]:
    if isinstance(ranks, (int, str)) or not isinstance(ranks, Iterable):
        raise TypeError(f"ranks must be a sequence of ints (one per LoRA expert), got {ranks!r}")
    if isinstance(alphas, (int, float, str)) or not isinstance(alphas, Iterable):
        raise TypeError(f"alphas must be a sequence of numbers (one per LoRA expert), got {alphas!r}")
    ranks, alphas = tuple(ranks), tuple(alphas)
    if len(ranks) == 0:
        raise ValueError("ranks must name at least one LoRA expert, got ()")
    if len(ranks) != len(alphas):
        raise ValueError(f"ranks and alphas must have the same length, got ranks={ranks} (len {len(ranks)}) "
                         f"and alphas={alphas} (len {len(alphas)})")
    ranks = tuple(_checks.integer(f"ranks[{i}]", r, low=1) for i, r in enumerate(ranks))
    alphas = tuple(_checks.real(f"alphas[{i}]", a, low=0.0, low_open=True) for i, a in enumerate(alphas))
    _checks.real("dropout", dropout, 0.0, 1.0, high_open=True)
    return ranks, alphas


def expert_names(ranks: Sequence[int], train_base: bool) -> list[str]:
    """["full"] (when the base trains) then "lora_r{r}" per LoRA expert, suffixed when a rank repeats."""
    names = ["full"] if train_base else []
    for i, r in enumerate(ranks):
        name = f"lora_r{r}"
        names.append(name if list(ranks).count(r) == 1 else f"{name}_{i}")
    return names


def lowrank_linear(x, weight, bias, lora_A, lora_B, scalings, mask=None, p=0.0, s_cols=None, base_out=None):
    """The eager layer in torch ops: y = x W^T + b + (drop(x) A_cat^T * s_cols) B_cat^T, the experts as one
    low-rank product of rank R = sum r_i with the scales on the small M x R side, added by one addmm
    (against the reference's scaled product and sum per expert: two M x N passes fewer each).
    s_cols: `column_scales` in the LoRA dtype (built here when None). base_out: x W^T + b computed by the
    caller (a quantized base's own layer), else F.linear."""
    lead = x.shape[:-1]
    m = lead.numel()  # not -1: ambiguous when a dimension is 0
    if x.dim() != 2:  # one 2-D view in, one out (each view is an autograd node: host time at small shapes)
        x = x.reshape(m, x.shape[-1])
        mask = None if mask is None else mask.reshape(x.shape)
        base_out = None if base_out is None else base_out.reshape(m, base_out.shape[-1])
    y = nn.functional.linear(x, weight, bias) if base_out is None else base_out
    xd = x if mask is None else x * mask / (1.0 - p)
    if len(lora_A) == 1:
        a_cat, b_cat = lora_A[0], lora_B[0]
        u = nn.functional.linear(xd, a_cat) * scalings[0]
    else:
        a_cat, b_cat = torch.cat(lora_A, 0), torch.cat(lora_B, 1)
        if s_cols is None:
            s_cols = column_scales([a.shape[0] for a in lora_A], scalings, a_cat.device, a_cat.dtype)
        u = nn.functional.linear(xd, a_cat) * s_cols
    b_t = b_cat.t()
    u = u if u.dtype == y.dtype else u.to(y.dtype)  # a quantized base's y is in x's dtype, the experts in
    b_t = b_t if b_t.dtype == y.dtype else b_t.to(y.dtype)  # theirs (the checks skip .to's dispatch per call)
    y = torch.addmm(y, u, b_t)
    return y if len(lead) == 1 else y.view(*lead, y.shape[-1])


META_EXPERTS = ("the LoRA experts are created on the meta device, so they hold no values: after model.to_empty(...) "
                "and loading the base weights, call reset_lora_parameters() on every MoLF layer (for _, m in "
                "molf.layer.molf_layers(model): m.reset_lora_parameters()), or load a molf checkpoint; otherwise B "
                "is whatever memory to_empty gives")


class MoLFLinear(nn.Module):
    """A MoLF layer: `base` (an nn.Linear, the "full" expert when it trains) plus LoRA experts.

    Args:
        base: the nn.Linear to wrap (kept as `.base`, its parameters are not copied).
        ranks, alphas: one entry per LoRA expert; A_i is (r_i, in_features), B_i is (out_features, r_i).
        train_base: False freezes the base weight and bias (MoLF-Efficient).
        rslora: scale s_i = alpha_i / sqrt(r_i) if True, else alpha_i / r_i.
        dropout: dropout probability on the LoRA path only (the base path always sees x).
        backend: "auto" (on a GPU: per shape the faster of the fused kernels and the cuBLAS chain, measured
            once, see molf.layer_plan(); elsewhere, and for float64, torch ops), "eager" (torch ops) or "triton"
            (the fused kernels, always; float32, float16 and bfloat16).
    """

    experts_enabled = True  # False inside molf.disable_experts: y = base(x)

    def __init__(self, base: nn.Linear, ranks: Sequence[int] = (128,), alphas: Sequence[float] = (32,),
                 train_base: bool = True, rslora: bool = True, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        ranks, alphas = _check_experts(ranks, alphas, dropout)
        train_base, rslora = _checks.flag("train_base", train_base), _checks.flag("rslora", rslora)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        why = _unsupported("base", base)
        if why:
            raise TypeError(why)
        self.quantized = quant.quant_kind(base) is not None
        if self.quantized:
            quant.check_quantized(base, "base")
            quant.keep_cpu_trainable(base)
            if train_base:
                raise ValueError(f"train_base=True needs a float base, got a {quant.describe(base)} layer: a quantized "
                                 "weight cannot be the full expert; use train_base=False (MoLF-Efficient), or load "
                                 "the model in bf16/fp16/fp32")
        self.backend = _backend.check_backend(backend)
        k, n = base.in_features, base.out_features
        if max(ranks) > min(k, n):
            warnings.warn(f"rank {max(ranks)} exceeds min(in_features, out_features) = {min(k, n)}: "
                          "the low-rank term cannot use the extra rank", stacklevel=2)
        self.base = base
        self.in_features, self.out_features = k, n
        self.ranks, self.alphas, self.rslora = ranks, alphas, rslora
        self.dropout = float(dropout)
        self.train_base = train_base
        self.scalings = tuple(a / math.sqrt(r) if rslora else a / r for a, r in zip(alphas, ranks))
        self._s_cols: dict = {}  # column_scales per (device, dtype): built once, not per forward
        for p in base.parameters():  # train_base=True trains W and b even if they were frozen before wrapping
            p.requires_grad_(train_base)
        w = base.weight
        dtype = quant.compute_dtype(base) if self.quantized else w.dtype
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(r, k, device=w.device, dtype=dtype)) for r in ranks])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.empty(n, r, device=w.device, dtype=dtype)) for r in ranks])
        self.reset_lora_parameters()
        if w.is_meta:
            warnings.warn(META_EXPERTS, UserWarning, stacklevel=2)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight W (read-only here; as peft's layers expose it for code that reads `.weight.dtype`)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base bias b (read-only here)."""
        return self.base.bias

    @property
    def _compute_dtype(self) -> torch.dtype:
        """The dtype the layer computes in: its base weight's, or its experts' over a quantized base."""
        return self._experts()[0][0].dtype if self.quantized else self.base.weight.dtype

    def _experts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """([A_i], [B_i]), read once per call from the ParameterLists' own dicts: indexing a ParameterList costs
        a few microseconds of Python per element, the largest share of the layer's host work at small shapes."""
        a, b = self.lora_A._parameters, self.lora_B._parameters
        if len(a) == len(b) == len(self.ranks):
            return list(a.values()), list(b.values())
        return list(self.lora_A), list(self.lora_B)  # a parametrized entry lives outside the dict

    @property
    def expert_names(self) -> list[str]:
        return expert_names(self.ranks, self.base.weight.requires_grad)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A_i Kaiming-uniform (a = sqrt(5), as nn.Linear and peft), B_i = 0: the layer starts equal to `base`."""
        for a, b in zip(self.lora_A, self.lora_B):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def _check_input(self, x: torch.Tensor, experts, want: torch.dtype) -> None:
        """TypeError/ValueError for an input the layer cannot take; want: the compute dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype} (token ids go through "
                            "the embedding, not a linear layer)")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input of shape {tuple(x.shape)} does not match the layer: its last dimension must be "
                             f"in_features = {self.in_features} (weight shape {tuple(self.base.weight.shape)})")
        w = self.base.weight
        if torch.is_autocast_enabled(x.device.type):
            return  # every product runs in the autocast dtype
        for p in (*experts[0], *experts[1]):  # a loop: torch 2.7's torch.compile cannot trace next(generator)
            if p.dtype != want:
                raise TypeError(f"the layer's LoRA experts are {p.dtype} but its "
                                f"{'first expert' if self.quantized else 'base weight'} is {want}: a MoLF layer "
                                "computes in one dtype; cast the layer as a whole (layer.to(dtype)), or run it under "
                                "torch.autocast")
        if x.dtype != w.dtype and not self.quantized:
            raise TypeError(f"input dtype {x.dtype} differs from the layer's weight dtype {w.dtype}; "
                            "cast the input or run under torch.autocast")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts = self._experts()
        want = experts[0][0].dtype if self.quantized else self.base.weight.dtype  # the compute dtype
        self._check_input(x, experts, want)
        if not self.experts_enabled:
            return self.base(x)
        impl = "chain"
        if _backend.resolve(self.backend, x.device, (x.dtype, want)) == "triton":
            impl = "fused" if self.backend == "triton" else _plan.PLANNER.choose(self, x, self._forward_by)
        return self._forward_by(impl, x, experts)

    def _forward_by(self, impl: str, x: torch.Tensor, experts=None) -> torch.Tensor:
        """The layer by implementation: "fused" (the Triton kernels) or "chain" (torch ops, cuBLAS on a GPU)."""
        seed = dropout_seed(x.device) if self.training and self.dropout > 0 else None
        lora_A, lora_B = experts or self._experts()
        if self.quantized:
            return self._quantized_forward_by(impl, x, seed, lora_A, lora_B)
        base = self.base
        if impl == "fused":
            from .kernels import molf_linear as _fused  # imported on first use: triton stays optional
            return _fused.molf_linear(x, base.weight, base.bias, lora_A, lora_B, self.scalings, seed, self.dropout,
                                      s_cols=self._column_scales(x.device, torch.float32))
        mask = None if seed is None else self._keep_mask(seed, x)
        s_cols = self._column_scales(x.device, lora_A[0].dtype) if len(self.ranks) > 1 else None
        return lowrank_linear(x, base.weight, base.bias, lora_A, lora_B, self.scalings, mask, self.dropout,
                              s_cols=s_cols)

    def _quantized_forward_by(self, impl: str, x: torch.Tensor, seed, lora_A, lora_B) -> torch.Tensor:
        """A quantized base: the low-rank term in the LoRA dtype, the output in x's dtype (as bitsandbytes
        and peft). "chain": the base through bitsandbytes' own layer. "fused": the base dequantized into a
        transient buffer for the forward GEMM, and again in backward for dx (recomputed, never saved)."""
        dtype = lora_A[0].dtype
        xc = x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)
        if impl == "fused":
            from .kernels import molf_linear as _fused
            bias = self.base.bias
            y = _fused.molf_linear(xc, None, None if bias is None else bias.to(dtype), lora_A, lora_B,
                                   self.scalings, seed, self.dropout,
                                   s_cols=self._column_scales(x.device, torch.float32),
                                   weight_fn=lambda dt: quant.dequantize(self.base, dt))
            return y.to(x.dtype)
        mask = None if seed is None else self._keep_mask(seed, xc)
        s_cols = self._column_scales(x.device, dtype) if len(self.ranks) > 1 else None
        return lowrank_linear(xc, None, None, lora_A, lora_B, self.scalings, mask,
                              self.dropout, s_cols=s_cols, base_out=self.base(x))

    def _keep_mask(self, seed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The keep-mask the fused kernels would draw from `seed` for x: one Triton launch on a GPU, one C loop
        on the CPU (molf/_cpu.c), torch ops (molf._math.dropout_keep) elsewhere."""
        rows, cols = x.numel() // max(self.in_features, 1), self.in_features
        if x.device.type == "cuda" and _backend.triton_available():
            from .kernels.molf_linear import keep_mask
            return keep_mask(seed, rows, cols, self.dropout).view(x.shape)
        if x.device.type == "cpu" and _cpu.available():
            return _cpu.keep_mask(seed, rows, cols, self.dropout).view(x.shape)
        return dropout_keep(seed, rows, cols, self.dropout).view(x.shape)

    def _column_scales(self, device, dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._s_cols:
            # a normal tensor even when first built under torch.inference_mode (a pipeline's forward): an
            # inference tensor could not be saved for backward by the training forwards that reuse it
            with torch.inference_mode(False):
                self._s_cols[key] = column_scales(self.ranks, self.scalings, device, dtype)
        return self._s_cols[key]

    @torch.no_grad()
    def merged_weight(self, state: dict | None = None) -> torch.Tensor:
        """W + sum_i s_i B_i A_i, accumulated in fp32 (or W's dtype if wider) and rounded once to W's dtype
        (a quantized W: dequantized, the result in the LoRA dtype, no longer quantized). `state`: W, A_i, B_i
        from this layer's own state dict (keys base.weight, lora_A.i, lora_B.i: full tensors gathered from
        FSDP2's shards) instead of its parameters."""
        if state is not None:
            w = state["base.weight"]
            lora_A = [state[f"lora_A.{i}"] for i in range(len(self.ranks))]
            lora_B = [state[f"lora_B.{i}"] for i in range(len(self.ranks))]
            dtype = w.dtype
        else:
            w, dtype, lora_A, lora_B = self.base.weight, self._compute_dtype, self.lora_A, self.lora_B
        acc = torch.promote_types(dtype, torch.float32)
        delta = quant.dequantize(self.base, acc) if state is None and self.quantized else w.to(acc, copy=True)
        for s, a, b in zip(self.scalings, lora_A, lora_B):
            delta.addmm_(b.to(acc), a.to(acc), alpha=s)
        return delta.to(dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new plain nn.Linear whose weight is W + sum_i s_i B_i A_i (bias copied), trainable as the base was
        (peft's merge_and_unload keeps a frozen base frozen); this layer is unchanged. A quantized base is
        dequantized: the merged layer is a float nn.Linear in the LoRA dtype."""
        w = self.merged_weight()
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=w.device, dtype=w.dtype)
        out.weight.copy_(w)
        out.weight.requires_grad_(self.base.weight.requires_grad)
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
            out.bias.requires_grad_(self.base.bias.requires_grad)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, ranks={self.ranks}, "
                f"alphas={self.alphas}, train_base={self.base.weight.requires_grad}, rslora={self.rslora}, "
                f"dropout={self.dropout}, backend={self.backend!r}"
                + (f", base={quant.describe(self.base)}" if self.quantized else ""))


@contextlib.contextmanager
def disable_experts(model: nn.Module):
    """Inside the block, every MoLF layer of `model` computes its base alone, y = x W^T + b: while the base has
    not trained, the model it was wrapped from (as peft's `model.disable_adapter()`). Restored on exit; nests."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, MoLFLinear)]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no MoLF layers to disable: molf.wrap it first")
    before = [m.experts_enabled for m in layers]
    for m in layers:
        m.experts_enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(layers, before):
            m.experts_enabled = enabled


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)  # nn.ModuleList/Sequential accept setattr with a digit name


# Default targets per architecture (model.config.model_type) where the projections are named otherwise: every
# linear layer of its decoder blocks (OPT's project_in/out, between the embeddings and the blocks, are left out).
_NEOX = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
_OPT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_GLM = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
_GPT2 = ("c_attn", "c_proj", "c_fc")
# Multi-head latent attention (MiniCPM3, Youtu): q_proj where the query has no low-rank pair (q_lora_rank None);
# the names a model lacks are dropped as for DEFAULT_TARGETS.
_MLA = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
        "down_proj")
# Qwen3.5's Gated DeltaNet layers: in_proj_qkv, in_proj_z and out_proj beside the attention's and MLP's; not the
# per-head gates in_proj_a / in_proj_b (num_v_heads outputs, below a LoRA's rank; serving stacks load adapters
# for them only since mid-2026): name them to train them.
_QWEN3_5 = DEFAULT_TARGETS + ("in_proj_qkv", "in_proj_z", "out_proj")
# OLMo-hybrid's Gated DeltaNet layers name q/k/v/o as attention does and add the output gate g_proj (value_dim
# outputs, the role of Qwen3.5's in_proj_z); not its per-head a_proj / b_proj.
_OLMO_HYBRID = DEFAULT_TARGETS + ("g_proj",)
ARCH_TARGETS = {
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "glm": _GLM,
    "glm4": _GLM,
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "starcoder2": ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
    "gpt_neox": _NEOX,
    "falcon": _NEOX,
    "bloom": _NEOX,
    "persimmon": _NEOX,
    "gpt2": _GPT2,
    "gpt_bigcode": _GPT2,
    "opt": _OPT,
    "xglm": _OPT,
    "biogpt": _OPT,
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
    "codegen": ("qkv_proj", "out_proj", "fc_in", "fc_out"),
    "gpt_neo": ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"),
    "mpt": ("Wqkv", "out_proj", "up_proj", "down_proj"),
    "nanochat": ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
    "lfm2": ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"),  # in/out_proj: its short convs
    # LFM3: as LFM2 with o_proj; not its attention's per-head gate g_proj (num_attention_heads outputs)
    "lfm3": ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "w1", "w2", "w3"),
    "minicpm3": _MLA,
    "youtu": _MLA,
    "qwen3_5": _QWEN3_5,
    "qwen3_5_text": _QWEN3_5,
    "olmo_hybrid": _OLMO_HYBRID,
    # Zamba2: the shared transformer block's projections (one tensor for every hybrid layer that calls the block:
    # MoLF-E trains a LoRA per layer) and each hybrid layer's own `linear`; in_proj of its Mamba-2 mixers comes
    # as for every Mamba-style model. Not the block's own per-layer adapters (*_adapter_list, Linear pairs named
    # 0 and 1, part of the pretrained model): name them to train them.
    "zamba2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "linear"),
}


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The target names for this model's architecture: ARCH_TARGETS by config.model_type, else DEFAULT_TARGETS;
    with Mamba-style mixers (Mamba, Falcon-H1, Nemotron-H, ...) also their in_proj, the one projection they call
    as a layer (see MAMBA_MIXERS)."""
    names = ARCH_TARGETS.get(getattr(getattr(model, "config", None), "model_type", None), DEFAULT_TARGETS)
    if any(parent in MAMBA_MIXERS for _, parent in _read_by_weight(model).values()):
        names += ("in_proj",)
    return names


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's OptimizedModule and DDP / DataParallel, whose parameter names (prefixed
    `_orig_mod.`, `module.`) are not the model's: checkpoints, adapters and routing logs use the model's own."""
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def molf_layers(model: nn.Module) -> list[tuple[str, "MoLFLinear"]]:
    """(name, layer) of every MoLFLinear in the model, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoLFLinear)]


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer with its weight stored in_features x out_features."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


# nn.Linear subclasses whose own forward computes x W^T + b in other ops (read in their source; a test checks that
# the installed transformers still computes F.linear's values): molf wraps them as nn.Linear.
LINEAR_FORWARDS = {"transformers.models.falcon.modeling_falcon.FalconLinear"}  # x @ W.T, then + b


def _unsupported(name: str, m: nn.Module) -> str | None:
    """Why module `m` cannot be a MoLF base (None if it can)."""
    kind = type(m)
    if torch.nn.utils.parametrize.is_parametrized(m):
        return (f"{name} has parametrized tensors ({', '.join(m.parametrizations)}, torch.nn.utils.parametrize): molf "
                "reads and trains the weight tensor itself, so the parametrization would not apply; call "
                "torch.nn.utils.parametrize.remove_parametrizations first")
    if hooks := _hooks(m):
        return (f"{name} has {hooks} that molf's layer would not run (it computes the base product in its own "
                "kernels, not through the nn.Linear's forward; torch.nn.utils.weight_norm is such a hook): remove "
                "it before wrapping, and register it on the MoLF layer if it should see the layer's output")
    if quant.quant_kind(m) is not None:
        return None  # bitsandbytes Linear4bit / Linear8bitLt: MoLF-E on a quantized base (molf.quant)
    if kind.__module__.startswith("bitsandbytes") or getattr(m, "weight", None) is not None and (
            not m.weight.is_floating_point() or type(m.weight.data) not in (torch.Tensor, nn.Parameter)):
        return (f"{name} is a quantized layer ({kind.__module__}.{kind.__name__}, weight "
                f"{type(m.weight.data).__name__} {m.weight.dtype}) that molf cannot wrap: quantized bases are "
                "supported as bitsandbytes Linear4bit and Linear8bitLt (train_base=False); load the model with "
                "bitsandbytes, or in bf16/fp16/fp32, to wrap it")
    if _is_conv1d(m):
        return (f"{name} is a transformers Conv1D (GPT-2 style, weight stored in_features x out_features): molf "
                "wraps nn.Linear layers only; convert the model's Conv1D layers to nn.Linear first")
    if not isinstance(m, nn.Linear):
        return f"{name} is a {kind.__name__}, not an nn.Linear"
    if kind is not nn.Linear and kind.forward is not nn.Linear.forward and \
            f"{kind.__module__}.{kind.__qualname__}" not in LINEAR_FORWARDS:
        return (f"{name} is a {kind.__module__}.{kind.__name__}, a subclass of nn.Linear with its own forward: "
                "molf would replace that forward; wrap a model with plain nn.Linear layers there")
    return None


def _hooks(m: nn.Module) -> str:
    """The forward / backward hooks registered on module `m` itself, described ("" if none); a replaced
    `forward` (accelerate's hooks, a patch) counts as one."""
    kinds = {"forward pre-hook": m._forward_pre_hooks, "forward hook": m._forward_hooks,
             "backward pre-hook": m._backward_pre_hooks, "backward hook": m._backward_hooks}
    found = [f"a {kind} ({getattr(h, '__qualname__', None) or type(h).__name__})"
             for kind, hooks in kinds.items() for h in hooks.values()]
    if "forward" in m.__dict__:
        found.append(f"a replaced forward ({getattr(m.forward, '__qualname__', type(m.forward).__name__)})")
    return ", ".join(found)


# Linear layers whose parent reads their weight without calling them, by the parent's class: a MoLF layer's
# experts there would never apply. nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward;
# transformers' Mamba-style mixers hand these weights to their CUDA kernels (mamba_inner_fn,
# mamba_split_conv1d_scan_combined) or multiply by dt_proj.weight; DeBERTa splits in_proj.weight; WavLM calls
# F.multi_head_attention_forward.
MAMBA_MIXERS = {
    "MambaMixer": ("x_proj", "dt_proj", "out_proj"), "FalconMambaMixer": ("x_proj", "dt_proj", "out_proj"),
    "JambaMambaMixer": ("dt_proj",), "Mamba2Mixer": ("out_proj",), "BambaMixer": ("out_proj",),
    "FalconH1Mixer": ("out_proj",), "NemotronHMamba2Mixer": ("out_proj",), "GraniteMoeHybridMambaLayer": ("out_proj",),
    "Zamba2MambaMixer": ("out_proj",),
}
READ_BY_WEIGHT = {**MAMBA_MIXERS, "DisentangledSelfAttention": ("in_proj",), "WavLMAttention": ("out_proj",)}


def _read_by_weight(model: nn.Module) -> dict[int, tuple[str, str]]:
    """id(linear) -> (its name, its parent's class) for the linears READ_BY_WEIGHT (and nn.MultiheadAttention's
    out_proj) lists."""
    found = {}
    for n, m in model.named_modules():
        kind = type(m)
        if isinstance(m, nn.MultiheadAttention):
            attrs = ("out_proj",)
        elif kind.__module__.startswith("transformers.") and kind.__name__ in READ_BY_WEIGHT:
            attrs = READ_BY_WEIGHT[kind.__name__]
        else:
            continue
        for a in attrs:
            child = getattr(m, a, None)
            if isinstance(child, nn.Module):
                found[id(child)] = (f"{n}.{a}" if n else a, kind.__name__)
    return found


def _shared_problems(model: nn.Module, chosen: list[tuple[str, nn.Module]]) -> list[str]:
    """The targets that sit in more than one place (one module object set as two attributes, or under two
    parents): wrapping replaces one attribute, so the others would keep computing the plain layer. A module
    inside a shared block is one place (the block's attribute), wherever the block is used."""
    places: dict[int, list[str]] = {id(m): [] for _, m in chosen}
    for pname, parent in model.named_modules():
        for attr, child in parent._modules.items():
            if child is not None and id(child) in places:
                places[id(child)].append(f"{pname}.{attr}" if pname else attr)
    return [f"{ps[0]} is the same module as {ps[1]} ({len(ps)} places in the model): wrapping it would replace "
            "one of them only, and the others would silently compute the plain layer; give each place its own "
            "module (copy.deepcopy) or leave it out of target_modules" for ps in places.values() if len(ps) > 1]


def _fused_experts(model: nn.Module) -> list[tuple[str, list[tuple[str, list[int]]]]]:
    """(name, [(parameter, shape)]) of the modules holding 3-D weights: a mixture-of-experts block's experts
    stored as one [n_experts, out, in] tensor each (transformers 5's Mixtral, Qwen-MoE, OLMoE), not nn.Linear."""
    found = []
    for n, m in model.named_modules():
        if "expert" not in type(m).__name__.lower() + n.rpartition(".")[2].lower():
            continue  # a vision tower's pooling probe [1, 1, d] is 3-D too
        params = [(pn, list(p.shape)) for pn, p in m.named_parameters(recurse=False)
                  if p.dim() == 3 and p.is_floating_point()]
        if params:
            found.append((n, params))
    return found


def _experts_problem(model: nn.Module) -> str | None:
    """Why the default targets cannot serve a mixture-of-experts model (None for other models)."""
    experts = _fused_experts(model)
    if not experts:
        return None
    name, params = experts[0]
    linears = sorted({n.rpartition(".")[2] for n, _ in _match_targets(model, "all-linear")})
    return (f"the model is a mixture of experts: its experts ({name}: "
            f"{', '.join(f'{pn} {shape}' for pn, shape in params)}; {len(experts)} such modules) are 3-D "
            "parameters, not nn.Linear layers, which molf cannot wrap, and the default targets would leave them "
            f"out; pass target_modules naming the linear layers to wrap (this model's are named {linears}): the "
            "experts then train as plain AdamW parameters, or stay frozen with freeze_others=True")


def refuse_offloaded(model: nn.Module) -> None:
    """ValueError if accelerate offloads some of the model's weights (a device_map with "cpu"/"disk" beside a
    GPU, or a max_memory it does not fit): their parameters are placeholders between forwards."""
    def hooks(m):  # accelerate's hook on m: one AlignDevicesHook, or a SequentialHook of several
        hook = getattr(m, "_hf_hook", None)
        return getattr(hook, "hooks", None) or ([hook] if hook is not None else [])

    offloaded = [n or "the model" for n, m in model.named_modules() if any(getattr(h, "offload", False)
                                                                           for h in hooks(m))]
    if offloaded:
        raise ValueError(f"model has weights offloaded by its device_map ({offloaded[0]}, {len(offloaded)} modules: "
                         f"hf_device_map {getattr(model, 'hf_device_map', None)}): accelerate brings them to the "
                         "device for each forward only, and molf's layers read and train their weights in place; load "
                         "the model onto one device without offloading (device_map='cuda', or bitsandbytes 4-bit "
                         "with MoLF-E to fit it)")


LANGUAGE_MODELS = ("language_model", "text_model")  # Gemma-3 4B+, Llava, Qwen-VL, ...; Idefics2/3, SmolVLM


def _language_model_prefix(model: nn.Module) -> str | None:
    """"<name>." of a multimodal model's language model (a submodule named as in LANGUAGE_MODELS), None for a
    plain language model."""
    return next((n + "." for n, _ in model.named_modules() if n.rpartition(".")[2] in LANGUAGE_MODELS), None)


TASK_HEADS = ("score", "classifier", "qa_outputs")


def _task_heads(model: nn.Module) -> list[str]:
    """The new, randomly initialised head of a classification or QA model (transformers' `model.score`,
    `.classifier`, `.qa_outputs`): "all-linear" leaves it alone and freeze_others keeps it trainable, as peft's
    modules_to_save does for those tasks."""
    return [n for n, _ in model.named_children() if n in TASK_HEADS]


def _hit(name: str, key: str) -> bool:
    """Whether module `name` is the one a target list names `key`: it, or ends in "." + it (peft's rule)."""
    return name == key or name.endswith("." + key)


def _defaults_present(names: tuple[str, ...], linears: list[str]) -> tuple[str, ...]:
    """The default target names, less those the model lacks when the rest already cover every linear layer
    (`linears`, the language model's; Nemotron's and Apertus' MLPs have no gate_proj); all of them otherwise, so
    that an architecture whose projections are named differently is an error rather than a partial wrap."""
    present = tuple(k for k in names if any(_hit(n, k) for n in linears))
    covered = all(any(_hit(n, k) for k in present) for n in linears)
    return present if present and covered else names


def _called_linears(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The nn.Linear / Conv1D layers among `modules` that the model calls (not those READ_BY_WEIGHT)."""
    by_weight = _read_by_weight(model)
    return [(n, m) for n, m in modules if (isinstance(m, nn.Linear) or _is_conv1d(m)) and id(m) not in by_weight]


def _log_left_out(model: nn.Module, chosen: list, linears: list[tuple[str, nn.Module]]) -> None:
    """Say (at INFO, on the `molf` logger) which of `linears` (the language model's, as "all-linear" finds them)
    the defaults do not wrap."""
    picked = {id(m) for _, m in chosen}
    left = [n for n, m in linears if id(m) not in picked]
    if left:
        names = sorted({n.rpartition(".")[2] for n in left})
        arch = getattr(getattr(model, "config", None), "model_type", "?")
        logging.getLogger("molf").info(
            "molf.wrap: the default targets of this architecture (%s) wrap %d linear layers and leave out %d (%s, "
            "e.g. %s): name them in target_modules, or pass 'all-linear', to train them", arch, len(chosen),
            len(left), ", ".join(names), left[0])


def _match_targets(model: nn.Module, target_modules, defaults: bool = False) -> list[tuple[str, nn.Module]]:
    """The modules target_modules names (peft's conventions): "all-linear" (every linear but the output
    head and a task head), a regular expression (a str, full match of the module name) or a list of names, each
    matching a module whose name is it or ends in "." + it. A listed name that matches nothing is an error."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = [(n, m) for n, m in model.named_modules() if n and m is not head and n.rpartition(".")[2] != "lm_head"]
    if target_modules == "all-linear":
        tasks = tuple(_task_heads(model))
        return [(n, m) for n, m in _called_linears(model, modules) if n.partition(".")[0] not in tasks]
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression ({e})") from None
        chosen = [(n, m) for n, m in modules if pattern.fullmatch(n)]
        if not chosen:
            raise ValueError(f"target_modules={target_modules!r} (a regular expression, matched against full module "
                             f"names such as {modules[0][0] if modules else '...'!r}) matches no module")
        return chosen
    chosen = [(n, m) for n, m in modules if any(_hit(n, key) for key in target_modules)]  # in model order
    unmatched = [key for key in target_modules if not any(_hit(n, key) for n, _ in chosen)]
    heads = [key for key in unmatched for n, m in model.named_modules()
             if n and _hit(n, key) and (m is head or n.rpartition(".")[2] == "lm_head")]
    if heads:
        raise ValueError(f"target_modules names the output head ({heads[0]}), which molf never wraps (MoLF routes "
                         "the decoder's linear layers); leave it out, and to train it beside the experts set "
                         f"model.{heads[0]}.requires_grad_(True) before MoLFAdamW (plain AdamW there)")
    if unmatched:
        linear_names = sorted({n.rpartition(".")[2] for n, _ in _called_linears(model, modules)})
        experts = _fused_experts(model)
        moe = (f" (its MoE experts, e.g. {experts[0][0]}, are 3-D parameters, not nn.Linear layers, and cannot be "
               "wrapped)") if experts else ""
        arch = getattr(getattr(model, "config", None), "model_type", "?")
        what = (f"the default target_modules of this architecture ({arch}): {unmatched}" if defaults
                else f"target_modules {unmatched}")
        fix = ("pass target_modules naming this model's projections, or 'all-linear'" if defaults else
               "pass names that exist, target_modules='all-linear', or None for the architecture's defaults")
        raise ValueError(f"{what} match no module of the model (its linear layers are named {linear_names}){moe}; "
                         f"{fix}")
    return chosen


def wrap(model: nn.Module, ranks: Sequence[int] = (128,), alphas: Sequence[float] = (32,), train_base: bool = True,
         target_modules: Sequence[str] | str | None = None, rslora: bool = True, dropout: float = 0.0,
         backend: str = "auto", freeze_others: bool = False) -> nn.Module:
    """Replace, in place, the linear layers `target_modules` names with MoLFLinear layers.

    target_modules: None (the architecture's defaults: q/k/v/o and gate/up/down projections, or its decoder
    blocks' linear layers under their own names, ARCH_TARGETS; in a multimodal model, those of its language
    model), "all-linear" (every linear but the output head and a classifier's or QA model's new head), a regular
    expression (full match of module names) or a list of names matched as suffixes. The output head is never
    wrapped.
    A model with Mamba-style mixers also gets their in_proj (their other projections are read by weight and never
    wrapped). A default name the model lacks (no gate_proj) is dropped when the others cover every linear layer; a
    mixture-of-experts model has no defaults (its experts are 3-D parameters, not linear layers): name them.
    Every layer named must be wrappable: a quantized layer, a Conv1D, an nn.Linear subclass with its own
    forward (but those of LINEAR_FORWARDS: Falcon's) or a linear with hooks or parametrizations of its own is an
    error, never silently skipped.
    `freeze_others=True` also freezes every parameter outside the wrapped linears (embeddings, norms, ...), so
    that only the MoLF experts train (MoLF-E's option); a classifier's or QA model's new head (`score`,
    `classifier`, `qa_outputs`) stays trainable.
    Returns `model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if hasattr(model, "peft_config") or any(type(m).__module__.startswith("peft.") for m in model.modules()):
        if getattr(model, "_hf_peft_config_loaded", False) and not hasattr(model, "merge_and_unload"):
            raise ValueError("model holds a peft adapter that transformers loaded into it (load_adapter, or "
                             "from_pretrained of an adapter's folder), whose LoRA layers molf would train unrouted: "
                             "load the base with peft instead, peft.PeftModel.from_pretrained(base, adapter)."
                             "merge_and_unload(), and wrap the plain model it returns (or drop the adapter: "
                             "model.delete_adapter(name))")
        raise ValueError("model is a peft model (it holds peft's LoRA layers, which molf would train unrouted): call "
                         "model.merge_and_unload() first and wrap the plain model it returns")
    sharded = _dist.sharded_or_replicated(model)
    if sharded is not None:
        raise ValueError(f"model is already wrapped by {sharded}, which would not see the LoRA experts wrap adds "
                         "(their gradients would not be averaged or sharded across processes): call molf.wrap on "
                         "the plain model first, then DDP / fully_shard, then MoLFAdamW")
    outer, model = model, unwrap_model(model)  # torch.compile's and DataParallel's wrapper: wrap the model inside
    refuse_offloaded(model)
    wrapped = [n for n, _ in molf_layers(model)]
    if wrapped:
        raise ValueError(f"model is already wrapped ({len(wrapped)} MoLF layers, e.g. {wrapped[0]}): wrap a fresh "
                         "model, or molf.merge(model) first")
    defaults = target_modules is None
    lm = _language_model_prefix(model) if defaults else None
    if defaults:
        if msg := _experts_problem(model):
            raise ValueError(msg)
        lm_linears = [(n, m) for n, m in _match_targets(model, "all-linear") if n.startswith(lm or "")]
        target_modules = _defaults_present(default_targets(model), [n for n, _ in lm_linears])
    if not isinstance(target_modules, (str, Iterable)):
        raise TypeError(f"target_modules must be None, 'all-linear', a regular expression or a sequence of module "
                        f"names, got {target_modules!r}")
    if not isinstance(target_modules, str):
        target_modules = tuple(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise TypeError(f"target_modules must be a non-empty sequence of str, got {target_modules!r}")
    ranks, alphas = _check_experts(ranks, alphas, dropout)
    train_base, rslora = _checks.flag("train_base", train_base), _checks.flag("rslora", rslora)
    freeze_others = _checks.flag("freeze_others", freeze_others)
    _backend.check_backend(backend)
    chosen = _match_targets(model, target_modules, defaults)
    if lm is not None:
        # A multimodal model: the defaults are its language model's (matching the vision tower's q/k/v_proj too
        # would wrap half of it).
        chosen = [(n, m) for n, m in chosen if n.startswith(lm)]
    problems = [msg for n, m in chosen if (msg := _unsupported(n, m))] + _shared_problems(model, chosen)
    by_weight = _read_by_weight(model)
    problems += [f"{n}: its parent ({by_weight[id(m)][1]}) reads its weight directly without calling the layer, so "
                 "a MoLF layer's experts there would never apply; leave it out of target_modules ('all-linear' "
                 "does)" for n, m in chosen if id(m) in by_weight]
    quantized = [(n, m) for n, m in chosen if quant.quant_kind(m) is not None]
    if quantized and train_base:
        problems.insert(0, f"train_base=True needs float bases, but {quantized[0][0]} is a "
                           f"{quant.describe(quantized[0][1])} layer ({len(quantized)} quantized targets): a quantized "
                           "weight cannot be the full expert; use train_base=False (MoLF-Efficient)")
    for n, m in quantized:
        try:
            quant.check_quantized(m, n)
        except ValueError as e:
            problems.append(str(e))
    targets = {id(m) for _, m in chosen}  # the quantized layers between the targets carry gradients too
    problems += [p for n, m in model.named_modules() if id(m) not in targets and (p := quant.repacked_problem(m, n))]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)
    if not chosen:
        raise ValueError(f"target_modules={target_modules!r} selects no linear layer of the model")
    if defaults:
        _log_left_out(model, chosen, lm_linears)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape(META_EXPERTS[:40]))  # said once below, not per layer
        for name, lin in chosen:
            _set_child(model, name, MoLFLinear(lin, ranks, alphas, train_base, rslora, dropout, backend))
    if any(lin.weight.is_meta for _, lin in chosen):
        warnings.warn(META_EXPERTS, UserWarning, stacklevel=2)
    quant.keep_cpu_trainable(model)
    if freeze_others:
        inside = {id(p) for m in model.modules() if isinstance(m, MoLFLinear) for p in m.parameters()}
        inside |= {id(p) for n in _task_heads(model) for p in getattr(model, n).parameters()}
        for p in model.parameters():
            if id(p) not in inside:
                p.requires_grad_(False)
    return outer


def merge(model: nn.Module) -> nn.Module:
    """Turn every MoLFLinear of `model` back into a plain nn.Linear with the experts folded in; in place."""
    if isinstance(model, MoLFLinear):
        raise TypeError("merge(model) replaces MoLF layers inside a model; for one layer call layer.merge()")
    _dist.refuse_shards(model, "molf.merge", "merge an unsharded model: molf.from_pretrained(checkpoint), or "
                        "molf.load into the model built and wrapped alike before fully_shard (molf.save_pretrained("
                        "model, path, state_dict=sd) writes the merged checkpoint directly)")
    dequantized = []
    for name, m in list(model.named_modules()):
        if isinstance(m, MoLFLinear):
            merged = m.merge()
            if m.quantized:
                dequantized.append((name, quant.describe(m.base), merged.weight.dtype))
            _set_child(model, name, merged)
    if dequantized:
        left = [n for n, m in model.named_modules() if quant.quant_kind(m) is not None]
        if not left:  # nothing quantized remains: transformers must not save or reload it as quantized
            _forget_quantization(model)
        name, what, dtype = dequantized[0]
        warnings.warn(f"molf.merge dequantized {len(dequantized)} {what} layers (e.g. {name}) into float nn.Linear "
                      f"({dtype}): the merged model is no longer quantized there"
                      + (f"; {len(left)} other quantized layers stay quantized" if left else
                         "; its quantization_config was removed, so save_pretrained writes a float checkpoint"),
                      stacklevel=2)
    return model


def _forget_quantization(model: nn.Module) -> None:
    """Drop transformers' record that the model is quantized (config.quantization_config, hf_quantizer)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable element counts per expert kind ("full", "lora_r16", ...), "other" (outside MoLF layers),
    "trainable" and "total"."""
    counts: dict[str, int] = {}
    inside = set()
    for m in model.modules():
        if isinstance(m, MoLFLinear):
            names = m.expert_names
            groups = ([[m.base.weight, m.base.bias]] if m.base.weight.requires_grad else []) + \
                [[a, b] for a, b in zip(m.lora_A, m.lora_B)]
            for name, ps in zip(names, groups):
                key = "full" if name == "full" else name
                counts[key] = counts.get(key, 0) + sum(p.numel() for p in ps if p is not None and p.requires_grad)
            inside.update(id(p) for p in m.parameters())
    seen, other, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)  # two 4-bit values per stored byte
        if p.requires_grad and id(p) not in inside:
            other += p.numel()
    counts["other"] = other
    counts["trainable"] = sum(counts.values())
    counts["total"] = total
    return counts


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the trainable parameters per expert kind, as peft's model.print_trainable_parameters() does."""
    c = trainable_parameters(model)
    kinds = ", ".join(f"{k}: {v:,}" for k, v in c.items() if k not in ("trainable", "total"))
    print(f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
          f"trainable%: {100 * c['trainable'] / max(c['total'], 1):.4f} ({kinds})")
