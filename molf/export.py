"""Export a trained MoLF-Efficient model as a standard peft LoRA adapter."""
from __future__ import annotations

import collections
import json
import os
import warnings

import torch
from torch import nn

from ._dist import GATHER, refuse_shards
from .layer import MoLFLinear, molf_layers, unwrap_model


# peft's task type for a transformers head class (PeftModel.from_pretrained wraps the base by it)
PEFT_TASKS = (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
              ("ForQuestionAnswering", "QUESTION_ANS"))


def trained_base_parameters(layers: list[tuple[str, MoLFLinear]]) -> list[str]:
    """Names of the base weights and biases that train (MoLF, or a bias unfrozen by hand): not LoRA."""
    return [f"{n}.base.{pn}" for n, m in layers for pn, p in m.base.named_parameters() if p.requires_grad]


@torch.no_grad()
def export_peft(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None,
                state_dict: dict | None = None) -> str:
    """Write a peft LoRA adapter holding every MoLF layer's experts as one LoRA of rank R = sum r_i.

    A = [A_1; ...; A_E], B = [s_1 B_1, ..., s_E B_E] and lora_alpha = R without rsLoRA, so peft's own
    scaling is 1: `peft.PeftModel.from_pretrained(untouched_base, path)` computes what the molf model does.
    Layers of different total ranks (MoLFLinear built by hand): r is the most common one, and peft's
    rank_pattern and alpha_pattern give every layer its own, keyed by its full name (longest first, so that a
    name that ends another's matches only its own layer).
    Trainable parameters outside the MoLF layers (embeddings, norms: MoLF-E without freeze_others) are
    saved through peft's `modules_to_save` (tied embeddings with `ensure_weight_tying`), so the adapter
    reproduces the trained model exactly. lora_dropout is the layers' dropout (one in peft: the most common,
    with a warning where they differ). Only for MoLF-Efficient (base frozen): a trained base weight is
    not a LoRA adapter. state_dict: the wrapped model's full state dict to take the values from (FSDP2: gathered
    from the shards, see save_pretrained); the model gives the layout.
    """
    model = unwrap_model(model)
    layers = molf_layers(model)
    if not layers:
        raise ValueError("export_peft: the model has no MoLF layers")
    if state_dict is None:
        refuse_shards(model, "molf.export_peft", GATHER + ", then export_peft(model, path, state_dict=sd) on rank 0")
    trained_base = trained_base_parameters(layers)
    if trained_base:  # a bias unfrozen by hand too: peft's adapter would leave it out
        raise ValueError(f"export_peft needs a frozen base (MoLF-Efficient, train_base=False); {trained_base[:3]} "
                         "trains: use molf.merge(model) and save_pretrained instead")
    inside = {id(p) for _, m in layers for p in m.parameters()}
    # Trainable parameters outside the MoLF layers (embeddings, norms, ...) go in as peft's modules_to_save;
    # a parameter shared by several modules (tied embeddings) is saved under each, with peft's weight tying.
    owners: dict[int, list[tuple[str, str, torch.Tensor]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None and p.requires_grad and id(p) not in inside:
                owners.setdefault(id(p), []).append((mod_name, pname, p))
    saved_modules = sorted({mod_name for own in owners.values() for mod_name, _, _ in own})
    for mod_name in saved_modules:
        mod = model.get_submodule(mod_name)
        if not mod_name or any(isinstance(m, MoLFLinear) for m in mod.modules()):
            raise ValueError(f"export_peft: {mod_name or 'the model itself'} holds trained parameters and MoLF "
                             "layers; peft cannot save it as a module (freeze its own parameters, or merge and "
                             "save the full model)")
    totals = {name: sum(m.ranks) for name, m in layers}
    counts = collections.Counter(totals.values())
    rank = max(counts, key=lambda r: (counts[r], r))
    # peft takes a pattern key for a module whose name is the key or ends with "." + key, the first that does
    pattern = {} if len(counts) == 1 else {n: totals[n] for n in sorted(totals, key=len, reverse=True)}

    def value(key, p):
        return p.detach() if state_dict is None else state_dict[key]
    tensors = {}
    for name, m in layers:
        lora_A = [value(f"{name}.lora_A.{i}", x) for i, x in enumerate(m.lora_A)]
        lora_B = [value(f"{name}.lora_B.{i}", x) for i, x in enumerate(m.lora_B)]
        a = torch.cat(lora_A, 0)
        b = torch.cat([s * x.float() for s, x in zip(m.scalings, lora_B)], 1).to(lora_B[0].dtype)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().cpu()
    for own in owners.values():
        for mod_name, pname, p in own:  # safetensors: no sharing
            tensors[f"base_model.model.{mod_name}.{pname}"] = value(f"{mod_name}.{pname}".lstrip("."), p).cpu().clone()
    targets = [n for n, _ in layers]  # full names: exactly the wrapped layers, also after a partial wrap
    cfg = getattr(model, "config", None)
    base_name = base_model_name_or_path or getattr(cfg, "_name_or_path", None) or None
    task = next((t for suffix, t in PEFT_TASKS if type(model).__name__.endswith(suffix)), "CAUSAL_LM")
    dropouts = collections.Counter(m.dropout for _, m in layers)
    dropout = max(dropouts, key=lambda p: (dropouts[p], p))
    if len(dropouts) > 1:  # peft has no per-layer pattern for it
        warnings.warn(f"export_peft: the MoLF layers use LoRA dropouts {sorted(dropouts)}; peft takes one, "
                      f"lora_dropout={dropout} (the most common) is written: training the adapter further with peft "
                      "drops out alike in every layer (its outputs are unaffected)", UserWarning, stacklevel=2)
    config = {"peft_type": "LORA", "task_type": task, "r": rank, "lora_alpha": rank, "use_rslora": False,
              "lora_dropout": dropout, "bias": "none", "target_modules": targets, "fan_in_fan_out": False,
              "init_lora_weights": True, "base_model_name_or_path": base_name, "inference_mode": True,
              "rank_pattern": pattern, "alpha_pattern": dict(pattern), "modules_to_save": saved_modules or None,
              "ensure_weight_tying": any(len(own) > 1 for own in owners.values())}
    os.makedirs(path, exist_ok=True)
    from safetensors.torch import save_file
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return str(path)
