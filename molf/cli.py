"""The `molf` command: `molf train ...` and `molf plot ROUTING.jsonl -o DIR` (also `python -m molf ...`)."""
from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line and exit code 2, not the whole usage
        self.exit(2, f"{self.prog}: error: {message}\n")


def _floats(text):
    return tuple(float(x) for x in text.split(","))


def _ints(text):
    return tuple(int(x) for x in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    from .train import MODES

    p = _Parser(prog="molf", description="MoLF fine-tuning: train, plot routing.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="fine-tune a causal LM (default: a small model on synthetic facts, no network)")
    t.add_argument("--mode", default="molf", choices=MODES, help="molf | molf-e | fft | lora (default molf)")
    t.add_argument("--model", help="local model directory or hub id (default: a small Qwen2 built from a config)")
    t.add_argument("--data", help="JSONL of {\"prompt\", \"completion\"} pairs (default: synthetic counterfactual facts)")
    t.add_argument("--output", default="molf-run", help="output folder, must not exist or be empty (default molf-run)")
    t.add_argument("--steps", type=int, default=800)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, help="full expert / FFT lr (default 2e-3 built-in model, 5e-5 otherwise)")
    t.add_argument("--lora-lr", type=float, help="LoRA experts' lr (default --lr)")
    t.add_argument("--ranks", type=_ints, help="comma-separated LoRA ranks (default: molf 128, molf-e 16,128, lora 32)")
    t.add_argument("--alphas", type=_floats, help="comma-separated alphas (default 32 each)")
    t.add_argument("--score", default="epd", choices=("epd", "pfn"))
    t.add_argument("--top-k", type=int, help="experts updated per layer and step (default 1; not for fft)")
    t.add_argument("--max-length", type=int,
                   help="tokens per example, longer ones are truncated (default: the model's max positions)")
    t.add_argument("--facts", type=int, default=400, help="number of synthetic facts (default 400)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    t.add_argument("--backend", default="auto", choices=("auto", "eager", "triton"))
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    pl = sub.add_parser("plot", help="draw the routing heatmap and expert shares from a routing JSONL")
    pl.add_argument("routing", help="routing JSONL (one record per step)")
    pl.add_argument("-o", "--output", default=".", help="folder for the PNGs (default .)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from .train import TrainConfig, TrainError, train
        cfg = TrainConfig(mode=args.mode, model=args.model, data=args.data, output=args.output, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, lora_lr=args.lora_lr, ranks=args.ranks,
                          alphas=args.alphas, score=args.score, top_k=args.top_k, max_length=args.max_length,
                          n_facts=args.facts,
                          seed=args.seed, device=args.device, backend=args.backend, progress=not args.no_progress)
        try:
            train(cfg)
        except TrainError as e:
            print(f"molf train: error: {e}", file=sys.stderr)
            return 2
        return 0
    from .plot import plot_routing
    import os
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
