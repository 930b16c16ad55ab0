"""One benchmark harness: each measurement becomes a row of bench/results/<device>.json.

On a GPU, times come from triton.testing.do_bench (median of many runs, L2 flushed between runs);
pytest-benchmark's table (synchronised calls) is printed beside them. On the CPU, pytest-benchmark's
median is recorded; the Triton kernels are not timed there (the interpreter says nothing about speed).
"""
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# `python -m pytest` (make bench) puts the checkout first on sys.path, where kernels/ (installed as molf.kernels)
# would pose as PyPI's `kernels` package, which bitsandbytes and transformers import when it is there.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent.parent]
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# MOLF_BENCH_SMOKE=1 with TRITON_INTERPRET=1 and no GPU: the GPU-only rows run once each under Triton's
# interpreter at tiny stand-in shapes (bench/shapes.py), nothing timed or written: a check on the CPU that the
# benchmarks still call molf's kernels as they are today (tests/test_bench_smoke.py).
SMOKE = not CUDA and os.environ.get("MOLF_BENCH_SMOKE") == "1"
KERNELS = CUDA or SMOKE  # the Triton kernels run here (on the GPU, or in the smoke run's interpreter)
ROWS: list[dict] = []


def _warm_cpu_allocator():
    """Raise glibc malloc's mmap threshold to its ceiling (32 MiB) before any row is timed: the first free of
    an mmap'd block sets the threshold to that block's size. Until then, every temporary over 128 KiB is a
    fresh mmap and its pages fault in on first touch, so a row's time depended on what ran before it in the
    process (the MoLF-E reference step: 29 ms alone, 11.6 ms after the MoLF rows). A training process reaches
    the raised threshold within its first steps; every row now starts there."""
    block = torch.empty((31 << 20) // 4)  # 31 MiB: under the ceiling, over any earlier threshold
    del block


if not CUDA:
    _warm_cpu_allocator()
RESULTS = Path(__file__).parent / "results"
GPU_ONLY = "Triton kernel timings need a GPU: under the CPU interpreter they would time the interpreter"


def device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture
def measure(benchmark):
    """measure(fn, **row): time fn() and record the row (bench, model, module, M, K, N, ranks, dtype, impl)."""
    def _measure(fn, **row):
        benchmark.group = " ".join(f"{k}={row[k]}" for k in row if k != "impl")
        if SMOKE:  # one call: the interpreter's times say nothing
            benchmark.pedantic(fn, rounds=1, warmup_rounds=0)
            ROWS.append(dict(row, median_ms=float("nan")))
            return float("nan")
        fn()  # compiles, autotunes, allocates state
        _sync()
        if CUDA:  # peak memory of one call, above what was allocated before it
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            _sync()
            row = dict(row, peak_mb=round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1))
            import triton.testing
            ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
            benchmark.pedantic(lambda: (fn(), _sync()), rounds=3, warmup_rounds=1)
        else:
            t0 = time.perf_counter()
            fn()
            once = time.perf_counter() - t0
            # About half a second of rounds (5 to 50): a small machine's noise is a few ms, as long as a short row
            rounds = min(50, max(5, int(0.5 / max(once, 1e-6))))
            benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
            ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info["median_ms"] = ms
        ROWS.append(dict(row, median_ms=float(ms)))
        return ms
    return _measure


def _commit() -> str:
    """The checkout's commit (-dirty with uncommitted changes); MOLF_COMMIT names it where the copy has no .git
    (the GPU machine receives a working tree without its history)."""
    if os.environ.get("MOLF_COMMIT"):
        return os.environ["MOLF_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


# Measured values and stamps: everything else in a row says what was measured (achieved_GBps varies per run:
# left in the identity it kept every run's row of the same measurement).
_STAMPS = ("median_ms", "peak_mb", "achieved_GBps", "bytes_moved", "commit", "date", "torch", "triton")


def _identity(row) -> tuple:
    """What a row measured (everything but the time and the stamps)."""
    return tuple(sorted((k, json.dumps(v)) for k, v in row.items() if k not in _STAMPS))


def pytest_sessionfinish(session, exitstatus):
    if not ROWS or SMOKE:
        return
    import triton
    RESULTS.mkdir(exist_ok=True)
    name = device_name()
    commit = _commit()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    path = RESULTS / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".json")
    # A run replaces the rows it measured again (same bench, shape, ranks, dtype, impl) and keeps the others,
    # so one file, or part of one (-k), can run at a time; each row says when and at which commit.
    ran = {_identity(r) for r in ROWS}
    kept = []
    if path.exists():
        try:
            kept = [r for r in json.loads(path.read_text())["rows"] if _identity(r) not in ran]
        except (ValueError, KeyError):
            kept = []
    rows = kept + [dict(r, commit=commit, date=date, torch=torch.__version__, triton=triton.__version__)
                   for r in ROWS]
    doc = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
           "date": date, "rows": rows}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    session.config._molf_results = path


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    path = getattr(config, "_molf_results", None)
    if path is None:
        return
    tr = terminalreporter
    tr.section("molf: ratios measured side by side in this run")
    if not CUDA:
        tr.write_line(f"No GPU here: {GPU_ONLY}. Rows compare molf's eager path with the reference "
                      "and the baselines, on the CPU, at reduced sizes.")
    from summary import ratio_table
    for line in ratio_table(ROWS):
        tr.write_line(line)
    tr.write_line(f"rows written to {path}")
