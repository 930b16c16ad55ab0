"""A whole training step (forward, backward, optimizer) of a Qwen2-architecture model built from a config:
molf (fused layer + fused optimizer) vs eager (molf's eager backends) vs reference (eager layers + the
authors'-structure optimizer). On the GPU: Qwen2.5-0.5B's dimensions in bf16, 4 x 512 tokens; on the CPU a
small config (a smoke run of the harness)."""
import functools
import statistics

import pytest
import torch

import molf
from conftest import CUDA, DEVICE, GPU_ONLY, KERNELS, ROWS, SMOKE

if CUDA:
    DIMS = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936)
    NAME, DTYPE, BATCH, SEQ = "Qwen2.5-0.5B (config)", torch.bfloat16, 4, 512
else:
    DIMS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=512)
    NAME, DTYPE, BATCH, SEQ = "Qwen2 tiny (config)", torch.float32, 4, 64
    if SMOKE:  # the kernels under the interpreter: fewer tokens and layers
        DIMS, BATCH, SEQ = dict(DIMS, num_hidden_layers=1), 2, 16
SETS = {"molf": dict(ranks=(128,), alphas=(32,), train_base=True),
        "molf-e": dict(ranks=(16, 128), alphas=(32, 32), train_base=False),
        "molf-dropout0.05": dict(ranks=(128,), alphas=(32,), train_base=True, dropout=0.05)}  # peak memory vs "molf"


def qwen2(setting, backend):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(max_position_embeddings=2 * SEQ, tie_word_embeddings=True, use_cache=False, **DIMS)
    model = Qwen2ForCausalLM(cfg).to(device=DEVICE, dtype=DTYPE)
    molf.wrap(model, backend=backend, freeze_others=setting == "molf-e", **SETS[setting])
    return model, cfg


def reference_forward(layer, x):
    """peft-style: dropout on the LoRA input from torch's RNG (torch.nn.Dropout's Bernoulli mask)."""
    p = layer.dropout if layer.training else 0.0
    mask = torch.empty_like(x).bernoulli_(1.0 - p) if p else None
    return molf.reference.molf_linear_reference(x, layer.base.weight, layer.base.bias, list(layer.lora_A),
                                                list(layer.lora_B), layer.scalings, mask, p)


def model_and_optimizer(setting, impl):
    """The model of `setting` and its optimizer for impl "molf" (fused), "eager" or "reference" (peft-style
    layers and the authors'-structure optimizer, end to end)."""
    backend = "triton" if impl == "molf" else "eager"
    model, cfg = qwen2(setting, backend)
    kw = dict(lr=5e-5, lora_lr=5e-5, weight_decay=0.1, lora_weight_decay=0.01)
    if impl == "reference":
        for m in model.modules():
            if isinstance(m, molf.MoLFLinear):
                m.forward = functools.partial(reference_forward, m)
        return model, cfg, molf.reference.MoLFAdamWReference(model, **kw)
    return model, cfg, molf.MoLFAdamW(model, backend=backend, **kw)


@pytest.mark.parametrize("impl", ["molf", "eager", "reference"])
@pytest.mark.parametrize("setting", list(SETS))
def test_train_step(measure, setting, impl):
    if impl == "molf" and not KERNELS:
        pytest.skip(GPU_ONLY)
    model, cfg, opt = model_and_optimizer(setting, impl)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), device=DEVICE)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    measure(step, bench="train_step", model=f"{NAME} ({setting})", module="all", M=BATCH * SEQ,
            K=cfg.hidden_size, N=cfg.intermediate_size, ranks=list(SETS[setting]["ranks"]),
            dtype=str(DTYPE).removeprefix("torch."), impl=impl)


LOOP_STEPS, LOOP_WARMUP = (60, 10) if CUDA else (8, 2)


@pytest.mark.parametrize("lengths", ["fixed", "variable"])
def test_train_loop_dynamic_padding(lengths):
    """A training loop as a Trainer with dynamic padding runs it: every step a batch of BATCH sequences whose
    lengths are drawn uniformly from [SEQ/2, 3 SEQ/2), padded to the longest (a new M almost every step),
    against the same loop with every batch at the variable loop's mean padded length. Median step time after LOOP_WARMUP steps; the
    autotuner's buckets of M are what keeps the variable loop from tuning again every step."""
    backend = "auto" if CUDA else "eager"
    model, cfg = qwen2("molf", backend)
    opt = molf.MoLFAdamW(model, backend=backend, lr=5e-5, lora_lr=5e-5, weight_decay=0.1, lora_weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    schedule = [torch.randint(SEQ // 2, SEQ + SEQ // 2, (BATCH,), generator=gen).tolist() for _ in range(LOOP_STEPS)]
    if lengths == "fixed":  # every batch at the variable loop's mean padded length
        schedule = [[round(statistics.mean(max(lens) for lens in schedule))] * BATCH] * LOOP_STEPS
    times, tokens = [], []
    for step, lens in enumerate(schedule):
        longest = max(lens)
        ids = torch.randint(0, cfg.vocab_size, (BATCH, longest), generator=gen).to(DEVICE)
        mask = (torch.arange(longest)[None, :] < torch.tensor(lens)[:, None]).to(DEVICE)
        labels = ids.masked_fill(~mask, -100)
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            import time
            t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if CUDA:
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = 1e3 * (time.perf_counter() - t0)
        if step >= LOOP_WARMUP:
            times.append(ms)
            tokens.append(BATCH * longest)
    ROWS.append(dict(bench=f"train_loop_{lengths}", model=f"{NAME} (molf)", module="all",
                     M=round(statistics.mean(tokens)), K=cfg.hidden_size, N=cfg.intermediate_size, ranks=[128],
                     dtype=str(DTYPE).removeprefix("torch."), impl="molf" if CUDA else "molf_eager",
                     steps=len(times), median_ms=float(statistics.median(times))))
