"""Worker processes for tests/test_distributed.py (2 ranks, gloo, CPU)."""
import contextlib
import functools
import os
import traceback

import torch
import torch.distributed as dist

import molf
from helpers import batch, exit_rank_without_finalizing, tiny_qwen2

@contextlib.contextmanager
def cpu_ranks():
    """Spawned CPU ranks run the Triton kernels under the interpreter, which must be on before they import
    triton (on a GPU machine the parent has not set it): the children inherit it from here."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


CFG = dict(ranks=(2, 8), alphas=(8, 16), train_base=True)
OPT = dict(lr=1e-3, lora_lr=1e-3, weight_decay=0.1, lora_weight_decay=0.01)


def build(mode, world, backend, shard_before_optimizer=True, device="cpu"):
    model = molf.wrap(tiny_qwen2(seed=0).to(device), backend="eager" if device == "cpu" else "auto", **CFG)
    inner = model
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
        inner = model.module
    elif mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(torch.device(device).type, (world,))
        if not shard_before_optimizer:
            opt = molf.MoLFAdamW(inner, backend=backend, **OPT)
        for layer in inner.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(inner, mesh=mesh)
        if not shard_before_optimizer:
            return model, inner, opt
    return model, inner, molf.MoLFAdamW(inner, backend=backend, **OPT)


def full_params(inner):
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten()
                      for p in inner.parameters()])


def steps(model, opt, ids, n):
    routes = []
    for _ in range(n):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        routes.append(opt.routing.clone())
    return routes


def run(rank, world, initfile, mode, backend, outdir, nccl=False):
    if nccl:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if nccl else "gloo", init_method=f"file://{initfile}", rank=rank,
                            world_size=world)
    device = f"cuda:{rank}" if nccl else "cpu"
    make = functools.partial(build, device=device)
    result = {}
    try:
        torch.manual_seed(0)
        ids = batch(n=2 * world)[2 * rank: 2 * rank + 2].to(device)  # this rank's half of the global batch
        model, inner, opt = make(mode, world, backend)
        routes = steps(model, opt, ids, 10)
        result.update(routes=torch.stack(routes), params=full_params(inner))
        # Save after 5 steps, load into a fresh model and optimizer, continue: same as uninterrupted.
        model2, inner2, opt2 = make(mode, world, backend)
        steps(model2, opt2, ids, 5)
        saved = (inner2.state_dict(), opt2.state_dict())
        path = os.path.join(outdir, f"ckpt{rank}.pt")
        torch.save(saved, path)
        model3, inner3, opt3 = make(mode, world, backend)
        msd, osd = torch.load(path, weights_only=False)
        inner3.load_state_dict(msd)
        opt3.load_state_dict(osd)
        result.update(resumed_routes=torch.stack(steps(model3, opt3, ids, 5)), resumed_params=full_params(inner3))
        if mode == "fsdp2":
            # Experts are sharded like every parameter; merge works on gathered full weights.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            from torch.distributed.tensor import DTensor
            a = inner.model.layers[0].self_attn.q_proj.lora_A[0]
            result["lora_sharded"] = isinstance(a, DTensor) and a.to_local().shape[0] < a.shape[0]
            full = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            ids_cpu = ids.cpu()
            with torch.no_grad():
                sharded_logits = model(ids).logits
            try:  # the sharded model's own state dict (DTensors) is refused before anything is written
                molf.save_pretrained(inner, os.path.join(outdir, f"shards{rank}"), state_dict=inner.state_dict())
                result["dtensor_save_error"] = None
            except ValueError as e:
                result["dtensor_save_error"] = str(e)
            if rank == 0:
                plain = molf.wrap(tiny_qwen2(seed=1), backend="eager", **CFG)
                plain.load_state_dict(full)
                molf.merge(plain)
                with torch.no_grad():
                    result["merged_logits"], result["sharded_logits"] = plain(ids_cpu).logits, sharded_logits
            # The optimizer built before fully_shard (as the Trainer and accelerate.prepare do): it takes the
            # sharded parameters at its first step and trains as one built after.
            model4, inner4, opt4 = make(mode, world, backend, shard_before_optimizer=False)
            late = torch.stack(steps(model4, opt4, ids, 10))
            result.update(late_shard_routes=late, late_shard_params=full_params(inner4))
    except Exception:
        result["error"] = traceback.format_exc()
    result = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in result.items()}
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    exit_rank_without_finalizing()


def plan_worker(rank, world, init_dir, out_dir):
    """Both ranks plan the same layer with fake timers that disagree: rank 0 measures (the chain wins there),
    rank 1 measures nothing and takes rank 0's choice."""
    os.environ["MOLF_BACKEND"] = "triton"
    from molf import _plan
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_dir}", rank=rank, world_size=world)
        prefer = "chain" if rank == 0 else "fused"
        _plan.PLANNER = _plan.LayerPlanner(timer=lambda fn, impl, m: 1.0 if impl == prefer else 2.0)
        torch.manual_seed(0)
        layer = molf.MoLFLinear(torch.nn.Linear(12, 10), ranks=(2, 4), alphas=(4, 4))
        x = torch.randn(5, 12)
        result["y"] = layer(x).detach()
        layer(torch.randn(300, 12))  # another probe of the same shape: decided already
        result["rows"] = molf.layer_plan()
        result["measurements"] = _plan.PLANNER.measurements
    except Exception:
        result["error"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"plan{rank}.pt"))
    exit_rank_without_finalizing()


