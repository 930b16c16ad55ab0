"""Accelerate outside the Trainer: resuming an FSDP2 run whose MoLF layers have bitsandbytes 4-bit bases.

    model, opt = accelerator.prepare(model, molf.MoLFAdamW(model, ...))
    accelerator.save_state(folder)                         # as usual
    from molf.integrations.accelerate import load_state
    load_state(accelerator, folder)                        # was: accelerator.load_state(folder)

accelerate's own load_state loads every key of the model's state dict into FSDP2's shards, which hold no
bitsandbytes quantization state (a KeyError, or "Unexpected key(s)", from torch on every rank). Any other run
may call either: load_state is then accelerator.load_state.
"""
from __future__ import annotations

import contextlib
import os

import accelerate.accelerator

from .. import checkpoint


def saved_model_path(plugin, input_dir, model_index: int = 0) -> str:
    """Where accelerate's save_state wrote model `model_index` of an FSDP2 run: the full state dict's file
    (FULL_STATE_DICT) or the torch.distributed.checkpoint folder (SHARDED_STATE_DICT)."""
    kind = getattr(plugin.state_dict_type, "name", str(plugin.state_dict_type))
    suffix = "" if model_index == 0 else f"_{model_index}"
    if kind == "FULL_STATE_DICT":
        return os.path.join(input_dir, f"{checkpoint.FSDP_MODEL_NAME}{suffix}.bin")
    if kind == "SHARDED_STATE_DICT":
        folder = f"{checkpoint.FSDP_MODEL_NAME}_{model_index}"
        return str(input_dir) if os.path.basename(os.path.normpath(input_dir)) == folder \
            else os.path.join(input_dir, folder)
    raise ValueError(f"state_dict_type={kind}: an FSDP2 run on a quantized base resumes from FULL_STATE_DICT or "
                     "SHARDED_STATE_DICT checkpoints")


@contextlib.contextmanager
def _quantized_bases_load_floats():
    """accelerate's load_fsdp_model, for the FSDP2 models with quantized MoLF bases, loads only the float tensors
    (checkpoint.load_fsdp_quantized); the other models as accelerate does."""
    original = accelerate.accelerator.load_fsdp_model

    def load_fsdp_model(fsdp_plugin, accelerator, model, input_dir, model_index=0, *args, **kwargs):
        if not (accelerator.is_fsdp2 and checkpoint.has_quantized_bases(model)):
            return original(fsdp_plugin, accelerator, model, input_dir, model_index, *args, **kwargs)
        accelerator.wait_for_everyone()
        checkpoint.load_fsdp_quantized(model, saved_model_path(fsdp_plugin, input_dir, model_index))

    accelerate.accelerator.load_fsdp_model = load_fsdp_model
    try:
        yield
    finally:
        accelerate.accelerator.load_fsdp_model = original


def load_state(accelerator, input_dir: str | os.PathLike | None = None, **load_model_func_kwargs) -> None:
    """accelerator.load_state(input_dir, **load_model_func_kwargs), where an FSDP2 model with bitsandbytes-quantized
    MoLF bases takes its experts and every float tensor from the checkpoint (its quantized weights, frozen, stay
    as loaded); the optimizers, schedulers, scaler, RNG states and registered objects load as accelerate loads
    them. Call it on every rank."""
    if not hasattr(accelerate.accelerator, "load_fsdp_model"):
        raise RuntimeError(f"this accelerate ({accelerate.__version__}) has no accelerate.accelerator."
                           "load_fsdp_model, which molf's load_state stands in for: call accelerator.load_state")
    with _quantized_bases_load_floats():
        return accelerator.load_state(input_dir, **load_model_func_kwargs)
