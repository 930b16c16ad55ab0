"""Checkpoints of wrapped models that load exactly, with plain transformers and with molf.

`save_pretrained(model, path)` writes, in one folder:
- a plain transformers checkpoint of the merged model (config.json, model.safetensors): what
  `AutoModelForCausalLM.from_pretrained(path)` loads, every MoLF layer a plain nn.Linear with
  W + sum_i s_i B_i A_i (the model computes what the wrapped one does);
- molf_config.json (how each layer was wrapped, which parameters were frozen) and molf_model.safetensors
  (the wrapped model's own state: base weights and LoRA experts unmerged), from which
  `molf.from_pretrained(path)` rebuilds the wrapped model bitwise, to continue MoLF training.

A model whose MoLF layers have quantized bases (bitsandbytes, MoLF-E) is saved as QLoRA runs are: a peft
adapter for the original quantized base (`export_peft`: adapter_config.json, adapter_model.safetensors)
and molf's state without the quantized weights (molf_model.safetensors holds the experts and every float
tensor; `molf.load(wrapped_quantized_model, path)` restores it, as MoLFTrainer's resume does). No merged
plain model is written: it would not be quantized (`molf.merge` dequantizes, on purpose).

Saving into a folder that holds an earlier save removes what that save wrote and this one does not overwrite,
as transformers removes its own stale shards: its weight files where this save writes merged weights (also a
single file or an index, which transformers leaves: from_pretrained prefers an earlier single file to new
shards) and a peft adapter (plain transformers, finding adapter_config.json beside config.json, loads the
adapter onto the base it names, not this save's weights), both put back if the save fails; an earlier molf
save's merged weights where this one writes an adapter (weights that no molf save wrote, a folder holding the
base model, are left alone).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings

import torch
from torch import nn

from . import quant
from ._dist import GATHER, DTensor, refuse_shards, sharded
from .layer import MoLFLinear, molf_layers, unwrap_model

MOLF_CONFIG = "molf_config.json"
MOLF_WEIGHTS = "molf_model.safetensors"
FORMAT_VERSION = 1


@torch.no_grad()
def merged_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """model.state_dict() (or `state_dict`, the wrapped model's full one: gathered from FSDP2's shards) with every
    MoLF layer as the plain nn.Linear `merge` would give (name.weight = W + sum_i s_i B_i A_i, name.bias = b):
    the keys of the unwrapped model. The model is not changed."""
    # every path to a layer: a block used at several places (shared) has its keys under each of them
    layers = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, MoLFLinear)]
    prefixes = tuple(f"{n}." for n, _ in layers)
    sd = model.state_dict() if state_dict is None else state_dict
    out = {k: v for k, v in sd.items() if not k.startswith(prefixes)}
    for name, m in layers:
        own = None
        if state_dict is not None:
            own = {k: sd[f"{name}.{k}"] for k, _ in m.named_parameters() if f"{name}.{k}" in sd}
        out[f"{name}.weight"] = m.merged_weight(own)
        if m.base.bias is not None:
            out[f"{name}.bias"] = m.base.bias.detach() if own is None else own["base.bias"]
    return out


def molf_config(model: nn.Module) -> dict:
    layers = molf_layers(model)
    inside = {id(p) for _, m in layers for p in m.parameters()}
    return {
        "format_version": FORMAT_VERSION,
        "layers": {n: {"ranks": list(m.ranks), "alphas": list(m.alphas), "rslora": m.rslora, "dropout": m.dropout,
                       "train_base": bool(m.base.weight.requires_grad)} for n, m in layers},
        "frozen_outside": [n for n, p in model.named_parameters() if id(p) not in inside and not p.requires_grad],
        # set by hand against what wrap gives (a LoRA pair frozen, a base bias unfrozen): rewrap sets them again
        "requires_grad_inside": {f"{n}.{pn}": p.requires_grad for n, m in layers for pn, p in m.named_parameters()
                                 if p.requires_grad != _wrap_requires_grad(m, pn)},
    }


def _wrap_requires_grad(layer: MoLFLinear, name: str) -> bool:
    """Whether wrap leaves the layer's parameter `name` trainable: the experts always, the base as its weight."""
    return layer.base.weight.requires_grad or not name.startswith("base.")


