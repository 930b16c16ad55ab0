"""Checkpoints of wrapped models that load exactly, with plain transformers and with molf.

`save_pretrained(model, path)` writes, in one folder:
- a plain transformers checkpoint of the merged model (config.json, model.safetensors): what
  `AutoModelForCausalLM.from_pretrained(path)` loads, every MoLF layer a plain nn.Linear with
  W + sum_i s_i B_i A_i (the model computes what the wrapped one does);
- molf_config.json (how each layer was wrapped, which parameters were frozen) and molf_model.safetensors
  (the wrapped model's own state: base weights and LoRA experts unmerged), from which
  `molf.from_pretrained(path)` rebuilds the wrapped model bitwise, to continue MoLF training.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from .layer import MoLFLinear, molf_layers

MOLF_CONFIG = "molf_config.json"
MOLF_WEIGHTS = "molf_model.safetensors"
FORMAT_VERSION = 1


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every MoLF layer as the plain nn.Linear `merge` would give (name.weight =
    W + sum_i s_i B_i A_i, name.bias = b): the keys of the unwrapped model. The model is not changed."""
    layers = molf_layers(model)
    prefixes = tuple(f"{n}." for n, _ in layers)
    out = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, m in layers:
        out[f"{name}.weight"] = m.merged_weight()
        if m.base.bias is not None:
            out[f"{name}.bias"] = m.base.bias.detach()
    return out


def molf_config(model: nn.Module) -> dict:
    layers = molf_layers(model)
    inside = {id(p) for _, m in layers for p in m.parameters()}
    return {
        "format_version": FORMAT_VERSION,
        "layers": {n: {"ranks": list(m.ranks), "alphas": list(m.alphas), "rslora": m.rslora, "dropout": m.dropout,
                       "train_base": bool(m.base.weight.requires_grad)} for n, m in layers},
        "frozen_outside": [n for n, p in model.named_parameters() if id(p) not in inside and not p.requires_grad],
    }


def save_pretrained(model: nn.Module, path: str | os.PathLike, **kwargs) -> str:
    """Write the merged plain checkpoint and molf's exact state to `path` (see the module docstring).
    kwargs go to transformers' `save_pretrained` (e.g. max_shard_size)."""
    from safetensors.torch import save_model

    if not molf_layers(model):
        raise ValueError("save_pretrained: the model has no MoLF layers (use the model's own save_pretrained)")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_pretrained needs a transformers model, got {type(model).__name__}")
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, state_dict=merged_state_dict(model), **kwargs)
    save_model(model, os.path.join(path, MOLF_WEIGHTS), metadata={"format": "pt", "molf": str(FORMAT_VERSION)})
    with open(os.path.join(path, MOLF_CONFIG), "w") as f:
        json.dump(molf_config(model), f, indent=2)
    return str(path)


def is_molf_checkpoint(path) -> bool:
    return os.path.isfile(os.path.join(path, MOLF_CONFIG)) and os.path.isfile(os.path.join(path, MOLF_WEIGHTS))


def rewrap(model: nn.Module, config: dict, backend: str = "auto") -> nn.Module:
    """Wrap `model` (the plain model) as `config` (a molf_config.json) describes, in place."""
    from .layer import _set_child

    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"molf checkpoint format {config.get('format_version')!r} is not {FORMAT_VERSION}: "
                         "saved by another molf version")
    for name, spec in config["layers"].items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint wraps {name}, which this model does not have") from None
        _set_child(model, name, MoLFLinear(lin, spec["ranks"], spec["alphas"], spec["train_base"], spec["rslora"],
                                           spec["dropout"], backend))
    frozen = set(config.get("frozen_outside", []))
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return model


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load molf's exact state from a checkpoint folder into `model`, already wrapped the same way."""
    from safetensors.torch import load_model

    if not is_molf_checkpoint(path):
        raise ValueError(f"{path} is not a molf checkpoint (no {MOLF_CONFIG} and {MOLF_WEIGHTS})")
    missing, unexpected = load_model(model, os.path.join(path, MOLF_WEIGHTS), strict=False)
    if missing or unexpected:
        raise ValueError(f"the molf checkpoint in {path} does not fit this model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return model


def from_pretrained(path: str | os.PathLike, backend: str = "auto", **kwargs) -> nn.Module:
    """The wrapped model saved by `molf.save_pretrained` (or MoLFTrainer), bitwise as it was saved.

    kwargs go to `AutoModelForCausalLM.from_pretrained` (e.g. dtype, device_map)."""
    from transformers import AutoModelForCausalLM

    if not is_molf_checkpoint(path):
        raise ValueError(f"{path} is not a molf checkpoint (no {MOLF_CONFIG} and {MOLF_WEIGHTS}); a plain model "
                         "loads with AutoModelForCausalLM.from_pretrained")
    with open(os.path.join(path, MOLF_CONFIG)) as f:
        config = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    rewrap(model, config, backend)
    return load(model, path)
