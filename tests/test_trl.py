"""molf under trl's SFT, DPO, KTO, GRPO, RLOO, Reward and Distillation trainers: training, routing log, references,
exact resume."""
import json

import pytest
import torch

import molf
from helpers import rel_err, tiny_qwen2
from molf.train import builtin_tokenizer

trl = pytest.importorskip("trl", reason="trl is a dev extra (not on the GPU image)")
datasets = pytest.importorskip("datasets")


WORDS = [f"w{i}" for i in range(40)]
TEXTS = [" ".join(WORDS[(3 * i + k) % 40] for k in range(6)) for i in range(16)]


def preference_pairs(*columns):
    """8 rows of TEXTS as trl's preference datasets take them (DPO: prompt, chosen, rejected; reward: the last two)."""
    rows = {"prompt": TEXTS[:8], "chosen": TEXTS[8:], "rejected": TEXTS[7::-1]}
    return datasets.Dataset.from_dict({c: rows[c] for c in columns or rows})


def make(out, max_steps):
    from molf.integrations.trl import MoLFSFTTrainer

    tok = builtin_tokenizer(TEXTS)
    model = molf.wrap(tiny_qwen2(vocab=len(tok)), ranks=(2, 8), alphas=(8, 16), train_base=False, backend="eager")
    args = trl.SFTConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=3e-3,
                         logging_steps=1, save_steps=3, report_to=[], use_cpu=True, seed=0, data_seed=0,
                         disable_tqdm=True, max_length=16, dataloader_num_workers=0)
    ds = datasets.Dataset.from_dict({"text": TEXTS})
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


def make_dpo(out, base, max_steps):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from molf.integrations.trl import MoLFDPOTrainer

    model = molf.wrap(AutoModelForCausalLM.from_pretrained(base), ranks=(2, 8), alphas=(8, 16), train_base=True,
                      backend="eager")
    args = trl.DPOConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                         learning_rate=3e-3, logging_steps=1, save_steps=2, report_to=[], use_cpu=True, seed=0,
                         data_seed=0, disable_tqdm=True, max_length=32, dataloader_num_workers=0)
    pairs = preference_pairs()
    return MoLFDPOTrainer(model=model, args=args, train_dataset=pairs,
                          processing_class=AutoTokenizer.from_pretrained(base), lora_lr=3e-3, backend="eager")


