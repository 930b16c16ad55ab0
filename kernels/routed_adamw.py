"""Fused routed AdamW kernels (the fused-optimizer issue)."""


class TritonRoutedAdamW:
    name = "triton"

    def __init__(self, opt):
        raise NotImplementedError("the fused Triton MoLF optimizer is not implemented yet; use backend='eager'")
