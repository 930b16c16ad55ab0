"""The algorithm's pure math, shared by the runtime (molf.layer, molf.optim) and the reference oracle:
constants, the score terms, routing, hyperparameter checks, dropout masks, stochastic rounding.
`../shared/molf-algorithm.md` section 2 states it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from . import _checks

EPS_SCORE = 1e-8  # the score's epsilon, fixed by the algorithm (not the optimizer's eps)
SCORES = ("epd", "pfn")


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Keep-mask for dropout on the LoRA path, drawn from torch's RNG (so every backend draws the same)."""
    return torch.empty(x.shape, device=x.device, dtype=torch.float32).bernoulli_(1.0 - p).to(torch.bool)


def expert_score_terms(m: torch.Tensor, v: torch.Tensor, score: str) -> torch.Tensor:
    """Per-element score term, in fp32: EPD m^2/(sqrt(v)+eps_s), PFN (m/(sqrt(v)+eps_s))^2."""
    m, v = m.float(), v.float()
    if score == "epd":
        return m.square() / (v.sqrt() + EPS_SCORE)
    return (m / (v.sqrt() + EPS_SCORE)).square()


def preference(score: float) -> tuple[int, float]:
    """Sort key, highest first: finite scores, then NaN/inf (molf's safeguard), then -inf (no gradient).
    Python's sort is stable with reverse=True too: ties go to the lower expert index."""
    if math.isfinite(score):
        return 2, score
    return (0, 0.0) if score == -math.inf else (1, 0.0)


def check_hyperparameters(lr, lora_lr, weight_decay, lora_weight_decay, betas, eps, score, top_k,
                          n_experts: int | None = None) -> dict:
    """The hyperparameters as plain floats and ints (numpy scalars accepted), or a TypeError/ValueError
    naming the argument. `betas` may be any iterable of two numbers (consumed once)."""
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Iterable):
        raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
    betas = tuple(betas)
    if len(betas) != 2:
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
    if not isinstance(score, str) or score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return dict(
        lr=_checks.real("lr", lr, low=0.0),
        lora_lr=None if lora_lr is None else _checks.real("lora_lr", lora_lr, low=0.0),
        weight_decay=_checks.real("weight_decay", weight_decay, low=0.0),
        lora_weight_decay=_checks.real("lora_weight_decay", lora_weight_decay, low=0.0),
        betas=tuple(_checks.real(f"betas[{i}]", b, 0.0, 1.0, high_open=True) for i, b in enumerate(betas)),
        eps=_checks.real("eps", eps, low=0.0), score=score,
        top_k=_checks.integer("top_k (experts updated per layer, at most the number of experts)", top_k, 1,
                              n_experts))


def route(sums: torch.Tensor, inv_n: torch.Tensor, no_grad: torch.Tensor, expert_lrs: list[float], score: str,
          top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and winners from the per-expert sums [L, E], on the device, without host synchronisation.

    EPD: S = lr_e / N_e * sum;  PFN: S = sqrt(sum) / sqrt(N_e)  (inv_n holds 1/N_e or 1/sqrt(N_e)).
    Order of preference: finite scores (highest first), then non-finite ones (NaN or inf, from non-finite
    moments), then experts without gradients (-inf, never picked); ties go to the lower expert index.
    """
    if score == "epd":
        scores = sums * inv_n
        for e, lr in enumerate(expert_lrs):
            scores[:, e] *= lr
    else:
        scores = sums.sqrt() * inv_n
    scores.masked_fill_(no_grad, -math.inf)
    finite = scores.isfinite()
    # Two stable sorts: by score (non-finite as 0), then by class (finite 2, non-finite 1, no gradient 0).
    order = torch.sort(torch.where(finite, scores, 0.0), dim=1, descending=True, stable=True).indices
    cls = finite.to(torch.int8) + (~no_grad).to(torch.int8)
    by_class = torch.sort(cls.gather(1, order), dim=1, descending=True, stable=True).indices
    top = order.gather(1, by_class[:, :top_k])
    winners = torch.zeros_like(no_grad).scatter_(1, top, True) & ~no_grad
    return winners, scores


def stochastic_round_bf16(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16 rounding up with probability equal to the dropped remainder (unbiased); inf/nan kept."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=gen)
    bits = (x.view(torch.int32) + noise) & -65536  # 0xFFFF0000: the low 16 bits are what bf16 drops
    return torch.where(x.isfinite(), bits.view(torch.float32), x).to(torch.bfloat16)
