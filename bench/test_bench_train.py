"""A whole training step (forward, backward, optimizer) of a Qwen2-architecture model built from a config:
molf (fused layer + fused optimizer) vs eager (molf's eager backends) vs reference (eager layers + the
authors'-structure optimizer). On the GPU: Qwen2.5-0.5B's dimensions in bf16, 4 x 512 tokens; on the CPU a
small config (a smoke run of the harness)."""
import functools

import pytest
import torch

import molf
from conftest import CUDA, DEVICE, GPU_ONLY

if CUDA:
    DIMS = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936)
    NAME, DTYPE, BATCH, SEQ = "Qwen2.5-0.5B (config)", torch.bfloat16, 4, 512
else:
    DIMS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=512)
    NAME, DTYPE, BATCH, SEQ = "Qwen2 tiny (config)", torch.float32, 4, 64
SETS = {"molf": dict(ranks=(128,), alphas=(32,), train_base=True),
        "molf-e": dict(ranks=(16, 128), alphas=(32, 32), train_base=False)}


def reference_forward(layer, x):
    return molf.reference.molf_linear_reference(x, layer.base.weight, layer.base.bias, list(layer.lora_A),
                                                list(layer.lora_B), layer.scalings)


@pytest.mark.parametrize("impl", ["molf", "eager", "reference"])
@pytest.mark.parametrize("setting", list(SETS))
def test_train_step(measure, setting, impl):
    if impl == "molf" and not CUDA:
        pytest.skip(GPU_ONLY)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(max_position_embeddings=SEQ, tie_word_embeddings=True, use_cache=False, **DIMS)
    model = Qwen2ForCausalLM(cfg).to(device=DEVICE, dtype=DTYPE)
    backend = "triton" if impl == "molf" else "eager"
    molf.wrap(model, backend=backend, freeze_others=setting == "molf-e", **SETS[setting])
    kw = dict(lr=5e-5, lora_lr=5e-5, weight_decay=0.1, lora_weight_decay=0.01)
    if impl == "reference":  # the reference end to end: peft-style layers and the authors'-structure optimizer
        for m in model.modules():
            if isinstance(m, molf.MoLFLinear):
                m.forward = functools.partial(reference_forward, m)
        opt = molf.reference.MoLFAdamWReference(model, **kw)
    else:
        opt = molf.MoLFAdamW(model, backend=backend, **kw)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), device=DEVICE)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    measure(step, bench="train_step", model=f"{NAME} ({setting})", module="all", M=BATCH * SEQ,
            K=cfg.hidden_size, N=cfg.intermediate_size, ranks=list(SETS[setting]["ranks"]),
            dtype=str(DTYPE).removeprefix("torch."), impl=impl)
