"""TRL integration: `MoLFSFTTrainer` and `MoLFDPOTrainer`, everything `MoLFTrainer` adds on trl's SFTTrainer
and DPOTrainer.

    molf.wrap(model, ranks=(128,), alphas=(32,))
    from molf.integrations.trl import MoLFSFTTrainer
    trainer = MoLFSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tok, lora_lr=5e-5)

MoLFAdamW from the TrainingArguments, the routing JSONL in output_dir (truncated on resume), checkpoints that
load as plain models and resume exactly. Any other Trainer built with `optimizers=(molf.MoLFAdamW(...), None)`
gets the routing log from `molf.integrations.hf.RoutingLogCallback()` added to its callbacks.
"""
from __future__ import annotations

from trl import DPOTrainer, SFTTrainer

from .hf import MoLFTrainer


class MoLFSFTTrainer(MoLFTrainer, SFTTrainer):
    """trl.SFTTrainer stepping a molf-wrapped model with MoLFAdamW (keyword arguments as MoLFTrainer's)."""


class MoLFDPOTrainer(MoLFTrainer, DPOTrainer):
    """trl.DPOTrainer stepping a molf-wrapped model with MoLFAdamW (keyword arguments as MoLFTrainer's).

    Without `ref_model`, trl loads the reference from the policy's `config.name_or_path`: the plain model the
    policy was wrapped from (a molf checkpoint loads there as its merged weights), which equals the wrapped
    policy before its first step (the LoRA experts start with B = 0)."""

    def __init__(self, model, ref_model=None, *args, **kwargs):
        config = kwargs.get("args", args[0] if args else None)
        in_memory = not isinstance(model, str) and not getattr(getattr(model, "config", None), "_name_or_path", "")
        if ref_model is None and in_memory and not getattr(config, "precompute_ref_log_probs", False):
            raise ValueError("ref_model: the policy was built in memory (its config.name_or_path is empty), so trl "
                             "cannot load DPO's reference model from it; pass ref_model=copy.deepcopy(model) before "
                             "training, or DPOConfig(precompute_ref_log_probs=True)")
        super().__init__(model, ref_model, *args, **kwargs)
