"""Shared test helpers: tiny models built from a config, error measures, data files."""
import json

import torch

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against b (computed in float64)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(a, b, tol, what="", scale=None):
    """||a - b|| <= tol ||b||; with `scale`, tol ||scale|| (a bound of the rounding when b may cancel)."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values (an unwritten output?)"
    err = rel_err(a, b) if scale is None else \
        ((a.detach().double() - b.detach().double()).norm() / scale.detach().double().norm().clamp_min(1e-30)).item()
    if not err <= tol:
        diff = (a.double() - b.double()).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(f"{what}: {'relative error' if scale is None else 'error against the scale'} "
                             f"{err:.3g} > {tol:.1g}; worst at {idx}: {a[idx].item()} vs {b[idx].item()}")


def tiny_qwen2(seed=0, dtype=torch.float32, layers=2, hidden=32, inter=48, vocab=64, task="CausalLM", **config):
    """Qwen2For<task> (CausalLM, SequenceClassification, TokenClassification, QuestionAnswering), tiny; config:
    more Qwen2Config fields (num_labels, pad_token_id, ...)."""
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=True, use_cache=False, **config)
    torch.manual_seed(seed)
    model = getattr(transformers, f"Qwen2For{task}")(cfg).to(dtype)
    return model.eval()


def config_for(model_type: str, **fields):
    """AutoConfig.for_model, skipping the test where the installed transformers predates the architecture (the GPU
    machine's image may carry an older transformers than the CPU venv)."""
    import pytest
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no model type {model_type!r}")
    return transformers.AutoConfig.for_model(model_type, **fields)


def device_for(backend: str) -> torch.device:
    """Where a test runs `backend`: the Triton kernels on the GPU when there is one (CPU tensors take them only
    under the interpreter, which a GPU machine does not set), everything else on the CPU."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def batch(seed=1, n=2, t=8, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


@torch.no_grad()
def randomize_lora_B(model, std=0.05):
    """Every MoLF layer's B_i drawn from N(0, std^2) (they start at 0: the low-rank term would vanish)."""
    import molf
    for _, m in molf.layer.molf_layers(model):
        for b in m.lora_B:
            b.normal_(std=std)


class Rows(torch.utils.data.Dataset):
    """n fixed token rows as a Trainer dataset (input_ids and labels)."""

    def __init__(self, n=16, t=8, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, t), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def exit_rank_without_finalizing():
    """End a gloo rank once its results are on disk, skipping Python's finalization.

    torch 2.13's gloo can abort a rank at interpreter exit, after everything is written: a gloo worker thread
    drops the last reference to a finished collective's tensors, needs the GIL while Python finalizes, and
    std::terminate follows ("terminate called without an active exception", exit -6; about 1 run in 15-30,
    backtrace in c10d::ProcessGroupGloo::AsyncWork::~AsyncWork; seen under torchrun and under mp.spawn)."""
    import os
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def write_jsonl(path, records):
    """records as a JSONL file at `path` (a pathlib.Path); returns its path as a string."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)