def _quantized_prefixes(model: nn.Module) -> tuple[str, ...]:
    """"name." of every bitsandbytes layer (wrapped bases included): their weights are not molf's to save."""
    return tuple(f"{n}." for n, m in model.named_modules(remove_duplicate=False)
                 if n and quant.quant_kind(m) is not None)


def float_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """model.state_dict() (or the given full one) without the quantized layers' weights and quantization state
    (their biases kept)."""
    prefixes = _quantized_prefixes(model)
    sd = model.state_dict() if state_dict is None else state_dict
    return {k: v for k, v in sd.items() if not k.startswith(prefixes) or any(k == p + "bias" for p in prefixes)}


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MERGED_WEIGHTS = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")


def _merged_weight_files(path) -> list[str]:
    """The transformers weight files (single, shards, indexes; safetensors or pickles) in the folder `path`."""
    return [f for f in os.listdir(path) if MERGED_WEIGHTS.fullmatch(f)]


def _remove(path, names) -> None:
    """Remove an earlier save's files `names` from the folder `path` (see the module docstring)."""
    for name in names:
        if os.path.isfile(os.path.join(path, name)):
            os.remove(os.path.join(path, name))


@contextlib.contextmanager
def _earlier_weights_aside(path):
    """Around a merged save into the folder `path`: the transformers weight files and peft adapter already there
    are moved aside and removed once the save succeeded (put back where it fails, in place of what it wrote).
    transformers removes an earlier save's shards, but not its single file nor its index, and from_pretrained
    prefers an earlier single file to new shards, or an adapter (onto the base it names) to the folder's weights."""
    names = _merged_weight_files(path) + [f for f in ADAPTER_FILES if os.path.exists(os.path.join(path, f))]
    if not names:
        yield
        return
    aside = tempfile.mkdtemp(prefix=".molf-earlier-weights-", dir=path)
    for name in names:
        os.replace(os.path.join(path, name), os.path.join(aside, name))
    try:
        yield
    except BaseException:  # the failed save's partial weight files go, the earlier ones come back
        _remove(path, _merged_weight_files(path))
        for name in names:
            os.replace(os.path.join(aside, name), os.path.join(path, name))
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _earlier_merged_save(path) -> bool:
    """Whether the folder `path` holds an earlier molf save of a model without quantized bases."""
    try:
        config = _config(path)
    except (OSError, ValueError):  # no molf save there, or not one molf can read: nothing of ours to remove
        return False
    return isinstance(config, dict) and not config.get("quantized_base")


def _save_quantized(model: nn.Module, path, state_dict: dict | None = None) -> str:
    from safetensors.torch import save_file

    from .export import export_peft, trained_base_parameters
    trained = trained_base_parameters(molf_layers(model))
    if trained:  # a bias unfrozen by hand: molf's state below holds it, a LoRA adapter could not
        warnings.warn(f"save_pretrained: no peft adapter written, since {trained[:3]} trains (not LoRA); "
                      "molf_model.safetensors holds the whole trained state (molf.load)", UserWarning, stacklevel=3)
        _remove(path, ADAPTER_FILES)
    else:
        export_peft(model, path, state_dict=state_dict)
    tensors, aliases, first = {}, {}, {}
    tied = _tied_parameters(model) if state_dict is not None else {}  # a gathered state dict holds copies
    for k, v in float_state_dict(model, state_dict).items():  # tied tensors stored once, other names aliased
        key = (v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride()))
        if k in tied:
            aliases[k] = tied[k]
        elif v.numel() and key in first:
            aliases[k] = first[key]
        else:
            first[key] = k
            tensors[k] = v.detach().contiguous().cpu()
    save_file(tensors, os.path.join(path, MOLF_WEIGHTS),
              metadata={"format": "pt", "molf": str(FORMAT_VERSION), "aliases": json.dumps(aliases)})
    with open(os.path.join(path, MOLF_CONFIG), "w") as f:
        json.dump(dict(molf_config(model), quantized_base=True), f, indent=2)
    return str(path)


PUSH_KWARGS = ("repo_id", "commit_message", "create_pr", "private", "token")


