"""Hugging Face Trainer integration: MoLFAdamW built from TrainingArguments, routing JSONL in output_dir.

    molf.wrap(model, ranks=(128,), alphas=(32,))                                     # 1
    from molf.integrations.hf import MoLFTrainer                                     # 2
    trainer = MoLFTrainer(model=model, args=args, train_dataset=ds, lora_lr=5e-5)    # 3 (was: Trainer(...))

The Trainer's own LR scheduler, gradient accumulation, clipping (max_grad_norm), bf16 autocast, gradient
checkpointing and checkpoint save/resume (optimizer state included) work unchanged.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings

from . import check_transformers

check_transformers()

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from .. import checkpoint  # noqa: E402
from ..optim import MoLFAdamW  # noqa: E402

ROUTING_FILE = "molf_routing.jsonl"
# The Trainer's AdamW choices, which MoLFAdamW stands in for silently (its hyperparameters are read).
ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused")


def unwrap_optimizer(opt):
    """The MoLFAdamW inside accelerate's AcceleratedOptimizer (or opt itself)."""
    while not isinstance(opt, MoLFAdamW) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt if isinstance(opt, MoLFAdamW) else None


class RoutingLogCallback(TrainerCallback):
    """Appends the routing of every step to <output_dir>/molf_routing.jsonl, one flush per logging step."""

    def __init__(self, filename: str = ROUTING_FILE):
        self.filename = filename

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        """After a resume, drop the records of the steps that will be taken again (a crash after the last
        checkpoint left them in the log), so that every step appears once."""
        opt = unwrap_optimizer(optimizer)
        path = os.path.join(args.output_dir, self.filename)
        if opt is None and optimizer is not None and state.is_world_process_zero:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
            warnings.warn(f"RoutingLogCallback: the Trainer steps with {type(inner).__name__}, not MoLFAdamW: "
                          f"there is no routing to log and {path} gets no records (pass optimizers=(molf.MoLFAdamW("
                          "model, ...), None) to the Trainer, or use molf's MoLFTrainer)", UserWarning, stacklevel=2)
        if opt is not None and opt.history_size == 0 and state.is_world_process_zero:
            warnings.warn(f"MoLFAdamW(history_size=0) keeps no routing: {path} gets no records (pass a "
                          "history_size of at least 1, e.g. the default)", UserWarning, stacklevel=2)
        if opt is None or not state.is_world_process_zero or not os.path.isfile(path):
            return
        with open(path) as f:
            lines = f.readlines()
        keep = [ln for ln in lines if not ln.strip() or _record_step(ln) <= opt.molf_step]
        if keep and not keep[-1].endswith("\n"):  # a run killed mid-record: new records must not extend it
            keep[-1] = keep[-1] + "\n" if _record_step(keep[-1]) >= 0 else ""
        if keep != lines:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)

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
        """Flush at each logging step (state.logging_steps: a ratio of the run resolved by the Trainer), and
        before a full history would drop a step (history_size below logging_steps)."""
        opt = unwrap_optimizer(optimizer)
        every = state.logging_steps or args.logging_steps
        if (every and state.global_step % max(int(every), 1) == 0) or (opt is not None and opt.history_full):
            self._flush(args, state, optimizer)

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        self._flush(args, state, optimizer)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self._flush(args, state, optimizer)


def _env_flag(name: str) -> bool:
    """An ACCELERATE_USE_* flag as accelerate reads it (`accelerate launch` sets them in the processes)."""
    return os.environ.get(name, "false").lower() == "true"


def _fsdp1_requested(training_args) -> bool:
    """FSDP version 1 from the TrainingArguments (fsdp_config["version"], transformers' default 2) or from
    `accelerate launch --use_fsdp` (its FSDP_VERSION, accelerate's default 1)."""
    if getattr(training_args, "fsdp", None):
        return int((getattr(training_args, "fsdp_config", None) or {}).get("version", 2)) == 1
    return _env_flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") == "1"


