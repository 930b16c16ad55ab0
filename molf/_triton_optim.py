"""The routed step on the Triton kernels (molf.kernels.routed_adamw): per-tensor tables built from the
optimizer's step plan (host work O(tensors); pointers refreshed when storage moves), three launches per
dtype combination. Built by MoLFAdamW for backend "triton"."""
from __future__ import annotations

import weakref
from bisect import bisect_left
from itertools import accumulate

import torch

from . import _backend
from ._dist import check_columns, local, state_columns
from ._math import EPS_SCORE
from .kernels import routed_adamw as K
from .kernels._env import to_device
from .kernels._utils import cdiv
from .kernels.multi_tensor import LayoutError, TensorTable


_PTR, _NUMEL, _CONTIGUOUS = torch.Tensor.data_ptr, torch.Tensor.numel, torch.Tensor.is_contiguous


class _Launch:
    """One dtype combination (param, grad, state): its tensors' rows (pointers, numel, first block, the
    global block where its score partials go, owner expert, param group, tensor id). O(tensors) to build."""

    def __init__(self, opt, plan, ids, block, device, first_global):
        self.opt, self.ids = opt, ids  # the backend's proxy of the optimizer
        self.dtensors = [plan.params[i] for i in ids]
        self.whole = len(ids) == len(plan.params)  # then ids is range(len(plan.params))
        self.sharded = any(local(p) is not p for p in self.dtensors)
        p0 = self.dtensors[0]
        self.p_dtype, self.g_dtype, self.s_dtype = p0.dtype, p0.grad.dtype, opt.state[p0]["exp_avg"].dtype
        cols = self.current()
        try:
            self.table = TensorTable(self.columns(cols), block, device)
        except LayoutError as e:
            raise self.named(e) from None
        self.col_ptrs = [list(map(_PTR, c)) for c in cols]
        self.out_block = to_device([first_global[i] for i in self.ids], torch.int64, device)
        self.owner = to_device([plan.owner[i] for i in self.ids], torch.int32, device)
        self.group = to_device([plan.group[i] for i in self.ids], torch.int32, device)
        self.tensor_id = to_device(self.ids, torch.int32, device)

    def current(self, grads=None, states=None):
        """[params, grads, exp_avgs, exp_avg_sqs, step counters] as they are now, local tensors (FSDP2: this
        rank's shards). grads, states: this step's, of every parameter of the plan, as the optimizer read them
        (else read here)."""
        ps = self.dtensors
        if states is None:
            grads, states = [p.grad for p in ps], [self.opt.state[p] for p in ps]
        elif not self.whole:
            grads, states = [grads[i] for i in self.ids], [states[i] for i in self.ids]
        return state_columns(ps, grads, states, self.sharded)

    def named(self, e: LayoutError) -> ValueError:
        return ValueError(f"{self.opt.param_name(self.dtensors[e.row])}: its parameter, gradient and moments must be "
                          "laid out alike (a gradient assigned by hand in another layout?): " + str(e))

    def columns(self, cols):
        """The table's columns: `current()`'s cols but the step counters, checked: the kernels index every column
        by the parameter's numel, so a smaller moment would be written out of bounds. One host check per tensor."""
        check_columns(self.opt, self.dtensors, cols)
        return cols[:4]

    def refresh(self, grads, states) -> bool:
        """Re-read the pointers (storage moved: zero_grad(set_to_none=True) gives fresh gradients every step).
        False when the tables must be built again: a parameter's size or dtype changed, or moments or step
        counters were replaced by hand (the rebuild checks them and takes the new step pointers). O(tensors), a
        small constant: one data_ptr() per tensor; moved gradients or parameters add a size and a contiguity
        check (parameters also a dtype check)."""
        cols = self.current(grads, states)
        ptrs = [list(map(_PTR, c)) for c in cols]
        if ptrs == self.col_ptrs:
            return True
        if ptrs[2:] != self.col_ptrs[2:] or (ptrs[0] != self.col_ptrs[0] and (
                list(map(_NUMEL, cols[0])) != self.table.numels or any(p.dtype != self.p_dtype for p in cols[0]))):
            return False  # model.half() after a step moves the parameters into another dtype: launches regrouped
        cols = cols[:4]
        if list(map(_NUMEL, cols[1])) != self.table.numels:
            cols = self.columns(cols)  # raises, naming the parameter
        moved = [c for c, now, before in zip(cols, ptrs, self.col_ptrs) if now != before]
        # Contiguous before and after: rows alike. Otherwise (a column-major parameter) every row is checked:
        # a gradient assigned in another layout than its unmoved parameter's would be paired element by element.
        if not (self.table.contiguous and all(all(map(_CONTIGUOUS, c)) for c in moved)):
            try:
                self.table.pointers(cols)  # checks the layouts
            except LayoutError as e:
                raise self.named(e) from None
        grads_alone = ptrs[0] == self.col_ptrs[0]  # (moments and step counters unmoved: checked above)
        self.col_ptrs = ptrs
        if grads_alone:  # zero_grad(set_to_none=True): fresh gradients every step
            self.table.repoint_column(1, ptrs[1])
        else:
            self.table.repoint(cols, [x for row in zip(*ptrs[:4]) for x in row])
        return True


