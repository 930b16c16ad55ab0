"""Hugging Face Trainer integration: MoLFAdamW built from TrainingArguments, routing JSONL in output_dir.

    molf.wrap(model, ranks=(128,), alphas=(32,))                                     # 1
    from molf.integrations.hf import MoLFTrainer                                     # 2
    trainer = MoLFTrainer(model=model, args=args, train_dataset=ds, lora_lr=5e-5)    # 3 (was: Trainer(...))

The Trainer's own LR scheduler, gradient accumulation, clipping (max_grad_norm), bf16 autocast, gradient
checkpointing and checkpoint save/resume (optimizer state included) work unchanged.
"""
from __future__ import annotations

import os

from transformers import Trainer, TrainerCallback

from ..optim import MoLFAdamW

ROUTING_FILE = "molf_routing.jsonl"


def unwrap_optimizer(opt):
    """The MoLFAdamW inside accelerate's AcceleratedOptimizer (or opt itself)."""
    while not isinstance(opt, MoLFAdamW) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt if isinstance(opt, MoLFAdamW) else None


class RoutingLogCallback(TrainerCallback):
    """Appends the routing of every step to <output_dir>/molf_routing.jsonl, one flush per logging step."""

    def __init__(self, filename: str = ROUTING_FILE):
        self.filename = filename

    def _flush(self, args, state, optimizer):
        opt = unwrap_optimizer(optimizer)
        if opt is None:
            return
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            opt.write_routing_jsonl(os.path.join(args.output_dir, self.filename))
        else:
            opt.routing_history(clear=True)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if args.logging_steps and state.global_step % max(int(args.logging_steps), 1) == 0:
            self._flush(args, state, optimizer)

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        self._flush(args, state, optimizer)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self._flush(args, state, optimizer)


class MoLFTrainer(Trainer):
    """A transformers Trainer that steps a molf-wrapped model with MoLFAdamW.

    From TrainingArguments: learning_rate (full expert and non-MoLF parameters), weight_decay,
    adam_beta1/adam_beta2, adam_epsilon. Keyword arguments of this class: lora_lr (default learning_rate),
    lora_weight_decay (default weight_decay), score ("epd"/"pfn"), top_k, backend, routing_file.
    """

    def __init__(self, *args, lora_lr: float | None = None, lora_weight_decay: float | None = None,
                 score: str = "epd", top_k: int = 1, backend: str = "auto", routing_file: str = ROUTING_FILE,
                 **kwargs):
        self.molf_kwargs = dict(lora_lr=lora_lr, lora_weight_decay=lora_weight_decay, score=score, top_k=top_k,
                                backend=backend)
        super().__init__(*args, **kwargs)
        for name in ("activation_checkpointing", "gradient_checkpointing"):  # transformers 5 renames the option
            if getattr(self.args, name, False) and not getattr(self.args, f"{name}_kwargs", None):
                # Non-reentrant checkpointing gives every parameter its gradient even with frozen embeddings.
                setattr(self.args, f"{name}_kwargs", {"use_reentrant": False})
        self.add_callback(RoutingLogCallback(routing_file))

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            a, kw = self.args, dict(self.molf_kwargs)
            if kw["lora_weight_decay"] is None:
                kw["lora_weight_decay"] = a.weight_decay
            self.optimizer = MoLFAdamW(self.model if model is None else model, lr=a.learning_rate,
                                       weight_decay=a.weight_decay, betas=(a.adam_beta1, a.adam_beta2),
                                       eps=a.adam_epsilon, **kw)
        return self.optimizer

    @property
    def molf_optimizer(self) -> MoLFAdamW | None:
        return unwrap_optimizer(self.optimizer)
