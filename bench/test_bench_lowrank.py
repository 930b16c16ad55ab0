"""The backward's low-rank pieces, v = (g B_cat) s and dB_cat = g^T u (and db = sum_m g when the base trains
with a bias): one read of g (`lowrank_grads`) vs separate launches (two `mm2` and torch's sum). Each row also
says which one `one_pass_pays` (the bytes model the layer uses) picks for that shape, to check the model."""
import pytest
import torch

from conftest import CUDA, DEVICE, GPU_ONLY, KERNELS, SMOKE
from molf.kernels.molf_linear import lowrank_grads, one_pass_pays, product
from shapes import MODELS

CASES = [(m, mod, M) for m in MODELS for mod in ("q_proj", "k_proj", "gate_proj", "down_proj")
         for M in ((64,) if SMOKE else (4096, 8192))]
DTYPE = torch.bfloat16 if CUDA else torch.float32  # the smoke run's interpreter: bf16 tl.dot is wrong there


@pytest.mark.parametrize("impl", ["one_pass", "two_pass"])
@pytest.mark.parametrize("with_dbias", [False, True], ids=["frozen", "full_bias"])
@pytest.mark.parametrize("ranks", [(16,), (32,), (16, 128)], ids=lambda r: "r" + "-".join(map(str, r)))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-M{c[2]}")
def test_lowrank_grads(measure, case, ranks, with_dbias, impl):
    if not KERNELS:
        pytest.skip(GPU_ONLY)
    model, module, M = case
    n, k = MODELS[model][0][module]
    R, dt = sum(ranks), DTYPE
    g, u = torch.randn(M, n, device=DEVICE, dtype=dt), torch.randn(M, R, device=DEVICE, dtype=dt)
    b_cat, s_cols = torch.randn(n, R, device=DEVICE, dtype=dt), torch.rand(R, device=DEVICE)
    if impl == "one_pass":
        def fn():
            return lowrank_grads(g, b_cat, u, s_cols, with_dbias)
    else:
        def fn():
            v = product(g, b_cat, colscale=s_cols)
            d_b = product(g.t(), u)
            return v, d_b, (g.sum(0, dtype=torch.float32).to(dt) if with_dbias else None)
    measure(fn, bench="layer_bwd_lowrank_dbias" if with_dbias else "layer_bwd_lowrank", model=model,
            module=module, M=M, K=k, N=n, ranks=list(ranks), dtype=str(dt).removeprefix("torch."), impl=impl,
            model_picks_one_pass=one_pass_pays(M, n, R, dt.itemsize, with_dbias, DEVICE))
