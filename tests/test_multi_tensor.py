"""The multi-tensor scaffolding (pointer tables, block map, deterministic segmented sums)."""
import pytest
import torch

from conftest import DEVICE
import triton
import triton.language as tl

from molf.kernels.multi_tensor import LayoutError, TensorTable, block_owner, dense, multi_tensor_sumsq, segment_sum

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no tl.dot here: bf16 is exact under the interpreter


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_tensor_sumsq_matches_torch(dtype):
    shapes = [(1,), (7, 13), (1000,), (3, 5, 67), (64,)]
    xs = [torch.randn(s, device=DEVICE).to(dtype) for s in shapes]
    got = multi_tensor_sumsq(xs, block=128)
    want = torch.stack([x.double().square().sum() for x in xs])
    assert got.dtype == torch.float32 and got.shape == (len(xs),)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert torch.equal(got, multi_tensor_sumsq(xs, block=128))  # bitwise reproducible


def test_segment_sum_fixed_order_and_every_output_written():
    partials = torch.randn(1000, device=DEVICE)
    seg = torch.tensor([0, 0, 3, 517, 1000], device=DEVICE)
    out = torch.full((4,), float("nan"), device=DEVICE)
    segment_sum(partials, seg, out)
    want = torch.stack([partials[0:0].sum(), partials[0:3].sum(), partials[3:517].sum(), partials[517:].sum()])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_table_rows_block_owner_and_staleness():
    xs = [torch.zeros(n, device=DEVICE) for n in (5, 0, 300, 256)]
    t = TensorTable([xs], 128, DEVICE)
    assert t.n_blocks == 1 + 0 + 3 + 2 and t.n_rows == 4
    assert t.first_block == [0, 1, 1, 4, 6] and t.first.tolist() == [0, 1, 1, 4, 6]
    assert t.ptrs.shape == (4, 1)  # one row per tensor, never one entry per block
    owners = torch.empty(t.n_blocks, dtype=torch.int64, device=DEVICE)
    _owner_kernel[(t.n_blocks,)](t.first, t.n_rows, owners, STEPS=t.search_steps)
    assert owners.tolist() == [0, 2, 2, 2, 3, 3]  # the empty tensor owns no block
    assert not t.stale([xs])
    moved = [xs[0], xs[1], torch.zeros(300, device=DEVICE), xs[3]]
    assert t.stale([moved])
    t.repoint([moved])
    assert not t.stale([moved]) and t.ptrs[2, 0].item() == moved[2].data_ptr()
    two = TensorTable([xs, moved], 128, DEVICE)  # one column moved alone
    fresh = [torch.zeros(n, device=DEVICE) for n in (5, 0, 300, 256)]
    two.repoint_column(1, [x.data_ptr() for x in fresh])
    assert not two.stale([xs, fresh]) and two.stale([xs, moved])
    assert two.ptrs.tolist() == [[a.data_ptr(), b.data_ptr()] for a, b in zip(xs, fresh)]
    square = torch.zeros(4, 4, device=DEVICE)
    TensorTable([[square.t()], [square.t().clone()]], 128, DEVICE)  # dense, one layout per row: walked alike
    with pytest.raises(LayoutError, match=r"strides \(1, 4\), \(4, 4\) strides \(4, 1\)") as e:
        TensorTable([[xs[0], square.t()], [xs[0], square]], 128, DEVICE)
    assert e.value.row == 1
    with pytest.raises(LayoutError):  # every other column: gaps between the elements
        TensorTable([[torch.zeros(4, 8, device=DEVICE)[:, ::2]]], 128, DEVICE)


def test_dense_layouts_are_walked_in_storage_order():
    x = torch.randn(6, 1, 5, device=DEVICE)
    assert dense(x) and dense(x.permute(2, 1, 0)) and dense(x[:, :, :0]) and not dense(x[::2])
    y = torch.randn(7, 3, device=DEVICE)
    got = multi_tensor_sumsq([x.permute(2, 0, 1), y.t()], block=8)
    assert torch.equal(got[0], multi_tensor_sumsq([x.contiguous()], block=8)[0])
    torch.testing.assert_close(got[1].double(), y.double().square().sum(), rtol=1e-6, atol=0)
    with pytest.raises(LayoutError):  # x.transpose(0, 2)[1:2]: a slice of a transposed tensor has gaps
        multi_tensor_sumsq([x.transpose(0, 2)[1:2]])


@pytest.mark.parametrize("n_rows", [1, 2, 3, 7, 8, 33])
def test_block_owner_matches_searchsorted(n_rows):
    g = torch.Generator().manual_seed(n_rows)
    sizes = torch.randint(0, 4, (n_rows,), generator=g).tolist()
    first = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int64, device=DEVICE)
    n_blocks = int(first[-1])
    if n_blocks == 0:
        return
    owners = torch.empty(n_blocks, dtype=torch.int64, device=DEVICE)
    _owner_kernel[(n_blocks,)](first, n_rows, owners, STEPS=max(1, n_rows.bit_length()))
    want = torch.searchsorted(first, torch.arange(n_blocks, device=DEVICE), right=True) - 1
    assert owners.tolist() == want.tolist()


@triton.jit
def _owner_kernel(first, n_rows, out, STEPS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tl.store(out + b, block_owner(first, n_rows, b, STEPS))
