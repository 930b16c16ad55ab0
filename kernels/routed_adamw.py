"""Fused routed AdamW: three launches per step whatever the number of layers, no host synchronisation.

    launch 1  moments + score:  m <- b1 m + (1-b1) g,  v <- b2 v + (1-b2) g^2  (in place, every tensor)
              partial[block] = sum m^2/(sqrt(v)+1e-8)  (EPD)  or  sum (m/(sqrt(v)+1e-8))^2  (PFN)
    launch 2  finish:  sums[expert] = fixed-order sum of its blocks' partials;  step <- step + 1;
              per tensor 1/(1-b1^t) and sqrt(1-b2^t), in float64 (b^t by repeated squaring)
    (routing: torch ops on the device, molf.optim.route)
    launch 3  masked update, for blocks whose expert won (or outside MoLF layers):
              p <- p (1 - lr wd) - lr/(1-b1^t) m / (sqrt(v)/sqrt(1-b2^t) + eps)

Launches 1 and 3 run once per combination of (param, grad, state) dtypes, normally one.
"""
from __future__ import annotations


import triton
import triton.language as tl

from ._utils import TORCH_TO_TL, round_to
from .multi_tensor import TensorTable, block_owner, segment_total

MAX_GROUPS = 5  # per-group hyperparameters a launch takes (MoLFAdamW has up to 5 group kinds)


@triton.jit
def _group_value(gi, v0, v1, v2, v3, v4):
    return tl.where(gi == 0, v0, tl.where(gi == 1, v1, tl.where(gi == 2, v2, tl.where(gi == 3, v3, v4))))


# Columns of a launch's pointer table (one row per tensor); constexpr so that kernels may read them.
COL_P, COL_G, COL_M, COL_V, N_COLS = (tl.constexpr(i) for i in range(5))


