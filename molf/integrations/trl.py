"""TRL integration: `MoLFSFTTrainer`, `MoLFDPOTrainer`, `MoLFKTOTrainer`, `MoLFGRPOTrainer`, `MoLFRLOOTrainer`,
`MoLFRewardTrainer` and `MoLFDistillationTrainer`, everything `MoLFTrainer` adds on trl's trainers of those names.

    molf.wrap(model, ranks=(128,), alphas=(32,))
    from molf.integrations.trl import MoLFSFTTrainer
    trainer = MoLFSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tok, lora_lr=5e-5)

MoLFAdamW from the TrainingArguments, the routing JSONL in output_dir (truncated on resume), checkpoints that
load as plain models and resume exactly. Any other Trainer built with `optimizers=(molf.MoLFAdamW(...), None)`
gets the routing log from `molf.integrations.hf.RoutingLogCallback()` added to its callbacks.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RewardTrainer, RLOOTrainer, SFTTrainer
from trl.trainer import grpo_trainer, rloo_trainer

from .. import checkpoint
from ..layer import disable_experts
from .hf import MoLFTrainer, _env_flag, check_sharding

try:
    from trl import DistillationTrainer
except ImportError:  # an older trl, without it: no MoLFDistillationTrainer
    DistillationTrainer = None


def _reference_path(model) -> str | None:
    """Where trl loads a reference model from: the policy's config.name_or_path ("" for a model built in memory;
    None for a model name, which MoLFTrainer refuses)."""
    return None if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")


def _warn_if_trained_since_loaded(model, what: str, remedy: str) -> None:
    """trl's reference is the model at config.name_or_path. A plain model there, while the wrapped policy's
    LoRA experts are no longer zero, means the policy trained in memory after loading (SFT, then DPO in one
    script): the reference is the model before that training."""
    path = _reference_path(model)
    if not path or checkpoint.is_molf_checkpoint(path):
        return
    if _experts_moved(checkpoint.molf_layers(model)):
        warnings.warn(f"{what}: trl loads the reference model from {path!r}, but this policy has trained since it "
                      "was loaded from there (its LoRA experts are not zero), so the reference is the model before "
                      f"that training; for a reference equal to the policy as it is, {remedy}molf.save_pretrained "
                      "the policy and build the trainer on molf.from_pretrained of it", UserWarning, stacklevel=3)


@torch.no_grad()
def _experts_moved(layers) -> bool:
    """Whether some LoRA B of these (name, MoLF layer) pairs is no longer zero (they start at B = 0)."""
    return any(bool(b.any()) for _, m in layers for b in m.lora_B)


def _only_fresh_experts_train(model) -> bool:
    """Every trainable parameter is a LoRA expert's and every B is zero: the policy equals its base with the
    experts off, now and, since nothing else moves, as a reference for the whole run."""
    layers = checkpoint.molf_layers(model)
    experts = {id(p) for _, m in layers for p in [*m.lora_A, *m.lora_B]}
    if not layers or any(p.requires_grad and id(p) not in experts for p in model.parameters()):
        return False
    return not _experts_moved(layers)


def _sharded_by_accelerate(config) -> bool:
    """FSDP from the TrainingArguments or `accelerate launch`: trl prepares its reference for it (DeepSpeed is
    refused by MoLFTrainer)."""
    return bool(_env_flag("ACCELERATE_USE_FSDP") or getattr(config, "fsdp", None))


class ExpertsOffReference(nn.Module):
    """A reference model without a second copy of the weights: calls run the policy with its LoRA experts off
    (molf.disable_experts), in eval mode and without gradients, as trl's own reference runs. Exact while only
    the experts train and they started at B = 0 (MoLF-E with freeze_others=True): the policy's base is then the
    model it was wrapped from for the whole run. The policy is not a submodule, so what trl does to its
    reference (eval(), to(), dropout off, accelerate's prepare) leaves the policy alone; the attributes trl's
    fused LM head reads (config, the backbone, get_output_embeddings) are the policy's."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.__dict__["policy"] = policy

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "policy" not in self.__dict__:  # a copy being built
                raise
            return getattr(self.__dict__["policy"], name)

    def forward(self, *args, **kwargs):
        return self.policy(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        modes = [(m, m.training) for m in self.policy.modules()]
        self.policy.eval()  # bitsandbytes' CPU repacking on an eval forward is off in wrapped models (molf.quant)
        try:
            with torch.no_grad(), disable_experts(self.policy):
                return super().__call__(*args, **kwargs)
        finally:
            for m, training in modes:
                m.training = training


def _experts_off_reference_applies(model, config) -> bool:
    """Whether the trainer's reference can be ExpertsOffReference(model): none of the user's own (precomputed,
    synced, sharded by trl) and only fresh experts train."""
    return (not getattr(config, "precompute_ref_log_probs", False) and not getattr(config, "sync_ref_model", False)
            and not _sharded_by_accelerate(config) and not isinstance(model, str) and _only_fresh_experts_train(model))


@contextlib.contextmanager
def _loads_experts_off_reference(trainer_module, model):
    """A trainer that takes no ref_model (GRPO, RLOO) builds its reference with create_model_from_path(the policy's
    path): while it is built, that call returns ExpertsOffReference(model) instead of loading a second copy."""
    load = trainer_module.create_model_from_path

    def reference(path, *args, **kwargs):
        return ExpertsOffReference(model) if path == _reference_path(model) else load(path, *args, **kwargs)

    trainer_module.create_model_from_path = reference
    try:
        yield
    finally:
        trainer_module.create_model_from_path = load


class MoLFSFTTrainer(MoLFTrainer, SFTTrainer):
    """trl.SFTTrainer stepping a molf-wrapped model with MoLFAdamW (keyword arguments as MoLFTrainer's)."""


class MoLFRewardTrainer(MoLFTrainer, RewardTrainer):
    """trl.RewardTrainer stepping a molf-wrapped sequence classifier (num_labels=1) with MoLFAdamW; its new
    `score` head trains as a plain parameter, also under freeze_others (see molf.wrap)."""


def _preference_reference(model, ref_model, config, trainer: str, method: str):
    """DPO's and KTO's reference: the user's, else ExpertsOffReference when only fresh experts train, else None
    (trl loads it from the policy's path: refused for a model built in memory, warned for a policy trained since
    it was loaded)."""
    if ref_model is None and _experts_off_reference_applies(model, config):
        return ExpertsOffReference(model)
    if ref_model is None and not getattr(config, "precompute_ref_log_probs", False):  # trl loads one
        if _reference_path(model) == "":
            raise ValueError(f"ref_model: the policy was built in memory (its config.name_or_path is empty), so trl "
                             f"cannot load {method}'s reference model from it; pass ref_model=copy.deepcopy(model) "
                             f"before training, or {method}Config(precompute_ref_log_probs=True) (a policy whose "
                             "only trainable parameters are fresh LoRA experts, molf.wrap(..., train_base=False, "
                             "freeze_others=True), needs neither: its reference is itself with the experts off)")
        _warn_if_trained_since_loaded(model, f"{trainer} without ref_model", "pass ref_model=copy.deepcopy(model), or ")
    return ref_model


def _refuse_vllm(config, method: str) -> None:
    if getattr(config, "use_vllm", False):
        raise ValueError("use_vllm=True: trl syncs the policy into vLLM by parameter name, and a molf-wrapped "
                         "model's parameters (base weights and LoRA experts) are not the plain model's; set "
                         f"{method}Config(use_vllm=False) (generation through transformers)")


def _kl_reference(trainer_module, model, config, trainer: str, method: str):
    """GRPO's and RLOO's KL reference (they take no ref_model; trl builds one when beta > 0): a context for
    building the trainer, in which trl's load gives ExpertsOffReference when only fresh experts train. vLLM is
    refused: trl syncs a non-peft policy into it parameter by parameter, by name, and a wrapped model's names
    (q_proj.base.weight, q_proj.lora_A.0, ...) and low-rank terms are not the plain model's."""
    _refuse_vllm(config, method)
    beta = getattr(config, "beta", 0.0)
    # (a trl without create_model_from_path there: its own reference, with the checks below)
    if beta and _experts_off_reference_applies(model, config) and hasattr(trainer_module, "create_model_from_path"):
        return _loads_experts_off_reference(trainer_module, model)
    if beta:  # trl loads a KL reference
        if _reference_path(model) == "":
            raise ValueError(f"beta={beta}: trl loads {method}'s reference model from the policy's "
                             "config.name_or_path, which a model built in memory has not; save_pretrained the model "
                             "and load it back before molf.wrap, or set beta=0.0 (a policy whose only trainable "
                             "parameters are fresh LoRA experts needs no path: its reference is itself with the "
                             "experts off)")
        _warn_if_trained_since_loaded(model, f"{trainer} with beta={beta}", "")
    return contextlib.nullcontext()


def _config(args, kwargs):
    """A trl trainer's config: its third positional argument (args here), or args=."""
    return kwargs.get("args", args[0] if args else None)


class MoLFDPOTrainer(MoLFTrainer, DPOTrainer):
    """trl.DPOTrainer stepping a molf-wrapped model with MoLFAdamW (keyword arguments as MoLFTrainer's).

    Without `ref_model`: when only fresh LoRA experts train (MoLF-E with freeze_others=True, B = 0), the
    reference is the policy with its experts off (`ExpertsOffReference`, no second copy, as peft's disabled
    adapter); otherwise trl loads it from the policy's `config.name_or_path`: the plain model the policy was
    wrapped from (a molf checkpoint loads there as its merged weights), which equals the wrapped policy before
    its first step (the LoRA experts start with B = 0)."""

    def __init__(self, model, ref_model=None, *args, **kwargs):
        check_sharding(*args, *kwargs.values())  # before what the reference needs: it is refused whatever
        ref_model = _preference_reference(model, ref_model, _config(args, kwargs), "MoLFDPOTrainer", "DPO")
        super().__init__(model, ref_model, *args, **kwargs)


class MoLFKTOTrainer(MoLFTrainer, KTOTrainer):
    """trl.KTOTrainer stepping a molf-wrapped model with MoLFAdamW (keyword arguments as MoLFTrainer's); its
    reference as MoLFDPOTrainer's."""

    def __init__(self, model, ref_model=None, *args, **kwargs):
        check_sharding(*args, *kwargs.values())
        ref_model = _preference_reference(model, ref_model, _config(args, kwargs), "MoLFKTOTrainer", "KTO")
        super().__init__(model, ref_model, *args, **kwargs)


class MoLFGRPOTrainer(MoLFTrainer, GRPOTrainer):
    """trl.GRPOTrainer stepping a molf-wrapped model with MoLFAdamW (keyword arguments as MoLFTrainer's).

    Completions are generated with the wrapped policy (transformers' generate through the MoLF layers); vLLM is
    refused. With `beta > 0`, the KL reference is the policy with its experts off when only fresh experts train,
    else trl loads it from the policy's `config.name_or_path`, as MoLFDPOTrainer's."""

    def __init__(self, model, reward_funcs=None, *args, **kwargs):
        check_sharding(*args, *kwargs.values())
        with _kl_reference(grpo_trainer, model, _config(args, kwargs), "MoLFGRPOTrainer", "GRPO"):
            super().__init__(model, reward_funcs, *args, **kwargs)


class MoLFRLOOTrainer(MoLFTrainer, RLOOTrainer):
    """trl.RLOOTrainer stepping a molf-wrapped model with MoLFAdamW (keyword arguments as MoLFTrainer's); its
    KL reference (RLOOConfig's beta is 0.05 by default) and generation as MoLFGRPOTrainer's."""

    def __init__(self, model, reward_funcs=None, *args, **kwargs):
        check_sharding(*args, *kwargs.values())
        with _kl_reference(rloo_trainer, model, _config(args, kwargs), "MoLFRLOOTrainer", "RLOO"):
            super().__init__(model, reward_funcs, *args, **kwargs)


if DistillationTrainer is not None:
    class MoLFDistillationTrainer(MoLFTrainer, DistillationTrainer):
        """trl.DistillationTrainer (on-policy distillation: the student generates, a teacher model scores every
        next token) training a molf-wrapped student with MoLFAdamW (keyword arguments as MoLFTrainer's). The
        student generates through transformers' generate; vLLM is refused, as for MoLFGRPOTrainer."""

        def __init__(self, model, teacher_model=None, *args, **kwargs):
            check_sharding(*args, *kwargs.values())
            _refuse_vllm(_config(args, kwargs), "Distillation")
            super().__init__(model, teacher_model, *args, **kwargs)
