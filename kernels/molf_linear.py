"""Fused MoLF layer: the base GEMM and the scaled low-rank term in one accumulator, forward and backward.

With A_cat = [A_1; ...; A_E] (R x K), B_cat = [B_1, ..., B_E] (N x R), s_cols the per-column scales
(s_i repeated r_i times) and xd = drop(x) = keep * x / (1 - p):

    forward   u  = (xd A_cat^T) * s_cols                        (M x R, skinny GEMM)
              y  = x W^T + u B_cat^T + b                        (ONE launch: K-loop, then R-loop, same acc)
    backward  v  = (g B_cat) * s_cols                           (M x R)
              dx = g W + keep/(1-p) * (v A_cat)                 (ONE launch; without dropout one accumulator)
              dA_cat = v^T xd,  dB_cat = g^T u                  (R x K, N x R)
              dW = g^T x,  db = sum_m g                         (only when the base trains)

Dropout's keep-mask is never stored: each kernel that reads x (u, dA) or writes dx draws keep(m, k) from
Philox (seed, counter (k, m)) as molf._math.philox_uniform states it, so neither xd nor the mask exists.

Every product is one generic kernel, `_mm2`: C = A1 B1 (+ A2 B2) (* colscale) (+ bias), dropout on A1, B1 or
the second product,
any strides (transposes are free), fp32 accumulation, output in the caller's dtype. R is padded in the
kernel (masked loads), never in the user's parameters. A single product whose output is too small to fill
the GPU (dA, dB: reductions over the M tokens) is split over K-ranges into fp32 partials summed in a fixed
order. For small ranks, v, dB (and db) come from one read of g (`lowrank_grads`); both are deterministic.
"""
import functools
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._env import KERNEL_DTYPES, column_scales
from ._utils import autocast_dtype, autotune, cdiv, config, interpreting, tensor_descriptor_class, tuning_configs

# Where `_mm2` applies dropout (DROP): on A1 = x (u = xd A^T), on B1 = x (dA = v^T xd), on the second product
# (dx's low-rank term), rows and columns of x being (token m, feature k) in each case.
NO_DROP, DROP_A1, DROP_B1, DROP_SECOND = 0, 1, 2, 3
# Philox-4x32-10 constants, as molf._math (a test checks they agree; the kernels import nothing from molf).
_ROUNDS: tl.constexpr = tl.constexpr(10)
_MUL_A: tl.constexpr = tl.constexpr(0xD2511F53)
_MUL_B: tl.constexpr = tl.constexpr(0xCD9E8D57)
_KEY_A: tl.constexpr = tl.constexpr(0x9E3779B9)
_KEY_B: tl.constexpr = tl.constexpr(0xBB67AE85)


