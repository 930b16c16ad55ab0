"""Which parameters a MoLF optimizer updates, grouped the way the algorithm needs them."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ._dist import fsdp1_name
from .layer import expert_names as layer_expert_names
from .layer import molf_layers, unwrap_model

# Param-group kinds: the full expert's weight and bias, the LoRA experts, everything else.
FULL, FULL_BIAS, LORA, DECAY, NO_DECAY = "full", "full_bias", "lora", "decay", "no_decay"


@dataclass
class Layout:
    layer_names: list[str]
    expert_names: list[str]
    experts: list[list[list[nn.Parameter]]]  # [layer][expert] -> that expert's trainable parameters
    others: list[nn.Parameter]               # trainable parameters outside MoLF layers (plain AdamW)
    groups: list[dict]                       # torch param groups, each tagged with its "kind"
    modules: list                            # the MoLFLinear layers, in layer_names order
    names: dict                              # id(parameter) -> a readable name (layer, expert, tensor)
    slots: list                              # (module, attribute, parameter) of every trainable parameter
    frozen: list                             # (name, parameter) of the model's parameters frozen at build time


def build_layout(model: nn.Module, lr: float, lora_lr: float | None, weight_decay: float,
                 lora_weight_decay: float) -> Layout:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (molf wraps the model, not a parameter list), "
                        f"got {type(model).__name__}")
    fsdp1 = fsdp1_name(model)
    if fsdp1 is not None:
        raise ValueError(f"model is sharded with FSDP1 (FullyShardedDataParallel, at {fsdp1}), which flattens the "
                         "experts' parameters into per-rank pieces: each rank would score and route on its own piece. "
                         "Use FSDP2 (torch.distributed.fsdp.fully_shard; the Trainer: fsdp_config={'version': 2}; "
                         "accelerate launch --use_fsdp --fsdp_version 2)")
    model = unwrap_model(model)  # names as the model's own, not torch.compile's or DDP's wrapper's
    layers = molf_layers(model)
    if not layers:
        raise ValueError("the model has no MoLF layers: call molf.wrap(model, ...) before creating MoLFAdamW")
    # One expert layout for the whole model: "full" where any layer's base trains, then the LoRA experts. An
    # expert left without trainable parameters in a layer (frozen by hand: a layer frozen whole, its base or
    # one LoRA pair) has no gradient there, scores -inf and never wins, as a layer unused in a step.
    ranks = layers[0][1].ranks
    for n, m in layers:
        if m.ranks != ranks:
            raise ValueError(f"all MoLF layers must share one expert layout; {layers[0][0]} has LoRA ranks "
                             f"{list(ranks)} but {n} has {list(m.ranks)}: wrap the model with one `ranks`")
    has_full = any(p.requires_grad for _, m in layers for p in m.base.parameters())
    expert_names = layer_expert_names(ranks, has_full)
    lora_lr = lr if lora_lr is None else lora_lr
    kinds = {FULL: [], FULL_BIAS: [], LORA: [], DECAY: [], NO_DECAY: []}
    experts, inside, names, full_of = [], set(), {}, {}
    for lname, m in layers:
        own = {id(p): n for n, p in m.named_parameters()}
        per = []
        if has_full:
            full = [p for p in (m.base.weight, m.base.bias) if p is not None and p.requires_grad]
            for p in full:
                if full_of.setdefault(id(p), lname) != lname:
                    raise ValueError(
                        f"the base {own[id(p)].rpartition('.')[2]} of {lname} is the same tensor as {full_of[id(p)]}'s "
                        "(tied weights): MoLF routes each layer's full expert on its own, and a weight two layers "
                        "share would take both layers' updates (its moments advanced twice a step); train it with "
                        "train_base=False (MoLF-E: the tied base stays frozen), or give each layer its own copy")
            kinds[FULL].extend(p for p in full if p is m.base.weight)
            kinds[FULL_BIAS].extend(p for p in full if p is not m.base.weight)
            per.append(full)
        for a, b in zip(m.lora_A, m.lora_B):
            ps = [p for p in (a, b) if p.requires_grad]
            kinds[LORA].extend(ps)
            per.append(ps)
        experts.append(per)
        inside.update(id(p) for p in m.parameters())
        for ename, ps in zip(expert_names, per):
            names.update((id(p), f"{lname}.{own[id(p)]} (expert {ename})") for p in ps)
    if not any(ps for per in experts for ps in per):
        raise ValueError(f"every expert of the model's {len(layers)} MoLF layers is frozen (requires_grad=False): "
                         "nothing would be routed or trained. Was the model frozen after molf.wrap (e.g. "
                         "model.requires_grad_(False), peft's prepare_model_for_kbit_training)? Freeze first, "
                         "then wrap")
    others, seen = [], set(inside)
    for n, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        others.append(p)
        names[id(p)] = n
        no_decay = p.ndim < 2 or "norm" in n.lower()
        kinds[NO_DECAY if no_decay else DECAY].append(p)
    hyper = {FULL: (lr, weight_decay), FULL_BIAS: (lr, 0.0), LORA: (lora_lr, lora_weight_decay),
             DECAY: (lr, weight_decay), NO_DECAY: (lr, 0.0)}
    groups = [dict(params=ps, lr=hyper[k][0], weight_decay=hyper[k][1], kind=k) for k, ps in kinds.items() if ps]
    # Where each trained parameter lives, so that a replaced one (load_state_dict(assign=True), fully_shard,
    # to_empty) is caught by an identity check per step.
    slots = [(mod, attr, p) for mod in model.modules() for attr, p in mod._parameters.items()
             if p is not None and id(p) in names]
    frozen = [(n, p) for n, p in model.named_parameters() if id(p) not in names]
    return Layout([n for n, _ in layers], expert_names, experts, others, groups, [m for _, m in layers], names,
                  slots, frozen)