def test_dpo_trainer_against_the_plain_reference_trains_and_resumes_bitwise(tmp_path):
    tok = builtin_tokenizer(TEXTS)
    tiny_qwen2(vocab=len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    full = make_dpo(tmp_path / "full", tmp_path / "base", 4)
    # trl's reference is the plain model loaded from the policy's path: equal to the policy before step 1 (under
    # the bf16 autocast DPOConfig turns on by default, which accelerate wraps the reference's forward in)
    assert not any(isinstance(m, molf.MoLFLinear) for m in full.ref_model.modules())
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad(), full.accelerator.autocast():
        assert torch.equal(full.ref_model(ids).logits, full.model(ids).logits)
    full.train()
    assert full.molf_optimizer.molf_step == 4
    losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert abs(losses[0] - 0.6931) < 1e-3 and losses[-1] < losses[0] - 0.05, losses  # log 2 while policy == ref
    steps = [json.loads(x)["step"] for x in (tmp_path / "full" / "molf_routing.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    part = make_dpo(tmp_path / "part", tmp_path / "base", 4)
    part.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert torch.equal(part.molf_optimizer.routing, full.molf_optimizer.routing)
    for (n, p), q in zip(full.model.named_parameters(), part.model.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("remedy", [None, "deepcopy", "precompute"])
def test_dpo_policy_built_in_memory_needs_a_reference(tmp_path, remedy):
    import copy

    from molf.integrations.trl import MoLFDPOTrainer

    tok = builtin_tokenizer(TEXTS)
    model = molf.wrap(tiny_qwen2(vocab=len(tok)), ranks=(2, 8), alphas=(8, 16), backend="eager")
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, max_length=32, save_strategy="no", disable_tqdm=True,
                         precompute_ref_log_probs=remedy == "precompute")
    pairs = preference_pairs()
    ref = copy.deepcopy(model) if remedy == "deepcopy" else None
    if remedy is None:
        with pytest.raises(ValueError, match=r"ref_model: the policy was built in memory .*copy.deepcopy"):
            MoLFDPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok)
        return
    trainer = MoLFDPOTrainer(model, ref, args, train_dataset=pairs, processing_class=tok, backend="eager")
    trainer.train()
    assert trainer.molf_optimizer.molf_step == 2


def make_grpo(out, model, **kw):
    from molf.integrations.trl import MoLFGRPOTrainer

    args = trl.GRPOConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=6, learning_rate=1e-2, report_to=[], use_cpu=True, save_steps=3,
                          logging_steps=1, disable_tqdm=True, seed=0, **kw)
    prompts = datasets.Dataset.from_dict({"prompt": TEXTS[:8]})
    return MoLFGRPOTrainer(model, lambda completions, **_: [float(len(c)) for c in completions], args,
                           train_dataset=prompts, processing_class=builtin_tokenizer(TEXTS), lora_lr=1e-2,
                           backend="eager")


def test_grpo_trainer_generates_with_the_wrapped_policy_and_steps_with_molf(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = builtin_tokenizer(TEXTS)
    tiny_qwen2(vocab=len(tok)).save_pretrained(tmp_path / "base")
    model = molf.wrap(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), ranks=(2, 8), alphas=(8, 16),
                      backend="eager")
    before = [p.detach().clone() for p in model.parameters()]
    trainer = make_grpo(tmp_path / "run", model, beta=0.04)
    assert not any(isinstance(m, molf.MoLFLinear) for m in trainer.ref_model.modules())  # the plain model
    trainer.train()
    assert trainer.molf_optimizer.molf_step == 3
    assert any(not torch.equal(p, q) for p, q in zip(before, model.parameters()))
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "molf_routing.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert [h["reward"] for h in trainer.state.log_history if "reward" in h]  # rewards of generated completions
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-3")
    assert not any(isinstance(m, molf.MoLFLinear) for m in plain.modules())


def test_grpo_refuses_what_would_not_see_the_wrapped_policy(tmp_path):
    model = molf.wrap(tiny_qwen2(vocab=len(builtin_tokenizer(TEXTS))), ranks=(2,), alphas=(8,), backend="eager")
    with pytest.raises(ValueError, match=r"beta=0.04: trl loads GRPO's reference model .* built in memory"):
        make_grpo(tmp_path, model, beta=0.04)
    with pytest.raises(ValueError, match=r"use_vllm=True: trl syncs the policy into vLLM by parameter name"):
        make_grpo(tmp_path, model, use_vllm=True)
    make_grpo(tmp_path, model).train()  # beta=0 (trl's default) needs no reference: a model built in memory trains


def test_distillation_trainer_trains_the_wrapped_student_from_a_teacher(tmp_path):
    """On-policy distillation (trl.DistillationTrainer): the wrapped student generates, the teacher (a plain model)
    scores its tokens, MoLFAdamW steps; vLLM refused as for GRPO."""
    from transformers import AutoModelForCausalLM

    from molf.integrations.trl import MoLFDistillationTrainer
    tok = builtin_tokenizer(TEXTS)
    student = molf.wrap(tiny_qwen2(vocab=len(tok)), ranks=(2, 8), alphas=(8, 16), backend="eager")
    before = [p.detach().clone() for p in student.parameters()]

    def make_distill(out, **kw):
        args = trl.DistillationConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4,
                                      max_completion_length=6, learning_rate=1e-2, report_to=[], use_cpu=True,
                                      save_steps=3, logging_steps=1, disable_tqdm=True, seed=0, **kw)
        return MoLFDistillationTrainer(student, tiny_qwen2(seed=5, vocab=len(tok)), args,
                                       train_dataset=datasets.Dataset.from_dict({"prompt": TEXTS[:8]}),
                                       processing_class=tok, lora_lr=1e-2, backend="eager")
    with pytest.raises(ValueError, match=r"use_vllm=True: trl syncs the policy into vLLM by parameter name"):
        make_distill(tmp_path / "v", use_vllm=True)
    trainer = make_distill(tmp_path / "run")
    trainer.train()
    assert trainer.molf_optimizer.molf_step == 3
    assert any(not torch.equal(p, q) for p, q in zip(before, student.parameters()))
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "molf_routing.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-3")
    assert not any(isinstance(m, molf.MoLFLinear) for m in plain.modules())


def molf_e(model, seed=0):
    """MoLF-E with freeze_others=True (only the LoRA experts train), its A drawn from `seed`."""
    torch.manual_seed(seed)
    return molf.wrap(model, ranks=(2, 8), alphas=(8, 16), train_base=False, freeze_others=True, backend="eager")


