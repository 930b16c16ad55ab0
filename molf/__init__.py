"""molf: Triton kernels for MoLF fine-tuning (Mixture of LoRA and Full fine-tuning, arXiv 2605.07111)."""
from .export import export_peft
from .checkpoint import from_pretrained, load, save_pretrained
from .layer import (DEFAULT_TARGETS, MoLFLinear, disable_experts, merge, print_trainable_parameters,
                    trainable_parameters, wrap)
from .optim import MoLFAdamW
from ._plan import layer_plan

__version__ = "0.1.0"
__all__ = ["MoLFLinear", "wrap", "merge", "disable_experts", "MoLFAdamW", "export_peft", "save_pretrained",
           "from_pretrained", "load", "print_trainable_parameters", "trainable_parameters", "layer_plan", "reference",
           "DEFAULT_TARGETS", "__version__"]


def __getattr__(name):  # molf.reference, the oracle, is imported only when asked for: nothing at run time needs it
    if name == "reference":
        import importlib
        return importlib.import_module(".reference", __name__)
    raise AttributeError(f"module 'molf' has no attribute {name!r}")
