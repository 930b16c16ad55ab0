"""One launch over many tensors: pointer tables, a block map, and deterministic segmented sums.

A `TensorTable` lays the tensors of a list end to end in blocks of BLOCK elements; program b of a
launch works on block b: tensor `blk_tensor[b]`, elements [blk_start[b], blk_start[b] + BLOCK).
Reductions write one fp32 partial per block, then `segment_sum` adds the partials of each segment
(a run of consecutive blocks) in a fixed order: no atomics, so the result is bitwise reproducible.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._utils import TORCH_TO_TL, cdiv


class TensorTable:
    """Pointers of `columns` (lists of tensors, one entry per tensor of the table) plus the block map."""

    def __init__(self, columns: Sequence[Sequence[torch.Tensor]], block: int, device: torch.device):
        n = len(columns[0])
        if any(len(c) != n for c in columns):
            raise ValueError("every column of a TensorTable needs one tensor per row")
        for c in columns:
            for t in c:
                if not t.is_contiguous():
                    raise ValueError(f"multi-tensor kernels need contiguous tensors, got strides {t.stride()}")
        self.block = block
        self.numels = [c.numel() for c in columns[0]]
        self.ptrs = torch.tensor([[t.data_ptr() for t in row] for row in zip(*columns)] or [[0] * len(columns)],
                                 dtype=torch.int64).to(device)
        blk_tensor, blk_start, self.first_block = [], [], []
        for i, ne in enumerate(self.numels):
            self.first_block.append(len(blk_tensor))
            nb = cdiv(ne, block)
            blk_tensor += [i] * nb
            blk_start += range(0, nb * block, block)
        self.first_block.append(len(blk_tensor))
        self.n_blocks = len(blk_tensor)
        self.blk_tensor = torch.tensor(blk_tensor, dtype=torch.int32).to(device)
        self.blk_start = torch.tensor(blk_start, dtype=torch.int64).to(device)
        self.numel = torch.tensor(self.numels or [0], dtype=torch.int64).to(device)
        self.storage = [(t.data_ptr(), t.numel()) for c in columns for t in c]

    def stale(self, columns: Sequence[Sequence[torch.Tensor]]) -> bool:
        """True when a tensor was replaced or re-allocated since the table was built."""
        return [(t.data_ptr(), t.numel()) for c in columns for t in c] != self.storage


@triton.jit
def _sumsq_partials_kernel(ptrs, blk_tensor, blk_start, numel, partials, DTYPE: tl.constexpr,
                           BLOCK: tl.constexpr):
    b = tl.program_id(0)
    t = tl.load(blk_tensor + b).to(tl.int64)
    x_ptr = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    offs = tl.load(blk_start + b) + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < tl.load(numel + t), other=0.0).to(tl.float32)
    tl.store(partials + b, tl.sum(x * x, axis=0))


@triton.jit
def segment_total(partials, seg_start, s, BLOCK: tl.constexpr):
    """sum(partials[seg_start[s]:seg_start[s+1]]): BLOCK lanes in index order, then one fixed tree."""
    lo = tl.load(seg_start + s)
    hi = tl.load(seg_start + s + 1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(lo, hi, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < hi, other=0.0)
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
        _sumsq_partials_kernel[(table.n_blocks,)](table.ptrs, table.blk_tensor, table.blk_start, table.numel,
                                                  partials, DTYPE=TORCH_TO_TL[tensors[0].dtype], BLOCK=block)
    seg = torch.tensor(table.first_block, dtype=torch.int64).to(dev)
    return segment_sum(partials, seg)
