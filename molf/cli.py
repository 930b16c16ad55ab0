"""The `molf` command: `molf train ...`, `molf compare ...` and `molf plot ROUTING.jsonl -o DIR` (also
`python -m molf ...`)."""
from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line and exit code 2, not the whole usage
        self.exit(2, f"{self.prog}: error: {message}\n")


def _numbers(kind, what):
    """An argparse type: comma-separated `kind` numbers (`what` names them in the error)."""
    def parse(text):
        try:
            return tuple(kind(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    return parse


_floats, _ints = _numbers(float, "numbers"), _numbers(int, "integers")


def _targets(text):
    """"all-linear" as is; else comma-separated module names (empty entries are an error)."""
    if text == "all-linear":
        return text
    names = tuple(x.strip() for x in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected all-linear or comma-separated module names, got {text!r}")
    return names


def _modes(text):
    """Comma-separated mode names, each once (checked against the modes by `compare`)."""
    modes = tuple(text.split(","))
    twice = sorted({m for m in modes if modes.count(m) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"names {','.join(twice)} more than once: {text!r}")
    return modes


def _mode_floats(text):
    out = {}
    for item in text.split(","):
        mode, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected MODE=LR items, got {item!r}")
        if mode in out:
            raise argparse.ArgumentTypeError(f"names {mode} more than once: {text!r}")
        try:
            out[mode] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected MODE=LR items with a number LR, got {item!r}") from None
    return out


def _run_options(p, default_output):
    """The model, data and budget options `molf train` and `molf compare` share."""
    p.add_argument("--model", help="local model directory or hub id, or a peft adapter's folder (merged into its "
                                   "base first) (default: a small Qwen2 built from a config)")
    p.add_argument("--data", help="JSONL, one example per line (or a JSON array of them, .csv or .parquet): "
                                  "{\"prompt\", \"completion\"} (strings, or lists of chat messages), {\"text\"} "
                                  "or {\"messages\": [...]} (default: synthetic counterfactual facts)")
    p.add_argument("--output", default=default_output, help=f"output folder, must not exist or be empty "
                                                            f"(default {default_output})")
    p.add_argument("--steps", type=int, help="optimizer steps (default 800, or from --epochs)")
    p.add_argument("--epochs", type=float, help="passes over the training data (instead of --steps)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per device batch (default 16)")
    p.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step (default 1)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="bf16 weights, fp16 autocast over fp32 weights, or fp32 (default bf16 on a GPU with it, "
                        "else fp32)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--eval-split", type=float, default=0.0, help="held-out share of the data (default 0)")
    p.add_argument("--max-length", type=int,
                   help="tokens per example, longer ones are truncated (default: the model's max positions)")
    p.add_argument("--facts", type=int, default=400, help="number of synthetic facts (default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda (pick the GPU with "
                                                    "CUDA_VISIBLE_DEVICES)")
    p.add_argument("--backend", default="auto", choices=("auto", "eager", "triton"))
    p.add_argument("--report-to", default="none", help="the Trainer's logging: none, tensorboard, wandb, ... "
                                                       "(comma-separated)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--target-modules", type=_targets,
                   help="linear layers to wrap: comma-separated names (a module whose name is one or ends in "
                        "'.'+one, as peft) or all-linear (default: the architecture's attention and MLP projections)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .compare import MODES as COMPARE_MODES
    from .train import MODES, QUANTIZE

    p = _Parser(prog="molf", description="MoLF fine-tuning: train, compare, plot routing.")
    p.add_argument("--version", action="version", version=f"molf {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="fine-tune a causal LM (default: a small model on synthetic facts, no network)")
    t.add_argument("--mode", default="molf", choices=MODES, help="molf | molf-e | fft | lora (default molf)")
    _run_options(t, "molf-run")
    t.add_argument("--lr", type=float, help="full expert / FFT lr (default 2e-3 built-in model; else the paper's: "
                                            "fft and molf 5e-5, lora and molf-e 5e-4)")
    t.add_argument("--lora-lr", type=float, help="LoRA experts' lr (default --lr)")
    t.add_argument("--ranks", type=_ints, help="comma-separated LoRA ranks (default: molf 128, molf-e 16,128, lora 32)")
    t.add_argument("--alphas", type=_floats, help="comma-separated alphas (default 32 each)")
    t.add_argument("--score", default="epd", choices=("epd", "pfn"))
    t.add_argument("--top-k", type=int, help="experts updated per layer and step (default 1; not for fft)")
    t.add_argument("--quantize", choices=QUANTIZE,
                   help="load the base quantized by bitsandbytes and frozen (QLoRA-style): 4-bit NF4 with double "
                        "quantization, or 8-bit; --mode molf-e or lora")
    t.add_argument("--save-steps", type=int, help="checkpoint every N steps into OUTPUT.checkpoints/")
    t.add_argument("--resume", nargs="?", const="last",
                   help="continue an interrupted run from its newest complete checkpoint (or from the folder given)")
    c = sub.add_parser("compare", help="FFT, LoRA, MoLF and MoLF-E side by side on the same data and budget")
    c.add_argument("--modes", default=",".join(COMPARE_MODES), type=_modes,
                   help=f"comma-separated subset of {','.join(COMPARE_MODES)} (default all)")
    c.add_argument("--seeds", type=int, default=1, help="runs per mode, seeds --seed, --seed + 1, ... (default 1)")
    c.add_argument("--lrs", type=_mode_floats, default={},
                   help="learning rates per mode, e.g. fft=5e-5,lora=5e-4 (default: molf train's per mode)")
    _run_options(c, "molf-compare")
    pl = sub.add_parser("plot", help="draw the routing heatmap and expert shares from a routing JSONL")
    pl.add_argument("routing", help="routing JSONL (one record per step)")
    pl.add_argument("-o", "--output", default=".", help="folder for the PNGs (default .)")
    return p


def train_config(args):
    """The TrainConfig of parsed `molf train` (or `molf compare`) arguments."""
    from .train import TrainConfig
    return TrainConfig(mode=getattr(args, "mode", "molf"), model=args.model, data=args.data, output=args.output,
                       steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       lr=getattr(args, "lr", None), lora_lr=getattr(args, "lora_lr", None),
                       ranks=getattr(args, "ranks", None), alphas=getattr(args, "alphas", None),
                       score=getattr(args, "score", "epd"), top_k=getattr(args, "top_k", None),
                       max_length=args.max_length, n_facts=args.facts, seed=args.seed, device=args.device,
                       backend=args.backend, progress=not args.no_progress, dtype=args.dtype,
                       gradient_checkpointing=args.gradient_checkpointing, eval_split=args.eval_split,
                       save_steps=getattr(args, "save_steps", None), resume=getattr(args, "resume", None),
                       report_to=args.report_to, target_modules=args.target_modules,
                       quantize=getattr(args, "quantize", None))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from .train import TrainError, train
        cfg = train_config(args)
        try:
            train(cfg)
        except TrainError as e:
            print(f"molf train: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "compare":
        from .compare import compare
        from .train import TrainError
        try:
            compare(train_config(args), modes=args.modes, seeds=args.seeds, lrs=args.lrs)
        except TrainError as e:
            print(f"molf compare: error: {e}", file=sys.stderr)
            return 2
        return 0
    from .plot import plot_routing
    from .train import missing_modules
    import os
    if missing_modules("matplotlib"):
        print("molf plot: error: molf plot needs matplotlib: pip install matplotlib, or pip install 'molf[train]'",
              file=sys.stderr)
        return 2
    if not os.path.isfile(args.routing):
        print(f"molf plot: error: routing file not found: {args.routing}", file=sys.stderr)
        return 2
    try:
        for path in plot_routing(args.routing, args.output):
            print(path)
    except ValueError as e:
        print(f"molf plot: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
