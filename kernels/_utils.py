"""Small helpers shared by the kernel families; version differences live here, as feature checks."""
import torch
import triton.language as tl

TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
