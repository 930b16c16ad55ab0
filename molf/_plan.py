"""Which implementation runs a MoLF layer on a GPU: the fused kernels or the cuBLAS chain, measured per shape.

The chain is F.linear + the skinny low-rank GEMM + one addmm (molf.layer.lowrank_linear, unsloth's shape);
the fused path is kernels/molf_linear.py. For each layer shape (device, N, K, ranks, dtype, bias, dropout,
whether the base trains) seen by a layer with backend="auto", both are timed once, forward + backward, at
the token counts PROBE_M; a call with M tokens takes the choice of the nearest probe (log scale). So molf
is never slower than the unfused path at the probes, by construction. A layer in eval mode called without
gradients (evaluation, generation) is planned apart, on the forward alone; a training-mode call without
gradients (reentrant activation checkpointing's first pass) keeps the forward + backward plan, so that the
recomputation runs the same implementation.

- MOLF_LAYER_IMPL=fused|chain pins the choice (nothing is measured); "auto" (the default) measures.
- MOLF_CACHE_DIR: choices are read from and written to `<dir>/layer_plans.json`, keyed by the GPU's name
  and the torch and triton versions as well as the shape, so a later run measures nothing.
- Deterministic within a run (a shape is decided once) and identical across ranks: with torch.distributed
  initialised, rank 0 decides (from its cache or by measuring) and broadcasts to every rank, at the first
  forward of each training shape, which every rank runs in the same order (as DDP and FSDP require).
  Evaluation and generation shapes (eval mode, no gradients) are decided by each rank alone: under DDP the
  main process often generates by itself, and a broadcast only it joined would hang.
- Never measured while a CUDA graph is captured or torch.compile traces: an undecided shape then runs
  fused without recording a choice.
- `molf.layer_plan()` lists every decision with its measured times; the logger "molf" says each at INFO.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

IMPLS = ("fused", "chain")
PROBE_M = (128, 512, 2048, 8192)
ENV_IMPL, ENV_CACHE = "MOLF_LAYER_IMPL", "MOLF_CACHE_DIR"
CACHE_FILE = "layer_plans.json"
log = logging.getLogger("molf")


def pinned_impl() -> str | None:
    """MOLF_LAYER_IMPL's pin ("fused" or "chain"), None for "auto" or unset; anything else is an error."""
    value = os.environ.get(ENV_IMPL, "auto")
    if value not in ("auto", *IMPLS):
        raise ValueError(f"{ENV_IMPL} must be one of {('auto', *IMPLS)}, got {value!r}")
    return None if value == "auto" else value


_PROBE_KEY = {m: str(m) for m in PROBE_M}
_PROBE_UPPER = [(math.sqrt(a * b), a) for a, b in zip(PROBE_M, PROBE_M[1:])]  # geometric midpoints


def probe_for(m: int) -> int:
    """The probe token count whose choice a call with m tokens takes: nearest in log scale, ties upward."""
    for mid, probe in _PROBE_UPPER:
        if m < mid:
            return probe
    return PROBE_M[-1]


def cuda_event_timer(fn, *, impl: str, m: int, repeat: int = 5) -> float:
    """Median milliseconds of fn() over `repeat` runs after one warm-up (which also autotunes)."""
    fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    start = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for s, e in zip(start, end):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end))


@dataclass
class ShapePlan:
    """The decision for one layer shape: impl per probe M, the times (ms) measured, and where it came from."""
    shape: dict
    impl: dict = field(default_factory=dict)  # probe M (as str, JSON keys) -> "fused" | "chain"
    ms: dict = field(default_factory=dict)  # probe M -> {"fused": ms, "chain": ms}
    source: str = "measured"


def _versions_key(device: torch.device) -> str:
    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}|torch {torch.__version__}|triton {triton.__version__}"


def shape_of(layer, x: torch.Tensor) -> dict:
    """The plan's key for `layer` called on x (x already in the compute dtype)."""
    from .kernels._utils import autocast_dtype  # the planner runs on the triton backend only: triton is there
    dtype = autocast_dtype(x.device.type) or x.dtype
    return dict(device=str(x.device), n=layer.out_features, k=layer.in_features, ranks=list(layer.ranks),
                dtype=str(dtype).replace("torch.", ""), bias=layer.base.bias is not None,
                dropout=bool(layer.training and layer.dropout > 0), train_base=bool(layer.base.weight.requires_grad),
                forward_only=not layer.training and not torch.is_grad_enabled())


def _shape_str(shape: dict) -> str:
    return json.dumps(shape, sort_keys=True)


