"""MoLFLinear: a linear layer as a base weight plus LoRA experts; wrap() and merge() for whole models.

    y = x W^T + b + sum_i s_i (drop(x) A_i^T) B_i^T,   s_i = alpha_i / sqrt(r_i) (rsLoRA) or alpha_i / r_i
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import torch
from torch import nn

from . import _backend, _checks
from .reference import molf_linear_reference, dropout_mask

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_experts(ranks: Sequence[int], alphas: Sequence[float], dropout: float) -> tuple[tuple[int, ...], tuple[float, ...]]:
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


class MoLFLinear(nn.Module):
    """A MoLF layer: `base` (an nn.Linear, the "full" expert when it trains) plus LoRA experts.

    Args:
        base: the nn.Linear to wrap (kept as `.base`, its parameters are not copied).
        ranks, alphas: one entry per LoRA expert; A_i is (r_i, in_features), B_i is (out_features, r_i).
        train_base: False freezes the base weight and bias (MoLF-Efficient).
        rslora: scale s_i = alpha_i / sqrt(r_i) if True, else alpha_i / r_i.
        dropout: dropout probability on the LoRA path only (the base path always sees x).
        backend: "auto", "eager" or "triton".
    """

    def __init__(self, base: nn.Linear, ranks: Sequence[int] = (128,), alphas: Sequence[float] = (32,),
                 train_base: bool = True, rslora: bool = True, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        ranks, alphas = _check_experts(ranks, alphas, dropout)
        train_base, rslora = _checks.flag("train_base", train_base), _checks.flag("rslora", rslora)
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
        if not train_base:
            for p in base.parameters():
                p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(r, k, device=w.device, dtype=w.dtype)) for r in ranks])
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.empty(n, r, device=w.device, dtype=w.dtype)) for r in ranks])
        self.reset_lora_parameters()

    @property
    def expert_names(self) -> list[str]:
        return expert_names(self.ranks, self.base.weight.requires_grad)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A_i Kaiming-uniform (a = sqrt(5), as nn.Linear and peft), B_i = 0: the layer starts equal to `base`."""
        for a, b in zip(self.lora_A, self.lora_B):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype} (token ids go through "
                            "the embedding, not a linear layer)")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input of shape {tuple(x.shape)} does not match the layer: its last dimension must be "
                             f"in_features = {self.in_features} (weight shape {tuple(self.base.weight.shape)})")
        w = self.base.weight
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"input dtype {x.dtype} differs from the layer's weight dtype {w.dtype}; "
                            "cast the input or run under torch.autocast")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        mask = dropout_mask(x, self.dropout) if self.training and self.dropout > 0 else None
        backend = _backend.resolve(self.backend, x.device)
        if backend == "triton":
            from .kernels import molf_linear as _fused  # imported on first use: triton stays optional
            return _fused.molf_linear(x, self.base.weight, self.base.bias, list(self.lora_A), list(self.lora_B),
                                      self.scalings, mask, self.dropout)
        return molf_linear_reference(x, self.base.weight, self.base.bias, list(self.lora_A), list(self.lora_B),
                                     self.scalings, mask, self.dropout)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + sum_i s_i B_i A_i, accumulated in fp32 (or W's dtype if wider) and rounded once to W's dtype."""
        w = self.base.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        delta = w.to(acc, copy=True)
        for s, a, b in zip(self.scalings, self.lora_A, self.lora_B):
            delta.addmm_(b.to(acc), a.to(acc), alpha=s)
        return delta.to(w.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new plain nn.Linear whose weight is W + sum_i s_i B_i A_i (bias copied); this layer is unchanged."""
        w = self.base.weight
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=w.device, dtype=w.dtype)
        out.weight.copy_(self.merged_weight())
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, ranks={self.ranks}, "
                f"alphas={self.alphas}, train_base={self.base.weight.requires_grad}, rslora={self.rslora}, "
                f"dropout={self.dropout}, backend={self.backend!r}")


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)  # nn.ModuleList/Sequential accept setattr with a digit name


def wrap(model: nn.Module, ranks: Sequence[int] = (128,), alphas: Sequence[float] = (32,), train_base: bool = True,
         target_modules: Sequence[str] | None = DEFAULT_TARGETS, rslora: bool = True, dropout: float = 0.0,
         backend: str = "auto", freeze_others: bool = False) -> nn.Module:
    """Replace, in place, every nn.Linear whose name ends in one of `target_modules` with a MoLFLinear
    (None: `DEFAULT_TARGETS`).

    lm_head is never wrapped. `freeze_others=True` also freezes every parameter outside the wrapped
    linears (embeddings, norms, ...), so that only the MoLF experts train (MoLF-Efficient's option).
    Returns `model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if target_modules is None:
        target_modules = DEFAULT_TARGETS
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    if not isinstance(target_modules, Iterable):
        raise TypeError(f"target_modules must be a sequence of module names (or None for the defaults), "
                        f"got {target_modules!r}")
    target_modules = tuple(target_modules)
    bad = [t for t in target_modules if not isinstance(t, str)]
    if bad or not target_modules:
        raise TypeError(f"target_modules must be a non-empty sequence of str, got {target_modules!r}")
    targets = set(target_modules)
    ranks, alphas = _check_experts(ranks, alphas, dropout)
    train_base, rslora = _checks.flag("train_base", train_base), _checks.flag("rslora", rslora)
    freeze_others = _checks.flag("freeze_others", freeze_others)
    _backend.check_backend(backend)
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    chosen = [(n, m) for n, m in linears
              if n.rpartition(".")[2] in targets and n.rpartition(".")[2] != "lm_head"]
    if not chosen:
        names = [n for n, _ in linears][:6]
        raise ValueError(f"no nn.Linear of the model matches target_modules={tuple(target_modules)}; "
                         f"its linear layers include {names}")
    for name, lin in chosen:
        _set_child(model, name, MoLFLinear(lin, ranks, alphas, train_base, rslora, dropout, backend))
    if freeze_others:
        inside = {id(p) for m in model.modules() if isinstance(m, MoLFLinear) for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in inside:
                p.requires_grad_(False)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Turn every MoLFLinear of `model` back into a plain nn.Linear with the experts folded in; in place."""
    if isinstance(model, MoLFLinear):
        raise TypeError("merge(model) replaces MoLF layers inside a model; for one layer call layer.merge()")
    for name, m in list(model.named_modules()):
        if isinstance(m, MoLFLinear):
            _set_child(model, name, m.merge())
    return model