def test_molf_e_dpo_reference_is_the_policy_with_its_experts_off(tmp_path):
    """Only fresh experts train, so DPO's reference is the policy with its experts off: no second model, and
    training equals training against a deep copy, bitwise, also resumed from a checkpoint. Anything else that
    trains, or experts that already moved, and trl needs a reference of its own as before (here: a model built in
    memory has none)."""
    import copy

    from molf.integrations.trl import ExpertsOffReference, MoLFDPOTrainer

    tok = builtin_tokenizer(TEXTS)
    plain = tiny_qwen2(vocab=len(tok))

    def dpo(out, policy, ref=None):
        args = trl.DPOConfig(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                             max_length=32, save_steps=2)
        return MoLFDPOTrainer(policy, ref, args, train_dataset=preference_pairs(), processing_class=tok, lora_lr=3e-3,
                              backend="eager")

    off = dpo(tmp_path / "off", molf_e(copy.deepcopy(plain)))
    assert isinstance(off.ref_model, ExpertsOffReference) and not list(off.ref_model.parameters())
    off.train()
    losses = [h["loss"] for h in off.state.log_history if "loss" in h]
    assert abs(losses[0] - 0.6931) < 1e-3 and losses[-1] < losses[0] - 0.02, losses
    policy = molf_e(copy.deepcopy(plain))
    copied = dpo(tmp_path / "copy", policy, copy.deepcopy(policy))
    copied.train()
    resumed = dpo(tmp_path / "resumed", molf_e(copy.deepcopy(plain), seed=1))
    resumed.train(resume_from_checkpoint=str(tmp_path / "off" / "checkpoint-2"))
    for other in (copied, resumed):
        for (n, p), q in zip(off.model.named_parameters(), other.model.parameters()):
            assert torch.equal(p, q), n
    # the reference is the plain model in eval mode (as trl's runs) while the policy has moved and trains with
    # attention dropout; the policy's modes are as they were after it
    policy = off.model.train()
    for layer in policy.model.layers:
        layer.self_attn.attention_dropout = 0.3
    policy.model.layers[0].eval()
    modes = [m.training for m in policy.modules()]
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad(), off.accelerator.autocast():
        assert torch.equal(off.ref_model(ids).logits, plain(ids).logits)
        assert not torch.equal(policy(ids).logits, plain(ids).logits)
    assert [m.training for m in policy.modules()] == modes
    norms_train = molf.wrap(copy.deepcopy(plain), ranks=(2, 8), alphas=(8, 16), train_base=False, backend="eager")
    for policy in (norms_train, off.model):  # the trained policy's experts are no longer zero
        with pytest.raises(ValueError, match="ref_model: the policy was built in memory"):
            dpo(tmp_path / "no", policy)
    # the README's next stage without a copy: merge the trained policy, wrap it again (fresh experts)
    stage2 = molf_e(molf.merge(off.model.eval()))
    with torch.no_grad():  # both under the bf16 autocast accelerate put on the trained policy's forward
        merged = stage2(ids).logits
        assert torch.equal(dpo(tmp_path / "stage2", stage2).ref_model(ids).logits, merged)