def save_pretrained(model: nn.Module, path: str | os.PathLike, push_to_hub: bool = False,
                    state_dict: dict | None = None, **kwargs) -> str:
    """Write the merged plain checkpoint and molf's exact state to `path` (see the module docstring); a model
    with quantized bases: the peft adapter and molf's float state. kwargs go to transformers'
    `save_pretrained` (e.g. max_shard_size; is_main_process=False, on a distributed run's other ranks, writes
    nothing, as transformers). push_to_hub=True uploads the whole folder once it is written
    (repo_id, default the folder's name; commit_message, create_pr, private, token), as transformers does.
    state_dict: the wrapped model's full state dict to write instead of its parameters' values (a model sharded
    by FSDP2: gather it with get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
    cpu_offload=True)) on every rank, then save on rank 0); the model gives the layout."""
    from safetensors.torch import save_file, save_model

    model = unwrap_model(model)
    layers = molf_layers(model)
    if not layers:
        raise ValueError("save_pretrained: the model has no MoLF layers (use the model's own save_pretrained)")
    if not kwargs.get("is_main_process", True):  # as transformers: a distributed run's other ranks write nothing
        return str(path)  # (their state_dict, gathered with cpu_offload, is empty)
    # transformers would push before molf's own files exist: the folder is pushed below, whole
    hub = {k: kwargs.pop(k) for k in PUSH_KWARGS if k in kwargs} if push_to_hub else {}
    if state_dict is not None:
        state_dict = _check_full_state_dict(model, state_dict)
    else:
        refuse_shards(model, "molf.save_pretrained", GATHER + ", then save_pretrained(model, path, state_dict=sd) "
                      "on rank 0")
    if any(m.quantized for _, m in layers):
        os.makedirs(path, exist_ok=True)
        if _earlier_merged_save(path):
            _remove(path, _merged_weight_files(path))
        _save_quantized(model, path, state_dict)
    else:
        if not hasattr(model, "save_pretrained"):
            raise TypeError(f"save_pretrained needs a transformers model, got {type(model).__name__}")
        os.makedirs(path, exist_ok=True)
        with _earlier_weights_aside(path):
            model.save_pretrained(path, state_dict=merged_state_dict(model, state_dict), **kwargs)
        aliases = _tied_parameters(model)
        meta = {"format": "pt", "molf": str(FORMAT_VERSION), "aliases": json.dumps(aliases)}
        if state_dict is None:
            save_model(model, os.path.join(path, MOLF_WEIGHTS), metadata=meta)
        else:  # tied names stored once, as save_model does for the model's own tensors
            save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k not in aliases},
                      os.path.join(path, MOLF_WEIGHTS), metadata=meta)
        with open(os.path.join(path, MOLF_CONFIG), "w") as f:
            json.dump(molf_config(model), f, indent=2)
    if push_to_hub:
        _push_folder(path, **hub)
    return str(path)


def _check_full_state_dict(model: nn.Module, state_dict) -> dict:
    """state_dict, checked against the model's keys and shapes (a DTensor parameter: its full shape); a
    ValueError naming the first key that does not fit, before anything is written."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of the wrapped model's tensors, got {type(state_dict).__name__}")
    # a quantized layer's packed weight and quantization state are not molf's to write: not checked
    want = {k: tuple(v.shape) for k, v in float_state_dict(model).items()}
    aliases, given = _tied_parameters(model), float_state_dict(model, state_dict)
    missing = [k for k in want if k not in given and k not in aliases]
    unexpected = [k for k in given if k not in want]
    if missing or unexpected:
        raise ValueError(f"state_dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         "(a full state dict of the wrapped model is needed: FSDP2's get_model_state_dict with "
                         "full_state_dict=True, on rank 0)")
    for k, v in given.items():
        if DTensor and isinstance(v, DTensor):
            raise ValueError(f"state_dict[{k!r}] is a DTensor (this rank's shard of it): pass the full state dict, "
                             "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, "
                             "cpu_offload=True)) called on every rank, and save on rank 0")
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != want[k]:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"state_dict[{k!r}] has shape {got}, the model's is {want[k]} (a shard? gather the "
                             "full state dict: get_model_state_dict(..., full_state_dict=True))")
    return state_dict


def _push_folder(path, repo_id: str | None = None, commit_message: str | None = None, create_pr: bool = False,
                 private: bool | None = None, token: str | bool | None = None) -> None:
    """Upload the saved folder to the Hub (huggingface_hub: the repo made if missing)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id or os.path.basename(os.path.abspath(path)), private=private, exist_ok=True)
    api.upload_folder(repo_id=repo.repo_id, folder_path=str(path), commit_message=commit_message or
                      "Upload MoLF model (merged, and molf's state)", create_pr=create_pr)


HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")


def _local_folder(path, **hub) -> str:
    """`path` itself when it is a local folder; a Hugging Face Hub repo id ("user/name") is downloaded into
    huggingface_hub's cache (as transformers' from_pretrained does) and that folder returned."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise ValueError(f"{path} is not a folder (nor a Hugging Face Hub repo id, user/name)")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path, **{k: v for k, v in hub.items() if k in HUB_KWARGS})
    except Exception as e:  # no network, no such repo, gated: say which and why in one line
        raise ValueError(f"{path} is not a local folder and could not be downloaded from the Hugging Face Hub "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def _tied_parameters(model: nn.Module) -> dict[str, str]:
    """{name: the first name of the same Parameter} for every parameter reachable under two names (tied)."""
    first, tied = {}, {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), n) != n:
            tied[n] = first[id(p)]
    return tied


def _tie(model: nn.Module, aliases: dict[str, str]) -> list:
    """Make each parameter named in `aliases` the very Parameter of its original, as it was when saved (the
    merged checkpoint unties bases two wrapped layers shared, Zamba2's shared attention: each layer's merged
    weight differs, so transformers loads them apart). Returns what `_untie` needs to undo it."""
    params = dict(model.named_parameters(remove_duplicate=False))
    undo = []
    for alias, original in aliases.items():
        if alias in params and original in params and params[alias] is not params[original]:
            owner, _, attr = alias.rpartition(".")
            module = model.get_submodule(owner)
            undo.append((module, attr, params[alias]))
            setattr(module, attr, params[original])
    return undo


def _untie(undo: list) -> None:
    for module, attr, p in undo:
        setattr(module, attr, p)


def _aliases(file: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        return json.loads((f.metadata() or {}).get("aliases", "{}"))


def is_molf_checkpoint(path) -> bool:
    return os.path.isfile(os.path.join(path, MOLF_CONFIG)) and os.path.isfile(os.path.join(path, MOLF_WEIGHTS))


EXPERT_KEY = re.compile(r"(.+)\.lora_A\.(\d+)$")


def _weight_files(path) -> list[str]:
    """A transformers checkpoint folder's weight files, in from_pretrained's order of preference: one
    safetensors file, else the shards its index names, else PyTorch pickles (`pytorch_model.bin`, as
    transformers 4 writes with save_safetensors=False; or its shards)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(path, single)):
            return [single]
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                return sorted(set(json.load(f).get("weight_map", {}).values()))
    return []


def _read_weights(file: str) -> dict[str, torch.Tensor]:
    """One weight file's tensors on the CPU (a pickle memory-mapped: only what is used is read)."""
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def _weight_shapes(path) -> dict[str, tuple[str, list[int]]]:
    """{key: (file, shape)} of a transformers checkpoint folder's weights, from the safetensors headers (or the
    memory-mapped pickles); {} where it has none."""
    from safetensors import safe_open

    shapes = {}
    for name in _weight_files(path):
        file = os.path.join(path, name)
        if name.endswith(".safetensors"):
            with safe_open(file, "pt") as f:
                shapes.update({k: (name, list(f.get_slice(k).get_shape())) for k in f.keys()})
        else:
            shapes.update({k: (name, list(v.shape)) for k, v in _read_weights(file).items()})
    return shapes


def wrapped_layout(path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, tuple[int, ...]]]:
    """(the weights' shapes as _weight_shapes gives them, {layer: ranks}) when `path` holds a wrapped model's own
    state_dict, as `model.save_pretrained` or transformers' Trainer write it for a wrapped model
    (`<layer>.base.weight`, `<layer>.lora_A.<i>`: a layout that plain `from_pretrained` loads as random layers);
    ({}, {}) otherwise. The ranks are read from the shapes."""
    if not os.path.isdir(path) or is_molf_checkpoint(path):
        return {}, {}
    try:
        shapes = _weight_shapes(path)
    except Exception:  # an unreadable file (legacy pickle, corrupt): not taken for the wrapped layout
        return {}, {}
    experts: dict[str, dict[int, int]] = {}
    for key, (_, shape) in shapes.items():
        hit = EXPERT_KEY.fullmatch(key)
        if hit and len(shape) == 2:
            experts.setdefault(hit.group(1), {})[int(hit.group(2))] = shape[0]
    return shapes, {layer: tuple(r[i] for i in sorted(r)) for layer, r in experts.items()}


