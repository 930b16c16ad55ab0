"""One launch over many tensors: per-tensor tables, a block lookup on the device, deterministic sums.

A `TensorTable` lays the tensors of a list end to end in blocks of BLOCK elements and keeps ONE row per
tensor (pointers of each column, numel, first block): host work O(tensors), never O(elements). Program b
of a launch finds its tensor t on the device by binary search over `first_block` (`block_owner`) and works
on elements [(b - first_block[t]) BLOCK, + BLOCK) of it. Reductions write one fp32 partial per block, then
`segment_sum` adds the partials of each segment (a run of consecutive blocks) in a fixed order: no atomics,
so the result is bitwise reproducible.
"""
from __future__ import annotations

from itertools import accumulate
from typing import Sequence

import torch
import triton
import triton.language as tl

from ._utils import TORCH_TO_TL, cdiv, to_device


def dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill numel consecutive slots from data_ptr(), in some order (a transposed weight):
    the strides of its dimensions longer than 1, sorted, are 1, n_1, n_1 n_2, ..."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _long_strides(t: torch.Tensor) -> list[int]:
    """The strides of t's dimensions longer than 1 (a size-1 dimension's stride never moves to an element)."""
    return [st for sz, st in zip(t.shape, t.stride()) if sz != 1]


def walks_alike(row: Sequence[torch.Tensor]) -> bool:
    """Whether the row's tensors hold their elements in the same order: each dense, one shape, one stride per
    dimension longer than 1 (a parameter's gradient and moments follow its layout). The kernels walk each
    tensor as a flat array from data_ptr(), so element i of one is element i of the others."""
    first = row[0]
    if first.numel() == 0:
        return all(t.numel() == 0 for t in row)
    steps = _long_strides(first)
    return all(t.shape == first.shape and dense(t) and _long_strides(t) == steps for t in row)


class LayoutError(ValueError):
    """A table row whose tensors the kernels cannot walk alike (walks_alike); `row` is its index."""

    def __init__(self, row: int, tensors: Sequence[torch.Tensor]):
        self.row = row
        super().__init__("multi-tensor kernels need each row's tensors contiguous, or dense with one shape and "
                         "strides, got " + ", ".join(f"{tuple(t.shape)} strides {t.stride()}" for t in tensors))


class TensorTable:
    """Per-tensor rows for `columns` (lists of tensors, one entry per row): a [rows, columns] int64 pointer
    table, numel and first block (both with one entry more than rows). `repoint` refreshes the pointers
    alone (one small host-to-device copy) when storage moved but sizes did not."""

    def __init__(self, columns: Sequence[Sequence[torch.Tensor]], block: int, device: torch.device):
        n = len(columns[0])
        if any(len(c) != n for c in columns):
            raise ValueError("every column of a TensorTable needs one tensor per row")
        self.block, self.device, self.n_rows = block, device, n
        self.numels = [c.numel() for c in columns[0]]
        self.first_block = list(accumulate((cdiv(ne, block) for ne in self.numels), initial=0))
        self.n_blocks = self.first_block[-1]
        self.search_steps = max(1, n.bit_length())  # binary-search iterations (constexpr, changes rarely)
        self.numel = to_device(self.numels or [0], torch.int64, device)
        self.first = to_device(self.first_block, torch.int64, device)
        self.repoint(columns)

    def pointers(self, columns) -> list[int]:
        """The columns' data pointers, row by row, their layouts checked (LayoutError where a row cannot be
        walked as flat arrays); `contiguous` records whether every tensor is."""
        self.contiguous = all(t.is_contiguous() for c in columns for t in c)
        if not self.contiguous:
            for i, row in enumerate(zip(*columns)):
                if not (all(t.is_contiguous() for t in row) or walks_alike(row)):
                    raise LayoutError(i, row)
        return [t.data_ptr() for row in zip(*columns) for t in row]

    def repoint(self, columns, pointers: list[int] | None = None) -> None:
        """Take the columns' pointers (`pointers`: already read with `pointers(columns)`)."""
        self.storage = self.pointers(columns) if pointers is None else pointers
        self.ptrs = to_device(self.storage or [0] * len(columns), torch.int64, self.device).view(
            max(self.n_rows, 1), len(columns))

    def repoint_column(self, k: int, pointers: list[int]) -> None:
        """Take new pointers for column k alone (its tensors checked by the caller): a copy of one column, not
        of the whole table (the optimizer's gradients move every step, its parameters and moments do not)."""
        if self.n_rows:
            self.storage[k::self.ptrs.shape[1]] = pointers
            self.ptrs[:, k].copy_(to_device(pointers, torch.int64, self.device))

    def stale(self, columns: Sequence[Sequence[torch.Tensor]]) -> bool:
        """True when a tensor was replaced or re-allocated since the pointers were taken."""
        return self.pointers(columns) != self.storage