class LayerPlanner:
    """Decides, caches and reports the implementation per layer shape (see the module docstring).
    timer(fn, impl=..., m=...) -> milliseconds; the tests pass a fake one."""

    def __init__(self, timer=cuda_event_timer):
        self.timer = timer
        self.plans: dict[str, ShapePlan] = {}
        self._by_layer: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.measurements = 0  # how many (shape, probe, impl) timings ran: the tests count them

    def choose(self, layer, x: torch.Tensor, run) -> str:
        """"fused" or "chain" for `layer` on x (..., K); run(impl, x) is the layer's forward by impl."""
        pin = pinned_impl()
        if pin is not None:
            return pin
        # Per layer, the plan is found by a tuple lookup: no per-call key building for a 196-layer model.
        fast = (x.device, x.dtype, torch.is_autocast_enabled(x.device.type), layer.training,
                layer.base.weight.requires_grad, torch.is_grad_enabled())
        mine = self._by_layer.setdefault(layer, {})
        plan = mine.get(fast)
        if plan is None:
            shape = shape_of(layer, x)
            key = _shape_str(shape)
            plan = self.plans.get(key)
            if plan is None:
                if _tracing_or_capturing():
                    return "fused"  # undecided: no measurement inside a capture or a trace, and nothing recorded
                plan = self.plans[key] = self._decide(layer, x, run, shape)
            mine[fast] = plan
        return plan.impl[_PROBE_KEY[probe_for(x.numel() // max(x.shape[-1], 1))]]

    def _decide(self, layer, x, run, shape) -> ShapePlan:
        # Training shapes: rank 0 decides for all (every rank runs those forwards together, as DDP and FSDP need).
        # Evaluation and generation shapes: each rank alone (the main process often generates by itself).
        distributed = not shape["forward_only"] and torch.distributed.is_available() and \
            torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        plan = None
        if not distributed or torch.distributed.get_rank() == 0:
            plan = self._from_cache(shape, x.device) or self._measure(layer, x, run, shape)
        if distributed:
            box = [asdict(plan) if plan is not None else None]
            torch.distributed.broadcast_object_list(box, src=0)
            plan = ShapePlan(**box[0])
            if torch.distributed.get_rank() != 0:
                plan.source += " (broadcast from rank 0)"
        log.info("molf layer plan %s: %s (%s, ms %s)", _shape_str(shape), plan.impl, plan.source, plan.ms)
        return plan

    def _measure(self, layer, x, run, shape) -> ShapePlan:
        plan = ShapePlan(shape=shape)
        params = [p for p in layer.parameters() if p.requires_grad]
        # Forked RNG: measuring must not move the user's random stream (dropout seeds, data order).
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
                torch.inference_mode(False), torch.enable_grad():
            for m in PROBE_M:
                xs = torch.randn(m, layer.in_features, device=x.device, dtype=x.dtype, requires_grad=True)
                upstream = {}  # the output gradient per output dtype (under autocast y's dtype is not x's)

                def once(impl, xs=xs, upstream=upstream):
                    if shape["forward_only"]:
                        with torch.no_grad():
                            return run(impl, xs)
                    y = run(impl, xs)
                    if y.dtype not in upstream:
                        upstream[y.dtype] = torch.randn(y.shape, device=y.device, dtype=y.dtype)
                    torch.autograd.grad(y, [xs, *params], upstream[y.dtype], allow_unused=True)
                ms = {}
                for impl in IMPLS:
                    ms[impl] = float(self.timer(lambda impl=impl: once(impl), impl=impl, m=m))
                    self.measurements += 1
                plan.ms[str(m)] = ms
                plan.impl[str(m)] = "fused" if ms["fused"] <= ms["chain"] else "chain"
        self._to_cache(plan, x.device)
        return plan

    def _cache_path(self) -> Path | None:
        d = os.environ.get(ENV_CACHE)
        return Path(d) / CACHE_FILE if d else None

    def _from_cache(self, shape, device) -> ShapePlan | None:
        path = self._cache_path()
        if path is None or not path.exists():
            return None
        try:
            entry = json.loads(path.read_text()).get(_versions_key(device), {}).get(_shape_str(shape))
        except (OSError, ValueError, AttributeError) as e:
            log.warning("molf: ignoring the unreadable layer plan cache %s (%s)", path, e)
            return None
        if not entry or set(entry.get("impl", {})) != {str(m) for m in PROBE_M}:
            return None
        return ShapePlan(shape=shape, impl=entry["impl"], ms=entry.get("ms", {}), source=f"cache {path}")

    def _to_cache(self, plan: ShapePlan, device) -> None:
        path = self._cache_path()
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                data = json.loads(path.read_text()) if path.exists() else {}
            except ValueError:  # an unreadable cache is replaced
                data = {}
            data = data if isinstance(data, dict) else {}
            data.setdefault(_versions_key(device), {})[_shape_str(plan.shape)] = dict(impl=plan.impl, ms=plan.ms)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
        except (OSError, ValueError) as e:
            log.warning("molf: could not write the layer plan cache %s (%s)", path, e)

    def rows(self) -> list[dict]:
        out = []
        for plan in self.plans.values():
            for m in PROBE_M:
                ms = plan.ms.get(str(m), {})
                out.append(dict(plan.shape, probe_m=m, impl=plan.impl[str(m)], fused_ms=ms.get("fused"),
                                chain_ms=ms.get("chain"), source=plan.source))
        return out


def _tracing_or_capturing() -> bool:
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
    return compiling or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


PLANNER = LayerPlanner()


def layer_plan() -> list[dict]:
    """Every layer-shape decision of this process: one row per (shape, probe M) with the implementation
    chosen, the measured fused and chain times (ms, forward + backward; the forward alone where the shape's
    forward_only is True: eval mode without gradients) and the source (measured, a cache
    file, or broadcast from rank 0). MOLF_LAYER_IMPL pins bypass it (no rows)."""
    return PLANNER.rows()