def _configs():
    if interpreting():  # one small tile keeps the CPU interpreter fast (and autotune then skips benchmarking)
        return [config(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)]
    return tuning_configs([
        config(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        config(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
        config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
        config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
        config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
        config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
        config(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    ], default=3)


_K_STEP = max(c.kwargs["BLOCK_K"] for c in _configs())


@triton.jit
def _dot(x, y, acc, IEEE: tl.constexpr):
    """acc + x y with fp32 accumulation; fp32 operands in IEEE precision (no TF32)."""
    if IEEE:
        return tl.dot(x, y, acc, input_precision="ieee")
    else:
        return tl.dot(x, y, acc)


@triton.jit
def _dropout_keep(seed, rows, cols, p):
    """keep(m, k) = u >= p, u = (c0 >> 8) 2^-24 from Philox-4x32-10 at counter (k, m, 0, 0), key (seed lo, hi)."""
    c0 = cols.to(tl.uint32)
    c1 = rows.to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(_ROUNDS):
        hi0, lo0 = tl.umulhi(c0, _MUL_A), c0 * _MUL_A
        hi2, lo2 = tl.umulhi(c2, _MUL_B), c2 * _MUL_B
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0 += _KEY_A
        k1 += _KEY_B
    return (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0) >= p


@triton.jit
def _accumulate_product(acc, a, b, rm, rn, m_ok, n_ok, K, s_am, s_ak, s_bk, s_bn, k_base, seed, p_drop,
                        DROP: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += A[rm, :K] B[:K, rn] in steps of BLOCK_K (masked loads: K, or the rank R, is padded here only);
    DROP_A1 / DROP_B1: A's (row, k_base + k) / B's (k_base + k, column) entries dropped (kept ones unscaled)."""
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(a + rm[:, None] * s_am + kk[None, :] * s_ak, mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
        y = tl.load(b + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=(kk[:, None] < K) & n_ok[None, :], other=0.0)
        if DROP == 1:
            x = tl.where(_dropout_keep(seed, rm[:, None], k_base + kk[None, :], p_drop), x, 0.0)
        if DROP == 2:
            y = tl.where(_dropout_keep(seed, k_base + kk[:, None], rn[None, :], p_drop), y, 0.0)
        acc = _dot(x, y, acc, IEEE)
    return acc


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile number `tile` in grouped order: GROUP_M row tiles share each
    column tile while it is in L2."""
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (tile // width) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    return first_m + (tile % width) % size_m, (tile % width) // size_m


def m_bucket(M: int) -> int:
    """The autotuning key's stand-in for M: the next power of two (at least 16). Dynamic padding gives a new M
    almost every step; tuning per bucket runs a handful of times per (N, K, R), not every step."""
    return max(16, 1 << (max(M, 1) - 1).bit_length())


@autotune(_configs(), key=["M_BUCKET", "N", "K", "R", "HAS_SECOND", "DROP", "SPLIT_K"])
@triton.jit
def _mm2_kernel(a1, b1, a2, b2, seed_ptr, bias, colscale, c, M, M_BUCKET, N, K, R, k_split,
                s_a1m, s_a1k, s_b1k, s_b1n, s_a2m, s_a2r, s_b2r, s_b2n, s_cs, s_cm, s_cn, p_drop, inv_keep,
                HAS_SECOND: tl.constexpr, DROP: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok, n_ok = rm < M, rn < N
    k_len, k_base = K, 0
    seed = tl.load(seed_ptr) if DROP != 0 else 0
    if SPLIT_K:  # this program sums K-range [pid_s k_split, + k_split) into its own fp32 slice c[pid_s]
        pid_s = tl.program_id(1).to(tl.int64)
        k_base = pid_s * k_split
        a1 += k_base * s_a1k
        b1 += k_base * s_b1k
        c += pid_s * s_cs
        k_len = tl.minimum(k_split, K - k_base)
    acc = _accumulate_product(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a1, b1, rm, rn, m_ok, n_ok, k_len,
                              s_a1m, s_a1k, s_b1k, s_b1n, k_base, seed, p_drop, DROP, IEEE, BLOCK_K)
    if DROP == 1 or DROP == 2:  # the kept entries' 1 / (1 - p), once on the accumulator
        acc *= inv_keep
    if HAS_SECOND:
        if DROP == 3:  # dropout applies to the low-rank part of dx only: a second accumulator
            low = _accumulate_product(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a2, b2, rm, rn, m_ok, n_ok,
                                       R, s_a2m, s_a2r, s_b2r, s_b2n, 0, seed, p_drop, 0, IEEE, BLOCK_K)
            acc += tl.where(_dropout_keep(seed, rm[:, None], rn[None, :], p_drop), low * inv_keep, 0.0)
        else:  # the low-rank term goes into the same accumulator
            acc = _accumulate_product(acc, a2, b2, rm, rn, m_ok, n_ok, R, s_a2m, s_a2r, s_b2r, s_b2n, 0, seed, p_drop,
                                      0, IEEE, BLOCK_K)
    if HAS_SCALE:
        acc *= tl.load(colscale + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _set_tma_blocks(nargs):
    """Autotune pre-hook: each descriptor's block shape from the config's tiles (descriptors are built once
    on the host, before the config is known)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a1_d"].block_shape = [bm, bk]
    nargs["b1_d"].block_shape = [bn, bk] if nargs["B1_NK"] else [bk, bn]
    nargs["a2_d"].block_shape = [bm, bk]
    nargs["b2_d"].block_shape = [bn, bk] if nargs["B2_NK"] else [bk, bn]
    nargs["c_d"].block_shape = [bm, bn // 2] if nargs["SUBTILE"] else [bm, bn]


def _tma_configs():
    if interpreting():
        return [config(_set_tma_blocks, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SUBTILE=True, num_warps=4,
                       num_stages=1)]
    return tuning_configs([config(_set_tma_blocks, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, SUBTILE=sub,
                                  num_warps=w, num_stages=st)
                           for bm, bn, w, st, sub in ((128, 256, 8, 3, True), (128, 128, 8, 4, True),
                                                      (128, 128, 4, 4, False), (64, 128, 4, 4, False),
                                                      (128, 64, 4, 4, False))], default=1)


@triton.jit
def _load_b(desc, k0, n0, NK: tl.constexpr):
    """The (BLOCK_K, BLOCK_N) tile of B at (k0, n0): B itself row-major, or (NK) B^T row-major, transposed
    in shared memory by the MMA (nothing is copied)."""
    if NK:
        return tl.trans(desc.load([n0, k0]))
    else:
        return desc.load([k0, n0])


@triton.jit
def _descriptor_product(acc, a_d, b_d, m0, n0, K, B_NK: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += A[m0:, :K] B[:K, n0:] through TMA descriptors (out-of-bounds rows, columns and K read as 0)."""
    for k0 in range(0, K, BLOCK_K):
        acc = tl.dot(a_d.load([m0, k0]), _load_b(b_d, k0, n0, B_NK), acc)
    return acc


@autotune(_tma_configs(), key=["M_BUCKET", "N", "K", "R", "DROP", "B1_NK", "B2_NK"])
@triton.jit
def _mm2_tma_kernel(a1_d, b1_d, a2_d, b2_d, c_d, seed_ptr, bias, M, M_BUCKET, N, K, R, p_drop, inv_keep, NUM_SMS,
                    B1_NK: tl.constexpr, B2_NK: tl.constexpr, DROP: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    SUBTILE: tl.constexpr):
    """Hopper path of C = A1 B1 + A2 B2 (+ bias), dropout on the second product (DROP_SECOND): TMA
    descriptors, persistent (NUM_SMS programs walk the output tiles in grouped order), the epilogue stored
    in two halves (SUBTILE) to halve the registers the fp32 tile holds while it is converted and stored."""
    seed = tl.load(seed_ptr) if DROP == 3 else 0
    n_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), n_tiles, NUM_SMS):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = _descriptor_product(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a1_d, b1_d, m0, n0, K, B1_NK,
                                  BLOCK_K)
        rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        if DROP == 3:  # dropout on the low-rank part of dx only: a second accumulator
            low = _descriptor_product(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a2_d, b2_d, m0, n0, R, B2_NK,
                                      BLOCK_K)
            acc += tl.where(_dropout_keep(seed, rm[:, None], rn[None, :], p_drop), low * inv_keep, 0.0)
        else:
            acc = _descriptor_product(acc, a2_d, b2_d, m0, n0, R, B2_NK, BLOCK_K)
        if HAS_BIAS:
            acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        out = acc.to(c_d.dtype)
        if SUBTILE:
            left, right = tl.split(tl.permute(tl.reshape(out, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            c_d.store([m0, n0], left)
            c_d.store([m0, n0 + BLOCK_N // 2], right)
        else:
            c_d.store([m0, n0], out)


def _row_major(t) -> bool:
    """A 2-D tensor a TMA descriptor can take: last stride 1, 16-byte aligned base and row stride."""
    return t.stride(1) == 1 and t.shape[1] > 0 and (t.stride(0) * t.element_size()) % 16 == 0 and \
        t.data_ptr() % 16 == 0 and t.shape[0] > 0


def _b_form(b):
    """(tensor for the descriptor, NK) for a B operand (K x N): itself if row-major, else its transpose if
    that is (NK), else None."""
    if _row_major(b):
        return b, False
    if _row_major(b.t()):
        return b.t(), True
    return None


def tma_path(a1, b1, a2, b2, out, drop) -> bool:
    """Whether `_mm2_tma_kernel` takes this product: a Hopper-or-later GPU (or the interpreter, when
    MOLF_TMA=1 forces it for the tests), Triton's descriptors, 16-bit operands that descriptors can take,
    a second product, and dropout (if any) on that product only. MOLF_TMA=0 turns the path off."""
    flag = os.environ.get("MOLF_TMA", "auto")
    if flag == "0" or a2 is None or drop not in (NO_DROP, DROP_SECOND) or tensor_descriptor_class() is None:
        return False
    if interpreting():
        if flag != "1":
            return False
    elif a1.device.type != "cuda" or _sm_major(a1.device) < 9 or \
            a1.dtype not in (torch.float16, torch.bfloat16):
        return False
    return all(_row_major(t) for t in (a1, a2, out)) and _b_form(b1) is not None and _b_form(b2) is not None


def _launch_mm2_tma(out, a1, b1, a2, b2, seed, drop, p, bias):
    M, K = a1.shape
    N, R = b1.shape[1], a2.shape[1]
    desc = tensor_descriptor_class()
    b1_t, b1_nk = _b_form(b1)
    b2_t, b2_nk = _b_form(b2)
    placeholder = [16, 16]  # replaced by _set_tma_blocks once the config is known
    d = [desc.from_tensor(t, placeholder) for t in (a1, b1_t, a2, b2_t, out)]
    sms = 3 if interpreting() else _sm_count(a1.device)  # 3 under the interpreter: programs walk several tiles
    grid = lambda meta: (min(sms, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)  # noqa: E731
    _mm2_tma_kernel[grid](*d, seed if seed is not None else out, bias if bias is not None else out,
                          M, m_bucket(M), N, K, R, float(p), 1.0 / (1.0 - p), sms,
                          B1_NK=b1_nk, B2_NK=b2_nk, DROP=drop, HAS_BIAS=bias is not None)
    return out


@triton.jit
def _sum_partials_kernel(part, out, colscale, bias, n_parts, numel, n_cols,
                         HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[e] = (sum_i part[i, e], in order i = 0, 1, ...) * colscale[e % n_cols] + bias[e % n_cols], for a
    contiguous (n_parts, numel) fp32 part and a contiguous out of numel elements (cast to out's dtype)."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = e < numel
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(n_parts):
        total += tl.load(part + i * numel + e, mask=ok, other=0.0)
    if HAS_SCALE:
        total *= tl.load(colscale + e % n_cols, mask=ok, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias + e % n_cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + e, total.to(out.dtype.element_ty), mask=ok)


def _sum_partials(part, out, colscale=None, bias=None):
    """out = part.sum(0) (* colscale) (+ bias) in one launch; part (n_parts, *out.shape) fp32, out contiguous."""
    numel, n_cols = out.numel(), (out.shape[-1] if out.dim() else 1)
    if numel:
        _sum_partials_kernel[(cdiv(numel, 1024),)](
            part, out, colscale if colscale is not None else part, bias if bias is not None else part,
            part.shape[0], numel, n_cols, HAS_SCALE=colscale is not None, HAS_BIAS=bias is not None, BLOCK=1024)
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@functools.lru_cache(maxsize=None)
def _sm_major(device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def _split_k(M: int, N: int, K: int, device) -> int:
    """Into how many K-ranges a plain product is split so that a small output still fills the GPU (dA is
    R x K and dB N x R, both reducing over the M tokens): fp32 partials, summed in a fixed order afterwards
    (deterministic, no atomics). Threshold and minimum range from the tile counts, not yet measured."""
    if interpreting():
        tile, min_k, programs = 32, 32, 8
    else:
        tile, min_k, programs = 128, 512, _sm_count(device)
    tiles = cdiv(M, tile) * cdiv(N, tile)
    if tiles * 4 > programs:
        return 1
    return max(1, min(cdiv(programs, tiles), K // min_k))


def _launch_mm2(out, a1, b1, a2=None, b2=None, seed=None, drop=NO_DROP, p=0.0, bias=None, colscale=None,
                split=None):
    M, K = a1.shape
    N = b1.shape[1]
    R = a2.shape[1] if a2 is not None else 0
    if M == 0 or N == 0:
        return out
    if K == 0 and a2 is None:
        return out.zero_()
    if drop not in (NO_DROP, DROP_A1, DROP_B1, DROP_SECOND) or (drop != NO_DROP) != (seed is not None) or \
            (drop == DROP_SECOND and a2 is None):
        raise ValueError(f"drop={drop}: dropout needs a seed tensor (DROP_SECOND also a second product), and no "
                         f"dropout no seed; got seed={seed!r}, a2={'set' if a2 is not None else None}")
    if colscale is None and split is None and tma_path(a1, b1, a2, b2, out, drop):
        return _launch_mm2_tma(out, a1, b1, a2, b2, seed, drop, p, bias)
    plain = a2 is None
    if split is None:
        split = _split_k(M, N, K, a1.device) if plain else 1
    if split > 1 and not plain:
        raise ValueError("split-K applies to a single product only (no second product)")
    k_split = cdiv(cdiv(K, split), _K_STEP) * _K_STEP  # a multiple of every BLOCK_K: no K-range overlaps the next
    split = cdiv(K, k_split) if split > 1 else 1
    c = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=out.device)
    dummy = out
    a2_, b2_ = (a2, b2) if a2 is not None else (dummy, dummy)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), split)  # noqa: E731
    _mm2_kernel[grid](
        a1, b1, a2_, b2_, seed if seed is not None else dummy, bias if bias is not None else dummy,
        colscale if colscale is not None else dummy, c, M, m_bucket(M), N, K, R, k_split,
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
        a2_.stride(0) if a2 is not None else 0, a2_.stride(1) if a2 is not None else 0,
        b2_.stride(0) if a2 is not None else 0, b2_.stride(1) if a2 is not None else 0,
        c.stride(0) if split > 1 else 0, c.stride(-2), c.stride(-1), float(p), 1.0 / (1.0 - p),
        HAS_SECOND=a2 is not None, DROP=drop, HAS_BIAS=bias is not None and split == 1,
        HAS_SCALE=colscale is not None and split == 1, IEEE=a1.dtype == torch.float32, SPLIT_K=split > 1)
    if split > 1:  # the epilogue after the fixed-order sum of the partials
        dst = out if out.is_contiguous() else torch.empty((M, N), dtype=out.dtype, device=out.device)
        _sum_partials(c, dst, colscale, bias)
        if dst is not out:
            out.copy_(dst)
    return out


def _mm2(a1, b1, a2, b2, seed, drop, p, bias, colscale):
    out = torch.empty((a1.shape[0], b1.shape[1]), dtype=a1.dtype, device=a1.device)
    return _launch_mm2(out, a1, b1, a2, b2, seed, drop, p, bias, colscale)


# torch.library ops: opaque to torch.compile (with fake implementations for tracing). Outside torch.compile
# the layer calls their bodies directly: a custom op's Python dispatch costs tens of microseconds per call.
@torch.library.custom_op("molf::mm2", mutates_args=())
def mm2(a1: torch.Tensor, b1: torch.Tensor, a2: Optional[torch.Tensor], b2: Optional[torch.Tensor],
        seed: Optional[torch.Tensor], drop: int, p: float, bias: Optional[torch.Tensor],
        colscale: Optional[torch.Tensor]) -> torch.Tensor:
    """C = A1 B1 (+ A2 B2) (* colscale) (+ bias), fp32 accumulation, A1's dtype; dropout (Philox keep-mask of
    `seed`, kept entries times 1/(1-p)) on A1, B1 or the second product as `drop` says."""
    return _mm2(a1, b1, a2, b2, seed, drop, p, bias, colscale)


@mm2.register_fake
def _(a1, b1, a2, b2, seed, drop, p, bias, colscale):
    return a1.new_empty((a1.shape[0], b1.shape[1]))


@triton.jit
def _keep_mask_kernel(seed_ptr, out, rows, cols, p, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = e < rows * cols
    tl.store(out + e, _dropout_keep(tl.load(seed_ptr), e // cols, e % cols, p).to(tl.int8), mask=ok)


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """The (rows, cols) bool keep-mask the fused kernels draw from `seed` (molf._math.dropout_keep, in one
    launch): for the eager path on a GPU and for the tests."""
    out = torch.empty((rows, cols), dtype=torch.int8, device=seed.device)
    if out.numel():
        _keep_mask_kernel[(cdiv(out.numel(), 1024),)](seed, out, rows, cols, float(p), BLOCK=1024)
    return out.view(torch.bool)


@triton.jit
def _lowrank_grads_kernel(g, b, u, vp, dbp, dbias_p, M, N, R, cols, s_gm, s_gn, s_bn, s_br, s_um, s_ur,
                          HAS_DBIAS: tl.constexpr, IEEE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """One pass over the g tiles of rows i and columns j: vp[j, rows] = g[rows, cols_j] B[cols_j],
    dbp[i, n] = g[rows_i, n]^T u[rows_i] (and dbias_p[i, n] = sum over rows_i of g), all fp32 partials."""
    pid_m, pid_q = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    m_ok, r_ok = rm < M, rr < R
    ut = tl.load(u + rm[:, None] * s_um + rr[None, :] * s_ur, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_first = pid_q * cols
    n_end = tl.minimum(n_first + cols, N)
    for n0 in range(0, cols, BLOCK_N):
        rn = n_first + n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < n_end
        gt = tl.load(g + rm[:, None] * s_gm + rn[None, :] * s_gn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        bt = tl.load(b + rn[:, None] * s_bn + rr[None, :] * s_br, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc = _dot(gt, bt, acc, IEEE)
        part = _dot(tl.trans(gt), ut, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), IEEE)
        tl.store(dbp + (pid_m * N + rn[:, None]) * R + rr[None, :], part, mask=n_ok[:, None] & r_ok[None, :])
        if HAS_DBIAS:
            tl.store(dbias_p + pid_m * N + rn, tl.sum(gt.to(tl.float32), axis=0), mask=n_ok)
    tl.store(vp + (pid_q * M + rm[:, None]) * R + rr[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])


def _one_pass_grid(M, N, R, elsize, device):
    """(BLOCK_M, BLOCK_N, BLOCK_R, p, q, cols): p row tiles times q column ranges of `cols` columns, enough
    programs to fill the GPU. Tiles chosen by ptxas (8 warps, no spills up to BLOCK_R = 32 in 16-bit, 64 in
    fp32), not yet by measurement."""
    if interpreting():  # small tiles, so the tests' odd shapes cover several row tiles and column ranges
        block_m, block_n, programs = 16, 16, 4
    else:
        block_m, block_n = (128, 64) if elsize == 2 else (64, 32)
        programs = _sm_count(device)
    p = cdiv(M, block_m)
    q = max(1, min(cdiv(programs, p), cdiv(N, block_n)))
    cols = cdiv(cdiv(N, q), block_n) * block_n
    return block_m, block_n, max(16, triton.next_power_of_2(R)), p, cdiv(N, cols), cols


_LAUNCH_BYTES = 8_000_000  # a small extra launch costs about as much GPU time as moving this many bytes (~2.5 us)


def one_pass_pays(M: int, N: int, R: int, elsize: int, with_dbias: bool, device) -> bool:
    """Whether v, dB (and db) from one read of g beat separate launches. The one pass writes and reads back
    fp32 partials, 8 (R (p N + q M) + p N [db]) bytes, and without db needs one launch more (3 against 2);
    it saves one read of g (two with db), M N elsize bytes each. The partials grow with R: the one pass pays
    for small ranks and large outputs only (at R = 16: the MLP and q_proj shapes, k_proj only with its bias)."""
    if M == 0 or N == 0:
        return False
    _, _, block_r, p, q, _ = _one_pass_grid(M, N, R, elsize, device)
    cost = 8 * (R * (p * N + q * M) + (p * N if with_dbias else 0)) + (0 if with_dbias else _LAUNCH_BYTES)
    return block_r <= 64 and cost < M * N * elsize * (2 if with_dbias else 1)


def _lowrank_grads(g, b_cat, u, s_cols, with_dbias):
    M, N = g.shape
    R = u.shape[1]
    if M == 0 or N == 0:  # nothing to read: zero sums
        return g.new_zeros((M, R)), g.new_zeros((N, R)), g.new_zeros((N,) if with_dbias else (0,))
    block_m, block_n, block_r, p, q, cols = _one_pass_grid(M, N, R, g.element_size(), g.device)
    vp = torch.empty((q, M, R), dtype=torch.float32, device=g.device)
    dbp = torch.empty((p, N, R), dtype=torch.float32, device=g.device)
    dbias_p = torch.empty((p, N) if with_dbias else (0,), dtype=torch.float32, device=g.device)
    _lowrank_grads_kernel[(p, q)](
        g, b_cat, u, vp, dbp, dbias_p, M, N, R, cols, g.stride(0), g.stride(1), b_cat.stride(0), b_cat.stride(1),
        u.stride(0), u.stride(1), HAS_DBIAS=with_dbias, IEEE=g.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=8)
    v, d_b = _sum_partials(vp, g.new_empty((M, R)), s_cols), _sum_partials(dbp, g.new_empty((N, R)))
    return v, d_b, _sum_partials(dbias_p, g.new_empty((N,))) if with_dbias else g.new_empty((0,))


@torch.library.custom_op("molf::lowrank_grads", mutates_args=())
def lowrank_grads(g: torch.Tensor, b_cat: torch.Tensor, u: torch.Tensor, s_cols: torch.Tensor,
                  with_dbias: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v, dB_cat, db) = ((g B_cat) * s_cols, g^T u, sum_m g) from one read of g, in g's dtype; db is empty
    unless with_dbias. Partials are summed in a fixed order: deterministic, no atomics."""
    return _lowrank_grads(g, b_cat, u, s_cols, with_dbias)


@lowrank_grads.register_fake
def _(g, b_cat, u, s_cols, with_dbias):
    M, N = g.shape
    return g.new_empty((M, u.shape[1])), g.new_empty((N, u.shape[1])), g.new_empty((N,) if with_dbias else (0,))


def product(a1, b1, *, a2=None, b2=None, seed=None, drop=NO_DROP, p=0.0, bias=None, colscale=None):
    """molf::mm2 by keyword: A1 B1 (+ A2 B2) (* colscale) (+ bias), with dropout where `drop` says."""
    op = mm2 if torch.compiler.is_compiling() else _mm2
    return op(a1, b1, a2, b2, seed, drop, p, bias, colscale)


class MoLFLinearFunction(torch.autograd.Function):
    """y = x W^T + b + (drop(x) A_cat^T * s_cols) B_cat^T on 2-D x; gradients as in the module docstring.
    With dropout only the 8-byte seed is saved: the kernels redraw the keep-mask where they read x."""

    @staticmethod
    def forward(ctx, x, weight, bias, a_cat, b_cat, s_cols, seed, p, weight_fn):
        drop = DROP_A1 if seed is not None else NO_DROP
        u = product(x, a_cat.t(), colscale=s_cols, seed=seed, drop=drop, p=p)
        w = weight if weight_fn is None else weight_fn(x.dtype)
        y = product(x, w.t(), a2=u, b2=b_cat.t(), bias=bias)
        ctx.save_for_backward(x, weight, a_cat, b_cat, s_cols, u, seed)
        ctx.p, ctx.has_bias, ctx.weight_fn = p, bias is not None, weight_fn
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, a_cat, b_cat, s_cols, u, seed = ctx.saved_tensors
        if ctx.weight_fn is not None:  # a quantized base: W dequantized again, never kept between the passes
            weight = ctx.weight_fn(g.dtype)
        if torch.is_grad_enabled():  # backward(create_graph=True): the kernels' outputs would carry no graph
            return differentiable_backward(ctx, g, x, weight, a_cat, b_cat, s_cols, seed)
        g = g.contiguous()
        need_x, need_w, need_bias, need_a_cat, need_b_cat = ctx.needs_input_grad[:5]
        dx = dw = db = da = dbb = v = None
        need_v, need_db = need_x or need_a_cat, need_bias and ctx.has_bias
        on = seed is not None
        if need_v and need_b_cat and one_pass_pays(*g.shape, u.shape[1], g.element_size(), need_db, g.device):
            op = lowrank_grads if torch.compiler.is_compiling() else _lowrank_grads
            v, dbb, db = op(g, b_cat, u, s_cols, need_db)
            db = db if need_db else None  # the op returns an empty db when the bias takes no gradient
        elif need_v:
            v = product(g, b_cat, colscale=s_cols)
        if need_x:
            dx = product(g, weight, a2=v, b2=a_cat, seed=seed, drop=DROP_SECOND if on else NO_DROP, p=ctx.p)
        if need_a_cat:
            da = product(v.t(), x, seed=seed, drop=DROP_B1 if on else NO_DROP, p=ctx.p)
        if need_b_cat and dbb is None:
            dbb = product(g.t(), u)
        if need_w:
            dw = product(g.t(), x)
        if need_db and db is None:
            db = g.sum(0, dtype=torch.float32).to(g.dtype)
        return dx, dw, db, da, dbb, None, None, None, None


def differentiable_backward(ctx, g, x, weight, a_cat, b_cat, s_cols, seed):
    """MoLFLinearFunction's gradients in torch ops, for a backward with create_graph=True (a gradient penalty,
    a Hessian-vector product): autograd differentiates these again, through the saved inputs. u is recomputed
    from x and A_cat (the saved u is a kernel output, outside the graph)."""
    need_x, need_w, need_bias, need_a_cat, need_b_cat = ctx.needs_input_grad[:5]
    s = s_cols.to(x.dtype)
    keep = None if seed is None else keep_mask(seed, *x.shape, ctx.p).to(x.dtype) / (1 - ctx.p)
    xd = x if keep is None else x * keep
    v = (g @ b_cat) * s
    dx = dw = db = da = dbb = None
    if need_x:
        dx = g @ weight + (v @ a_cat if keep is None else (v @ a_cat) * keep)
    if need_w:
        dw = g.t() @ x
    if need_bias and ctx.has_bias:
        db = g.sum(0)
    if need_a_cat:
        da = v.t() @ xd
    if need_b_cat:
        dbb = g.t() @ ((xd @ a_cat.t()) * s)
    return dx, dw, db, da, dbb, None, None, None, None


def molf_linear(x, weight, bias, lora_A, lora_B, scalings, seed=None, p=0.0, s_cols=None, weight_fn=None):
    """The MoLF layer on the fused kernels: x of any leading shape (..., K); output (..., N) in x's dtype.
    seed: dropout's int64 seed tensor (molf._math.dropout_seed) when p > 0, else None. s_cols: the cached
    `column_scales` (built here when None). weight_fn(dtype): W built on demand (a quantized base,
    dequantized in forward and again in backward) with weight=None; W then takes no gradient."""
    ac = autocast_dtype(x.device.type)
    if ac is not None:
        x, weight = x.to(ac), weight.to(ac) if weight is not None else None
        bias = bias.to(ac) if bias is not None else None
        lora_A, lora_B = [a.to(ac) for a in lora_A], [b.to(ac) for b in lora_B]
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the fused MoLF layer computes in float32, float16 or bfloat16, got {x.dtype} input")
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), x.shape[-1])  # -1 is ambiguous when K = 0
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    a_cat = lora_A[0] if len(lora_A) == 1 else torch.cat(list(lora_A), 0)
    b_cat = lora_B[0] if len(lora_B) == 1 else torch.cat(list(lora_B), 1)
    if s_cols is None or s_cols.device != x.device:
        s_cols = column_scales([a.shape[0] for a in lora_A], scalings, x.device)
    y = MoLFLinearFunction.apply(x2, weight, bias, a_cat, b_cat, s_cols, seed, float(p), weight_fn)
    return y.view(*lead, y.shape[-1])
