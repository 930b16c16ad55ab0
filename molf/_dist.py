"""torch.distributed helpers: local shards of FSDP2's DTensors (and the step's columns of them, checked), the
group a score sum is reduced over, FSDP1 found and refused."""
from __future__ import annotations

from operator import itemgetter

import torch

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch without the public DTensor API
    DTensor, Shard = (), ()


_M, _V, _STEP = itemgetter("exp_avg"), itemgetter("exp_avg_sq"), itemgetter("step")


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a (possibly sharded) tensor; in-place ops on it update the DTensor."""
    return t.to_local() if DTensor and isinstance(t, DTensor) else t


GATHER = ("gather the full state dict on every rank, sd = get_model_state_dict(model, options=StateDictOptions("
          "full_state_dict=True, cpu_offload=True)) (torch.distributed.checkpoint.state_dict)")


def sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 (fully_shard) holds any of the model's parameters as DTensors."""
    return bool(DTensor) and any(isinstance(p, DTensor) for p in model.parameters())


def refuse_shards(model: torch.nn.Module, what: str, how: str) -> None:
    """A ValueError where `model` holds FSDP2 shards and `what` needs its full tensors; `how` says what to do."""
    if sharded(model):
        raise ValueError(f"{what}: the model is sharded by FSDP2 (its parameters are DTensors, each rank holding a "
                         f"piece of each); {how}")


def state_columns(params, grads, states, sharded: bool) -> list[list]:
    """A step's columns [params, grads, exp_avgs, exp_avg_sqs, step counters] from the parameters, their gradients
    and their optimizer states; where `sharded` (FSDP2), the rank-local tensors."""
    cols = [params, grads, list(map(_M, states)), list(map(_V, states)), list(map(_STEP, states))]
    return [[local(t) for t in c] for c in cols] if sharded else cols


def check_columns(opt, params, cols) -> None:
    """Raise where a row of `state_columns`' [params, grads, exp_avgs, exp_avg_sqs] differs in numel or device:
    the kernels and C loops index every column by the parameter's numel, so a moment left smaller by a parameter
    resized in place (p.data = ...) would be written out of bounds. One host check per tensor."""
    for p, row in zip(params, zip(*cols[:4])):
        if len({t.numel() for t in row}) > 1 or len({t.device for t in row}) > 1:
            st = opt.state[p]
            raise ValueError(
                f"{opt.param_name(p)}: parameter {tuple(p.shape)} on {p.device}, gradient {tuple(p.grad.shape)}, "
                f"moments {tuple(st['exp_avg'].shape)} and {tuple(st['exp_avg_sq'].shape)} on {st['exp_avg'].device}:"
                " the moments must have the parameter's shape and device (a parameter resized after the optimizer "
                "stepped: create the optimizer after resizing)")


def shard_group(params):
    """The process group over which FSDP2 shards these parameters (None when nothing is sharded).

    Per-expert score sums are partial on each rank along sharded mesh dimensions and equal along
    replicated ones (HSDP), so they are summed over the sharded dimension's group only."""
    groups = set()
    for p in params:
        if DTensor and isinstance(p, DTensor):
            dims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
            if len(dims) > 1:
                raise NotImplementedError("MoLFAdamW supports parameters sharded along one mesh dimension")
            if dims:
                # by equality (ranks, shape, names), not identity: once other meshes were made in the process,
                # FSDP2 left some parameters of one model (the MoLF layers' bases) a distinct but equal mesh
                groups.add((p.device_mesh, dims[0]))
    if not groups:
        return None
    if len(groups) > 1:
        raise NotImplementedError("MoLFAdamW needs every sharded parameter on one device mesh dimension, got "
                                  f"{[(str(mesh), dim) for mesh, dim in groups]}")
    mesh, dim = groups.pop()
    return mesh.get_group(mesh_dim=dim)


def fsdp1_name(model: torch.nn.Module) -> str | None:
    """Where FSDP1 (FullyShardedDataParallel) holds part of `model`: the name of a wrapping unit, or of a
    parameter it has flattened (the model passed as the inner module of a unit); None when it holds none."""
    for name, m in model.named_modules():
        if type(m).__name__ == "FullyShardedDataParallel" and type(m).__module__.startswith("torch.distributed.fsdp"):
            return name or "the model itself"
    for name, p in model.named_parameters():
        if getattr(p, "_fsdp_flattened", False) or getattr(p, "_is_flat_param", False):
            return name
    return None


def sharded_or_replicated(model: torch.nn.Module) -> str | None:
    """What already shards or replicates `model` across processes (DDP, FSDP2's fully_shard, FSDP1), which would
    not see parameters added to it afterwards; None when nothing does."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return "DistributedDataParallel"
    fsdp1 = fsdp1_name(model)
    if fsdp1 is not None:
        return f"FSDP1 (FullyShardedDataParallel, at {fsdp1})"
    for name, m in model.named_modules():
        if any(c.__name__ == "FSDPModule" and c.__module__.startswith("torch.distributed.fsdp")
               for c in type(m).__mro__):
            return f"FSDP2 (fully_shard, at {name or 'the model itself'})"
    return None
