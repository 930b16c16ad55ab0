"""The per-shape choice between the fused kernels and the cuBLAS chain (molf/_plan.py), with fake timers:
measured once per shape and probe, pinned by MOLF_LAYER_IMPL, cached on disk, identical across ranks,
never measured inside a capture, and without moving the user's random stream."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import molf
from conftest import DEVICE
from helpers import assert_close
from molf import _plan
from molf.kernels import molf_linear as fused_kernels


class FakeTimer:
    """The chain is faster below `cross` tokens, the fused kernels from there on; records what it timed."""

    def __init__(self, cross=1000):
        self.cross, self.calls = cross, []

    def __call__(self, fn, *, impl, m):
        self.calls.append((impl, m))
        return (1.0 if m < self.cross else 2.0) if impl == "fused" else (0.5 if m < self.cross else 3.0)


@pytest.fixture
def planner(monkeypatch):
    """A fresh planner with a fake timer, layers on backend "auto" routed to the kernels (on the GPU, or under
    the interpreter on the CPU), and a spy on the fused path."""
    monkeypatch.setenv("MOLF_BACKEND", "triton")
    monkeypatch.delenv("MOLF_LAYER_IMPL", raising=False)
    monkeypatch.delenv("MOLF_CACHE_DIR", raising=False)
    p = _plan.LayerPlanner(timer=FakeTimer())
    monkeypatch.setattr(_plan, "PLANNER", p)
    p.fused_calls = []
    real = fused_kernels.molf_linear
    monkeypatch.setattr(fused_kernels, "molf_linear", lambda x, *a, **k: p.fused_calls.append(x.shape) or real(x, *a, **k))
    return p


def layer(bias=True, dropout=0.0):
    torch.manual_seed(1)
    lin = molf.MoLFLinear(nn.Linear(12, 10, bias=bias, device=DEVICE), ranks=(2, 4), alphas=(4, 8), dropout=dropout)
    with torch.no_grad():
        for b in lin.lora_B:
            b.normal_()
    return lin


def expected(lin, x):
    return molf.reference.molf_linear_reference(x, lin.base.weight, lin.base.bias, list(lin.lora_A),
                                                list(lin.lora_B), lin.scalings)


def test_probe_for_takes_the_nearest_probe():
    assert [_plan.probe_for(m) for m in (1, 128, 200, 256, 400, 1500, 5000, 10 ** 6)] == \
        [128, 128, 128, 512, 512, 2048, 8192, 8192]


def test_measured_once_per_shape_then_cached(planner):
    lin = layer()
    x_small, x_large = torch.randn(3, 4, 12, device=DEVICE), torch.randn(1500, 12, device=DEVICE)
    assert_close(lin(x_small), expected(lin, x_small), 1e-5, "small M")
    assert planner.timer.calls == [(impl, m) for m in _plan.PROBE_M for impl in _plan.IMPLS]
    assert planner.fused_calls == []  # 12 tokens: nearest probe 128, where the fake chain is faster
    assert_close(lin(x_large), expected(lin, x_large), 1e-5, "large M")
    assert planner.fused_calls == [(1500, 12)]  # probe 2048: the fused kernels
    for m in (5, 64, 300, 9000):  # new M in decided buckets: nothing is measured again
        lin(torch.randn(m, 12, device=DEVICE))
    assert planner.measurements == 8
    rows = molf.layer_plan()
    assert [(r["probe_m"], r["impl"]) for r in rows] == [(128, "chain"), (512, "chain"), (2048, "fused"),
                                                         (8192, "fused")]
    assert rows[0]["fused_ms"] == 1.0 and rows[0]["chain_ms"] == 0.5 and rows[0]["source"] == "measured"
    assert rows[0]["n"] == 10 and rows[0]["k"] == 12 and rows[0]["ranks"] == [2, 4] and rows[0]["bias"]
    other = layer(bias=False)  # another shape (no bias): its own decision
    other(x_small)
    assert planner.measurements == 16 and len(molf.layer_plan()) == 8


def test_explicit_triton_backend_is_never_planned(planner):
    lin = layer()
    lin.backend = "triton"
    lin(torch.randn(4, 12, device=DEVICE))
    assert planner.measurements == 0 and planner.fused_calls == [(4, 12)]


@pytest.mark.parametrize("pin", ["fused", "chain"])
def test_environment_pins_the_implementation(planner, monkeypatch, pin):
    monkeypatch.setenv("MOLF_LAYER_IMPL", pin)
    lin = layer()
    x = torch.randn(7, 12, device=DEVICE)
    assert_close(lin(x), expected(lin, x), 1e-5, pin)
    assert planner.measurements == 0 and molf.layer_plan() == []
    assert bool(planner.fused_calls) == (pin == "fused")
    monkeypatch.setenv("MOLF_LAYER_IMPL", "cublas")
    with pytest.raises(ValueError, match="MOLF_LAYER_IMPL must be one of .*got 'cublas'"):
        lin(x)


def test_cache_file_is_written_and_read(planner, monkeypatch, tmp_path):
    monkeypatch.setenv("MOLF_CACHE_DIR", str(tmp_path / "cache"))
    layer()(torch.randn(5, 12, device=DEVICE))
    data = json.loads((tmp_path / "cache" / _plan.CACHE_FILE).read_text())
    (versions, shapes), = data.items()
    assert "triton" in versions and len(shapes) == 1
    again = _plan.LayerPlanner(timer=FakeTimer(cross=0))  # a new process: would choose otherwise if it measured
    monkeypatch.setattr(_plan, "PLANNER", again)
    layer()(torch.randn(5, 12, device=DEVICE))
    assert again.measurements == 0
    (row, *_), = [molf.layer_plan()]
    assert row["impl"] == "chain" and row["source"].startswith("cache")
    (tmp_path / "cache" / _plan.CACHE_FILE).write_text("{not json")  # a broken file is ignored, then replaced
    third = _plan.LayerPlanner(timer=FakeTimer())
    monkeypatch.setattr(_plan, "PLANNER", third)
    layer()(torch.randn(5, 12, device=DEVICE))
    assert third.measurements == 8
    assert json.loads((tmp_path / "cache" / _plan.CACHE_FILE).read_text())


def test_not_measured_while_capturing_or_tracing(planner, monkeypatch):
    monkeypatch.setattr(_plan, "_tracing_or_capturing", lambda: True)
    lin = layer()
    lin(torch.randn(4, 12, device=DEVICE))
    assert planner.measurements == 0 and planner.fused_calls == [(4, 12)] and molf.layer_plan() == []
    monkeypatch.setattr(_plan, "_tracing_or_capturing", lambda: False)
    lin(torch.randn(4, 12, device=DEVICE))  # decided at the first call outside the capture
    assert planner.measurements == 8


def test_measuring_does_not_move_the_random_stream(planner):
    lin = layer(dropout=0.1).train()
    torch.manual_seed(7)
    lin(torch.randn(4, 12, device=DEVICE))  # measures (forks the RNG)
    after_measured = torch.rand(3, device=DEVICE)
    torch.manual_seed(7)
    lin(torch.randn(4, 12, device=DEVICE))  # decided: no measurement
    assert planner.measurements == 8
    assert torch.equal(torch.rand(3, device=DEVICE), after_measured)
    assert molf.layer_plan()[-1]["dropout"]  # dropout (training) is part of the shape


def test_measured_under_no_grad(planner):
    lin = layer()
    with torch.no_grad():
        lin(torch.randn(4, 12, device=DEVICE))
    with torch.inference_mode():
        layer(bias=False)(torch.randn(4, 12, device=DEVICE))
    assert planner.measurements == 16


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_choice_identical_across_ranks(tmp_path):
    import dist_worker
    with dist_worker.cpu_ranks():
        mp.spawn(dist_worker.plan_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"plan{r}.pt", weights_only=False) for r in range(2))
    assert "error" not in r0, r0.get("error")
    assert "error" not in r1, r1.get("error")
    assert r0["measurements"] == 8 and r1["measurements"] == 0
    assert [r["impl"] for r in r0["rows"]] == [r["impl"] for r in r1["rows"]] == ["chain"] * 4
    assert r1["rows"][0]["source"] == "measured (broadcast from rank 0)"
    assert torch.equal(r0["y"], r1["y"])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_evaluation_on_one_rank_alone_is_planned_there(tmp_path):
    """Evaluation and generation shapes (eval mode, no gradients) are decided by each rank alone: under DDP the
    main process often generates samples by itself, and a broadcast only it joined hung the run."""
    import dist_worker
    with dist_worker.cpu_ranks():
        mp.spawn(dist_worker.eval_plan_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"plan{r}.pt", weights_only=False) for r in range(2))
    assert "error" not in r0, r0.get("error")
    assert "error" not in r1, r1.get("error")
    assert {r["forward_only"] for r in r0["rows"]} == {False, True}
    assert {r["forward_only"] for r in r1["rows"]} == {False}
    assert {r["source"] for r in r1["rows"]} == {"measured (broadcast from rank 0)"}
    assert {r["source"] for r in r0["rows"] if r["forward_only"]} == {"measured"} and r0["y"].shape == (3, 10)


def test_measurement_runs_both_implementations_under_autocast(planner, monkeypatch):
    """The timed function really runs forward and backward of both paths, also when autocast makes the
    output's dtype differ from the input's; the layer's own gradients are left alone."""
    ran = []

    def calling_timer(fn, *, impl, m):
        fn()
        ran.append((impl, m))
        return 1.0 if impl == "fused" else 2.0
    monkeypatch.setattr(_plan, "PROBE_M", (16, 64))
    monkeypatch.setattr(_plan, "_PROBE_UPPER", [(32, 16)])
    monkeypatch.setattr(_plan, "_PROBE_KEY", {16: "16", 64: "64"})
    planner.timer = calling_timer
    lin = layer()
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        y = lin(torch.randn(5, 12, device=DEVICE))
    assert y.dtype == torch.float16 and ran == [("fused", 16), ("chain", 16), ("fused", 64), ("chain", 64)]
    assert all(p.grad is None for p in lin.parameters())
    assert molf.layer_plan()[0]["dtype"] == "float16"


