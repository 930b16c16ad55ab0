"""TRL integration: `MoLFSFTTrainer`, everything `MoLFTrainer` adds on trl's SFTTrainer.

    molf.wrap(model, ranks=(128,), alphas=(32,))
    from molf.integrations.trl import MoLFSFTTrainer
    trainer = MoLFSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tok, lora_lr=5e-5)

MoLFAdamW from the TrainingArguments, the routing JSONL in output_dir (truncated on resume), checkpoints that
load as plain models and resume exactly. Any other Trainer built with `optimizers=(molf.MoLFAdamW(...), None)`
gets the routing log from `molf.integrations.hf.RoutingLogCallback()` added to its callbacks.
"""
from __future__ import annotations

from trl import SFTTrainer

from .hf import MoLFTrainer


class MoLFSFTTrainer(MoLFTrainer, SFTTrainer):
    """trl.SFTTrainer stepping a molf-wrapped model with MoLFAdamW (keyword arguments as MoLFTrainer's)."""
