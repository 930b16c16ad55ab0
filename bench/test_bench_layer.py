"""The MoLF layer: molf (backend "auto": per shape the faster of the fused kernels and the chain, measured
once) vs molf_fused (the Triton kernels, pinned) vs molf_eager (molf's torch-op backend) vs eager
(peft-style, one product per expert: the reference) vs cublas_chain (unsloth-style) vs base. Dropout rows
(p = 0.05 beside p = 0, with the peak memory of forward + backward) in test_layer_dropout."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import molf
from conftest import CUDA, DEVICE, GPU_ONLY, KERNELS, SMOKE
from molf.reference import molf_linear_reference
from shapes import MODELS

if KERNELS:
    CASES = [(m, mod, M) for m in MODELS for mod in ("q_proj", "k_proj", "gate_proj", "down_proj")
             for M in ((64,) if SMOKE else (4096, 8192))]
    DTYPE = torch.bfloat16 if CUDA else torch.float32  # bf16 tl.dot is wrong in the interpreter
else:  # the CPU run is a smoke run of the harness at reduced size
    CASES = [("Qwen2.5-1.5B", mod, 128) for mod in ("q_proj", "k_proj")]
    DTYPE = torch.float32
RANKS = [(16,), (128,), (16, 128)]
MODES = ["layer_fwd", "layer_fwd_bwd_frozen", "layer_fwd_bwd_full"]
IMPLS = ["molf", "molf_fused", "molf_eager", "eager", "cublas_chain", "base"]
BACKEND = {"molf": "auto", "molf_fused": "triton"}


def cublas_chain(x, w, b, As, Bs, scalings):
    """unsloth-style: one matmul for the base, then addmm of the (concatenated) low-rank term."""
    x2 = x.reshape(-1, x.shape[-1])
    y = F.linear(x2, w, b)
    if len(As) == 1:
        a, bb = As[0], Bs[0] * scalings[0]
    else:
        a, bb = torch.cat(list(As)), torch.cat([B * s for B, s in zip(Bs, scalings)], dim=1)
    return torch.addmm(y, x2 @ a.t(), bb.t()).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ranks", RANKS, ids=lambda r: "r" + "-".join(map(str, r)))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-M{c[2]}")
def test_layer(measure, case, ranks, mode, impl):
    if impl in BACKEND and not KERNELS:
        pytest.skip(GPU_ONLY)
    if mode == "layer_fwd_bwd_frozen" and impl == "base":
        pytest.skip("base alone has nothing to train when frozen")
    model, module, M = case
    n, k = MODELS[model][0][module]
    train_base = mode == "layer_fwd_bwd_full"
    lin = nn.Linear(k, n, bias=module in ("q_proj", "k_proj"), device=DEVICE, dtype=DTYPE)
    layer = molf.MoLFLinear(lin, ranks=ranks, alphas=(32,) * len(ranks), train_base=train_base,
                            backend=BACKEND.get(impl, "eager"))
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(std=0.01)
    x = torch.randn(M, k, device=DEVICE, dtype=DTYPE, requires_grad=mode != "layer_fwd")
    As, Bs = list(layer.lora_A), list(layer.lora_B)
    fwd = {
        "molf": lambda: layer(x),
        "molf_fused": lambda: layer(x),
        "molf_eager": lambda: layer(x),
        "eager": lambda: molf_linear_reference(x, lin.weight, lin.bias, As, Bs, layer.scalings),
        "cublas_chain": lambda: cublas_chain(x, lin.weight, lin.bias, As, Bs, layer.scalings),
        "base": lambda: F.linear(x, lin.weight, lin.bias),
    }[impl]
    if mode == "layer_fwd":  # inference: eval mode without gradients (molf's planner times the forward alone)
        layer.eval()

        def fn():
            with torch.no_grad():
                return fwd()
    else:
        g = torch.randn(M, n, device=DEVICE, dtype=DTYPE)

        def fn():
            fwd().backward(g)
    measure(fn, bench=mode, model=model, module=module, M=M, K=k, N=n, ranks=list(ranks),
            dtype=str(DTYPE).removeprefix("torch."), impl=impl)


@pytest.mark.parametrize("impl", ["molf_fused", "molf_eager", "eager"])
@pytest.mark.parametrize("p", [0.0, 0.05])
@pytest.mark.parametrize("case", [c for c in CASES if c[2] == CASES[-1][2]], ids=lambda c: f"{c[0]}-{c[1]}-M{c[2]}")
def test_layer_dropout(measure, case, p, impl):
    """LoRA dropout as the paper trains (p = 0.05, r = 128, frozen base): the fused kernels redraw the mask
    from a seed (nothing stored); molf_eager (molf's counter-based mask) and eager (peft-style, torch's
    Bernoulli mask) keep x * mask / (1 - p) (and the mask) for backward."""
    if impl == "molf_fused" and not KERNELS:
        pytest.skip(GPU_ONLY)
    model, module, M = case
    n, k = MODELS[model][0][module]
    lin = nn.Linear(k, n, bias=module in ("q_proj", "k_proj"), device=DEVICE, dtype=DTYPE)
    layer = molf.MoLFLinear(lin, ranks=(128,), alphas=(32,), train_base=False, dropout=p,
                            backend=BACKEND.get(impl, "eager")).train()
    x = torch.randn(M, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    g = torch.randn(M, n, device=DEVICE, dtype=DTYPE)
    As, Bs = list(layer.lora_A), list(layer.lora_B)

    def fwd():
        if impl != "eager":
            return layer(x)
        mask = torch.empty_like(x).bernoulli_(1.0 - p) if p > 0 else None  # peft-style: torch's Bernoulli
        return molf_linear_reference(x, lin.weight, lin.bias, As, Bs, layer.scalings, mask, p)
    measure(lambda: fwd().backward(g), bench=f"layer_fwd_bwd_frozen_dropout{p}", model=model, module=module, M=M,
            K=k, N=n, ranks=[128], dtype=str(DTYPE).removeprefix("torch."), impl=impl)
