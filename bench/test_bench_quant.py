"""MoLF-E on a 4-bit base: qmolf_e (bitsandbytes nf4 + double quantization base, experts r16 + r128,
backend "auto") vs molf_e (the same experts on a bf16 base) vs peft_qlora (bitsandbytes Linear4bit +
peft LoRA r = 128, the QLoRA baseline): forward + backward of one layer, time and peak memory (GPU).
On the CPU a smoke run at reduced size (bitsandbytes' CPU backend, fp32 compute, molf's eager path)."""
import pytest
import torch
from torch import nn

import molf
from conftest import CUDA, DEVICE
from shapes import MODELS

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install molf[quant])")

if CUDA:
    CASES = [(m, mod, 4096) for m in ("Qwen2.5-1.5B", "Qwen2.5-3B") for mod in ("q_proj", "gate_proj", "down_proj")]
    DTYPE = torch.bfloat16
else:
    CASES = [("Qwen2.5-1.5B", "q_proj", 64)]
    DTYPE = torch.float32


def four_bit(lin: nn.Linear) -> nn.Module:
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=DTYPE,
                          quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to(DEVICE)


@pytest.mark.parametrize("impl", ["qmolf_e", "molf_e", "peft_qlora"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-M{c[2]}")
def test_quantized_layer(measure, case, impl):
    model, module, M = case
    n, k = MODELS[model][0][module]
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=module == "q_proj", device=DEVICE, dtype=DTYPE)
    if impl == "peft_qlora":
        peft = pytest.importorskip("peft")
        holder = nn.Module()
        holder.proj = four_bit(lin)
        layer = peft.get_peft_model(holder, peft.LoraConfig(r=128, lora_alpha=32, target_modules=["proj"]))
    else:
        base = four_bit(lin) if impl == "qmolf_e" else lin
        layer = molf.MoLFLinear(base, ranks=(16, 128), alphas=(32, 32), train_base=False,
                                backend="auto" if CUDA else "eager")
    x = torch.randn(M, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    g = torch.randn(M, n, device=DEVICE, dtype=DTYPE)
    fwd = (lambda: layer.proj(x)) if impl == "peft_qlora" else (lambda: layer(x))
    measure(lambda: fwd().backward(g), bench="layer_fwd_bwd_frozen_quant", model=model, module=module, M=M, K=k,
            N=n, ranks=[128] if impl == "peft_qlora" else [16, 128], dtype=str(DTYPE).removeprefix("torch."),
            impl=impl)