def test_molf_e_grpo_kl_reference_is_the_policy_with_its_experts_off(tmp_path, monkeypatch):
    """GRPO (beta > 0) on a policy whose only trainable parameters are fresh experts: the KL reference is the
    policy with its experts off, also for a model built in memory, and training equals training against trl's
    plain reference loaded from the path, bitwise."""
    from transformers import AutoModelForCausalLM

    import molf.integrations.trl as molf_trl

    tok = builtin_tokenizer(TEXTS)
    in_memory = make_grpo(tmp_path / "mem", molf_e(tiny_qwen2(vocab=len(tok))), beta=0.04)
    assert isinstance(in_memory.ref_model, molf_trl.ExpertsOffReference)
    with monkeypatch.context() as patch:  # a trl whose GRPO trainer loads otherwise: its own reference, checked
        patch.delattr(molf_trl.grpo_trainer, "create_model_from_path")
        with pytest.raises(ValueError, match="beta=0.04: trl loads GRPO's reference model"):
            make_grpo(tmp_path / "mem", molf_e(tiny_qwen2(vocab=len(tok))), beta=0.04)
    tiny_qwen2(vocab=len(tok)).save_pretrained(tmp_path / "base")
    runs = []
    for experts_off in (True, False):
        if not experts_off:
            monkeypatch.setattr(molf_trl, "_only_fresh_experts_train", lambda model: False)
        policy = molf_e(AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
        trainer = make_grpo(tmp_path / str(experts_off), policy, beta=0.04, save_strategy="no")
        assert isinstance(trainer.ref_model, molf_trl.ExpertsOffReference) == experts_off
        torch.manual_seed(0)  # generation samples
        trainer.train()
        runs.append((trainer.model, [h["kl"] for h in trainer.state.log_history if "kl" in h]))
    (off, kl), (loaded, kl_loaded) = runs
    assert kl == kl_loaded and kl[0] == 0.0 < kl[-1], (kl, kl_loaded)
    for (n, p), q in zip(off.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), n


def test_kto_reference_as_dpo_s(tmp_path):
    """KTO takes DPO's reference handling: the policy with its experts off when only fresh experts train (equal,
    bitwise, to training against a deep copy), else trl's plain model loaded from the path."""
    import copy

    from transformers import AutoModelForCausalLM

    from molf.integrations.trl import ExpertsOffReference, MoLFKTOTrainer

    tok = builtin_tokenizer(TEXTS)
    labelled = datasets.Dataset.from_dict({"prompt": TEXTS[:8], "completion": TEXTS[8:], "label": [True, False] * 4})

    def kto(out, policy, ref=None):
        args = trl.KTOConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=3e-3,
                             report_to=[], use_cpu=True, max_length=32, logging_steps=1, disable_tqdm=True, seed=0,
                             save_strategy="no")
        return MoLFKTOTrainer(policy, ref, args, train_dataset=labelled, processing_class=tok, lora_lr=3e-3,
                              backend="eager")

    plain = tiny_qwen2(vocab=len(tok))
    off = kto(tmp_path / "off", molf_e(copy.deepcopy(plain)))
    assert isinstance(off.ref_model, ExpertsOffReference)
    off.train()
    losses = [h["loss"] for h in off.state.log_history if "loss" in h]
    assert abs(losses[0] - 0.5) < 1e-4 and losses[-1] < losses[0], losses  # KTO's 1 - sigmoid(0) while policy == ref
    steps = [json.loads(x)["step"] for x in (tmp_path / "off" / "molf_routing.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    policy = molf_e(copy.deepcopy(plain))
    copied = kto(tmp_path / "copy", policy, copy.deepcopy(policy))
    copied.train()
    for (n, p), q in zip(off.model.named_parameters(), copied.model.parameters()):
        assert torch.equal(p, q), n
    plain.save_pretrained(tmp_path / "base")
    full = molf.wrap(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), ranks=(2, 8), alphas=(8, 16),
                     backend="eager")
    trainer = kto(tmp_path / "molf", full)
    assert not any(isinstance(m, molf.MoLFLinear) for m in trainer.ref_model.modules())  # the plain model
    trainer.train()
    assert trainer.molf_optimizer.molf_step == 3


def test_rloo_kl_reference_and_generation_as_grpo_s(tmp_path):
    """RLOO (beta 0.05 by default: a KL reference unless set to 0): the policy with its experts off when only
    fresh experts train, also built in memory; otherwise a model built in memory is refused, as is vLLM."""
    from molf.integrations.trl import ExpertsOffReference, MoLFRLOOTrainer

    tok = builtin_tokenizer(TEXTS)
    prompts = datasets.Dataset.from_dict({"prompt": TEXTS[:8]})

    def rloo(policy, **kw):
        args = trl.RLOOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, num_generations=4,
                              max_completion_length=6, learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
                              save_strategy="no", disable_tqdm=True, seed=0, **kw)
        return MoLFRLOOTrainer(policy, lambda completions, **_: [float(len(c)) for c in completions], args,
                               train_dataset=prompts, processing_class=tok, lora_lr=1e-2, backend="eager")

    trainer = rloo(molf_e(tiny_qwen2(vocab=len(tok))))
    assert isinstance(trainer.ref_model, ExpertsOffReference)
    trainer.train()
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert trainer.molf_optimizer.molf_step == 3 and kl[0] == 0.0 and kl[-1] != 0.0, kl
    steps = [json.loads(x)["step"] for x in (tmp_path / "molf_routing.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    full = molf.wrap(tiny_qwen2(vocab=len(tok)), ranks=(2,), alphas=(8,), backend="eager")
    with pytest.raises(ValueError, match=r"beta=0.05: trl loads RLOO's reference model .* built in memory"):
        rloo(full)
    with pytest.raises(ValueError, match=r"use_vllm=True: .* RLOOConfig\(use_vllm=False\)"):
        rloo(full, use_vllm=True)
    rloo(full, beta=0.0)  # no reference needed


def test_deepspeed_and_fsdp1_are_refused_with_trl_args_in_their_place(tmp_path):
    """trl's trainers take their config third (DPO: model, ref_model, args; GRPO: model, reward_funcs, args): the
    DeepSpeed and FSDP1 refusals find it there too, and come first."""
    from molf.integrations.trl import MoLFDPOTrainer, MoLFGRPOTrainer

    tok = builtin_tokenizer(TEXTS)
    model = molf_e(tiny_qwen2(vocab=len(tok)))
    dpo_args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    grpo_args = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                               per_device_train_batch_size=4, num_generations=4)
    for args in (dpo_args, grpo_args):
        args.deepspeed = "ds_config.json"
        with pytest.raises(ValueError, match="DeepSpeed: "):
            if args is dpo_args:
                MoLFDPOTrainer(model, None, args, train_dataset=preference_pairs(), processing_class=tok)
            else:
                MoLFGRPOTrainer(model, lambda completions, **_: [0.0] * len(completions), args,
                                train_dataset=preference_pairs("prompt"), processing_class=tok)
        args.deepspeed, args.fsdp, args.fsdp_config = None, "full_shard", {"version": 1}
        with pytest.raises(ValueError, match="FSDP1: "):  # before the in-memory policy's missing reference
            MoLFDPOTrainer(model, None, args, train_dataset=preference_pairs(), processing_class=tok)


def test_a_policy_trained_since_loading_warns_that_the_reference_is_the_older_model(tmp_path, recwarn):
    """SFT then DPO in one script: the wrapped policy trained in memory, and trl would load the reference from
    the plain model it was loaded from. It warns; the remedies (ref_model, or a molf checkpoint to build from)
    give a reference equal to the policy and no warning."""
    import copy

    from helpers import randomize_lora_B
    from molf.integrations.trl import MoLFDPOTrainer

    tok = builtin_tokenizer(TEXTS)
    tiny_qwen2(vocab=len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    sft = make_dpo(tmp_path / "a", tmp_path / "base", 1).model  # wrapped from the plain model at "base"
    randomize_lora_B(sft)  # as an SFT run in the same script leaves it
    args = trl.DPOConfig(output_dir=str(tmp_path / "b"), max_steps=1, report_to=[], use_cpu=True, max_length=32,
                         disable_tqdm=True)
    pairs = preference_pairs()
    with pytest.warns(UserWarning, match=r"MoLFDPOTrainer without ref_model: trl loads the reference model from .*"
                                         r"this policy has trained since it was loaded"):
        MoLFDPOTrainer(sft, None, args, train_dataset=pairs, processing_class=tok, backend="eager")
    with pytest.warns(UserWarning, match=r"MoLFGRPOTrainer with beta=0.04: .* has trained since"):
        make_grpo(tmp_path / "c", sft, beta=0.04)
    recwarn.clear()
    MoLFDPOTrainer(sft, copy.deepcopy(sft), args, train_dataset=pairs, processing_class=tok, backend="eager")
    molf.save_pretrained(sft, tmp_path / "sft")
    again = molf.from_pretrained(tmp_path / "sft", backend="eager")
    trainer = MoLFDPOTrainer(again, None, args, train_dataset=pairs, processing_class=tok, backend="eager")
    assert not [w for w in recwarn if "has trained since" in str(w.message)]
    merged, ref = molf.merge(copy.deepcopy(again)).state_dict(), trainer.ref_model.state_dict()
    assert set(merged) == set(ref)
    for k in merged:  # the reference is the policy as it is (merged)
        assert rel_err(ref[k], merged[k]) <= 1e-6, k


def test_reward_trainer_trains_a_wrapped_classifier_and_its_head(tmp_path):
    import transformers as tf

    from molf.integrations.trl import MoLFRewardTrainer

    tok = builtin_tokenizer(TEXTS)
    classifier = tiny_qwen2(vocab=len(tok), task="SequenceClassification", num_labels=1, pad_token_id=tok.pad_token_id)
    model = molf.wrap(classifier, ranks=(2, 8), alphas=(8, 16), train_base=False,
                      freeze_others=True, backend="eager")
    head = model.score.weight.detach().clone()
    args = trl.RewardConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                            report_to=[], use_cpu=True, logging_steps=1, save_steps=4, disable_tqdm=True, seed=0)
    pairs = preference_pairs("chosen", "rejected")
    trainer = MoLFRewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok, backend="eager")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.molf_optimizer.molf_step == 4 and losses[-1] < losses[0]
    assert not torch.equal(model.score.weight, head)
    steps = [json.loads(x)["step"] for x in (tmp_path / "molf_routing.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert type(molf.from_pretrained(tmp_path / "checkpoint-4", backend="eager")) is tf.Qwen2ForSequenceClassification
