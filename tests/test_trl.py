"""molf under trl's SFTTrainer: training, routing log, exact resume."""
import json

import pytest
import torch

import molf
from helpers import tiny_qwen2

trl = pytest.importorskip("trl", reason="trl is a dev extra (not on the GPU image)")
datasets = pytest.importorskip("datasets")


def make(out, max_steps):
    from molf.integrations.trl import MoLFSFTTrainer
    from molf.train import builtin_tokenizer

    words = [f"w{i}" for i in range(40)]
    texts = [" ".join(words[(3 * i + k) % 40] for k in range(6)) for i in range(16)]
    tok = builtin_tokenizer(texts)
    model = molf.wrap(tiny_qwen2(vocab=len(tok)), ranks=(2, 8), alphas=(8, 16), train_base=False, backend="eager")
    args = trl.SFTConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=3e-3,
                         logging_steps=1, save_steps=3, report_to=[], use_cpu=True, seed=0, data_seed=0,
                         disable_tqdm=True, max_length=16, dataloader_num_workers=0)
    ds = datasets.Dataset.from_dict({"text": texts})
    return MoLFSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, lora_lr=3e-3, backend="eager")


def test_sft_trainer_trains_logs_and_resumes_bitwise(tmp_path):
    full = make(tmp_path / "full", 6)
    full.train()
    opt = full.molf_optimizer
    assert isinstance(opt, molf.MoLFAdamW) and opt.molf_step == 6
    losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    steps = [json.loads(x)["step"] for x in (tmp_path / "full" / "molf_routing.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    part = make(tmp_path / "part", 6)
    part.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert torch.equal(part.molf_optimizer.routing, opt.routing)
    for (n, p), q in zip(full.model.named_parameters(), part.model.parameters()):
        assert torch.equal(p, q), n
    from transformers import AutoModelForCausalLM
    assert not any(isinstance(m, molf.MoLFLinear)
                   for m in AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "checkpoint-6").modules())


def test_peft_config_is_a_clear_error_before_anything_is_built(tmp_path):
    peft = pytest.importorskip("peft")
    trainer = make(tmp_path / "a", 1)
    model = trainer.model
    with pytest.raises(ValueError, match="peft_config: molf's LoRA experts are set by molf.wrap"):
        type(trainer)(model=model, args=trainer.args, train_dataset=trainer.train_dataset,
                      processing_class=trainer.processing_class, peft_config=peft.LoraConfig(r=4))
    assert not any(type(m).__module__.startswith("peft.") for m in model.modules())
