"""One optimizer step over a model's MoLF parameters: molf (fused) vs reference vs eager vs torch fused AdamW.

Parameters have the real shapes of Qwen2.5-1.5B's target linears (28 layers x 7 on the GPU; fewer on
the CPU), bf16 parameters, gradients and moments, random gradients. achieved GB/s = the bytes the step
must move (molf-algorithm.md section 4: 10 B per element plus 8 per winning element) / median time.
"""
import pytest
import torch

import molf
from conftest import CUDA, DEVICE, GPU_ONLY, KERNELS, ROWS
from shapes import MODELS, decoder_stack

MODEL = "Qwen2.5-1.5B"
N_LAYERS = MODELS[MODEL][1] if CUDA else 1
DTYPE = torch.bfloat16 if CUDA else torch.float32
SETS = {"molf": dict(ranks=(128,), alphas=(32,), train_base=True),
        "molf-e": dict(ranks=(16, 128), alphas=(32, 32), train_base=False)}
IMPLS = ["molf", "reference", "eager", "torch_adamw_fused"]


def build(setting):
    model = molf.wrap(decoder_stack(MODEL, N_LAYERS, DEVICE, DTYPE), **SETS[setting])
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    return model


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("setting", list(SETS))
def test_optim_step(measure, setting, impl):
    if impl == "molf" and not KERNELS:
        pytest.skip(GPU_ONLY)
    model = build(setting)
    kw = dict(lr=5e-5, lora_lr=5e-5, weight_decay=0.1, lora_weight_decay=0.01)
    if impl == "reference":
        opt = molf.reference.MoLFAdamWReference(model, compile_scores=CUDA, **kw)
    elif impl == "torch_adamw_fused":
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1, fused=True)
    else:
        opt = molf.MoLFAdamW(model, backend="triton" if impl == "molf" else "eager", **kw)
    opt.step()  # state allocated outside the timing
    params = [p for p in model.parameters() if p.requires_grad]
    n_elem = sum(p.numel() for p in params)
    ms = measure(opt.step, bench="optim_step", model=f"{MODEL} x{N_LAYERS} layers ({setting})", module="all",
                 M=0, K=0, N=n_elem, ranks=list(SETS[setting]["ranks"]), dtype=str(DTYPE).removeprefix("torch."),
                 impl=impl)
    if isinstance(opt, torch.optim.AdamW):
        winning = n_elem
    else:
        winning = sum(p.numel() for li, per in enumerate(opt.layout.experts) for ei, ps in enumerate(per)
                      for p in ps if opt.routing[li, ei])
    elem = torch.finfo(DTYPE).bits // 8
    moved = n_elem * 5 * elem + winning * 4 * elem  # read g, m, v, write m, v; winners read p, m, v, write p
    ROWS[-1]["bytes_moved"] = moved
    ROWS[-1]["achieved_GBps"] = moved / (ms * 1e-3) / 1e9


@pytest.mark.parametrize("impl", ["molf", "eager"])
@pytest.mark.parametrize("setting", list(SETS))
def test_optim_step_fresh_grads(measure, setting, impl):
    """As a Trainer runs it: zero_grad(set_to_none=True) gives the gradients new storage every step (two
    gradient sets alternate here, so no allocation is timed); the tables follow with O(tensors) host work."""
    if impl == "molf" and not KERNELS:
        pytest.skip(GPU_ONLY)
    model = build(setting)
    opt = molf.MoLFAdamW(model, backend="triton" if impl == "molf" else "eager", lr=5e-5, lora_lr=5e-5,
                         weight_decay=0.1, lora_weight_decay=0.01)
    opt.step()
    params = [p for p in model.parameters() if p.requires_grad]
    pools = [[p.grad for p in params], [p.grad.clone() for p in params]]
    turn = [0]

    def step():
        turn[0] ^= 1
        for p, g in zip(params, pools[turn[0]]):
            p.grad = g
        opt.step()
    measure(step, bench="optim_step", model=f"{MODEL} x{N_LAYERS} layers ({setting})", module="all",
            M=0, K=0, N=sum(p.numel() for p in params), ranks=list(SETS[setting]["ranks"]),
            dtype=str(DTYPE).removeprefix("torch."), impl=f"{impl}_fresh_grads")


@pytest.mark.skipif(not CUDA, reason="the copy bandwidth is the GPU's limit for the optimizer step")
def test_copy_bandwidth(measure):
    """The device's measured copy rate: the limit the optimizer step's achieved GB/s is compared with."""
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), bench="copy", model="-", module="-", M=0, K=0, N=src.numel(), ranks=[],
                 dtype="uint8", impl="torch_copy")
    ROWS[-1]["bytes_moved"] = 2 * src.numel()
    ROWS[-1]["achieved_GBps"] = 2 * src.numel() / (ms * 1e-3) / 1e9
