"""`molf compare`: FFT, LoRA, MoLF and MoLF-E on the same model, data, step budget and evaluation, each with
the paper's recipe (molf.train's defaults per mode), over several seeds; one folder with every run's summary,
a table (markdown and JSON) and a figure in the paper's style.

The paper's claim checked: MoLF's task metric is within 1.5% (relative) of the better of FFT and LoRA.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics

from .train import TrainConfig, TrainError, check_output, published, train

MODES = ("fft", "lora", "molf", "molf-e")
NAMES = {"fft": "FFT", "lora": "LoRA r32", "molf": "MoLF", "molf-e": "MoLF-E"}
COLOURS = {"fft": "#4c72b0", "lora": "#dd8452", "molf": "#55a868", "molf-e": "#8172b3"}


def _mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[dict]) -> dict:
    """Per mode: mean and spread (sample standard deviation over seeds) of the loss and the task metric
    (recall), seconds per step, peak memory, trainable parameters, mean routing shares; then MoLF's gap."""
    table = {}
    for mode in dict.fromkeys(r["mode"] for r in runs):
        rs = [r for r in runs if r["mode"] == mode]
        recall, recall_sd = _mean_spread([r["recall_after"] for r in rs])
        loss, loss_sd = _mean_spread([r["loss_after"] for r in rs])
        shares = {}
        for r in rs:
            for e, v in r["routing_share"].items():
                shares[e] = shares.get(e, 0.0) + v / len(rs)
        table[mode] = {"seeds": len(rs), "recall": recall, "recall_sd": recall_sd, "loss": loss, "loss_sd": loss_sd,
                       "seconds_per_step": _mean_spread([r["seconds_per_step"] for r in rs])[0],
                       "peak_memory_mb": _mean_spread([r["peak_memory_mb"] for r in rs])[0],
                       "trainable_parameters": rs[0]["trainable_parameters"], "routing_share": shares}
    out = {"modes": table}
    if {"fft", "lora", "molf"} <= set(table):
        best = max(("fft", "lora"), key=lambda m: table[m]["recall"])
        gap = (table[best]["recall"] - table["molf"]["recall"]) / max(table[best]["recall"], 1e-12)
        out["molf_vs_best"] = {"best_baseline": best, "relative_gap": gap, "within_1.5%": gap <= 0.015}
    return out


def markdown(result: dict, metric: str) -> str:
    lines = [f"| mode | {metric} (mean ± sd) | loss (mean ± sd) | s / step | peak MB | trainable params | routing |",
             "|---|---|---|---|---|---|---|"]
    for mode, t in result["modes"].items():
        share = ", ".join(f"{e} {v:.0%}" for e, v in t["routing_share"].items()) or "-"
        mem = f"{t['peak_memory_mb']:.0f}" if t["peak_memory_mb"] is not None else "n/a (CPU)"
        lines.append(f"| {NAMES[mode]} | {t['recall']:.1%} ± {t['recall_sd']:.1%} | {t['loss']:.3f} ± "
                     f"{t['loss_sd']:.3f} | {t['seconds_per_step']:.4f} | {mem} | {t['trainable_parameters']:,} | "
                     f"{share} |")
    gap = result.get("molf_vs_best")
    if gap:
        lines.append("")
        where = f"{gap['relative_gap']:.1%} below it" if gap["relative_gap"] > 0 else \
            f"{-gap['relative_gap']:.1%} above it"
        lines.append(f"MoLF vs the better baseline ({NAMES[gap['best_baseline']]}): {where}, relative "
                     f"({'within' if gap['within_1.5%'] else 'outside'} the paper's 1.5%)")
    return "\n".join(lines) + "\n"


def figure(result: dict, path: str, metric: str) -> str:
    """Bars of the task metric per mode with the spread over seeds; a dashed line at the better of FFT and
    LoRA and MoLF's distance to it, as the paper draws it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["modes"])
    vals = [100 * result["modes"][m]["recall"] for m in modes]
    errs = [100 * result["modes"][m]["recall_sd"] for m in modes]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.bar([NAMES[m] for m in modes], vals, yerr=errs, capsize=4, color=[COLOURS[m] for m in modes])
    gap = result.get("molf_vs_best")
    if gap:
        best = 100 * result["modes"][gap["best_baseline"]]["recall"]
        ax.axhline(best, ls="--", color="grey", lw=1)
        i = modes.index("molf")
        ax.annotate(f"{-100 * gap['relative_gap']:+.1f}% vs {NAMES[gap['best_baseline']]}", (i, vals[i]),
                    xytext=(0, 8), textcoords="offset points", ha="center")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, max(vals + [1.0]) * 1.2)
    ax.set_title("molf compare: same model, data and budget")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def compare(base: TrainConfig, modes=MODES, seeds: int = 1, lrs: dict | None = None, log=print) -> dict:
    """Run every mode for `seeds` seeds (base.seed, base.seed + 1, ...) into base.output/<mode>-seed<k>/,
    then table.json, table.md and compare.png there. The folder appears only when every run is done."""
    lrs = lrs or {}
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise TrainError(f"--modes must be a comma-separated subset of {','.join(MODES)}, got {','.join(modes)}")
    if set(lrs) - set(modes):
        raise TrainError(f"--lrs names modes that do not run: {','.join(sorted(set(lrs) - set(modes)))}")
    if not isinstance(seeds, int) or seeds < 1:
        raise TrainError(f"--seeds must be an int >= 1, got {seeds!r}")
    check_output(base.output)
    metric = "recall" if base.data is None else "exact match"

    def run_all(work):
        runs = []
        for mode in modes:
            for k in range(seeds):
                cfg = dataclasses.replace(base, mode=mode, seed=base.seed + k, lr=lrs.get(mode),
                                          target_modules=None if mode == "fft" else base.target_modules,
                                          output=os.path.join(work, f"{mode}-seed{k}"))
                log(f"molf compare: {mode}, seed {cfg.seed}")
                runs.append(train(cfg, log=lambda *_: None))
        result = aggregate(runs)
        result["runs"] = [{k: r[k] for k in ("mode", "recall_after", "loss_after", "seconds_per_step")}
                          | {"output": os.path.basename(r["output"])} for r in runs]
        with open(os.path.join(work, "table.json"), "w") as f:
            json.dump(result, f, indent=2)
        table = markdown(result, metric)
        with open(os.path.join(work, "table.md"), "w") as f:
            f.write(table)
        figure(result, os.path.join(work, "compare.png"), metric)
        return result, table

    (result, table), final = published(base.output, run_all, log)
    log(table.rstrip())
    log(f"molf compare: {final}/ (table.md, table.json, compare.png, one folder per run)")
    result["output"] = final
    return result