def check_sharding(*trainer_args) -> None:
    """Refuse DeepSpeed and FSDP1, from the TrainingArguments among a trainer's arguments (wherever they are:
    trl's trainers take them third) or from `accelerate launch`'s environment."""
    training_args = next((a for a in trainer_args if isinstance(a, TrainingArguments)), None)
    if getattr(training_args, "deepspeed", None) or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError("DeepSpeed: its ZeRO and bf16 optimizers flatten the parameters into partitions and hand "
                         "those to the optimizer, but MoLFAdamW scores and updates each layer's experts as the "
                         "model's own tensors; use DDP or FSDP2 (accelerate launch --use_fsdp --fsdp_version 2), "
                         "which molf supports")
    if _fsdp1_requested(training_args):
        raise ValueError("FSDP1: the Trainer would shard the model with FullyShardedDataParallel, which flattens the "
                         "experts' parameters into per-rank pieces (MoLFAdamW refuses them); use FSDP2: "
                         "TrainingArguments(fsdp=..., fsdp_config={'version': 2}) or accelerate launch --use_fsdp "
                         "--fsdp_version 2")


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # not a routing record: kept


@contextlib.contextmanager
def _trainable_adapters_attached(model):
    """transformers refuses to train a quantized model without peft adapters ("purely quantized"); a molf-
    wrapped quantized model has trainable experts, so it says so (as peft's flag) while the Trainer checks."""
    flag = "_hf_peft_config_loaded"
    quantized_molf = model is not None and getattr(model, "is_quantized", False) and \
        any(getattr(m, "quantized", False) for _, m in checkpoint.molf_layers(model))
    before = getattr(model, flag, None) if quantized_molf else None
    if quantized_molf:
        setattr(model, flag, True)
    try:
        yield
    finally:
        if quantized_molf:
            if before is None:
                delattr(model, flag)
            else:
                setattr(model, flag, before)


