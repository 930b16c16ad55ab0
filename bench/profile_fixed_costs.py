"""Where the fixed per-call costs go (the first H100 rows: ~300 us more per fused forward on small layers,
~3.5 ms per MoLF-E optimizer step beyond its bytes). Run on a GPU:

    python bench/profile_fixed_costs.py [--rows 25]

For each case: the wall time of N calls (host-bound if it exceeds the GPU time), the CPU time of the host side
and the GPU time of the kernels from torch.profiler, and the top ops by CPU time; for the fused k_proj layer also
its Python functions by own time (cProfile: molf's wrapper against Triton's launcher) and a run without TMA
descriptors (MOLF_TMA=0). On the CPU it runs a smoke
version (interpreter, tiny shapes) so that the script itself stays tested by hand without a GPU.
"""
import argparse
import os
import sys
import time

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import molf  # noqa: E402
from shapes import MODELS, decoder_stack  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32


def layer_case(module: str, ranks, backend: str, M: int):
    n, k = MODELS["Qwen2.5-1.5B"][0][module] if CUDA else (160, 144)
    lin = torch.nn.Linear(k, n, bias=module in ("q_proj", "k_proj"), device=DEVICE, dtype=DTYPE)
    layer = molf.MoLFLinear(lin, ranks=ranks, alphas=(32,) * len(ranks), backend=backend)
    x = torch.randn(M, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    g = torch.randn(M, n, device=DEVICE, dtype=DTYPE)
    return lambda: layer(x).backward(g)


def optim_case(setting: str):
    kw = {"molf": dict(ranks=(128,), alphas=(32,), train_base=True),
          "molf-e": dict(ranks=(16, 128), alphas=(32, 32), train_base=False)}[setting]
    model = molf.wrap(decoder_stack("Qwen2.5-1.5B", 28 if CUDA else 1, DEVICE, DTYPE), **kw)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    opt = molf.MoLFAdamW(model, lr=5e-5, lora_lr=5e-5, backend="triton" if CUDA else "eager")
    return opt.step


def sync():
    if CUDA:
        torch.cuda.synchronize()


def report(name: str, fn, calls: int, rows: int):
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e3  # time to issue one call (launches are asynchronous)
    sync()
    wall = (time.perf_counter() - t0) / calls * 1e3
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync()
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"\n== {name}: wall {wall:.3f} ms/call, host issue {host:.3f} ms/call, "
          f"GPU kernels {gpu / calls / 1e3:.3f} ms/call")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def python_profile(name: str, fn, calls: int, rows: int):
    """The host side by Python function (cProfile): molf's wrapper against Triton's launcher (JITFunction.run,
    the Autotuner, TMA descriptors), which torch.profiler shows only as one block of CPU time."""
    import cProfile
    import pstats
    fn()
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    sync()
    print(f"\n== {name}: Python functions by own time, {calls} calls")
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--calls", type=int, default=20)
    a = ap.parse_args()
    M = 8192 if CUDA else 64
    for module in ("k_proj", "gate_proj"):
        for backend in ("triton", "eager"):
            report(f"layer fwd+bwd {module} r(16,128) M={M} backend={backend}",
                   layer_case(module, (16, 128), backend, M), a.calls, a.rows)
    case = layer_case("k_proj", (16, 128), "triton", M)
    python_profile(f"layer fwd+bwd k_proj r(16,128) M={M} backend=triton", case, a.calls, a.rows)
    before = os.environ.get("MOLF_TMA")
    os.environ["MOLF_TMA"] = "0"  # read at each call: the pointer kernels, without descriptors
    report(f"layer fwd+bwd k_proj r(16,128) M={M} backend=triton MOLF_TMA=0", case, a.calls, a.rows)
    if before is None:
        del os.environ["MOLF_TMA"]
    else:
        os.environ["MOLF_TMA"] = before
    for setting in ("molf-e", "molf"):
        report(f"optimizer step {setting}", optim_case(setting), a.calls, a.rows)


if __name__ == "__main__":
    main()
