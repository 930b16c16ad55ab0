"""Host work of the fused optimizer step is O(number of tensors), whatever the tensors' sizes and even when
the gradients' storage moves every step (zero_grad(set_to_none=True), as every Trainer does)."""
import statistics
import time

import pytest
import torch
from torch import nn

import molf
from helpers import device_for


class NoOpKernel:
    """Stands for a Triton kernel: launching it does nothing, so only the host side of step() is timed."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_ms_small_large(backend: str, repeats: int = 3) -> tuple[float, float]:
    """Host time of step() for 8 MoLF layers of 32 x 32 and of 1024 x 1024 (1024x the elements), each the
    lowest of `repeats` medians, the two sizes measured in turn (a busy machine slows a stretch of steps: in
    turn, it falls on both sizes alike)."""
    runs = [[_median_host_ms(width, backend) for width in (32, 1024)] for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def _median_host_ms(width: int, backend: str, steps: int = 12) -> float:
    """Median host time of step() over `steps` steps, new gradient storage every step."""
    torch.manual_seed(0)
    names = [f"l{i}" for i in range(8)]
    net = nn.ModuleDict({n: nn.Linear(width, width) for n in names}).to(device_for(backend))
    molf.wrap(net, ranks=(4,), alphas=(8,), target_modules=names, backend=backend)
    opt = molf.MoLFAdamW(net, lr=1e-3, backend=backend)
    params = [p for p in net.parameters() if p.requires_grad]
    pools = [[torch.zeros_like(p) for p in params] for _ in range(2)]  # two gradient sets: storage moves each step
    times = []
    for step in range(steps):
        for p, g in zip(params, pools[step % 2]):
            p.grad = g
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    if backend == "eager":
        assert opt._impl._tables, "the C loops' tables were not used"
    return statistics.median(times[2:]) * 1e3


def test_step_host_time_does_not_grow_with_elements(monkeypatch):
    import molf.kernels.routed_adamw as ra
    for name in ("_moments_score_kernel", "_finish_kernel", "_masked_update_kernel"):
        monkeypatch.setattr(ra, name, NoOpKernel())
    small, large = host_ms_small_large("triton")
    assert large < 2.0 * small, f"host time per step {small:.2f} ms -> {large:.2f} ms for 1024x the elements"


def test_eager_cpu_step_host_time_does_not_grow_with_elements(monkeypatch):
    """The same for the eager backend on the CPU, its C calls replaced by no-ops."""
    from molf import _cpu
    if not _cpu.available():
        pytest.skip("the CPU loops (molf/_cpu.c) cannot be built here: no working C compiler")
    monkeypatch.setattr(_cpu, "moments_score_", lambda *a: None)
    monkeypatch.setattr(_cpu, "adamw_update_", lambda *a: None)
    monkeypatch.setattr(_cpu, "routed_step_", lambda tab, hp, b1, b2, pfn, inv_n, no_grad, lrs, top_k: (
        torch.zeros_like(no_grad), torch.zeros(inv_n.shape), 0))
    small, large = host_ms_small_large("eager")
    assert large < 2.0 * small, f"host time per step {small:.2f} ms -> {large:.2f} ms for 1024x the elements"


@pytest.mark.parametrize("ranks", [(8,), (2, 8)])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_layer_call_reads_its_experts_without_indexing_the_parameter_lists(monkeypatch, backend, ranks):
    """A ParameterList's indexing costs microseconds of Python per element (torch's container code): the layer
    read A_i and B_i through it nine times per forward, the largest share of its host work at small shapes
    (eager forward 48 -> 30 us on a 2-core CPU). Now none per forward or backward; the result is unchanged."""
    device = device_for(backend)
    torch.manual_seed(0)
    layer = molf.MoLFLinear(nn.Linear(24, 16).to(device), ranks=ranks, alphas=(4,) * len(ranks), backend=backend)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(5, 24, device=device, requires_grad=True)
    want = molf.reference.molf_linear_reference(x, layer.base.weight, layer.base.bias, list(layer.lora_A),
                                                list(layer.lora_B), layer.scalings)
    calls = []
    original = nn.ParameterList.__getitem__
    monkeypatch.setattr(nn.ParameterList, "__getitem__", lambda self, i: calls.append(i) or original(self, i))
    y = layer(x)
    y.sum().backward()
    assert calls == []
    assert torch.allclose(y, want, atol=1e-5, rtol=1e-5)
    # A parametrized expert lives outside the list's dict: read through the list then, not skipped.
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, t):
            return 2 * t
    parametrize.register_parametrization(layer.lora_B, "0", Double())
    monkeypatch.setattr(nn.ParameterList, "__getitem__", original)
    doubled = [2 * layer.lora_B.parametrizations["0"].original] + list(layer.lora_B)[1:]
    want = molf.reference.molf_linear_reference(x, layer.base.weight, layer.base.bias, list(layer.lora_A), doubled,
                                                layer.scalings)
    assert torch.allclose(layer(x), want, atol=1e-5, rtol=1e-5)
