"""The fused MoLF layer (backend="triton") against float64 formulas and the eager backend.

On the CPU the kernels run under Triton's interpreter; bf16 cases run on the GPU only (see conftest)."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import molf
from conftest import BF16_INTERPRETER, CUDA, DEVICE
from helpers import TOL, assert_close, batch, randomize_lora_B, tiny_qwen2
from molf.kernels import molf_linear as L
from molf._math import dropout_keep
from molf.kernels.molf_linear import _launch_mm2

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DESCRIPTORS = L.tensor_descriptor_class() is not None
needs_descriptors = pytest.mark.skipif(not DESCRIPTORS, reason="this Triton has no host-side TMA descriptors "
                                       "(triton.tools.tensor_descriptor, Triton >= 3.4): the layer runs the pointer "
                                       "kernels, tested without descriptors below")
# (M, K, N, ranks): odd sizes, not multiples of any block; M = 0 and M = 1.
SHAPES = [(37, 45, 70, (5, 19)), (1, 17, 13, (3,)), (0, 24, 8, (2,)), (70, 33, 40, (16, 1, 7))]


def shape_id(s):
    return f"M{s[0]}-K{s[1]}-N{s[2]}-r{'-'.join(map(str, s[3]))}"


def skip_bf16(dtype):
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip(BF16_INTERPRETER)


@pytest.fixture
def nan_empty(monkeypatch):
    """Every torch.empty comes back full of NaN, so an output element the kernels forget to write fails."""
    real = torch.empty

    def poisoned(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", poisoned)


class KernelSpy:
    """Records the grids a Triton kernel is launched with (kernel[grid](...)) and forwards the launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture(params=["one_pass", "two_pass", "split_k"])
def backward_plan(request, monkeypatch):
    """The backward's plans, each forced: v, dB (and db) from one read of g (lowrank_grads); separate
    launches; separate launches with every single product split over 3 K-ranges. After a passed test, checks
    that the plan really ran (a test whose shapes launch nothing sets `may_stay_idle`)."""
    plan = request.param
    one_pass, mm = KernelSpy(L._lowrank_grads_kernel), KernelSpy(L._mm2_kernel)
    monkeypatch.setattr(L, "_lowrank_grads_kernel", one_pass)
    monkeypatch.setattr(L, "_mm2_kernel", mm)
    monkeypatch.setattr(L, "one_pass_pays", lambda *args: plan == "one_pass")
    reductions = []  # the K of every single product: it splits when K spans more than one BLOCK_K step
    monkeypatch.setattr(L, "_split_k", lambda M, N, K, device: reductions.append(K) or (3 if plan == "split_k" else 1))
    state = SimpleNamespace(may_stay_idle=False)
    yield state
    if not request.node.rep_call.passed:
        return
    splits = [grid(dict(BLOCK_M=32, BLOCK_N=32))[1] for grid in mm.grids]
    assert bool(one_pass.grids) == (plan == "one_pass" and not state.may_stay_idle)
    assert any(s > 1 for s in splits) == (plan == "split_k" and any(k > L._K_STEP for k in reductions))


def pair(k, n, ranks, dtype, bias, train_base, dropout=0.0):
    """The same layer twice, on the triton and on the eager backend (shared parameters)."""
    lin = nn.Linear(k, n, bias=bias, device=DEVICE, dtype=dtype)
    fused = molf.MoLFLinear(lin, ranks=ranks, alphas=[8.0 * (i + 1) for i in range(len(ranks))],
                            train_base=train_base, dropout=dropout, backend="triton")
    with torch.no_grad():
        for b in fused.lora_B:
            b.normal_(std=0.5)
    eager = molf.MoLFLinear(lin, ranks=ranks, alphas=fused.alphas, train_base=train_base, dropout=dropout,
                            backend="eager")
    eager.lora_A, eager.lora_B = fused.lora_A, fused.lora_B
    return fused, eager


def params_of(layer):
    ps = {"W": layer.base.weight, "b": layer.base.bias}
    ps.update({f"A{i}": a for i, a in enumerate(layer.lora_A)})
    ps.update({f"B{i}": b for i, b in enumerate(layer.lora_B)})
    return {k: v for k, v in ps.items() if v is not None and v.requires_grad}


def grads(layer, x, g, fn=None):
    leaves = {"x": x, **params_of(layer)}
    for t in leaves.values():
        t.grad = None
    y = (fn or layer)(x)
    y.backward(g)
    return y.detach(), {k: t.grad.detach().clone() for k, t in leaves.items()}


