"""molf: Triton kernels for MoLF fine-tuning (Mixture of LoRA and Full fine-tuning, arXiv 2605.07111)."""
from . import reference
from .layer import DEFAULT_TARGETS, MoLFLinear, merge, wrap
from .optim import MoLFAdamW

__version__ = "0.1.0"
__all__ = ["MoLFLinear", "wrap", "merge", "MoLFAdamW", "reference", "DEFAULT_TARGETS", "__version__"]
