"""The README's first example runs as written (its `...` replaced by a tiny model, `data` by two batches): the
names and arguments it shows are the public API."""
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import molf
from helpers import Rows, batch, tiny_qwen2

pytest.importorskip("transformers")

README = Path(__file__).resolve().parent.parent / "README.md"


def first_python_block(section: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {section}")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_use_example_trains_saves_and_reloads(tmp_path, monkeypatch):
    code = first_python_block("Use")
    saved, save = [], molf.save_pretrained
    monkeypatch.setattr(molf, "save_pretrained", lambda model, *a, **k: saved.append(model) or save(model, *a, **k))
    assert "molf.MoLFAdamW(model" in code and "molf.from_pretrained(out)" in code
    ids = [batch(seed=s) for s in (1, 2)]
    scope = {"AutoModelForCausalLM": SimpleNamespace(from_pretrained=lambda *_: tiny_qwen2().train()),
             "data": [dict(input_ids=x, labels=x) for x in ids], "out": str(tmp_path / "out")}
    exec(compile(code, str(README), "exec"), scope)
    opt, (trained,), reloaded = scope["opt"], saved, scope["model"]
    assert opt.molf_step == 2 and opt.routing.shape == (14, 2) and opt.expert_names == ["full", "lora_r128"]
    assert sum(isinstance(m, molf.MoLFLinear) for m in reloaded.modules()) == 14 and reloaded is not trained
    for (n, p), q in zip(trained.named_parameters(), reloaded.parameters()):  # reloaded = saved, bitwise
        assert torch.equal(p, q), n
    fresh = dict(tiny_qwen2().named_parameters())  # every layer moved: its base (full won) or a B (lora won)
    for name, m in molf.layer.molf_layers(trained):
        assert not torch.equal(m.base.weight, fresh[f"{name}.weight"]) or m.lora_B[0].any(), name


def test_the_trainer_example_trains_and_logs_the_routing(tmp_path):
    from transformers import TrainingArguments

    code = first_python_block("With the Hugging Face Trainer")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    scope = {"model": tiny_qwen2(), "training_args": args, "ds": Rows(), "molf": molf}
    exec(compile(code, str(README), "exec"), scope)
    opt = scope["trainer"].molf_optimizer
    lora = next(g for g in opt.param_groups if g["kind"] == "lora")
    assert opt.molf_step == 2 and opt.expert_names == ["full", "lora_r128"]
    assert lora["initial_lr"] == 5e-5 and lora["weight_decay"] == 0.01  # the example's lora_lr, lora_weight_decay
    assert len((tmp_path / "run" / "molf_routing.jsonl").read_text().splitlines()) == 2