def f64(layer, x, g):
    """Output and gradients of the float64 formula on the same values."""
    leaves = {"x": x, **params_of(layer)}
    d = {k: t.detach().double().requires_grad_(True) for k, t in leaves.items()}
    w, b = d.get("W", layer.base.weight.detach().double()), d.get("b")
    if b is None and layer.base.bias is not None:
        b = layer.base.bias.detach().double()
    y = d["x"] @ w.T + (b if b is not None else 0)
    for i, s in enumerate(layer.scalings):
        a = d.get(f"A{i}", layer.lora_A[i].detach().double())
        bb = d.get(f"B{i}", layer.lora_B[i].detach().double())
        y = y + s * (d["x"] @ a.T) @ bb.T
    y.backward(g.double())
    return y.detach(), {k: t.grad for k, t in d.items()}


@pytest.mark.parametrize("train_base", [True, False], ids=["full", "frozen"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_backward_match_f64_and_eager(nan_empty, backward_plan, shape, dtype, bias, train_base):
    skip_bf16(dtype)
    M, K, N, ranks = shape
    backward_plan.may_stay_idle = M == 0  # nothing to launch
    fused, eager = pair(K, N, ranks, dtype, bias, train_base)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, requires_grad=True)
    g = torch.randn(M, N, device=DEVICE, dtype=dtype)
    y, gr = grads(fused, x, g)
    y_e, gr_e = grads(eager, x, g)
    y_64, gr_64 = f64(fused, x, g)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (M, N)
    if M == 0:
        assert all(v.abs().sum() == 0 for k, v in gr.items() if k != "x")
        return
    y_abs, gr_abs = rounding_scale(fused, x, g)  # M = 1 at rank 3: u = x A^T may cancel (see rounding_scale)
    assert_close(y, y_64, tol, "y vs f64", scale=y_abs)
    assert_close(y, y_e, tol, "y vs eager", scale=y_abs)
    assert set(gr) == set(gr_64)
    for k in gr:
        assert gr[k].dtype == dtype
        assert_close(gr[k], gr_64[k], tol, f"d{k} vs f64", scale=gr_abs[k])
        assert_close(gr[k], gr_e[k], tol, f"d{k} vs eager", scale=gr_abs[k])
    assert (fused.base.weight.grad is None) == (not train_base)


@st.composite
def layer_cases(draw):
    return dict(
        M=draw(st.integers(0, 80)), K=draw(st.integers(1, 80)), N=draw(st.integers(1, 80)),
        ranks=tuple(draw(st.integers(1, 20)) for _ in range(draw(st.integers(1, 3)))),
        dtype=draw(st.sampled_from(DTYPES if CUDA else DTYPES[:2])), bias=draw(st.booleans()),
        train_base=draw(st.booleans()), dropout=draw(st.sampled_from([0.0, 0.0, 0.25])),
        form=draw(st.sampled_from(["2d", "3d", "transposed"])),
        plan=draw(st.sampled_from(["one_pass", "two_pass", "split_k"])), seed=draw(st.integers(0, 2 ** 16)))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(layer_cases())
@pytest.mark.filterwarnings("ignore:rank .* exceeds min")
@pytest.mark.timeout(500)  # on a GPU each new shape class compiles its kernels: about 70 compilations here
def test_fused_layer_properties(nan_empty, monkeypatch, c):
    """Random shapes, ranks, dtypes, bias, frozen or trained base, dropout, input layouts and backward plans:
    output and every gradient equal the float64 formula (without dropout) and the eager backend (same seed)."""
    torch.manual_seed(c["seed"])
    M, K, N, dtype = c["M"], c["K"], c["N"], c["dtype"]
    fused, eager = pair(K, N, c["ranks"], dtype, c["bias"], c["train_base"], dropout=c["dropout"])
    fused.train(), eager.train()
    lead = {"2d": (M,), "3d": (1, M) if M % 2 else (2, M // 2), "transposed": (M,)}[c["form"]]
    if c["form"] == "transposed":
        x = torch.randn(K, M, device=DEVICE, dtype=dtype).T.requires_grad_(True)
    else:
        x = torch.randn(*lead, K, device=DEVICE, dtype=dtype, requires_grad=True)
    g = torch.randn(*lead, N, device=DEVICE, dtype=dtype)
    with monkeypatch.context() as mp:
        mp.setattr(L, "one_pass_pays", lambda *args: c["plan"] == "one_pass")
        mp.setattr(L, "_split_k", lambda M, N, K, device: 3 if c["plan"] == "split_k" else 1)
        torch.manual_seed(7)
        y, gr = grads(fused, x, g)
    torch.manual_seed(7)
    y_e, gr_e = grads(eager, x, g)
    tol = TOL[dtype]
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert set(gr) == set(gr_e)
    if M == 0:
        return
    y_abs, gr_abs = rounding_scale(fused, x, g)
    assert_close(y, y_e, tol, "y vs eager", scale=y_abs)
    for k in gr:
        assert gr[k].dtype == dtype and gr[k].shape == gr_e[k].shape
        assert_close(gr[k], gr_e[k], tol, f"d{k} vs eager", scale=gr_abs[k])
    if c["dropout"] == 0.0:
        y_64, gr_64 = f64(fused, x, g)
        assert_close(y, y_64, tol, "y vs f64", scale=y_abs)
        for k in gr:
            assert_close(gr[k], gr_64[k], tol, f"d{k} vs f64", scale=gr_abs[k])


def rounding_scale(layer, x, g):
    """The float64 formulas on absolute values. A sum's rounding error is bounded by n eps |a|.|b|, not by
    its result: a cancelling sum (u = x A^T near 0 at M = 1, rank 1) has a large relative error in any fp32
    order, eager's too, and a small one against this scale."""
    absolute = copy.deepcopy(layer)
    with torch.no_grad():
        for p in absolute.parameters():
            p.abs_()
    return f64(absolute, x.detach().abs(), g.abs())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nd_and_noncontiguous_input(nan_empty, backward_plan, dtype):
    skip_bf16(dtype)
    fused, eager = pair(21, 30, (4, 9), dtype, True, True)
    base = torch.randn(5, 21, 3, device=DEVICE, dtype=dtype)
    x = base.transpose(1, 2).detach().requires_grad_(True)  # (5, 3, 21), not contiguous
    assert not x.is_contiguous()
    g = torch.randn(5, 3, 30, device=DEVICE, dtype=dtype)
    y, gr = grads(fused, x, g)
    y_e, gr_e = grads(eager, x, g)
    assert y.shape == (5, 3, 30)
    assert_close(y, y_e, TOL[dtype], "y")
    for k in gr:
        assert_close(gr[k], gr_e[k], TOL[dtype], f"d{k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_mm2_writes_every_element(dtype):
    a1, b1 = torch.randn(19, 23, dtype=dtype, device=DEVICE), torch.randn(23, 35, dtype=dtype, device=DEVICE)
    a2, b2 = torch.randn(19, 6, dtype=dtype, device=DEVICE), torch.randn(6, 35, dtype=dtype, device=DEVICE)
    seed = torch.tensor([987654321987], device=DEVICE)
    keep = dropout_keep(seed, 19, 35, 0.3)
    bias, scale = torch.randn(35, dtype=dtype, device=DEVICE), torch.rand(35, device=DEVICE)
    out = torch.full((19, 35), math.nan, dtype=dtype, device=DEVICE)
    _launch_mm2(out, a1, b1, a2, b2, seed, L.DROP_SECOND, 0.3, bias, scale)
    want = (a1.double() @ b1.double() + keep * (a2.double() @ b2.double()) / 0.7) * scale.double() + bias.double()
    assert_close(out, want, TOL[dtype], "mm2")


def test_philox_is_philox_4x32_10():
    """Random123's known answer (counter 0, key 0: first word 0x6627e8d5) through the torch-ops generator,
    and the kernels' constants equal molf._math's."""
    from molf import _math
    assert _math.philox_uniform(torch.zeros(1, dtype=torch.int64), 1, 1).item() == (0x6627E8D5 >> 8) / 2 ** 24
    assert (L._ROUNDS.value, L._MUL_A.value, L._MUL_B.value, L._KEY_A.value, L._KEY_B.value) == \
        (_math.PHILOX_ROUNDS, *_math.PHILOX_MUL, *_math.PHILOX_KEY_STEP)


@pytest.mark.parametrize("rows, cols, p", [(37, 45, 0.05), (1, 1000, 0.5), (300, 7, 0.9), (0, 5, 0.1)])
def test_keep_mask_kernel_equals_torch_ops(rows, cols, p):
    seed = torch.randint(0, 1 << 62, (1,), device=DEVICE)
    keep = L.keep_mask(seed, rows, cols, p)
    assert torch.equal(keep, dropout_keep(seed, rows, cols, p, chunk=97))  # chunked rows: the same mask
    if rows * cols >= 1000:
        assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    assert not torch.equal(keep, L.keep_mask(seed + 1, rows, cols, p)) or rows * cols < 2


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("drop", ["a1", "b1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_mm2_dropout_on_an_operand(dtype, drop, split):
    """u = drop(x) A^T (x = A1) and dA = v^T drop(x) (x = B1), also split over K-ranges: the mask of each
    element of x comes from its (token, feature) position, not from the tile or range that reads it."""
    p, seed = 0.25, torch.tensor([12345], device=DEVICE)
    x = torch.randn(70, 101, dtype=dtype, device=DEVICE)
    xd = x.double() * dropout_keep(seed, 70, 101, p) / (1 - p)
    if drop == "a1":
        a = torch.randn(101, 9, dtype=dtype, device=DEVICE)
        out = _launch_mm2(torch.full((70, 9), math.nan, dtype=dtype, device=DEVICE), x, a, seed=seed,
                          drop=L.DROP_A1, p=p, split=split)
        want = xd @ a.double()
    else:
        v = torch.randn(9, 70, dtype=dtype, device=DEVICE)
        out = _launch_mm2(torch.full((9, 101), math.nan, dtype=dtype, device=DEVICE), v, x, seed=seed,
                          drop=L.DROP_B1, p=p, split=split)
        want = v.double() @ xd
    assert_close(out, want, TOL[dtype], f"drop on {drop}")
    with pytest.raises(ValueError, match="seed"):
        _launch_mm2(out, x, x.t(), drop=L.DROP_A1, p=p)


@pytest.mark.parametrize("split", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_mm2_split_k(dtype, split):
    """A single product split over K-ranges (fp32 partials, fixed-order sum, then colscale and bias)."""
    a1, b1 = torch.randn(19, 101, dtype=dtype, device=DEVICE), torch.randn(101, 35, dtype=dtype, device=DEVICE)
    bias, scale = torch.randn(35, dtype=dtype, device=DEVICE), torch.rand(35, device=DEVICE)
    out = torch.full((19, 35), math.nan, dtype=dtype, device=DEVICE)
    _launch_mm2(out, a1, b1, bias=bias, colscale=scale, split=split)
    want = (a1.double() @ b1.double()) * scale.double() + bias.double()
    assert_close(out, want, TOL[dtype], f"mm2 split {split}")
    again = torch.full_like(out, math.nan)
    assert torch.equal(_launch_mm2(again, a1, b1, bias=bias, colscale=scale, split=split), out)  # deterministic
    strided = torch.full((35, 19), math.nan, dtype=dtype, device=DEVICE).t()  # an output view, not contiguous
    assert torch.equal(_launch_mm2(strided, a1, b1, bias=bias, colscale=scale, split=split), out)
    with pytest.raises(ValueError, match="split-K"):
        _launch_mm2(out, a1, b1, a1[:, :3], b1[:3], split=2)


@pytest.fixture
def h100(monkeypatch):
    """The tile rules as compiled code on an H100 (132 SMs) sees them; yields that device."""
    monkeypatch.setattr(L, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    L._sm_count.cache_clear()
    yield torch.device("cuda")
    L._sm_count.cache_clear()  # no fake SM count left behind for later tests


def test_split_k_only_for_small_outputs(h100):
    """The split rule at real shapes (M = 8192 tokens, an H100's 132 SMs)."""
    cuda = h100
    assert L._split_k(144, 1536, 8192, cuda) == 6  # dA of the MoLF-E pair on q_proj: 24 tiles
    assert L._split_k(256, 144, 8192, cuda) == 16  # dB on k_proj: 2 tiles, at least 512 of K per range
    assert L._split_k(8960, 1536, 8192, cuda) == 1  # dW of gate_proj: 840 tiles
    assert L._split_k(8192, 144, 1536, cuda) == 1  # u in the forward: 64 tiles already


def test_one_pass_pays_for_small_ranks_only(h100):
    """The bytes model of the backward at real shapes (M = 8192, bf16, an H100's 132 SMs)."""
    cuda = h100
    assert L.one_pass_pays(8192, 8960, 16, 2, False, cuda)  # gate_proj, r = 16: partials about half of g
    assert L.one_pass_pays(8192, 1536, 16, 2, True, cuda)  # q_proj with its bias: saves two reads of g
    assert not L.one_pass_pays(8192, 256, 16, 2, False, cuda)  # k_proj: partials as large as g
    assert not L.one_pass_pays(8192, 8960, 48, 2, False, cuda)
    assert not L.one_pass_pays(8192, 8960, 144, 2, False, cuda)  # the MoLF-E pair (16, 128)
    assert not L.one_pass_pays(0, 8960, 16, 2, False, cuda)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dropout_matches_eager_under_same_seed(backward_plan, dtype):
    fused, eager = pair(29, 18, (3, 8), dtype, True, True, dropout=0.3)
    fused.train(), eager.train()
    x = torch.randn(4, 7, 29, device=DEVICE, dtype=dtype, requires_grad=True)
    g = torch.randn(4, 7, 18, device=DEVICE, dtype=dtype)
    torch.manual_seed(11)
    y, gr = grads(fused, x, g)
    torch.manual_seed(11)
    y_e, gr_e = grads(eager, x, g)
    assert_close(y, y_e, TOL[dtype], "y")
    for k in gr:
        assert_close(gr[k], gr_e[k], TOL[dtype], f"d{k}")
    torch.manual_seed(12)  # another mask gives another output
    assert (fused(x) - y).abs().max() > 1e-3


def test_gradient_checkpointing_gives_identical_grads(backward_plan):
    from torch.utils.checkpoint import checkpoint
    fused, _ = pair(19, 22, (4,), torch.float32, True, True, dropout=0.2)
    fused.train()
    x = torch.randn(6, 19, device=DEVICE, requires_grad=True)
    g = torch.randn(6, 22, device=DEVICE)
    torch.manual_seed(5)
    y, gr = grads(fused, x, g)
    torch.manual_seed(5)
    y_c, gr_c = grads(fused, x, g, fn=lambda t: checkpoint(fused, t, use_reentrant=False))
    assert torch.equal(y, y_c)
    for k in gr:
        assert torch.equal(gr[k], gr_c[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias, train_base, dropout", [(True, True, 0.0), (False, False, 0.3)],
                         ids=["molf-bias", "molfe-dropout"])
def test_double_backward_equals_eager(dtype, bias, train_base, dropout):
    """backward(create_graph=True), as a gradient penalty or a Hessian-vector product needs it: the kernels'
    gradients carried no graph, so the penalty's second-order terms were dropped (silently, beside a loss
    that has a graph). Now the fused layer's backward runs in torch ops then, and equals the eager path's."""
    skip_bf16(dtype)
    fused, eager = pair(21, 15, (3, 5), dtype, bias, train_base, dropout=dropout)
    x = torch.randn(2, 9, 21, device=DEVICE, dtype=dtype, requires_grad=True)
    out = {}
    for name, layer in (("fused", fused), ("eager", eager)):
        leaves = {"x": x, **params_of(layer)}
        for t in leaves.values():
            t.grad = None
        torch.manual_seed(3)
        y = layer(x)
        gx, = torch.autograd.grad(y.float().square().sum(), x, create_graph=True)
        assert gx.requires_grad
        (y.float().sum() + gx.float().square().sum()).backward()
        out[name] = {k: t.grad.detach().clone() for k, t in leaves.items()}
    assert out["fused"].keys() == out["eager"].keys()
    # bf16: each path's second-order gradients are 4e-3 to 8e-3 from fp32's (the eager path, measured on the CPU),
    # so the two may differ by twice bf16's usual 1e-2; a dropped second-order term is off by O(1)
    tol = 2.5e-2 if dtype == torch.bfloat16 else TOL[dtype]
    for k in out["fused"]:
        assert_close(out["fused"][k], out["eager"][k], tol, f"d{k}")


def test_merge_after_training_equals_forward():
    fused, _ = pair(16, 12, (2, 4), torch.float32, True, True)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    x = torch.randn(8, 16, device=DEVICE)
    for _ in range(3):
        fused(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert_close(fused.merge()(x), fused(x), 1e-5, "merged")


def test_torch_compile_matches_eager(backward_plan):
    model = molf.wrap(tiny_qwen2(layers=1).to(DEVICE), ranks=(4, 8), alphas=(8, 8), train_base=True,
                      backend="triton")
    randomize_lora_B(model)
    ids = batch().to(DEVICE)
    ref = model(ids, labels=ids)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model)
    out = compiled(ids, labels=ids)
    out.loss.backward()
    assert_close(out.logits, ref.logits, 1e-5, "compiled logits")
    for n, p in model.named_parameters():
        if n in ref_grads:
            assert_close(p.grad, ref_grads[n], 1e-4, f"compiled grad {n}")


def test_autocast_follows_autocast_dtype():
    fused, eager = pair(24, 16, (4,), torch.float32, True, True)
    x = torch.randn(5, 24, device=DEVICE)
    dt = torch.bfloat16 if CUDA else torch.float16
    with torch.autocast(DEVICE.type, dtype=dt):
        y = fused(x)
    assert y.dtype == dt
    want = eager(x.to(dt).float())  # fp32 reference on the autocast-rounded input
    assert_close(y, want, 1e-2, "autocast y")


def test_bad_inputs_on_triton_backend():
    fused, _ = pair(8, 4, (2,), torch.float32, True, True)
    with pytest.raises(ValueError, match=r"\(3, 7\)"):
        fused(torch.randn(3, 7, device=DEVICE))
    with pytest.raises(TypeError, match="dtype"):
        fused(torch.randn(3, 8, device=DEVICE, dtype=torch.float16))


def test_molf_autotune_env_keeps_one_config(monkeypatch):
    from molf.kernels._utils import tuning_configs
    monkeypatch.setenv("MOLF_AUTOTUNE", "0")
    assert tuning_configs(["a", "b", "c"], default=1) == ["b"]
    monkeypatch.setenv("MOLF_AUTOTUNE", "1")
    assert tuning_configs(["a", "b", "c"], default=1) == ["a", "b", "c"]
    monkeypatch.setenv("MOLF_AUTOTUNE", "off")
    with pytest.raises(ValueError, match="MOLF_AUTOTUNE must be 0 .* or 1 .*, got 'off'"):
        tuning_configs(["a"], default=0)


def test_autotune_key_is_a_bucket_of_m(monkeypatch):
    """Dynamic padding gives a new M almost every step: a new M in the same bucket must not tune again."""
    from molf.kernels import molf_linear as L
    from molf.kernels._utils import config
    assert "M_BUCKET" in L._mm2_kernel.keys and "M" not in L._mm2_kernel.keys
    assert L.m_bucket(100) == L.m_bucket(128) == 128 and L.m_bucket(129) == 256 and L.m_bucket(1) == 16
    cfgs = [config(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=g, num_warps=4, num_stages=1) for g in (4, 8)]
    monkeypatch.setattr(L._mm2_kernel, "configs", cfgs)
    monkeypatch.setattr(L._mm2_kernel, "cache", {})
    tuned = []
    monkeypatch.setattr(L._mm2_kernel, "_bench", lambda *a, config, **k: tuned.append(config) or [1.0, 1.0, 1.0])
    b1 = torch.randn(40, 24, device=DEVICE)
    for M in (100, 120, 128, 300, 500):
        a1 = torch.randn(M, 40, device=DEVICE)
        out = L._launch_mm2(torch.empty(M, 24, device=DEVICE), a1, b1, split=1)
        assert_close(out, a1 @ b1, 1e-5, f"M={M}")
    assert len(tuned) == 2 * 2, "two buckets (128 and 512), two configs each: tuned once per bucket"


@pytest.fixture
def tma(monkeypatch):
    """The Hopper descriptor path forced on (under the interpreter it runs only when MOLF_TMA=1), with a spy
    that records its launches."""
    monkeypatch.setenv("MOLF_TMA", "1")
    spy = KernelSpy(L._mm2_tma_kernel)
    monkeypatch.setattr(L, "_mm2_tma_kernel", spy)
    return spy


@needs_descriptors
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("form", ["forward", "dx", "dx_dropout"])
def test_tma_path_matches_formula(tma, nan_empty, dtype, form):
    """C = A1 B1 + A2 B2 (+ bias) on descriptors: B operands transposed (forward: W^T, B_cat^T) or not (dx:
    W, A_cat), dropout on the second product, output tiles walked by fewer programs than tiles (persistent)."""
    M, K, N, R = 70, 48, 72, 24
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    if form == "forward":
        w, u, b, bias = (torch.randn(N, K, dtype=dtype, device=DEVICE), torch.randn(M, R, dtype=dtype, device=DEVICE),
                         torch.randn(N, R, dtype=dtype, device=DEVICE), torch.randn(N, dtype=dtype, device=DEVICE))
        out = L.product(x, w.t(), a2=u, b2=b.t(), bias=bias)
        want = x.double() @ w.double().t() + u.double() @ b.double().t() + bias.double()
    else:
        g, w = torch.randn(M, N, dtype=dtype, device=DEVICE), torch.randn(N, K, dtype=dtype, device=DEVICE)
        v, a = torch.randn(M, R, dtype=dtype, device=DEVICE), torch.randn(R, K, dtype=dtype, device=DEVICE)
        seed, p = torch.tensor([4242], device=DEVICE), 0.3
        keep = dropout_keep(seed, M, K, p) / (1 - p) if form == "dx_dropout" else 1.0
        drop = L.DROP_SECOND if form == "dx_dropout" else L.NO_DROP
        out = L.product(g, w, a2=v, b2=a, seed=seed if drop else None, drop=drop, p=p if drop else 0.0)
        want = g.double() @ w.double() + keep * (v.double() @ a.double())
    assert_close(out, want, TOL[dtype], form)
    if CUDA and dtype == torch.float32:  # a GPU takes 16-bit operands only: fp32 stays on the pointer kernel
        assert tma.grids == []
        return
    assert len(tma.grids) == 1
    tiles = 3 * (3 if form == "forward" else 2)  # 32 x 32 tiles of the 70 x 72 (forward) or 70 x 48 (dx) output
    programs = 3 if L.interpreting() else min(tiles, L._sm_count(DEVICE))
    assert tma.grids[0](dict(BLOCK_M=32, BLOCK_N=32)) == (programs,)  # interpreter: 3 programs walk the tiles


def descriptor_operands():
    """fp16 operands of C = A1 B1 + A2 B2 (8 x 24 output, K 16, rank 8) that descriptors can take, and C."""
    h = dict(dtype=torch.float16, device=DEVICE)
    a1, b1 = torch.randn(8, 16, **h), torch.randn(24, 16, **h).t()
    return a1, b1, torch.randn(8, 8, **h), torch.randn(24, 8, **h).t(), torch.empty(8, 24, **h)


@needs_descriptors
def test_tma_path_takes_only_what_descriptors_can(monkeypatch):
    monkeypatch.setenv("MOLF_TMA", "1")
    a1, b1, a2, b2, out = descriptor_operands()
    h = dict(dtype=torch.float16, device=DEVICE)
    assert L.tma_path(a1, b1, a2, b2, out, L.NO_DROP)
    assert L.tma_path(a1, b1, a2, b2, out, L.DROP_SECOND)
    assert not L.tma_path(a1, b1, None, None, out, L.NO_DROP)  # a single product: the pointer kernel
    assert not L.tma_path(a1, b1, a2, b2, out, L.DROP_A1)
    odd = torch.randn(8, 5, **h)  # rank 5: a row of 10 bytes, not 16-byte aligned
    assert not L.tma_path(a1, b1, odd, torch.randn(24, 5, **h).t(), out, L.NO_DROP)
    assert not L.tma_path(a1[:, 1:], b1[1:], a2, b2, out, L.NO_DROP)  # an unaligned base
    assert not L.tma_path(a1, torch.randn(16, 48, **h)[:, ::2], a2, b2, out, L.NO_DROP)  # no unit stride
    if CUDA:  # on a GPU, 16-bit operands only
        assert not L.tma_path(a1.float(), b1.float(), a2.float(), b2.float(), out.float(), L.NO_DROP)
    monkeypatch.setenv("MOLF_TMA", "0")
    assert not L.tma_path(a1, b1, a2, b2, out, L.NO_DROP)
    monkeypatch.delenv("MOLF_TMA")
    hopper = CUDA and L._sm_major(DEVICE) >= 9
    assert L.tma_path(a1, b1, a2, b2, out, L.NO_DROP) == hopper  # by default: Hopper GPUs, not the interpreter


def test_without_tritons_descriptors_every_product_takes_the_pointer_kernel(monkeypatch):
    """A Triton without host-side descriptors (before 3.4): no product takes the descriptor path, even forced."""
    monkeypatch.setenv("MOLF_TMA", "1")
    monkeypatch.setattr(L, "tensor_descriptor_class", lambda: None)
    a1, b1, a2, b2, out = descriptor_operands()
    for drop in (L.NO_DROP, L.DROP_SECOND):
        assert not L.tma_path(a1, b1, a2, b2, out, drop)
    spy = KernelSpy(L._mm2_tma_kernel)
    monkeypatch.setattr(L, "_mm2_tma_kernel", spy)
    got = L.product(a1, b1, a2=a2, b2=b2)
    assert spy.grids == []
    assert_close(got, a1.double() @ b1.double() + a2.double() @ b2.double(), TOL[torch.float16], "pointer kernel")


@pytest.mark.parametrize("shape", [(48, 40, (8, 16)), (45, 40, (8, 16)), (48, 40, (5,))],
                         ids=["aligned", "K45-pointer-x", "r5-pointer-lowrank"])
def test_layer_on_tma_path_equals_pointer_path(monkeypatch, shape):
    """The whole layer (forward, backward with dropout) with the descriptor path forced equals the pointer
    kernels; operands descriptors cannot take fall back to the pointer kernel, per product."""
    k, n, ranks = shape
    fused, _ = pair(k, n, ranks, torch.float16, True, True, dropout=0.1)
    fused.train()
    x = torch.randn(3, 23, k, device=DEVICE, dtype=torch.float16, requires_grad=True)
    g = torch.randn(3, 23, n, device=DEVICE, dtype=torch.float16)
    monkeypatch.setenv("MOLF_TMA", "0")  # the pointer kernels (a Hopper GPU would take descriptors by default)
    torch.manual_seed(9)
    y, gr = grads(fused, x, g)
    monkeypatch.setenv("MOLF_TMA", "1")
    spy = KernelSpy(L._mm2_tma_kernel)
    monkeypatch.setattr(L, "_mm2_tma_kernel", spy)
    torch.manual_seed(9)
    y_t, gr_t = grads(fused, x, g)
    aligned = shape[0] % 8 == 0 and sum(ranks) % 8 == 0
    assert len(spy.grids) == (2 if aligned and DESCRIPTORS else 0)  # forward y and dx
    assert_close(y_t, y, TOL[torch.float16], "y")
    for key in gr:
        assert_close(gr_t[key], gr[key], TOL[torch.float16], f"d{key}")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_cuda_graph_captures_a_training_step(backend):
    """Forward, backward and MoLFAdamW.step of a small model with molf layers, captured once and replayed,
    equal the same steps run eagerly (backend "auto": the per-shape plan is decided in the warm-up)."""
    import copy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 32)).to(DEVICE)
    molf.wrap(model, ranks=(8, 16), alphas=(16, 16), target_modules="all-linear", backend=backend)
    randomize_lora_B(model)
    ref = copy.deepcopy(model)
    opt = molf.MoLFAdamW(model, lr=1e-3, lora_lr=1e-3, weight_decay=0.1)
    ref_opt = molf.MoLFAdamW(ref, lr=1e-3, lora_lr=1e-3, weight_decay=0.1)
    x, target = torch.randn(200, 64, device=DEVICE), torch.randn(200, 32, device=DEVICE)

    def step(m, o):
        torch.nn.functional.mse_loss(m(x), target).backward()
        o.step()
        o.zero_grad(set_to_none=False)  # the gradients stay the graph's static buffers
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(model, opt)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        step(ref, ref_opt)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, opt)
    for _ in range(3):
        graph.replay()
        step(ref, ref_opt)
    torch.cuda.synchronize()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p, q, 1e-6, name)
    assert torch.equal(opt.routing, ref_opt.routing)


def test_philox_mul_hi_lo_is_exact():
    """The 16-bit-halves product against Python's integers, at the edges of the 32-bit range too."""
    from molf import _math
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([0, 1, 0xFFFF, 0x10000, 0xFFFFFFFF, 0x80000000]),
                   torch.randint(0, 1 << 32, (1000,), generator=gen)])
    for a in (*_math.PHILOX_MUL, 0xFFFFFFFF, 1):
        hi, lo = _math._mul_hi_lo(a, x)
        assert hi.tolist() == [(a * v) >> 32 for v in x.tolist()]
        assert lo.tolist() == [(a * v) & 0xFFFFFFFF for v in x.tolist()]


@pytest.mark.parametrize("rows, cols, p", [(37, 45, 0.05), (2, 1000, 0.5), (300, 7, 0.9)])
def test_cpu_keep_mask_equals_torch_ops(rows, cols, p):
    """The layer's CPU keep-mask (one C loop) is molf._math.dropout_keep's, bit for bit, for seeds with high
    bits set and p at a multiple of 2^-24 (the comparison's edge)."""
    from molf import _cpu
    if not _cpu.available():
        pytest.skip("the CPU loops (molf/_cpu.c) cannot be built here: no working C compiler")
    for seed in (torch.randint(0, 1 << 62, (1,)), torch.tensor([(1 << 62) - 1]), torch.tensor([0])):
        for q in (p, 3 / (1 << 24)):
            assert torch.equal(_cpu.keep_mask(seed, rows, cols, q), dropout_keep(seed, rows, cols, q))


def test_float64_is_refused_by_the_kernels_and_auto_takes_torch_ops():
    """The kernels compute in float32, float16 and bfloat16: a float64 layer on backend="triton" gave NaN under
    the interpreter, silently. Now a TypeError naming the dtype (layer, kernel entry, optimizer); "auto" runs
    float64 on torch ops, on a GPU too."""
    from molf import _backend
    lin = molf.MoLFLinear(nn.Linear(16, 8, dtype=torch.float64, device=DEVICE), ranks=(4,), alphas=(8,),
                          backend="triton")
    x = torch.randn(5, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match=r"backend='triton': the Triton kernels compute in float32, float16 and "
                                        r"bfloat16, got torch.float64 tensors; use backend='eager'"):
        lin(x)
    with pytest.raises(TypeError, match="fused MoLF layer computes in float32, float16 or bfloat16, got "
                                        "torch.float64"):
        L.molf_linear(x, lin.base.weight, None, list(lin.lora_A), list(lin.lora_B), lin.scalings)
    model = nn.Sequential(lin)
    opt = molf.MoLFAdamW(model, lr=1e-3, backend="triton")
    lin.backend = "eager"
    model(x).sum().backward()
    with pytest.raises(TypeError, match=r"backend='triton': .* got torch.float64 tensors"):
        opt.step()
    cuda = torch.device("cuda")
    assert _backend.resolve("auto", cuda, (torch.float64, torch.float32)) == "eager"
    assert _backend.resolve("auto", cuda, (torch.bfloat16, torch.float32)) == "triton"
    if CUDA:  # auto on the GPU: the layer and the optimizer take torch ops for float64
        lin.backend = "auto"
        opt = molf.MoLFAdamW(model, lr=1e-3)
        want = x @ lin.base.weight.T + lin.base.bias
        assert_close(model(x), want, 1e-12, "float64 layer on auto")
        opt.step()
        assert opt._impl.name == "eager"
