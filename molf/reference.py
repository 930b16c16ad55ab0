"""The eager reference: MoLF as the paper states it, written to be read, not to be fast.

Every kernel and every backend of molf is tested against this module:

- `molf_linear_reference`: y = x W^T + b + sum_i s_i (drop(x) A_i^T) B_i^T, peft-style (one expert at a time).
- `MoLFAdamWReference`: the optimizer step as the authors' code runs it, a Python loop over layers and
  experts with one host synchronisation (`.item()`) per expert score.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ._math import EPS_SCORE, SCORES, check_hyperparameters, dropout_mask, expert_score_terms, preference  # noqa: F401

def molf_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor],
                          scalings: Sequence[float], mask: torch.Tensor | None = None,
                          p: float = 0.0) -> torch.Tensor:
    """y = x W^T + b + sum_i s_i (drop(x) A_i^T) B_i^T with drop(x) = x * mask / (1 - p)."""
    y = F.linear(x, weight, bias)
    xd = x if mask is None else x * mask / (1.0 - p)
    for s, a, b in zip(scalings, lora_A, lora_B):
        y = y + s * F.linear(F.linear(xd, a), b)
    return y


def _score_sum(ms, vs, score: str) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=ms[0].device)
    for m, v in zip(ms, vs):
        total = total + expert_score_terms(m, v, score).sum()
    return total


def adamw_update_(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: float, lr: float, wd: float,
                  beta1: float, beta2: float, eps: float) -> None:
    """Decoupled AdamW: p *= 1 - lr wd;  p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    p.mul_(1.0 - lr * wd)
    denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bc1)


class MoLFAdamWReference(torch.optim.Optimizer):
    """MoLF AdamW, one layer and one expert at a time (the authors' structure). Same arguments,
    param groups, state and `routing`/`scores` as `molf.MoLFAdamW`; see `../shared/molf-algorithm.md` §2.
    """

    def __init__(self, model, lr: float, lora_lr: float | None = None, weight_decay: float = 0.0,
                 lora_weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, score: str = "epd",
                 top_k: int = 1, compile_scores: bool = False):
        from ._layout import build_layout

        layout = build_layout(model, lr, lora_lr, weight_decay, lora_weight_decay)
        betas = check_hyperparameters(lr, lora_lr, weight_decay, lora_weight_decay, betas, eps, score, top_k,
                                      len(layout.expert_names))["betas"]  # a generator is read once
        super().__init__(layout.groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.layout, self.score, self.top_k = layout, score, top_k
        self.layer_names, self.expert_names = layout.layer_names, layout.expert_names
        self.routing: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        # The authors ship their score functions under torch.compile(mode="reduce-overhead"); the benchmark
        # times the reference that way on the GPU.
        self._score_sum = (torch.compile(_score_sum, mode="reduce-overhead", dynamic=True) if compile_scores
                           else _score_sum)
        self._group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}

    def _group(self, p):
        return self.param_groups[self._group_of[id(p)]]  # by index: load_state_dict replaces the group dicts

    def _advance_moments(self, p):
        st, (beta1, beta2) = self.state[p], self._group(p)["betas"]  # each group's, as torch.optim.AdamW
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg"].lerp_(p.grad, 1.0 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
        st["step"] += 1

    def _update(self, p):
        g, st = self._group(p), self.state[p]
        adamw_update_(p, st["exp_avg"], st["exp_avg_sq"], st["step"].item(), g["lr"], g["weight_decay"],
                      *g["betas"], g["eps"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        n_layers, n_experts = len(self.layer_names), len(self.expert_names)
        scores = torch.full((n_layers, n_experts), -math.inf)
        routing = torch.zeros((n_layers, n_experts), dtype=torch.bool)
        for li, experts in enumerate(self.layout.experts):
            for ei, params in enumerate(experts):
                with_grad = [p for p in params if p.grad is not None]
                for p in with_grad:
                    self._advance_moments(p)
                if not with_grad:
                    continue
                total = self._score_sum([self.state[p]["exp_avg"] for p in with_grad],
                                        [self.state[p]["exp_avg_sq"] for p in with_grad], self.score).item()
                n = sum(p.numel() for p in with_grad)
                if self.score == "epd":
                    scores[li, ei] = self._group(params[0])["lr"] / n * total
                else:
                    scores[li, ei] = math.sqrt(total) / math.sqrt(n)
            order = sorted(range(n_experts), key=lambda e: preference(scores[li, e].item()), reverse=True)
            for ei in order[: self.top_k]:
                if scores[li, ei] == -math.inf:
                    continue
                routing[li, ei] = True
                for p in experts[ei]:
                    if p.grad is not None:
                        self._update(p)
        for p in self.layout.others:
            if p.grad is not None:
                self._advance_moments(p)
                self._update(p)
        dev = self.layout.experts[0][0][0].device if self.layout.experts[0][0] else torch.device("cpu")
        self.routing, self.scores = routing.to(dev), scores.to(dev)
        return loss