class MoLFTrainer(Trainer):
    """A transformers Trainer that steps a molf-wrapped model with MoLFAdamW.

    From TrainingArguments: learning_rate (full expert and non-MoLF parameters), weight_decay,
    adam_beta1/adam_beta2, adam_epsilon. Keyword arguments of this class: lora_lr (default learning_rate),
    lora_weight_decay (default weight_decay), score ("epd"/"pfn"), top_k, backend, state_dtype,
    stochastic_rounding (as MoLFAdamW's), routing_file. TrainingArguments.optim / optim_args name another
    optimizer: one warning says they are not used. DeepSpeed and FSDP1 are refused when the trainer is built
    (check_sharding); DDP and FSDP2 work.
    """

    def __init__(self, *args, lora_lr: float | None = None, lora_weight_decay: float | None = None,
                 score: str = "epd", top_k: int = 1, backend: str = "auto", state_dtype=None,
                 stochastic_rounding: bool = False, routing_file: str = ROUTING_FILE, **kwargs):
        self.molf_kwargs = dict(lora_lr=lora_lr, lora_weight_decay=lora_weight_decay, score=score, top_k=top_k,
                                backend=backend, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)
        if kwargs.get("peft_config") is not None:  # trl's SFTTrainer would put peft's LoRA around the MoLF layers
            raise ValueError("peft_config: molf's LoRA experts are set by molf.wrap(ranks=..., alphas=...), and peft "
                             "cannot wrap MoLF layers; drop peft_config (to start from a peft adapter, "
                             "merge_and_unload() it before molf.wrap)")
        check_sharding(*args, *kwargs.values())
        model = kwargs.get("model", args[0] if args else None)
        own_optimizer = kwargs.get("optimizers", (None,))[0] is not None
        if not own_optimizer and model is not None:
            # before the Trainer (and trl's dataset preparation) runs, not at the first step
            if isinstance(model, str):
                raise ValueError(f"model={model!r}: MoLFTrainer needs a molf-wrapped model; load it and call "
                                 "molf.wrap(model, ...) first")
            if not checkpoint.molf_layers(model):
                raise ValueError(f"model ({type(model).__name__}) has no MoLF layers: call molf.wrap(model, ...) "
                                 "before MoLFTrainer, which steps it with MoLFAdamW")
        with _trainable_adapters_attached(model):
            super().__init__(*args, **kwargs)
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if own_optimizer and unwrap_optimizer(self.optimizer) is None:  # the user's choice, said once
            warnings.warn(f"MoLFTrainer was given optimizers=({type(self.optimizer).__name__}, ...): it steps with "
                          "that optimizer, not MoLFAdamW, so nothing is routed and no routing is logged (leave "
                          "optimizers out to train MoLF, or pass a molf.MoLFAdamW)", UserWarning, stacklevel=2)
        if getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            cls = getattr(self.optimizer_cls_and_kwargs[0], "__name__", self.optimizer_cls_and_kwargs[0])
            warnings.warn(f"MoLFTrainer steps with molf.MoLFAdamW: optimizer_cls_and_kwargs=({cls}, ...) is not used "
                          "(MoLFAdamW's options are MoLFTrainer's keyword arguments: lora_lr, lora_weight_decay, "
                          "score, top_k, backend, state_dtype, stochastic_rounding)",
                          UserWarning, stacklevel=2)
        if not own_optimizer and (optim not in ADAMW_NAMES or self.args.optim_args):
            warnings.warn(f"MoLFTrainer steps with molf.MoLFAdamW: TrainingArguments optim={optim!r}"
                          + (f", optim_args={self.args.optim_args!r}" if self.args.optim_args else "")
                          + " is not used (a smaller optimizer state: MoLFTrainer(..., state_dtype=torch.bfloat16))",
                          UserWarning, stacklevel=2)
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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As the Trainer's; under FSDP with SHARDED_STATE_DICT, where the Trainer writes nothing here (its
        checkpoints hold the shards), the full state dict is gathered (call it on every rank, as the Trainer's
        own gathering under FULL_STATE_DICT needs) and rank 0 writes the merged model and molf's state."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if _internal_call or not self.is_fsdp_enabled or "FULL_STATE_DICT" in str(plugin.state_dict_type) \
                or not checkpoint.molf_layers(self.accelerator.unwrap_model(self.model, keep_torch_compile=False)):
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.model))  # as under FULL_STATE_DICT
        if self.args.push_to_hub:  # as the Trainer's save_model, when the user calls it
            self.push_to_hub(commit_message="Model save")

    # Checkpoints: a plain merged model (loads with from_pretrained) plus molf's exact state (resume, molf loader).
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not checkpoint.molf_layers(model):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        # under FSDP2 (FULL_STATE_DICT) the Trainer passes the full state dict it gathered: the model holds shards
        checkpoint.save_pretrained(model, output_dir, is_main_process=True,
                                   state_dict=state_dict if self.is_fsdp_enabled else None)
        tok = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tok is not None:
            tok.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        if self.is_fsdp_enabled and checkpoint.has_quantized_bases(target):
            # accelerate's load_fsdp_model loads every key: the shards hold no bitsandbytes quantization state
            checkpoint.load_fsdp_quantized(target, resume_from_checkpoint)
            return
        # FSDP: the Trainer's own sharded checkpoint (save_fsdp_model) loads into the shards
        if not self.is_fsdp_enabled and checkpoint.is_molf_checkpoint(resume_from_checkpoint) \
                and checkpoint.molf_layers(target):
            checkpoint.load(target, resume_from_checkpoint)
            return
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not self.is_fsdp_enabled and best and checkpoint.is_molf_checkpoint(best) and checkpoint.molf_layers(model):
            checkpoint.load(model, best)
            return
        if self.is_fsdp_enabled and best and checkpoint.has_quantized_bases(model):
            checkpoint.load_fsdp_quantized(model, best)
            return
        return super()._load_best_model()

    @property
    def molf_optimizer(self) -> MoLFAdamW | None:
        return unwrap_optimizer(self.optimizer)
