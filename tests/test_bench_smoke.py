"""The benchmarks' GPU-only rows, run once each on the CPU (MOLF_BENCH_SMOKE=1, Triton's interpreter, tiny
stand-in shapes): a benchmark that calls molf's kernels with a stale signature fails here, not in a GPU
session's few minutes (test_bench_lowrank.py did, unnoticed, for three sessions). On a GPU the benchmarks
run for real (`make bench`), so this test is for machines without one."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LAYER = "Qwen2.5-1.5B-q_proj-M64"
ROWS = [  # one case per GPU-only code path of each benchmark
    *(f"bench/test_bench_layer.py::test_layer[{LAYER}-r16-128-{mode}-{impl}]"
      for mode in ("layer_fwd", "layer_fwd_bwd_frozen", "layer_fwd_bwd_full") for impl in ("molf", "molf_fused")),
    f"bench/test_bench_layer.py::test_layer_dropout[{LAYER}-0.05-molf_fused]",
    *(f"bench/test_bench_lowrank.py::test_lowrank_grads[{LAYER}-r16-128-{bias}-{impl}]"
      for bias in ("frozen", "full_bias") for impl in ("one_pass", "two_pass")),
    "bench/test_bench_optim.py::test_optim_step[molf-molf]",
    "bench/test_bench_optim.py::test_optim_step[molf-e-molf]",
    "bench/test_bench_optim.py::test_optim_step_fresh_grads[molf-e-molf]",
    "bench/test_bench_train.py::test_train_step[molf-e-molf]",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmarks themselves run (make bench)")
def test_gpu_only_benchmark_rows_run_under_the_interpreter():
    pytest.importorskip("pytest_benchmark", reason="pytest-benchmark (a dev extra) is not installed")
    results = ROOT / "bench" / "results"
    before = {f.name: f.read_bytes() for f in results.glob("*")}
    env = dict(os.environ, MOLF_BENCH_SMOKE="1", TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *ROWS],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = out.stdout[-3000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) == len(ROWS) and "skipped" not in out.stdout, tail
    assert {f.name: f.read_bytes() for f in results.glob("*")} == before, "the smoke run must write no results"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs for real")
def test_profile_fixed_costs_script_runs():
    """bench/profile_fixed_costs.py (the GPU session's profile) in its CPU mode: tiny layers under the
    interpreter, one layer's optimizer step in the eager backend."""
    out = subprocess.run([sys.executable, "bench/profile_fixed_costs.py", "--calls", "1", "--rows", "1"], cwd=ROOT,
                         env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count("\n== ") == 8, out.stdout[-2000:]
    assert "Python functions by own time" in out.stdout and "Ordered by: internal time" in out.stdout


def test_interleaved_script_runs():
    """bench/interleaved.py (molf eager and the reference stepped in turn) with one timed step per setting."""
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, "bench/interleaved.py", "--steps", "1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count("reference / eager") == 3, out.stdout[-2000:]
