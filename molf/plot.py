"""The paper's routing figures, drawn from a routing JSONL (one record per step)."""
from __future__ import annotations

import os
import warnings

from ._jsonl import read_jsonl

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
SEVERAL = "#7f7f7f"  # a (layer, step) where top_k > 1 picked several experts


def read_routing(path) -> tuple[list[int], list[str], list[str], list[list[list[str]]]]:
    """steps, layer names (model order), expert names, winners[step][layer]."""
    steps, layers, experts, winners = [], None, [], []
    for i, rec in read_jsonl(path, cut_off_tail=True):
        try:
            sel = rec["selections"]
            steps.append(int(rec["step"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{i}: not a routing record (missing or bad {e!s})") from None
        if not isinstance(sel, dict) or not sel or not all(_is_selection(v) for v in sel.values()):
            raise ValueError(f"{path}:{i}: not a routing record: 'selections' must map each layer name to "
                             "{'winners': [expert, ...], 'scores': {expert: score}}, got " + repr(sel)[:100])
        if layers is None:
            layers = list(sel)
        elif list(sel) != layers:
            raise ValueError(f"{path}:{i}: the record names other layers than the first record ({len(sel)} layers, "
                             f"not its {len(layers)}): routing logs of different models in one file?")
        row = []
        for name in layers:
            entry = sel[name]
            for e in list(entry.get("scores", {})) + entry["winners"]:
                if e not in experts:
                    experts.append(e)
            row.append(entry["winners"])
        winners.append(row)
    if not steps:
        raise ValueError(f"{path}: no routing records")
    last = {s: i for i, s in enumerate(steps)}  # a step logged twice (a resumed run): its last record counts
    if len(last) != len(steps):
        warnings.warn(f"{path}: {len(steps) - len(last)} step(s) appear more than once (a resumed run?); "
                      "the last record of each step is used", stacklevel=2)
    order = sorted(last)
    return order, layers, experts, [winners[last[s]] for s in order]


def _is_selection(entry) -> bool:
    """{"winners": [expert names], "scores": {expert name: score}} (scores optional), as MoLFAdamW writes it."""
    return (isinstance(entry, dict) and isinstance(entry.get("winners"), list)
            and all(isinstance(w, str) for w in entry["winners"]) and isinstance(entry.get("scores", {}), dict))


def plot_routing(path, out_dir) -> list[str]:
    """Write routing_heatmap.png (layers x steps, colored by the winning expert) and routing_share.png
    (the share of layers picking each expert, per step). Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    steps, layers, experts, winners = read_routing(path)
    os.makedirs(out_dir, exist_ok=True)
    n_e = len(experts)
    colors = [PALETTE[i % len(PALETTE)] for i in range(n_e)] + [SEVERAL, "#ffffff"]
    grid = [[0] * len(steps) for _ in layers]
    several = False
    for s, row in enumerate(winners):
        for li, w in enumerate(row):
            if len(w) == 1:
                grid[li][s] = experts.index(w[0])
            elif len(w) > 1:
                grid[li][s], several = n_e, True
            else:
                grid[li][s] = n_e + 1
    height = max(3.0, 0.18 * len(layers) + 1.5)
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.05 * len(steps) + 5)), height), dpi=100)
    ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=ListedColormap(colors), vmin=0, vmax=n_e + 1,
              extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer (model order)")
    if len(layers) <= 40:
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels(layers, fontsize=6)
    ax.set_title("MoLF routing: winning expert per layer and step")
    handles = [Patch(color=colors[i], label=e) for i, e in enumerate(experts)]
    if several:
        handles.append(Patch(color=SEVERAL, label="several (top_k > 1)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="expert")
    fig.tight_layout()
    heat = os.path.join(out_dir, "routing_heatmap.png")
    fig.savefig(heat)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, e in enumerate(experts):
        share = [sum(e in w for w in row) / len(row) for row in winners]
        ax.plot(steps, share, color=colors[i], label=e)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("share of layers picking the expert")
    ax.set_title("MoLF routing: share of layers per expert")
    ax.legend(title="expert")
    fig.tight_layout()
    share_path = os.path.join(out_dir, "routing_share.png")
    fig.savefig(share_path)
    plt.close(fig)
    return [heat, share_path]
