"""The CPU loops in C (molf/_cpu.c, built on first use with the C compiler, cached per machine):

    moments_score_:  m <- m + (1 - b1)(g - m),  v <- b2 v + (1 - b2) g^2,  step += 1, and per expert the sum of
                     m^2/(sqrt(v) + 1e-8) (EPD) or (m/(sqrt(v) + 1e-8))^2 (PFN) over its tensors
    adamw_update_:   p <- p (1 - lr wd) - lr/(1 - b1^t) m / (sqrt(v)/sqrt(1 - b2^t) + eps), for winners and
                     parameters outside MoLF layers (the routing is read where it lies)
    routed_step_:    both, with molf._math.route's routing between them, in one call, a run of layers at a time
    keep_mask:       the layer's dropout keep-mask (Philox-4x32-10, molf._math.dropout_keep)

Why not torch ops: on the CPU each op is a pass over memory and each foreach op a loop of per-tensor ops
(~10 of 4-10 us per tensor and step); torch.compile'd loops fuse the math but cost 20-60 us of dispatch per
call. Here the optimizer's step is one call whatever the tensor count (two, around torch's routing, where a
collective sits between sums and routing), each element read and written once per pass
(csrc_notes/routed_adamw.md "The CPU"). Tensors are rows of C arrays (pointers, numel, owner, group): host
work O(tensors) per step.

Where no compiler works, `available()` turns False with one warning and callers keep torch's ops.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("_cpu.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]
_state: dict = {"lib": None, "tried": False}


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's flags (a cache shared by machines must not mix builds)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("MOLF_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "molf")
    return Path(root)


def _build() -> ctypes.CDLL:
    compilers = [c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)]
    if not compilers:
        raise RuntimeError("no C compiler found (set CC)")
    src = _SRC.read_bytes()
    errors = []
    for cc in compilers:
        for openmp in (["-fopenmp"], []):  # without OpenMP (Apple clang): one thread
            flags = _FLAGS + openmp
            key = hashlib.sha256(src + repr((cc, flags, platform.machine(), _cpu_id())).encode()).hexdigest()[:16]
            lib = _cache_dir() / f"cpu-{key}.so"
            if not lib.exists():
                lib.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix="tmp-cpu-", suffix=".so", dir=lib.parent)
                os.close(fd)
                try:
                    run = subprocess.run([cc, *flags, str(_SRC), "-o", tmp, "-lm"], capture_output=True, text=True,
                                         timeout=300)
                    if not run.returncode:
                        os.replace(tmp, lib)  # atomic: processes building at once each write their own file
                finally:
                    if os.path.exists(tmp):  # a failed build, a timeout, an interrupt
                        os.unlink(tmp)
                if run.returncode:
                    errors.append(f"{cc} {' '.join(openmp)}: {run.stderr.strip()[-300:]}")
                    continue
                _prune(lib)
            else:
                with contextlib.suppress(OSError):  # a read-only cache
                    os.utime(lib)  # in use: kept by _prune
            return _bind(ctypes.CDLL(str(lib)))
    raise RuntimeError("; ".join(errors))


_STALE_S = 30 * 86400


def _prune(keep: Path) -> None:
    """Remove the builds of other sources, compilers or CPUs not used for 30 days (each process that loads a
    build touches it), and temporary files of builds that died, once a day old. Best effort."""
    now = time.time()
    for pattern, stale in (("cpu-*.so", _STALE_S), ("tmp*.so", 86400)):
        for f in keep.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if f != keep and now - f.stat().st_mtime > stale:
                    f.unlink()


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.molf_moments_score.argtypes = [i64] + [p] * 9 + [f64, f64, i32, p, i32]
    lib.molf_adamw_update.argtypes = [i64] + [p] * 12 + [f64, f64, i32]
    lib.molf_routed_step.argtypes = [i64] + [p] * 13 + [f64, f64, i32, i64, i64, p, p, p, i64, p, p, p, i64, i32]
    lib.molf_routed_step.restype = i64
    lib.molf_route.argtypes = [i64, i64, p, p, p, p, i32, i64, p, p]
    lib.molf_route.restype = None
    lib.molf_keep_mask.argtypes = [ctypes.c_uint64, i64, i64, ctypes.c_float, p, i32]
    lib.molf_moments_score.restype = lib.molf_adamw_update.restype = lib.molf_has_f16.restype = i32
    lib.molf_keep_mask.restype = None
    return lib


def available() -> bool:
    if not _state["tried"]:
        _state["tried"] = True
        try:
            lib = _build()
            CODES.update({torch.float32: 0, torch.bfloat16: 1})
            if lib.molf_has_f16():
                CODES[torch.float16] = 2
            _state["lib"] = lib
        except Exception as e:  # no compiler, a read-only cache, a platform the source does not build on
            warnings.warn(f"molf: the CPU loops (molf/_cpu.c) could not be built ({type(e).__name__}: "
                          f"{str(e)[:300]}); the eager optimizer and the dropout mask keep torch's ops on the CPU "
                          "(same results, slower)", RuntimeWarning, stacklevel=3)
    return _state["lib"] is not None


CODES: dict[torch.dtype, int] = {}  # the storage dtypes the loops read and write (fp16 where C has _Float16)


def takes(t: torch.Tensor) -> bool:
    """Whether the loops take t: a contiguous CPU tensor of a dtype they store (after `available()`)."""
    return t.is_cpu and t.dtype in CODES and t.is_contiguous()


class Table:
    """One row per tensor, as plain C arrays: pointer columns G, P, M, V, STEP (the gradient's rewritten every
    step by `set_grads`; no reference to a gradient is kept), dtype codes of g, p, m, v, numel, owner (expert
    index, -1 outside MoLF layers), group (param group index). `key` names the storage it was built for."""
    G, P, M, V, STEP = range(5)

    def __init__(self, key, ps, ms, vs, steps, owner, group):
        n = self.n = len(ps)
        self.key = key
        self.keep = (ps, ms, vs, steps)  # their pointers below stay valid while the table lives
        self.ptrs = (ctypes.c_int64 * (5 * n + 1))(*[0] * n, *[t.data_ptr() for col in self.keep for t in col])
        self.dtypes = (ctypes.c_uint8 * (4 * n + 1))(*[CODES[t.dtype] for col in (ps, ps, ms, vs) for t in col])
        self.numel = (ctypes.c_int64 * (n + 1))(*[p.numel() for p in ps])
        self.owner = (ctypes.c_int64 * (n + 1))(*owner)
        self.group = (ctypes.c_int64 * (n + 1))(*group)

    def set_grads(self, gs) -> None:
        """The gradients of this step (each contiguous, of a dtype the loops store: `takes`)."""
        self.ptrs[:self.n] = [g.data_ptr() for g in gs]
        self.dtypes[:self.n] = [CODES[g.dtype] for g in gs]

    def _col(self, k: int) -> int:
        return ctypes.addressof(self.ptrs) + k * self.n * 8

    def _dt(self, k: int) -> int:
        return ctypes.addressof(self.dtypes) + k * self.n


def _check(rc: int):
    if rc:
        raise MemoryError("molf: the CPU optimizer loops could not allocate their block tables")


def moments_score_(tab: Table, b1: float, b2: float, pfn: bool, sums: torch.Tensor) -> None:
    """Advances every row's moments and step; adds each row's score sum to sums[owner] (float64, contiguous)."""
    _check(_state["lib"].molf_moments_score(
        tab.n, tab._col(tab.G), tab._col(tab.M), tab._col(tab.V), tab._col(tab.STEP), ctypes.addressof(tab.numel),
        tab._dt(0), tab._dt(2), tab._dt(3), ctypes.addressof(tab.owner), b1, b2, int(pfn), sums.data_ptr(),
        torch.get_num_threads()))


def adamw_update_(tab: Table, win: torch.Tensor, hp: torch.Tensor, b1: float, b2: float) -> None:
    """The update of rows outside MoLF layers (owner < 0) and rows whose expert won (win: bool, contiguous,
    one per expert); hp: float64 [groups, 3] of (lr, weight decay, eps)."""
    _check(_state["lib"].molf_adamw_update(
        tab.n, tab._col(tab.P), tab._col(tab.M), tab._col(tab.V), tab._col(tab.STEP), ctypes.addressof(tab.numel),
        tab._dt(1), tab._dt(2), tab._dt(3), ctypes.addressof(tab.owner), win.data_ptr(), ctypes.addressof(tab.group),
        hp.data_ptr(), b1, b2, torch.get_num_threads()))


RUN_BYTES = 16 << 20  # routed_step_ takes whole layers of about this many bytes of tensors at a time (half an L3)


def routed_step_(tab: Table, hp: torch.Tensor, b1: float, b2: float, pfn: bool, inv_n: torch.Tensor,
                 no_grad: torch.Tensor, expert_lrs: list[float], top_k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """moments_score_, molf._math.route and adamw_update_ in one call, a few layers at a time (the update
    reads m and v back from cache); rows ordered by owner, rows outside MoLF layers last. Returns (winners,
    scores) as route does and the number of non-finite scores of experts with gradients."""
    lib, cols = _state["lib"], [tab._col(k) for k in (tab.G, tab.P, tab.M, tab.V, tab.STEP)]
    n_layers, n_experts = inv_n.shape
    sums = torch.empty(n_layers * n_experts, dtype=torch.float64)
    scores = torch.empty((n_layers, n_experts), dtype=torch.float32)
    winners = torch.empty((n_layers, n_experts), dtype=torch.bool)
    lrs = (ctypes.c_float * n_experts)(*expert_lrs)
    nonfinite = lib.molf_routed_step(
        tab.n, *cols, ctypes.addressof(tab.numel), *(tab._dt(k) for k in range(4)), ctypes.addressof(tab.owner),
        ctypes.addressof(tab.group), hp.data_ptr(), b1, b2, int(pfn), n_layers, n_experts, inv_n.data_ptr(),
        no_grad.data_ptr(), ctypes.addressof(lrs), top_k, sums.data_ptr(), scores.data_ptr(), winners.data_ptr(),
        RUN_BYTES, torch.get_num_threads())
    _check(nonfinite < 0)
    return winners, scores, nonfinite


def route(sums: torch.Tensor, inv_n: torch.Tensor, no_grad: torch.Tensor, expert_lrs: list[float], pfn: bool,
          top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing routed_step_ does between its passes (sums: float64 [L, E]), as molf._math.route."""
    scores = torch.empty(inv_n.shape, dtype=torch.float32)
    winners = torch.empty(inv_n.shape, dtype=torch.bool)
    lrs = (ctypes.c_float * inv_n.shape[1])(*expert_lrs)
    _state["lib"].molf_route(inv_n.shape[0], inv_n.shape[1], sums.contiguous().data_ptr(), inv_n.data_ptr(),
                             no_grad.data_ptr(), ctypes.addressof(lrs), int(pfn), top_k, scores.data_ptr(),
                             winners.data_ptr())
    return winners, scores


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """The (rows, cols) bool keep-mask u(seed, m, k) >= p of molf._math.dropout_keep (seed: one int64 on the
    CPU); p rounded to fp32 (ctypes' c_float), as the torch ops compare. Under torch.compile, the same as a
    custom op (the C call reads the seed, which a trace cannot: it would break the graph at every layer)."""
    return (_keep_mask_op if torch.compiler.is_compiling() else _keep_mask)(seed, rows, cols, p)


def _keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    out = torch.empty((rows, cols), dtype=torch.bool)
    _state["lib"].molf_keep_mask(int(seed.reshape(-1)[0]), rows, cols, p, out.data_ptr(), torch.get_num_threads())
    return out


_keep_mask_op = torch.library.custom_op("molf::cpu_keep_mask", _keep_mask, mutates_args=())


@_keep_mask_op.register_fake
def _(seed, rows, cols, p):
    return seed.new_empty((rows, cols), dtype=torch.bool)
