"""Environment checks the kernels and the PyTorch API share; imports neither triton nor molf."""
import os


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