def test_eval_mode_without_gradients_is_planned_on_the_forward_alone(planner, monkeypatch):
    """Evaluation and generation (eval mode, no gradients) get a plan of their own, timed on the forward alone;
    a training-mode call without gradients (reentrant checkpointing's first pass) keeps the forward + backward
    plan, so its recomputation runs the same implementation."""
    def calling_timer(fn, *, impl, m):
        fn()
        return 1.0 if impl == "fused" else 2.0
    backwards = []  # the measurement's backward passes (torch.autograd.grad calls)
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backwards.append(1) or real_grad(*a, **k))
    monkeypatch.setattr(_plan, "PROBE_M", (16,))
    monkeypatch.setattr(_plan, "_PROBE_UPPER", [])
    monkeypatch.setattr(_plan, "_PROBE_KEY", {16: "16"})
    planner.timer = calling_timer
    lin = layer()
    x = torch.randn(5, 12, device=DEVICE)
    with torch.no_grad():
        lin(x)  # training mode: the forward + backward plan
    assert planner.measurements == 2 and len(backwards) == 2
    lin.eval()
    with torch.no_grad():
        y = lin(x)  # eval mode, no gradients: a plan of its own, forward only
    assert planner.measurements == 4 and len(backwards) == 2
    assert_close(y, expected(lin, x), 1e-5, "eval forward")
    lin(x)  # eval mode with gradients (no dropout): the same shape as the first, its plan
    assert planner.measurements == 4 and len(backwards) == 2
    assert [r["forward_only"] for r in molf.layer_plan()] == [False, True]
