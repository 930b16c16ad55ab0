"""Host-side helpers the kernels and the PyTorch API share; imports neither triton nor molf."""
import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels compute in


def to_device(values, dtype, device) -> torch.Tensor:
    """A host list as a device tensor, copied without a host synchronisation (pinned, non-blocking)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def column_scales(ranks, scalings, device, dtype=torch.float32) -> torch.Tensor:
    """s_cols: s_i repeated r_i times (callers cache it: it changes only with the ranks)."""
    return torch.cat([torch.full((r,), s, dtype=dtype, device=device) for r, s in zip(ranks, scalings)])
