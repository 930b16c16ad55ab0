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


from bisect import bisect_left
from itertools import accumulate

import torch
import triton
import triton.language as tl

# kernels/ is installed as molf.kernels, so ".." is the molf package.
from .._dist import local
from ..optim import to_device
from ._utils import TORCH_TO_TL, cdiv, round_to
from .multi_tensor import TensorTable, segment_total

MAX_GROUPS = 5  # MoLFAdamW's param-group kinds: full, full_bias, lora, decay, no_decay
EPS_SCORE = 1e-8


@triton.jit
def _group_value(gi, v0, v1, v2, v3, v4):
    return tl.where(gi == 0, v0, tl.where(gi == 1, v1, tl.where(gi == 2, v2, tl.where(gi == 3, v3, v4))))


@triton.jit
def _moments_score_kernel(ptrs, blk_tensor, blk_start, blk_out, numel, owner, partials, beta1, beta2,
                          P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                          PFN: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    t = tl.load(blk_tensor + b).to(tl.int64)
    g_ptr = tl.load(ptrs + t * 5 + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(ptrs + t * 5 + 2).to(tl.pointer_type(S_DTYPE))
    v_ptr = tl.load(ptrs + t * 5 + 3).to(tl.pointer_type(S_DTYPE))
    offs = tl.load(blk_start + b) + tl.arange(0, BLOCK)
    ok = offs < tl.load(numel + t)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp_(g, 1 - b1)
    v = beta2 * v + (1.0 - beta2) * g * g
    m_s = round_to(m, S_DTYPE)
    v_s = round_to(v, S_DTYPE)
    tl.store(m_ptr + offs, m_s, mask=ok)
    tl.store(v_ptr + offs, v_s, mask=ok)
    if tl.load(owner + t) >= 0:  # the score reads the stored (rounded) moments, as the reference does
        m = m_s.to(tl.float32)
        d = tl.sqrt(v_s.to(tl.float32)) + 1e-8
        if PFN:
            q = m / d
            term = q * q
        else:
            term = m * m / d
        tl.store(partials + tl.load(blk_out + b), tl.sum(tl.where(ok, term, 0.0), axis=0))


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
def _masked_update_kernel(ptrs, blk_tensor, blk_start, numel, owner, group, tensor_id, winners, bias_corr,
                          lr0, lr1, lr2, lr3, lr4, wd0, wd1, wd2, wd3, wd4, eps0, eps1, eps2, eps3, eps4, seed,
                          P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr,
                          BLOCK: tl.constexpr):
    b = tl.program_id(0)
    t = tl.load(blk_tensor + b).to(tl.int64)
    o = tl.load(owner + t)
    active = (o < 0) | (tl.load(winners + tl.maximum(o, 0)) != 0)
    if active:  # a losing expert's blocks load nothing more
        p_ptr = tl.load(ptrs + t * 5).to(tl.pointer_type(P_DTYPE))
        m_ptr = tl.load(ptrs + t * 5 + 2).to(tl.pointer_type(S_DTYPE))
        v_ptr = tl.load(ptrs + t * 5 + 3).to(tl.pointer_type(S_DTYPE))
        gi = tl.load(group + t)
        lr = _group_value(gi, lr0, lr1, lr2, lr3, lr4)
        wd = _group_value(gi, wd0, wd1, wd2, wd3, wd4)
        eps = _group_value(gi, eps0, eps1, eps2, eps3, eps4)
        tid = tl.load(tensor_id + t)
        inv_bc1 = tl.load(bias_corr + 2 * tid)
        bc2_sqrt = tl.load(bias_corr + 2 * tid + 1)
        offs = tl.load(blk_start + b) + tl.arange(0, BLOCK)
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


class _Launch:
    """Tables for the tensors of one dtype combination (param, grad, state)."""

    def __init__(self, items, block, device, blk_offset_of):
        params = [local(p) for _, p, _, _, _ in items]  # FSDP2: this rank's shards
        sts = [st for _, _, st, _, _ in items]
        self.ids = [i for i, _, _, _, _ in items]
        self.p_dtype, self.g_dtype, self.s_dtype = params[0].dtype, items[0][1].grad.dtype, sts[0]["exp_avg"].dtype
        self.grads = [local(p.grad) for _, p, _, _, _ in items]
        ms, vs = [local(s["exp_avg"]) for s in sts], [local(s["exp_avg_sq"]) for s in sts]
        cols = [params, self.grads, ms, vs, [s["step"] for s in sts]]
        self.state_ptrs = [t.data_ptr() for t in ms + vs]
        self.table = TensorTable(cols, block, device)
        self.dtensors = [p for _, p, _, _, _ in items]
        self.param_ptrs = [p.data_ptr() for p in params]
        self.grad_ptrs = [g.data_ptr() for g in self.grads]
        self.blk_out = to_device([blk_offset_of[i] + j for i, ne in zip(self.ids, self.table.numels)
                                  for j in range(-(-ne // block))], torch.int64, device)
        self.owner = to_device([o for _, _, _, o, _ in items], torch.int32, device)
        self.group = to_device([gi for _, _, _, _, gi in items], torch.int32, device)
        self.tensor_id = to_device(self.ids, torch.int32, device)


class TritonRoutedAdamW:
    """The routed step on Triton kernels (see the module docstring); built by MoLFAdamW."""
    name = "triton"

    def __init__(self, opt):
        if len(opt.param_groups) > MAX_GROUPS:
            raise ValueError(f"the triton backend supports up to {MAX_GROUPS} param groups, "
                             f"got {len(opt.param_groups)}")
        self.opt = opt
        self.block = 1024  # also under the interpreter: the tiny test models still have multi-block tensors
        self.plan = None
        b1, b2 = opt.defaults["betas"]
        self.betas64 = to_device([b1, b2], torch.float64, opt.device)

    def _build(self, plan):
        opt, dev, block = self.opt, self.opt.device, self.block
        items = []
        for i, p in enumerate(plan.params):
            st = opt.state[p]
            items.append((i, p, st, plan.owner[i], plan.group[i]))
            # The kernels index every column by the parameter's numel: a smaller moment would be written out of
            # bounds. One host check per tensor, where the tables are built.
            cols = [local(t) for t in (p, p.grad, st["exp_avg"], st["exp_avg_sq"])]
            if len({t.numel() for t in cols}) > 1 or len({t.device for t in cols}) > 1:
                raise ValueError(
                    f"{opt.param_name(p)}: parameter {tuple(p.shape)} on {p.device}, gradient {tuple(p.grad.shape)}, "
                    f"moments {tuple(st['exp_avg'].shape)} and {tuple(st['exp_avg_sq'].shape)} on "
                    f"{st['exp_avg'].device}: the moments must have the parameter's shape and device")
        # Global block numbering in plan order. MoLF tensors come first with non-decreasing owners, so each
        # expert's blocks are one run: it starts at its first tensor (an expert without gradients: empty run).
        first = list(accumulate([cdiv(local(p).numel(), block) for p in plan.params], initial=0))
        n = self.n_blocks = first[-1]
        owners = plan.owner[: plan.n_molf]
        seg = [first[bisect_left(owners, o)] for o in range(plan.inv_n.numel() + 1)]
        self.seg_start = to_device(seg, torch.int64, dev)
        combos = {}
        for it in items:
            _, p, st, _, _ = it
            combos.setdefault((p.dtype, p.grad.dtype, st["exp_avg"].dtype), []).append(it)
        for key in combos:
            for k in key:
                if k not in TORCH_TO_TL:
                    raise TypeError(f"the triton backend supports float32/float16/bfloat16 tensors, got {k}")
        self.launches = [_Launch(its, block, dev, first) for its in combos.values()]
        self.step_ptrs = to_device([opt.state[p]["step"].data_ptr() for p in plan.params] or [0], torch.int64, dev)
        for p in plan.params:
            st = opt.state[p]["step"]
            if st.dtype != torch.float32 or st.device != dev or st.dim() != 0:
                raise TypeError(f"step counters must be 0-d float32 tensors on {dev}, got {st.dtype} on {st.device}")
        self.partials = torch.zeros(max(n, 1), dtype=torch.float32, device=dev)
        self.sums = torch.zeros(plan.inv_n.shape, dtype=torch.float32, device=dev)
        self.bias_corr = torch.empty(max(len(plan.params), 1), 2, dtype=torch.float32, device=dev)
        self.plan = plan

    def _stale(self, plan) -> bool:
        if plan is not self.plan:
            return True
        for ln in self.launches:
            if [local(p.grad).data_ptr() for p in ln.dtensors] != ln.grad_ptrs:
                return True
            if [local(p).data_ptr() for p in ln.dtensors] != ln.param_ptrs:
                return True
            sts = [self.opt.state[p] for p in ln.dtensors]
            if [local(s[k]).data_ptr() for k in ("exp_avg", "exp_avg_sq") for s in sts] != ln.state_ptrs:
                return True
        return False

    def moments_and_sums(self, plan):
        if self._stale(plan):
            self._build(plan)
        opt = self.opt
        b1, b2 = opt.defaults["betas"]
        pfn = opt.score == "pfn"
        for ln in self.launches:
            t = ln.table
            if t.n_blocks:
                _moments_score_kernel[(t.n_blocks,)](
                    t.ptrs, t.blk_tensor, t.blk_start, ln.blk_out, t.numel, ln.owner, self.partials, b1, b2,
                    P_DTYPE=TORCH_TO_TL[ln.p_dtype], G_DTYPE=TORCH_TO_TL[ln.g_dtype],
                    S_DTYPE=TORCH_TO_TL[ln.s_dtype], PFN=pfn, BLOCK=self.block)
        n_seg, n_t, tb = self.sums.numel(), len(plan.params), 128
        grid = (max(n_seg, -(-n_t // tb), 1),)
        _finish_kernel[grid](self.partials, self.seg_start, self.sums, n_seg, self.step_ptrs, n_t, self.betas64,
                             self.bias_corr, BLOCK=128, TB=tb)
        return self.sums.clone()

    def update(self, plan, winners):
        opt = self.opt
        groups = opt.param_groups
        lrs = [float(g["lr"]) for g in groups] + [0.0] * (MAX_GROUPS - len(groups))
        wds = [float(g["weight_decay"]) for g in groups] + [0.0] * (MAX_GROUPS - len(groups))
        epss = [float(g["eps"]) for g in groups] + [0.0] * (MAX_GROUPS - len(groups))
        win = winners.view(-1).to(torch.uint8)
        for ln in self.launches:
            t = ln.table
            if t.n_blocks:
                _masked_update_kernel[(t.n_blocks,)](
                    t.ptrs, t.blk_tensor, t.blk_start, t.numel, ln.owner, ln.group, ln.tensor_id, win,
                    self.bias_corr, *lrs, *wds, *epss, opt.rounding_seed(),
                    P_DTYPE=TORCH_TO_TL[ln.p_dtype], S_DTYPE=TORCH_TO_TL[ln.s_dtype],
                    STOCHASTIC=opt.stochastic_rounding and ln.p_dtype == torch.bfloat16, BLOCK=self.block)