class TritonRoutedAdamW:
    """The routed step on Triton kernels (see the module docstring); built by MoLFAdamW."""
    name = "triton"

    def __init__(self, opt):
        if len(opt.param_groups) > K.MAX_GROUPS:
            raise ValueError(f"the triton backend supports up to {K.MAX_GROUPS} param groups, "
                             f"got {len(opt.param_groups)}")
        self.opt = weakref.proxy(opt)  # the optimizer owns this backend: no reference cycle keeping it alive
        self.block = 1024  # also under the interpreter: the tiny test models still have multi-block tensors
        self.plan = None
        self.betas = None  # the pair betas64 holds (a scheduler may change it)

    def _build(self, plan) -> bool:
        """Per-tensor tables for the step plan: host work O(tensors). False (nothing built) where a tensor has a
        dtype the kernels lack and the backend is "auto" (model.double() after the optimizer was built)."""
        opt, dev, block = self.opt, self.opt.device, self.block
        combos = {}
        for i, p in enumerate(plan.params):
            key = (p.dtype, p.grad.dtype, opt.state[p]["exp_avg"].dtype)
            if any(k not in K.TORCH_TO_TL for k in key):
                if _backend.requested(opt.backend) == "auto":
                    return False
                raise TypeError(f"the triton backend supports float32/float16/bfloat16 tensors, got {key} for "
                                f"{opt.param_name(p)}")
            combos.setdefault(key, []).append(i)
        # Global block numbering in plan order. MoLF tensors come first with non-decreasing owners, so each
        # expert's blocks are one run: it starts at its first tensor (an expert without gradients: empty run).
        first = list(accumulate([cdiv(local(p).numel(), block) for p in plan.params], initial=0))
        n = self.n_blocks = first[-1]
        owners = plan.owner[: plan.n_molf]
        seg = [first[bisect_left(owners, o)] for o in range(plan.inv_n.numel() + 1)]
        self.seg_start = to_device(seg, torch.int64, dev)
        self.launches = [_Launch(opt, plan, ids, block, dev, first) for ids in combos.values()]
        steps = [opt.state[p]["step"] for p in plan.params]
        for p, st in zip(plan.params, steps):
            if st.dtype != torch.float32 or st.device != dev or st.dim() != 0:
                raise TypeError(f"step counters must be 0-d float32 tensors on {dev}, got {st.dtype} on {st.device} "
                                f"for {opt.param_name(p)}")
        self.step_ptrs = to_device([st.data_ptr() for st in steps] or [0], torch.int64, dev)
        self.partials = torch.zeros(max(n, 1), dtype=torch.float32, device=dev)
        self.sums = torch.zeros(plan.inv_n.shape, dtype=torch.float32, device=dev)
        self.bias_corr = torch.empty(max(len(plan.params), 1), 2, dtype=torch.float32, device=dev)
        self.plan = plan
        return True

    def prepare(self, plan, grads, states) -> bool:
        """Tables for this step (grads, states: of plan.params, as the optimizer read them this step): built when
        the plan changed, pointers refreshed when storage moved. False where the kernels cannot take this
        step's dtypes under backend "auto" (the caller takes torch ops)."""
        if plan is self.plan and all(ln.refresh(grads, states) for ln in self.launches):
            return True
        self.plan = None
        return self._build(plan)

    def moments_and_sums(self, plan):
        """Moments and per-expert score sums of the tables `prepare` built for `plan`."""
        opt = self.opt
        b1, b2 = opt.step_betas
        if self.betas != (b1, b2):
            self.betas, self.betas64 = (b1, b2), to_device([b1, b2], torch.float64, opt.device)
        for ln in self.launches:
            K.moments_score(ln.table, out_block=ln.out_block, owner=ln.owner, partials=self.partials, beta1=b1,
                            beta2=b2, p_dtype=ln.p_dtype, g_dtype=ln.g_dtype, s_dtype=ln.s_dtype,
                            pfn=opt.score == "pfn", eps_score=EPS_SCORE)
        K.finish(partials=self.partials, seg_start=self.seg_start, sums=self.sums, step_ptrs=self.step_ptrs,
                 n_tensors=len(plan.params), betas64=self.betas64, bias_corr=self.bias_corr)
        return self.sums.clone()

    def update(self, plan, winners):
        opt = self.opt
        groups = opt.param_groups
        win = winners.view(-1).to(torch.uint8)
        for ln in self.launches:
            K.masked_update(ln.table, owner=ln.owner, group=ln.group, tensor_id=ln.tensor_id, winners=win,
                            bias_corr=self.bias_corr, lrs=[g["lr"] for g in groups],
                            wds=[g["weight_decay"] for g in groups], epss=[g["eps"] for g in groups],
                            seed=opt.rounding_seed(), p_dtype=ln.p_dtype, s_dtype=ln.s_dtype,
                            stochastic=opt.stochastic_rounding and ln.p_dtype == torch.bfloat16)
