import os
import sys
from pathlib import Path

import torch

# `python -m pytest` (make test) puts the checkout first on sys.path, where kernels/ (installed as molf.kernels)
# would pose as PyPI's `kernels` package, which bitsandbytes and transformers import when it is there.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent.parent]

# Kernels run under Triton's CPU interpreter where there is no GPU; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # one config per kernel, no tuning: the suite compiles each variant once instead of once per config
    os.environ.setdefault("MOLF_AUTOTUNE", "0")

import pytest  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
BF16_INTERPRETER = ("bf16 tl.dot is wrong under Triton's CPU interpreter (triton-lang/triton#11584); "
                    "bf16 cases run on the GPU only")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the item (item.rep_call), for fixtures that check after a passed test."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
