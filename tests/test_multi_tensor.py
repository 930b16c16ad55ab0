"""The multi-tensor scaffolding (pointer tables, block map, deterministic segmented sums)."""
import pytest
import torch

from conftest import DEVICE
from molf.kernels.multi_tensor import TensorTable, multi_tensor_sumsq, segment_sum

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


def test_table_block_map_and_staleness():
    xs = [torch.zeros(5), torch.zeros(300), torch.zeros(256)]
    t = TensorTable([xs], 128, torch.device("cpu"))
    assert t.n_blocks == 1 + 3 + 2
    assert t.blk_tensor.tolist() == [0, 1, 1, 1, 2, 2]
    assert t.blk_start.tolist() == [0, 0, 128, 256, 0, 128]
    assert t.first_block == [0, 1, 4, 6]
    assert not t.stale([xs])
    assert t.stale([[xs[0], torch.zeros(300), xs[2]]])
    with pytest.raises(ValueError, match="contiguous"):
        TensorTable([[torch.zeros(4, 4).t()]], 128, torch.device("cpu"))