def _reads_tensors(model: nn.Module) -> bool:
    """Whether this process reads a checkpoint's tensors: all but rank 0 of a model sharded by FSDP2 take
    theirs from rank 0's (_assign), so that the node holds one copy of the checkpoint in host memory."""
    return not sharded(model) or torch.distributed.get_rank() == 0


def _assign(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """model.load_state_dict(state, strict=False) (full tensors, checked by the caller); into FSDP2's shards
    where the model holds them, broadcast from rank 0 (a collective: every rank calls it; the others' `state`
    is ignored, see _reads_tensors)."""
    if sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = state if torch.distributed.get_rank() == 0 else {}
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                    strict=False))
    else:
        model.load_state_dict(state, strict=False)


def _load_wrapped_layout(model: nn.Module, path, shapes, ranks: dict[str, tuple[int, ...]]) -> None:
    """Load a wrapped-layout transformers checkpoint (see wrapped_layout) into `model`, wrapped alike:
    every key and shape checked before anything is copied; tied parameters transformers saved once; a quantized
    base's weights are the loaded base's (only the float tensors are read, as for molf's own checkpoints)."""
    mine = dict(molf_layers(model))
    differ = {n: (r, tuple(mine[n].ranks) if n in mine else None) for n, r in sorted(ranks.items())
              if n not in mine or tuple(mine[n].ranks) != r}
    if differ:
        name, (saved, have) = next(iter(differ.items()))
        raise ValueError(f"the checkpoint in {path} was saved from a model wrapped otherwise ({len(differ)} layers "
                         f"differ): {name} has ranks {saved} there, " +
                         ("is not a MoLF layer here" if have is None else f"ranks {have} here") +
                         "; wrap the model with the ranks it was trained with")
    state = model.state_dict()
    wanted = float_state_dict(model)  # every key but a quantized base's own
    tied = _tied_parameters(model)
    missing = [k for k in wanted if k not in shapes and tied.get(k) not in shapes]
    unexpected = [k for k in shapes if k not in state]
    bad = [f"{k}: {shapes[k][1]} there, {list(state[k].shape)} here" for k in wanted
           if k in shapes and shapes[k][1] != list(state[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(f"the checkpoint in {path} does not fit this model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}, shapes {bad[:3]}; nothing was loaded")
    for name in sorted({file for file, _ in shapes.values()}):  # one shard in memory at a time
        part = _read_weights(os.path.join(path, name)) if _reads_tensors(model) else {}
        _assign(model, {k: v for k, v in part.items() if k in wanted})


def rewrap(model: nn.Module, config: dict, backend: str = "auto") -> nn.Module:
    """Wrap `model` (the plain model) as `config` (a molf_config.json) describes, in place."""
    from .layer import _set_child, refuse_offloaded

    refuse_offloaded(model)
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
    frozen, inside = set(config.get("frozen_outside", [])), config.get("requires_grad_inside", {})
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
        elif n in inside:
            p.requires_grad_(bool(inside[n]))
    return model


def load(model: nn.Module, path: str | os.PathLike, **hub) -> nn.Module:
    """Load molf's exact state from a checkpoint folder (or Hub repo id; `hub`: revision, token, cache_dir,
    ...) into `model`, already wrapped the same way. Also a folder that `model.save_pretrained` or transformers'
    Trainer wrote for a wrapped model (the wrapped layout): its ranks are checked by shape, but transformers
    records no alphas, rslora nor which parameters trained: wrap with those of the training run. A model
    sharded by FSDP2 (fully_shard) takes the full tensors into its shards: call it on every rank."""
    from safetensors.torch import load_model

    path = _local_folder(path, **hub)
    inner = unwrap_model(model)
    shapes, ranks = wrapped_layout(path)
    if ranks:
        _load_wrapped_layout(inner, path, shapes, ranks)
        return model
    if not is_molf_checkpoint(path):
        raise ValueError(f"{path} is not a molf checkpoint (no {MOLF_CONFIG} and {MOLF_WEIGHTS})")
    config = _config(path)
    _check_scalings(inner, config, path)
    if config.get("quantized_base"):
        _load_quantized(inner, path)
        return model
    if sharded(inner):  # FSDP2: the full tensors, scattered to the shards
        _assign(inner, _state_file(os.path.join(path, MOLF_WEIGHTS), set(inner.state_dict()), path,
                                   _reads_tensors(inner)))
        return model
    undo = _tie(inner, _aliases(os.path.join(path, MOLF_WEIGHTS)))
    try:
        missing, unexpected = load_model(inner, os.path.join(path, MOLF_WEIGHTS), strict=False)
    except Exception:  # a shape that does not fit: the model as it was
        _untie(undo)
        raise
    if missing or unexpected:
        _untie(undo)
        raise ValueError(f"the molf checkpoint in {path} does not fit this model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return model


def _check_scalings(model: nn.Module, config: dict, path) -> None:
    """ValueError unless each MoLF layer the checkpoint names has its alphas and rslora: the weights of another
    scaling load without a shape error and compute another function."""
    mine = dict(molf_layers(model))
    for name, spec in config.get("layers", {}).items():
        m = mine.get(name)
        if m is None:
            continue  # the state dict's keys say it (missing / unexpected)
        saved = (list(spec["ranks"]), [float(a) for a in spec["alphas"]], bool(spec["rslora"]))
        have = (list(m.ranks), [float(a) for a in m.alphas], bool(m.rslora))
        if saved != have:
            raise ValueError(f"the molf checkpoint in {path} was saved with {name} wrapped as ranks={saved[0]}, "
                             f"alphas={saved[1]}, rslora={saved[2]}, but this model's is ranks={have[0]}, "
                             f"alphas={have[1]}, rslora={have[2]}: its experts would compute another function; "
                             "wrap the model as molf_config.json says (molf.from_pretrained does)")


def _config(path) -> dict:
    with open(os.path.join(path, MOLF_CONFIG)) as f:
        return json.load(f)


def has_quantized_bases(model: nn.Module) -> bool:
    """Whether a MoLF layer of `model` (also inside torch.compile's or (D)DP's wrapper) has a quantized base."""
    return any(m.quantized for _, m in molf_layers(unwrap_model(model)))


def _load_quantized(model: nn.Module, path) -> nn.Module:
    if not has_quantized_bases(model):
        raise ValueError(f"the molf checkpoint in {path} (saved from a quantized base) does not fit this model: its "
                         "MoLF layers have float bases; load the same base quantized, wrap it as molf_config.json "
                         "says, then molf.load(model, path)")
    _assign(model, _state_file(os.path.join(path, MOLF_WEIGHTS), set(float_state_dict(model)), path,
                               _reads_tensors(model)))
    return model


FSDP_MODEL_NAME = "pytorch_model_fsdp"  # accelerate's save_fsdp_model: the file (.bin) or folder (_i) of model i
FSDP_SHARDS = f"{FSDP_MODEL_NAME}_0"  # the Trainer's sharded model folder (model 0)


def load_fsdp_quantized(model: nn.Module, path) -> None:
    """Load a checkpoint of an FSDP2 run into the shards of a model whose MoLF layers have bitsandbytes-quantized
    bases (accelerate's load_fsdp_model cannot: it loads every key, and the shards hold no quantization state).
    Only float_state_dict's keys load, the experts and every float tensor: from molf's float state (FULL_STATE_DICT
    checkpoints, written by MoLFTrainer), from the Trainer's sharded folder (SHARDED_STATE_DICT) or, as
    accelerate's save_fsdp_model wrote them, a torch.distributed.checkpoint folder or a full state dict's file;
    the quantized weights, frozen, stay as loaded. Call it on every rank."""
    inner = unwrap_model(model)
    if os.path.isfile(path):
        _load_full_floats(inner, path)
    elif is_molf_checkpoint(path):
        load(inner, path)
    elif os.path.isdir(os.path.join(path, FSDP_SHARDS)) or os.path.isfile(os.path.join(path, ".metadata")):
        shards = os.path.join(path, FSDP_SHARDS)
        _load_sharded_floats(inner, shards if os.path.isdir(shards) else path)
    else:
        raise ValueError(f"{path} holds neither molf's float state ({MOLF_CONFIG}, {MOLF_WEIGHTS}) nor the "
                         f"Trainer's sharded model folder {FSDP_SHARDS}: not a checkpoint of an FSDP2 run")


def _load_sharded_floats(model: nn.Module, folder) -> None:
    """float_state_dict's keys from a torch.distributed.checkpoint folder, into this rank's shards, in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    wanted = set(float_state_dict(model))
    state = {k: v for k, v in get_model_state_dict(model).items() if k in wanted}
    dcp.load({"model": state}, checkpoint_id=folder)
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))


def _load_full_floats(model: nn.Module, file) -> None:
    """float_state_dict's keys from a file torch.save wrote a full state dict to (accelerate's
    pytorch_model_fsdp.bin): every rank checks the names (memory-mapped, no tensor read), rank 0's tensors are
    broadcast to the shards."""
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    wanted = set(float_state_dict(model))
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(f"{file} does not fit this model: missing {missing[:5]} ({len(missing)} keys); load the "
                         "same base quantized and wrap it as in the run that saved it")
    _assign(model, {k: state[k] for k in wanted})


def _state_file(file: str, wanted: set, path, read: bool) -> dict:
    """molf_model.safetensors (its names alone, each to None, where not `read`), its tied names restored,
    checked to hold exactly the keys `wanted`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if read:
        state = load_file(file)
    else:
        with safe_open(file, "pt") as f:
            state = dict.fromkeys(f.keys())
    for alias, original in _aliases(file).items():  # tied tensors are stored once, under either name
        for name, other in ((alias, original), (original, alias)):
            if name not in state and other in state:
                state[name] = state[other]
    missing, unexpected = wanted - set(state), set(state) - wanted
    if missing or unexpected:
        raise ValueError(f"the molf checkpoint in {path} does not fit this model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}; load the same base (quantized if it was), wrap it "
                         "as molf_config.json says, then molf.load(model, path)")
    return state


def from_pretrained(path: str | os.PathLike, backend: str = "auto", **kwargs) -> nn.Module:
    """The wrapped model saved by `molf.save_pretrained` (or MoLFTrainer), bitwise as it was saved.

    The model class is the one the checkpoint's config.json names in `architectures` (a causal LM, a sequence
    classifier, ...), AutoModelForCausalLM where it names none that transformers has (remote code); kwargs go to
    its `from_pretrained` (e.g. dtype, device_map). `path` may be a Hugging Face Hub repo id (downloaded with
    the kwargs revision, token, cache_dir, ...)."""
    import transformers

    path = _local_folder(path, **kwargs)
    _, ranks = wrapped_layout(path)
    if ranks:
        found = sorted(set(ranks.values()))
        found = found[0] if len(found) == 1 else found
        raise ValueError(f"{path} holds a wrapped model as model.save_pretrained (or transformers' Trainer) wrote "
                         f"it, not a molf checkpoint: {len(ranks)} MoLF layers (ranks {found}), "
                         "without the alphas, rslora or frozen parameters molf.from_pretrained needs (and plain "
                         "from_pretrained would leave those layers random). Load it as: model = "
                         "AutoModelForCausalLM.from_pretrained(<the base model, or this folder: molf.load fills the "
                         "layers it leaves random>); molf.wrap(model, <as in training>); "
                         f"molf.load(model, {str(path)!r}); then molf.save_pretrained(model, <folder>) for a plain "
                         "merged checkpoint")
    if not is_molf_checkpoint(path):
        raise ValueError(f"{path} is not a molf checkpoint (no {MOLF_CONFIG} and {MOLF_WEIGHTS}); a plain model "
                         "loads with AutoModelForCausalLM.from_pretrained")
    config = _config(path)
    if config.get("quantized_base"):
        raise ValueError(f"{path} was saved from a quantized base and holds no base weights (a peft adapter and "
                         "molf's state): load the base with its quantization_config, molf.wrap it as "
                         "molf_config.json says, then molf.load(model, path); or load the adapter with peft")
    with open(os.path.join(path, "config.json")) as f:
        architectures = json.load(f).get("architectures") or [""]
    model_class = getattr(transformers, architectures[0], None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        model_class = transformers.AutoModelForCausalLM
    model = model_class.from_pretrained(path, **kwargs)
    rewrap(model, config, backend)
    return load(model, path)