def eval_plan_worker(rank, world, init_dir, out_dir):
    """Training shapes planned together, then rank 0 alone runs the model in eval mode without gradients (a
    sample generated on the main process, as training scripts do under DDP): a shape no other rank meets."""
    import datetime
    os.environ["MOLF_BACKEND"] = "triton"
    from molf import _plan
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_dir}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        _plan.PLANNER = _plan.LayerPlanner(timer=lambda fn, impl, m: 1.0 if impl == "chain" else 2.0)
        torch.manual_seed(0)
        layer = molf.MoLFLinear(torch.nn.Linear(12, 10), ranks=(2, 4), alphas=(4, 4))
        layer(torch.randn(5, 12)).sum().backward()
        if rank == 0:
            layer.eval()
            with torch.no_grad():
                result["y"] = layer(torch.randn(3, 12))
            layer.train()
        dist.barrier()  # before: rank 0 waited in a broadcast that rank 1 never joined
        result["rows"] = molf.layer_plan()
    except Exception:
        result["error"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"plan{rank}.pt"))
    exit_rank_without_finalizing()


def refusals_worker(rank, world, init_dir, out_dir):
    """What molf refuses under torch.distributed, as the message each raises (None: nothing raised).
    MoLFAdamW on FSDP1 (FullyShardedDataParallel), with and without use_orig_params, and on its inner module
    (before: routing differed per rank, or a KeyError); molf.wrap after DDP, fully_shard or FSDP1 (before: the
    new experts were outside DDP's buckets and FSDP's shards, their gradients neither averaged nor sharded);
    save_pretrained, export_peft and merge of FSDP2's shards without a gathered state dict (before: a RuntimeError
    from an invalid storage, or from mixed Tensor and DTensor)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    def message(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except ValueError as e:
            return str(e)
        return None

    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_dir}", rank=rank, world_size=world)
        for orig in (True, False):
            model = FullyShardedDataParallel(molf.wrap(tiny_qwen2(seed=0), backend="eager", **CFG),
                                             device_id=torch.device("cpu"), use_orig_params=orig)
            result[f"optimizer-fsdp1-{orig}"] = message(molf.MoLFAdamW, model, **OPT)
            result[f"optimizer-fsdp1-{orig}-inner"] = message(molf.MoLFAdamW, model.module, **OPT)
        result["wrap-ddp"] = message(molf.wrap, torch.nn.parallel.DistributedDataParallel(tiny_qwen2(seed=0)), **CFG)
        plain = tiny_qwen2(seed=0)
        for layer in plain.model.layers:
            fully_shard(layer, mesh=init_device_mesh("cpu", (world,)))
        result["wrap-fsdp2"] = message(molf.wrap, plain, **CFG)
        result["wrap-fsdp1"] = message(molf.wrap, FullyShardedDataParallel(
            tiny_qwen2(seed=0), device_id=torch.device("cpu")), **CFG)
        for train_base in (True, False):  # shards, without the gathered state dict
            model = molf.wrap(tiny_qwen2(seed=0), ranks=(2, 8), alphas=(8, 16), train_base=train_base)
            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            if train_base:
                result["full-save_pretrained"] = message(molf.save_pretrained, model, os.path.join(out_dir, f"s{rank}"))
                result["full-merge"] = message(molf.merge, model)
            else:
                result["full-export_peft"] = message(molf.export_peft, model, os.path.join(out_dir, f"p{rank}"))
    except Exception:
        result["error"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"refusals-{rank}.pt"))
    exit_rank_without_finalizing()


def load_worker(rank, world, init_dir, out_dir, folders):
    """molf.load of each folder into a model sharded by FSDP2 (fully_shard per layer and at the root), after which
    the rank's full parameters are recorded (before: a RuntimeError from an invalid storage on every rank), and
    how many weight files the rank read tensors from (rank 0 alone: the others take theirs by broadcast)."""
    import safetensors.torch

    from molf import checkpoint
    result = {"reads": 0}

    def counted(read):
        def reading(*args, **kwargs):
            result["reads"] += 1
            return read(*args, **kwargs)
        return reading
    safetensors.torch.load_file = counted(safetensors.torch.load_file)
    checkpoint._read_weights = counted(checkpoint._read_weights)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_dir}", rank=rank, world_size=world)
        for folder in folders:
            _, inner, _ = build("fsdp2", world, "eager")
            molf.load(inner, folder)
            result[folder] = full_params(inner)
    except Exception:
        result["error"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"load-{rank}.pt"))
    exit_rank_without_finalizing()


def other_meshes_worker(rank, world, init_dir, out_dir):
    """FSDP2 training after other device meshes were made in the process (another model sharded first, each layer
    on a mesh of its own): the MoLF model's parameters then hold distinct but equal DeviceMesh objects (before:
    MoLFAdamW refused them, "every sharded parameter on one device mesh dimension")."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_dir}", rank=rank, world_size=world)
        other = tiny_qwen2(seed=0)
        for layer in other.model.layers:
            fully_shard(layer, mesh=init_device_mesh("cpu", (world,)))
        torch.manual_seed(0)
        ids = batch(n=2 * world)[2 * rank: 2 * rank + 2]
        model, inner, opt = build("fsdp2", world, "eager")
        result.update(routes=torch.stack(steps(model, opt, ids, 10)), params=full_params(inner))
    except Exception:
        result["error"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"meshes-{rank}.pt"))
    exit_rank_without_finalizing()


def mesh_kinds_worker(rank, world, init_dir, out_dir, kind):
    """Ten steps of FSDP2 in a set-up beside the plain one: "hsdp", 2 replicas x world/2 shards (a 2-D mesh: the
    score sums are reduced over the shard dimension only); "bf16-compute", MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32) (fp32 shards, bf16 all-gathered weights in forward and backward). Each rank takes its
    part of the same global batch as tests/test_distributed.py's single process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_dir}", rank=rank, world_size=world)
        torch.manual_seed(0)
        rows = 4 // world
        ids = batch(n=4)[rows * rank: rows * (rank + 1)]
        model = molf.wrap(tiny_qwen2(seed=0), backend="eager", **CFG)
        kw = {}
        if kind == "hsdp":
            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (world,))
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, **kw)
        fully_shard(model, mesh=mesh, **kw)
        opt = molf.MoLFAdamW(model, backend="eager", **OPT)
        result.update(routes=torch.stack(steps(model, opt, ids, 10)), params=full_params(model), scores=opt.scores)
    except Exception:
        result["error"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"{kind}-{rank}.pt"))
    exit_rank_without_finalizing()
