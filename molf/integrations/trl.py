"""TRL integration: `MoLFSFTTrainer`, `MoLFDPOTrainer`, `MoLFGRPOTrainer` and `MoLFRewardTrainer`, everything
`MoLFTrainer` adds on trl's SFTTrainer, DPOTrainer, GRPOTrainer and RewardTrainer.

    molf.wrap(model, ranks=(128,), alphas=(32,))
    from molf.integrations.trl import MoLFSFTTrainer
    trainer = MoLFSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tok, lora_lr=5e-5)

MoLFAdamW from the TrainingArguments, the routing JSONL in output_dir (truncated on resume), checkpoints that
load as plain models and resume exactly. Any other Trainer built with `optimizers=(molf.MoLFAdamW(...), None)`
gets the routing log from `molf.integrations.hf.RoutingLogCallback()` added to its callbacks.
"""
from __future__ import annotations

import warnings

import torch
from trl import DPOTrainer, GRPOTrainer, RewardTrainer, SFTTrainer

from .. import checkpoint
from .hf import MoLFTrainer


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
    with torch.no_grad():
        trained = any(bool(b.any()) for _, m in checkpoint.molf_layers(model) for b in m.lora_B)
    if trained:
        warnings.warn(f"{what}: trl loads the reference model from {path!r}, but this policy has trained since it "
                      "was loaded from there (its LoRA experts are not zero), so the reference is the model before "
                      f"that training; for a reference equal to the policy as it is, {remedy}molf.save_pretrained "
                      "the policy and build the trainer on molf.from_pretrained of it", UserWarning, stacklevel=3)


class MoLFSFTTrainer(MoLFTrainer, SFTTrainer):
    """trl.SFTTrainer stepping a molf-wrapped model with MoLFAdamW (keyword arguments as MoLFTrainer's)."""


class MoLFRewardTrainer(MoLFTrainer, RewardTrainer):
    """trl.RewardTrainer stepping a molf-wrapped sequence classifier (num_labels=1) with MoLFAdamW; its new
    `score` head trains as a plain parameter, also under freeze_others (see molf.wrap)."""


class MoLFDPOTrainer(MoLFTrainer, DPOTrainer):
    """trl.DPOTrainer stepping a molf-wrapped model with MoLFAdamW (keyword arguments as MoLFTrainer's).

    Without `ref_model`, trl loads the reference from the policy's `config.name_or_path`: the plain model the
    policy was wrapped from (a molf checkpoint loads there as its merged weights), which equals the wrapped
    policy before its first step (the LoRA experts start with B = 0)."""

    def __init__(self, model, ref_model=None, *args, **kwargs):
        config = kwargs.get("args", args[0] if args else None)
        if ref_model is None and not getattr(config, "precompute_ref_log_probs", False):  # trl loads one
            if _reference_path(model) == "":
                raise ValueError("ref_model: the policy was built in memory (its config.name_or_path is empty), so "
                                 "trl cannot load DPO's reference model from it; pass ref_model=copy.deepcopy(model) "
                                 "before training, or DPOConfig(precompute_ref_log_probs=True)")
            _warn_if_trained_since_loaded(model, "MoLFDPOTrainer without ref_model",
                                          "pass ref_model=copy.deepcopy(model), or ")
        super().__init__(model, ref_model, *args, **kwargs)


class MoLFGRPOTrainer(MoLFTrainer, GRPOTrainer):
    """trl.GRPOTrainer stepping a molf-wrapped model with MoLFAdamW (keyword arguments as MoLFTrainer's).

    Completions are generated with the wrapped policy (transformers' generate through the MoLF layers). vLLM is
    refused: trl syncs a non-peft policy into vLLM parameter by parameter, by name, and a wrapped model's names
    (q_proj.base.weight, q_proj.lora_A.0, ...) and its low-rank terms are not the plain model's. With
    `beta > 0`, trl loads the KL reference from the policy's `config.name_or_path`, as MoLFDPOTrainer's."""

    def __init__(self, model, reward_funcs=None, *args, **kwargs):
        config = kwargs.get("args", args[0] if args else None)
        if getattr(config, "use_vllm", False):
            raise ValueError("use_vllm=True: trl syncs the policy into vLLM by parameter name, and a molf-wrapped "
                             "model's parameters (base weights and LoRA experts) are not the plain model's; set "
                             "GRPOConfig(use_vllm=False) (generation through transformers)")
        beta = getattr(config, "beta", 0.0)
        if beta:  # trl loads a KL reference
            if _reference_path(model) == "":
                raise ValueError(f"beta={beta}: trl loads GRPO's reference model from the policy's "
                                 "config.name_or_path, which a model built in memory has not; save_pretrained the "
                                 "model and load it back before molf.wrap, or set beta=0.0 (trl's default)")
            _warn_if_trained_since_loaded(model, f"MoLFGRPOTrainer with beta={beta}", "")
        super().__init__(model, reward_funcs, *args, **kwargs)
