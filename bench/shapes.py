"""Linear-layer shapes (out_features N, in_features K) of the models the paper fine-tunes."""
from torch import nn

from conftest import SMOKE

QWEN25_15B = {"q_proj": (1536, 1536), "k_proj": (256, 1536), "v_proj": (256, 1536), "o_proj": (1536, 1536),
              "gate_proj": (8960, 1536), "up_proj": (8960, 1536), "down_proj": (1536, 8960)}
QWEN25_3B = {"q_proj": (2048, 2048), "k_proj": (256, 2048), "v_proj": (256, 2048), "o_proj": (2048, 2048),
             "gate_proj": (11008, 2048), "up_proj": (11008, 2048), "down_proj": (2048, 11008)}
GEMMA3_1B = {"q_proj": (1024, 1152), "k_proj": (256, 1152), "v_proj": (256, 1152), "o_proj": (1152, 1024),
             "gate_proj": (6912, 1152), "up_proj": (6912, 1152), "down_proj": (1152, 6912)}
MODELS = {"Qwen2.5-1.5B": (QWEN25_15B, 28), "Qwen2.5-3B": (QWEN25_3B, 36), "Gemma-3-1B": (GEMMA3_1B, 26)}
if SMOKE:  # the same names at 1/32 of the size, one layer (conftest.py)
    MODELS = {name: ({mod: (max(8, n // 32), max(8, k // 32)) for mod, (n, k) in shapes.items()}, 1)
              for name, (shapes, _) in MODELS.items()}
BIASED = ("q_proj", "k_proj", "v_proj")  # Qwen2 attention projections carry a bias


def decoder_stack(model: str, n_layers: int, device, dtype) -> nn.Module:
    """n_layers decoder blocks' worth of target linears with the model's real shapes (no attention math)."""
    shapes, _ = MODELS[model]
    layers = nn.ModuleList()
    for _ in range(n_layers):
        block = nn.Module()
        for name, (n, k) in shapes.items():
            setattr(block, name, nn.Linear(k, n, bias=name in BIASED and model.startswith("Qwen"),
                                           device=device, dtype=dtype))
        layers.append(block)
    root = nn.Module()
    root.layers = layers
    return root
