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


def interpreter_numpy_conflict() -> str | None:
    """Why this Triton's CPU interpreter cannot run molf's kernels with this NumPy, or None. Triton before 3.7
    turns a loop bound taken from a kernel argument into int(a 1-element array), which NumPy 2.4 refuses:
    every kernel would fail with "only 0-dimensional arrays can be converted to Python scalars"."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    from packaging.version import Version
    if Version(triton.__version__).release < (3, 7) and Version(numpy.__version__).release >= (2, 4):
        return (f"Triton {triton.__version__}'s CPU interpreter cannot run with NumPy {numpy.__version__} (Triton "
                "before 3.7 converts 1-element arrays to int, which NumPy 2.4 refuses): pip install 'numpy<2.4' "
                "into this environment, or a newer torch with its triton >= 3.7")
    return None


def pytest_configure(config):
    conflict = interpreter_numpy_conflict()
    if conflict:
        raise pytest.UsageError(conflict)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the item (item.rep_call), for fixtures that check after a passed test."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