@triton.jit
def _moments_score_kernel(ptrs, first, numel, n_rows, out_block, owner, partials, beta1, beta2,
                          P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                          PFN: tl.constexpr, EPS_SCORE: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = block_owner(first, n_rows, b, STEPS)
    j = b - tl.load(first + t)  # this program's block within tensor t
    g_ptr = tl.load(ptrs + t * N_COLS + COL_G).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(ptrs + t * N_COLS + COL_M).to(tl.pointer_type(S_DTYPE))
    v_ptr = tl.load(ptrs + t * N_COLS + COL_V).to(tl.pointer_type(S_DTYPE))
    offs = j * BLOCK + tl.arange(0, BLOCK)
    ok = offs < tl.load(numel + t)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp_(g, 1 - b1)
    # v rounded after the decay as torch's v.mul_(b2).addcmul_(g, g, 1 - b2) does (16-bit states: same bits)
    v = round_to(beta2 * v, S_DTYPE).to(tl.float32) + (1.0 - beta2) * g * g
    m_s = round_to(m, S_DTYPE)
    v_s = round_to(v, S_DTYPE)
    tl.store(m_ptr + offs, m_s, mask=ok)
    tl.store(v_ptr + offs, v_s, mask=ok)
    if tl.load(owner + t) >= 0:  # the score reads the stored (rounded) moments, as the reference does
        m = m_s.to(tl.float32)
        d = tl.sqrt(v_s.to(tl.float32)) + EPS_SCORE
        if PFN:
            q = m / d
            term = q * q
        else:
            term = m * m / d
        tl.store(partials + tl.load(out_block + t) + j, tl.sum(tl.where(ok, term, 0.0), axis=0))


@triton.jit
def _pow_int(base, t):
    """base ** t for base float64 and t a float holding a non-negative integer (vectorised)."""
    e = t.to(tl.int64)
    result = tl.full(t.shape, 1.0, tl.float64)
    b = base.to(tl.float64) + tl.zeros(t.shape, tl.float64)
    for _ in tl.static_range(32):
        result = tl.where((e & 1) == 1, result * b, result)
        b = b * b
        e = e >> 1
    return result


@triton.jit
def _finish_kernel(partials, seg_start, sums, n_seg, step_ptrs, n_tensors, betas64, bias_corr,
                   BLOCK: tl.constexpr, TB: tl.constexpr):
    s = tl.program_id(0)
    if s < n_seg:
        tl.store(sums + s, segment_total(partials, seg_start, s, BLOCK))
    if s * TB < n_tensors:  # the programs past the last tensor only sum segments
        idx = s * TB + tl.arange(0, TB)
        ok = idx < n_tensors
        sp = tl.load(step_ptrs + idx, mask=ok, other=0).to(tl.pointer_type(tl.float32))
        step = tl.load(sp, mask=ok, other=0.0) + 1.0
        tl.store(sp, step, mask=ok)
        # Bias corrections in float64 (in fp32, 1 - 0.999^t loses ~1e-5 of its value to cancellation), with b^t
        # by repeated squaring: only fp64 multiplies, exact to a few ulp for any step count below 2^32.
        bc1 = 1.0 - _pow_int(tl.load(betas64), step)
        bc2 = 1.0 - _pow_int(tl.load(betas64 + 1), step)
        tl.store(bias_corr + 2 * idx, (1.0 / bc1).to(tl.float32), mask=ok)
        tl.store(bias_corr + 2 * idx + 1, tl.sqrt(bc2).to(tl.float32), mask=ok)


@triton.jit
def _masked_update_kernel(ptrs, first, numel, n_rows, owner, group, tensor_id, winners, bias_corr,
                          lr0, lr1, lr2, lr3, lr4, wd0, wd1, wd2, wd3, wd4, eps0, eps1, eps2, eps3, eps4, seed,
                          P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr,
                          BLOCK: tl.constexpr, STEPS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = block_owner(first, n_rows, b, STEPS)
    o = tl.load(owner + t)
    active = (o < 0) | (tl.load(winners + tl.maximum(o, 0)) != 0)
    if active:  # a losing expert's blocks load nothing more
        p_ptr = tl.load(ptrs + t * N_COLS + COL_P).to(tl.pointer_type(P_DTYPE))
        m_ptr = tl.load(ptrs + t * N_COLS + COL_M).to(tl.pointer_type(S_DTYPE))
        v_ptr = tl.load(ptrs + t * N_COLS + COL_V).to(tl.pointer_type(S_DTYPE))
        gi = tl.load(group + t)
        lr = _group_value(gi, lr0, lr1, lr2, lr3, lr4)
        wd = _group_value(gi, wd0, wd1, wd2, wd3, wd4)
        eps = _group_value(gi, eps0, eps1, eps2, eps3, eps4)
        tid = tl.load(tensor_id + t)
        inv_bc1 = tl.load(bias_corr + 2 * tid)
        bc2_sqrt = tl.load(bias_corr + 2 * tid + 1)
        offs = (b - tl.load(first + t)) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < tl.load(numel + t)
        p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        p = p * (1.0 - lr * wd)
        p = p - (lr * inv_bc1) * m / (tl.sqrt(v) / bc2_sqrt + eps)
        if STOCHASTIC:  # bf16: add 16 random low bits, truncate: rounds up with probability = the remainder
            r = tl.randint(seed, (tid.to(tl.int64) << 32) + offs)
            bits = p.to(tl.uint32, bitcast=True) + (r & 0xFFFF).to(tl.uint32)
            rounded = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
            p = tl.where(tl.abs(p) < float("inf"), rounded, p)
        tl.store(p_ptr + offs, round_to(p, P_DTYPE), mask=ok)


def _padded(values, fill=0.0):
    return [float(v) for v in values] + [fill] * (MAX_GROUPS - len(values))


def moments_score(table: TensorTable, *, out_block, owner, partials, beta1: float, beta2: float, p_dtype, g_dtype,
                  s_dtype, pfn: bool, eps_score: float) -> None:
    """Launch 1 over a table with columns (param, grad, exp_avg, exp_avg_sq): moments in place, one score
    partial per block of the tensors whose owner >= 0, at partials[out_block[t] + block within t]."""
    if table.n_blocks:
        _moments_score_kernel[(table.n_blocks,)](
            table.ptrs, table.first, table.numel, table.n_rows, out_block, owner, partials, beta1, beta2,
            P_DTYPE=TORCH_TO_TL[p_dtype], G_DTYPE=TORCH_TO_TL[g_dtype], S_DTYPE=TORCH_TO_TL[s_dtype], PFN=pfn,
            EPS_SCORE=eps_score, BLOCK=table.block, STEPS=table.search_steps)


def finish(*, partials, seg_start, sums, step_ptrs, n_tensors: int, betas64, bias_corr) -> None:
    """Launch 2: per-expert sums of the partials (fixed order), step counters + 1, bias corrections."""
    n_seg, tb = sums.numel(), 128
    grid = (max(n_seg, -(-n_tensors // tb), 1),)
    _finish_kernel[grid](partials, seg_start, sums, n_seg, step_ptrs, n_tensors, betas64, bias_corr, BLOCK=128, TB=tb)


def masked_update(table: TensorTable, *, owner, group, tensor_id, winners, bias_corr, lrs, wds, epss, seed: int,
                  p_dtype, s_dtype, stochastic: bool) -> None:
    """Launch 3: AdamW on the blocks whose expert won (or whose owner is -1); lrs/wds/epss per param group."""
    if len(lrs) > MAX_GROUPS:
        raise ValueError(f"masked_update takes up to {MAX_GROUPS} param groups, got {len(lrs)}")
    if table.n_blocks:
        _masked_update_kernel[(table.n_blocks,)](
            table.ptrs, table.first, table.numel, table.n_rows, owner, group, tensor_id, winners, bias_corr,
            *_padded(lrs), *_padded(wds), *_padded(epss), seed, P_DTYPE=TORCH_TO_TL[p_dtype],
            S_DTYPE=TORCH_TO_TL[s_dtype], STOCHASTIC=stochastic, BLOCK=table.block, STEPS=table.search_steps)