@triton.jit
def block_owner(first, n_rows, b, STEPS: tl.constexpr):
    """The last row t with first[t] <= b (first: non-decreasing, n_rows + 1 entries, first[0] = 0): the
    tensor that owns block b, empty tensors skipped. STEPS >= log2(n_rows) iterations of binary search."""
    lo = tl.zeros((), dtype=tl.int64)
    hi = lo + n_rows
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2
        active = hi - lo > 1
        right = tl.load(first + mid) <= b
        lo = tl.where(active & right, mid, lo)
        hi = tl.where(active & (right == 0), mid, hi)
    return lo


@triton.jit
def _sumsq_partials_kernel(ptrs, first, numel, n_rows, partials, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                           STEPS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = block_owner(first, n_rows, b, STEPS)
    x_ptr = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    offs = (b - tl.load(first + t)) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < tl.load(numel + t), other=0.0).to(tl.float32)
    tl.store(partials + b, tl.sum(x * x, axis=0))


@triton.jit
def segment_total(partials, seg_start, s, BLOCK: tl.constexpr):
    """sum(partials[seg_start[s]:seg_start[s+1]]): BLOCK lanes in index order, then one fixed tree."""
    lo = tl.load(seg_start + s)
    hi = tl.load(seg_start + s + 1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    i = lo
    while i < hi:  # not range(lo, hi): Triton 3.6's interpreter cannot take loaded bounds under NumPy >= 2.5
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < hi, other=0.0)
        i += BLOCK
    return tl.sum(acc, axis=0)


@triton.jit
def _segment_sum_kernel(partials, seg_start, out, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    tl.store(out + s, segment_total(partials, seg_start, s, BLOCK))


def segment_sum(partials: torch.Tensor, seg_start: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[s] = sum(partials[seg_start[s]:seg_start[s+1]]), in a fixed order (bitwise reproducible)."""
    n = seg_start.numel() - 1
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=partials.device)
    if n > 0:
        _segment_sum_kernel[(n,)](partials, seg_start, out, BLOCK=128)
    return out


def multi_tensor_sumsq(tensors: Sequence[torch.Tensor], block: int = 1024) -> torch.Tensor:
    """Per-tensor sum of squares, sum(x^2) in fp32, for many same-dtype tensors in two launches."""
    if not tensors:
        raise ValueError("multi_tensor_sumsq needs at least one tensor")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or tensors[0].dtype not in TORCH_TO_TL:
        raise TypeError(f"multi_tensor_sumsq needs tensors of one float dtype, got {sorted(map(str, dtypes))}")
    dev = tensors[0].device
    table = TensorTable([list(tensors)], block, dev)
    partials = torch.empty(max(table.n_blocks, 1), dtype=torch.float32, device=dev)
    if table.n_blocks:
        _sumsq_partials_kernel[(table.n_blocks,)](table.ptrs, table.first, table.numel, table.n_rows, partials,
                                                  DTYPE=TORCH_TO_TL[tensors[0].dtype], BLOCK=block,
                                                  STEPS=table.search_steps)
    return segment_sum(partials, table.first)
