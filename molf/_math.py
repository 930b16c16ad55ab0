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


# Philox-4x32 (Salmon et al., SC'11), the counter-based generator of the dropout keep-mask: element (m, k)
# of a (rows, cols) input is kept iff u(seed, m, k) >= p with u = (c0 >> 8) / 2^24, c0 the first output word
# for counter (k, m, 0, 0) and key (seed mod 2^32, seed >> 32). The fused kernels compute the same function
# where they load x (kernels/molf_linear.py, `_dropout_keep`), so neither the mask nor drop(x) is stored.
PHILOX_ROUNDS = 10
PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def dropout_seed(device) -> torch.Tensor:
    """One int64 seed in [0, 2^62) on `device`, drawn from torch's generator there (no host sync; restored
    by activation checkpointing and CUDA-graph safe like any torch RNG op)."""
    return torch.randint(0, 1 << 62, (1,), dtype=torch.int64, device=device)


def _mul_hi_lo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a x) >> 32 and (a x) mod 2^32 for a 32-bit constant a and 32-bit values x held in int64, from x's
    16-bit halves: a x = t 2^16 + (a x_lo mod 2^16) with t = a x_hi + (a x_lo >> 16), every product below
    2^48, so no int64 ever overflows (compiled C++ would make that undefined); checked against Random123's
    known answer and the Triton kernel's umulhi."""
    lo16 = a * (x & 0xFFFF)
    t = a * (x >> 16) + (lo16 >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (lo16 & 0xFFFF)


def philox_uniform(seed: torch.Tensor, rows: int, cols: int, row0: int = 0) -> torch.Tensor:
    """u(seed, m, k) for m in [row0, row0 + rows), k in [0, cols): float32 multiples of 2^-24 in [0, 1)."""
    dev = seed.device
    c0 = torch.arange(cols, dtype=torch.int64, device=dev).expand(rows, cols)
    c1 = torch.arange(row0, row0 + rows, dtype=torch.int64, device=dev)[:, None].expand(rows, cols)
    c2 = torch.zeros((), dtype=torch.int64, device=dev)
    c3 = c2
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mul_hi_lo(PHILOX_MUL[0], c0)
        hi2, lo2 = _mul_hi_lo(PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_KEY_STEP[0]) & _U32, (k1 + PHILOX_KEY_STEP[1]) & _U32
    return (c0 >> 8).to(torch.float32) * (1.0 / (1 << 24))


def dropout_keep(seed: torch.Tensor, rows: int, cols: int, p: float, chunk: int = 1 << 22) -> torch.Tensor:
    """The (rows, cols) bool keep-mask u(seed, m, k) >= p, built in row blocks of about `chunk` elements."""
    step = max(1, chunk // max(cols, 1))
    parts = [philox_uniform(seed, min(step, rows - r), cols, r) >= p for r in range(0, rows, step)]
    return torch.cat(parts) if parts else torch.zeros((0, cols), dtype=torch.bool, device=seed.device)


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Keep-mask for dropout on the LoRA path: a seed from torch's RNG, then `dropout_keep` over x viewed as
    (rows, x.shape[-1]); every backend draws the same seed, hence the same mask."""
    cols = x.shape[-1]
    return dropout_keep(dropout_seed(x.device), x.numel() // max(cols, 1), cols, p).view(x.shape)


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
