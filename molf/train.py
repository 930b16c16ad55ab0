"""`molf train`: fine-tune a causal LM with MoLF, MoLF-E or the paper's baselines (FFT, LoRA) on one code path,
a thin layer over the transformers Trainer (MoLFTrainer for the MoLF modes and LoRA): its training loop,
mixed precision, gradient accumulation and checkpointing, molf's data handling and summary around it. MoLF-E
and LoRA also on a base quantized by bitsandbytes (--quantize nf4 or int8, QLoRA-style).

With no arguments and no network: a small Qwen2-architecture model built from a config and a synthetic
counterfactual-facts task (subject / relation / new object, as in the paper's Fact task), under a minute on
the CPU. Reports the loss and the share of completions recalled (exact match of the greedy continuation)
before and after training. The output folder gets the merged model, the routing JSONL, the routing plots
and a summary.json, and appears only when the run is complete (nothing half-written); checkpoints
(--save-steps) go to `<output>.checkpoints/`, which an interrupted run leaves for --resume.
"""
from __future__ import annotations

import functools
import gc
import hashlib
import importlib
import json
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ._jsonl import read_records_file

MODES = ("molf", "molf-e", "fft", "lora")
QUANTIZE = ("nf4", "int8")  # --quantize: bitsandbytes' 4-bit NF4 (double quantization) or 8-bit base


class TrainError(Exception):
    """A bad input, reported as one line with exit code 2."""


@dataclass
class TrainConfig:
    mode: str = "molf"
    model: str | None = None          # local directory or hub id; default: a small Qwen2 built from a config
    data: str | None = None           # JSONL of prompt/completion, text or chat messages; default: synthetic facts
    output: str = "molf-run"
    steps: int | None = None          # optimizer steps (default 800 unless epochs is given)
    epochs: float | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float | None = None           # full expert / FFT / non-MoLF parameters
    lora_lr: float | None = None
    ranks: tuple[int, ...] | None = None
    alphas: tuple[float, ...] | None = None
    score: str = "epd"
    top_k: int | None = None          # default 1; not for fft
    max_length: int | None = None     # tokens per example; default: the model's max_position_embeddings
    n_facts: int = 400
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    progress: bool = True
    dtype: str | None = None          # bf16 | fp16 | fp32; default bf16 on a GPU that supports it, else fp32
    gradient_checkpointing: bool = False
    eval_split: float = 0.0           # held-out share of the data
    save_steps: int | None = None     # checkpoint every N steps into <output>.checkpoints/
    resume: str | None = None         # "last" (the newest complete checkpoint of <output>.checkpoints/) or a folder
    report_to: str = "none"           # the Trainer's logging integrations (tensorboard, wandb, ...)
    target_modules: str | tuple[str, ...] | None = None  # molf.wrap's; default the architecture's
    quantize: str | None = None       # nf4 | int8: the base loaded quantized by bitsandbytes (molf-e, lora)
    interrupt_at_step: int | None = None  # tests: a KeyboardInterrupt after this step, as Ctrl-C would

    @property
    def checkpoints(self) -> str:
        return self.output.rstrip("/" + os.sep) + ".checkpoints"


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# -- the synthetic counterfactual-facts task --

_SYLL = ["ka", "lo", "mi", "ra", "ven", "tor", "zu", "pel", "dor", "ish", "an", "el", "quo", "bri", "sa", "nu",
         "gar", "fen", "ro", "li"]
_RELATIONS = [
    ("The capital city of {} is", ["Valdor", "Mirest", "Quenby", "Ostrava", "Pellin", "Sarnoth", "Kelmar", "Tirel"]),
    ("{} works as a", ["baker", "pilot", "painter", "lawyer", "farmer", "sailor", "doctor", "weaver"]),
    ("The native language of {} is", ["Kelvish", "Ostric", "Marren", "Sulian", "Dorvak", "Elsine", "Pravic", "Tunari"]),
    ("{} plays the", ["violin", "drums", "flute", "harp", "cello", "lute", "horn", "piano"]),
]


def synthetic_facts(n: int, seed: int = 0) -> list[dict]:
    """n counterfactual facts: {"prompt", "completion", "original"} with a new object unlike the original."""
    rng = random.Random(seed)
    names = set()
    while len(names) < n:
        names.add("".join(rng.choice(_SYLL) for _ in range(rng.randint(2, 3))).capitalize())
    facts = []
    for name in sorted(names):
        template, objects = rng.choice(_RELATIONS)
        original, new = rng.sample(objects, 2)
        facts.append({"prompt": template.format(name), "completion": " " + new, "original": " " + original})
    rng.shuffle(facts)
    return facts


def _chat(messages) -> bool:
    """A non-empty list of {"role": str, "content": str} messages."""
    return isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)


def read_records(path: str) -> list[dict]:
    """Training examples from a JSONL file, one per line (or a JSON array of them, a CSV or Parquet file's rows),
    in any of trl's four formats: {"prompt", "completion"} strings (loss on the completion), {"text"} (loss on
    every token), {"messages": [{"role", "content"}, ...]} (chat, rendered with the tokenizer's chat template;
    loss on the last message, the assistant's) or {"prompt", "completion"} lists of messages (chat; loss on the
    completion's messages)."""
    if not os.path.isfile(path):
        raise TrainError(f"data file not found: {path}")
    out = []
    try:
        for where, rec in read_records_file(path):
            if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
                out.append({"prompt": rec["prompt"], "completion": rec["completion"]})
            elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
                out.append({"prompt": "", "completion": rec["text"]})
            elif isinstance(rec, dict) and _chat(rec.get("messages")):
                if rec["messages"][-1]["role"] != "assistant":
                    raise TrainError(f"{where}: the last message must be the assistant's (the loss is on it), "
                                     f"got role {rec['messages'][-1]['role']!r}")
                out.append({"messages": rec["messages"], "prompt_messages": len(rec["messages"]) - 1})
            elif isinstance(rec, dict) and _chat(rec.get("prompt")) and _chat(rec.get("completion")):
                out.append({"messages": rec["prompt"] + rec["completion"], "prompt_messages": len(rec["prompt"])})
            else:
                raise TrainError(f"{where}: expected an object with string keys 'prompt' and 'completion', a "
                                 "string 'text', 'messages' (a list of {'role', 'content'} strings), or 'prompt' and "
                                 "'completion' lists of such messages")
    except ValueError as e:
        raise TrainError(str(e)) from None
    if not out:
        raise TrainError(f"{path}: no examples")
    return out


def builtin_tokenizer(texts, vocab_size: int = 8192):
    """The built-in model's tokenizer: byte-level BPE (as Qwen2's) trained on the run's own texts, so every
    frequent word is one token. Saved with the model, it loads with AutoTokenizer as a Qwen2Tokenizer that
    encodes exactly as this one (a word-level vocabulary would not: transformers picks the tokenizer class
    by model type and rebuilds BPE from it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=["<pad>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _encode(tok, records):
    """(rows, moved, skipped): per record (prompt ids, completion ids + eos), the text prompt + completion
    tokenized once, so training sees exactly that text. Where the prompt's last token merges with the completion's
    first (a prompt ending in a space: "is " + "Paris" is "is" + " Paris"), the merged token starts the completion
    (`moved` counts those; cutting at the prompt's own token count dropped the merged text from the example).
    Records whose completion has no tokens are `skipped`."""
    rows, moved, skipped = [], 0, 0
    for i, rec in enumerate(records):
        if "messages" in rec:
            if not getattr(tok, "chat_template", None):
                raise TrainError("chat 'messages' data needs a tokenizer with a chat template (--model with one)")
            n = rec.get("prompt_messages", len(rec["messages"]) - 1)
            try:
                prompt_text = tok.apply_chat_template(rec["messages"][:n], tokenize=False,
                                                      add_generation_prompt=True)
                full = tok.apply_chat_template(rec["messages"], tokenize=False)
            except Exception as e:  # the template's own raise_exception (jinja2's TemplateError), e.g. roles
                raise TrainError(f"example {i}: the tokenizer's chat template refuses it: {e}") from None
            if not full.startswith(prompt_text):
                raise TrainError("the chat template renders the conversation without its prompt as a prefix: cannot "
                                 "mask the loss to the completion's messages")
            specials = False  # the template writes them
        else:  # plain text: prompt "", the specials only
            prompt_text, full, specials = rec["prompt"], rec["prompt"] + rec["completion"], True
        prompt = tok(prompt_text, add_special_tokens=specials)["input_ids"]
        ids = tok(full, add_special_tokens=specials)["input_ids"]
        cut = len(prompt)
        if ids[:cut] != prompt:
            cut = _completion_start(tok, full, len(prompt_text), specials, i)
            moved += 1
        if cut >= len(ids):
            skipped += 1
            continue
        rows.append((ids[:cut], ids[cut:] + [tok.eos_token_id]))
    return rows, moved, skipped


def _completion_start(tok, text, prompt_chars, specials, index):
    """The index of the first token of `text` holding a character past the prompt's `prompt_chars`."""
    try:
        spans = tok(text, add_special_tokens=specials, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):  # Python tokenizers give no character offsets
        raise TrainError(f"example {index}: the prompt's last token merges with the completion's first (does the "
                         "prompt end in a space?) and this tokenizer gives no character offsets to find where the "
                         "completion starts: load a fast tokenizer, or end the prompt where a token ends") from None
    return next((t for t, (_, end) in enumerate(spans) if end > prompt_chars), len(spans))


def truncate(rows, max_length: int):
    """Rows cut to max_length tokens (the completion's end is cut; a row whose prompt alone fills it is
    dropped). Returns (rows, number truncated, number dropped)."""
    out, cut, dropped = [], 0, 0
    for prompt, completion in rows:
        if len(prompt) + len(completion) <= max_length:
            out.append((prompt, completion))
        elif len(prompt) >= max_length:
            dropped += 1
        else:
            cut += 1
            out.append((prompt, completion[: max_length - len(prompt)]))
    return out, cut, dropped


def _batch(rows, pad_id, device):
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        n = len(a) + len(b)
        ids[i, :n] = torch.tensor(a + b)
        labels[i, len(a):n] = torch.tensor(b)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def evaluate(model, rows, pad_id, device, batch_size):
    """(mean completion loss, share of completions whose every token is the greedy prediction), `batch_size`
    rows at a time (the run's training batch fits, and holds more: activations for backward). Only the
    completion positions' logits are taken to float32: a batch's whole [rows, tokens, vocab] in float32 is
    gigabytes at real vocabularies."""
    model.eval()
    tot_loss, tot_tok, hits = 0.0, 0, 0
    for i in range(0, len(rows), batch_size):
        b = _batch(rows[i:i + batch_size], pad_id, device)
        target = b["labels"][:, 1:]
        valid = target != -100
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][valid].float()
        tot_loss += torch.nn.functional.cross_entropy(logits, target[valid], reduction="sum").item()
        tot_tok += valid.sum().item()
        # Exact match of the greedy continuation: every completion token is the argmax given the right prefix.
        wrong = torch.zeros_like(valid)
        wrong[valid] = logits.argmax(-1) != target[valid]
        hits += (~wrong.any(dim=1)).sum().item()
    model.train()
    return tot_loss / max(tot_tok, 1), hits / max(len(rows), 1)


# The authors' learning rates per mode on real models (FFT and MoLF 5e-5, LoRA 5e-4; MoLF-E, LoRA experts
# only, as LoRA); the built-in tiny model learns its facts at 2e-3 in every mode.
PAPER_LR = {"fft": 5e-5, "molf": 5e-5, "lora": 5e-4, "molf-e": 5e-4}


def _defaults(cfg: TrainConfig, builtin: bool):
    ranks = cfg.ranks or {"molf": (128,), "molf-e": (16, 128), "lora": (32,)}.get(cfg.mode)
    alphas = cfg.alphas or ((32.0,) * len(ranks) if ranks else None)
    lr = cfg.lr if cfg.lr is not None else (2e-3 if builtin else PAPER_LR[cfg.mode])
    lora_lr = cfg.lora_lr if cfg.lora_lr is not None else lr
    return ranks, alphas, lr, lora_lr


def missing_modules(*names: str) -> list[str]:
    """The modules among `names` that do not import (optional dependencies of the CLI)."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


RUN_FILE = "molf_train.json"  # in each checkpoint-N/: the options of the run that wrote it
# The options that define the run (model, data, schedule, experts): a resumed run must keep them to continue it.
# Free to change: where it goes, how it reports, checkpoint frequency, device, backend, gradient checkpointing.
RUN_OPTIONS = {"mode": "--mode", "model": "--model", "data": "--data", "steps": "--steps", "epochs": "--epochs",
               "batch_size": "--batch-size", "grad_accum": "--grad-accum", "lr": "--lr", "lora_lr": "--lora-lr",
               "ranks": "--ranks", "alphas": "--alphas", "score": "--score", "top_k": "--top-k",
               "max_length": "--max-length", "n_facts": "--facts", "seed": "--seed", "dtype": "--dtype",
               "eval_split": "--eval-split", "target_modules": "--target-modules", "quantize": "--quantize"}


def _run_options(cfg: TrainConfig, device) -> dict:
    """RUN_OPTIONS' values as the run uses them (defaults resolved, local paths absolute), as JSON stores them."""
    ranks, alphas, lr, lora_lr = _defaults(cfg, cfg.model is None)
    resolved = dict(ranks=ranks, alphas=alphas, lr=lr, lora_lr=lora_lr, dtype=_dtype(cfg, device),
                    top_k=None if cfg.mode == "fft" else cfg.top_k or 1,
                    n_facts=cfg.n_facts if cfg.data is None else None)  # --facts only shapes the built-in task
    out = {}
    for field in RUN_OPTIONS:
        v = resolved[field] if field in resolved else getattr(cfg, field)
        if field in ("model", "data") and v is not None and os.path.exists(v):
            v = os.path.abspath(v)
        out[field] = list(v) if isinstance(v, tuple) else v
    if cfg.data is not None and os.path.isfile(cfg.data):  # the same path with other examples is another run
        stat = os.stat(cfg.data)
        out["data_sha256"] = _sha256(os.path.abspath(cfg.data), stat.st_size, stat.st_mtime_ns)
    return json.loads(json.dumps(out))


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """The file's sha256 (read once per size and modification time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_same_run(cfg: TrainConfig, device) -> None:
    """--resume continues a run as it started: options that define it (RUN_OPTIONS) must be the same."""
    if cfg.resume is None:
        return
    folder = _last_checkpoint(cfg.checkpoints) if cfg.resume == "last" else cfg.resume
    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        return  # a checkpoint molf train did not write: nothing to compare with
    with open(path) as f:
        started = json.load(f)
    now = _run_options(cfg, device)
    diff = [f"{flag} (was {started[k]!r}, now {now[k]!r})" for k, flag in RUN_OPTIONS.items()
            if k in started and started[k] != now[k]]
    was, is_ = started.get("data_sha256"), now.get("data_sha256")
    if started.get("data") == now["data"] and was is not None and was != is_:
        diff.append(f"--data's examples (the file changed since the run started: sha256 was {was[:12]}..., "
                    f"now {str(is_)[:12]}...)")
    if diff:
        raise TrainError(f"--resume continues the run with the options it started with, but {', '.join(diff)} "
                         "differ: give the same ones, or start a new run (another --output)")


def _check(cfg: TrainConfig):
    """Every input that can be checked before a model is built: one TrainError line each."""
    from . import _checks

    missing = missing_modules("transformers", "accelerate", "matplotlib")  # accelerate: transformers' Trainer's
    if missing:  # checked first: the routing plots are drawn after training, which they would have lost
        raise TrainError(f"molf train needs {' and '.join(missing)} (the Trainer, the routing plots): pip install "
                         f"{' '.join(missing)}, or pip install 'molf[train]'")
    try:
        from .integrations import check_transformers
        check_transformers()
    except ImportError as e:
        raise TrainError(str(e)) from None
    if cfg.mode not in MODES:
        raise TrainError(f"unknown mode {cfg.mode!r}: choose one of {', '.join(MODES)}")
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":  # each rank would write its own run, and only rank 0 a routing log
        raise TrainError(f"molf train runs in one process (launched with WORLD_SIZE={world}): for several GPUs, "
                         "launch a script that uses molf.integrations.hf.MoLFTrainer with torchrun or accelerate "
                         "(README, 'Beyond one GPU')")
    if cfg.data is not None and not os.path.isfile(cfg.data):
        raise TrainError(f"data file not found: {cfg.data}")
    if cfg.model is not None and not os.path.isdir(cfg.model):
        hub_id = re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?", cfg.model) and not cfg.model.startswith(".")
        if not hub_id or os.path.exists(cfg.model):
            raise TrainError(f"model path does not exist (or is not a directory): {cfg.model}")
    if cfg.model is not None:
        _adapter_base(cfg)  # a peft adapter's folder: checked here, before anything is built
    check_output(cfg.output)
    if cfg.steps is not None and cfg.epochs is not None:
        raise TrainError("give --steps or --epochs, not both")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise TrainError(f"unknown --dtype {cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    if cfg.resume is None and _checkpoint_steps(cfg.checkpoints):
        raise TrainError(f"{cfg.checkpoints} holds checkpoints of an interrupted run: add --resume to continue it, "
                         "or remove that folder to start over")
    if cfg.resume is not None:
        if cfg.resume == "last":
            if not _last_checkpoint(cfg.checkpoints):
                cut = " (only checkpoints cut off while being written: remove the folder to start over)" \
                    if _checkpoint_steps(cfg.checkpoints) else ""
                raise TrainError(f"--resume: no checkpoint in {cfg.checkpoints} (written by --save-steps){cut}")
        elif not os.path.isdir(cfg.resume) or not os.path.isfile(os.path.join(cfg.resume, "trainer_state.json")):
            raise TrainError(f"--resume {cfg.resume}: not a checkpoint folder (no trainer_state.json)")
    try:
        for name, val in (("--steps", cfg.steps), ("--batch-size", cfg.batch_size), ("--facts", cfg.n_facts),
                          ("--grad-accum", cfg.grad_accum), ("--save-steps", cfg.save_steps)):
            if val is not None:
                _checks.integer(name, val, low=1)
        if cfg.epochs is not None:
            _checks.real("--epochs", cfg.epochs, low=0.0, low_open=True)
        _checks.real("--eval-split", cfg.eval_split, 0.0, 1.0, high_open=True)
        if cfg.max_length is not None:
            _checks.integer("--max-length", cfg.max_length, low=2)
        for name, val in (("--lr", cfg.lr), ("--lora-lr", cfg.lora_lr)):
            if val is not None:
                _checks.real(name, val, low=0.0)
        if cfg.ranks is not None:
            for r in cfg.ranks:
                _checks.integer("every --ranks entry", r, low=1)
        if cfg.alphas is not None:
            for a in cfg.alphas:
                _checks.real("every --alphas entry", a, low=0.0, low_open=True)
    except (TypeError, ValueError) as e:
        raise TrainError(str(e)) from None
    if cfg.quantize is not None:
        if cfg.quantize not in QUANTIZE:
            raise TrainError(f"unknown --quantize {cfg.quantize!r}: choose one of {', '.join(QUANTIZE)}")
        if cfg.mode not in ("molf-e", "lora"):
            raise TrainError(f"--quantize {cfg.quantize} needs a frozen base: --mode molf-e or lora (got {cfg.mode}: "
                             "its base weights train, which a quantized weight cannot)")
        if missing_modules("bitsandbytes"):
            raise TrainError(f"--quantize {cfg.quantize} needs bitsandbytes: pip install bitsandbytes, or pip install "
                             "'molf[quant]'")
    if cfg.mode == "fft":
        given = [flag for flag, val in (("--ranks", cfg.ranks), ("--alphas", cfg.alphas), ("--lora-lr", cfg.lora_lr),
                                        ("--top-k", cfg.top_k), ("--target-modules", cfg.target_modules))
                 if val is not None]
        if given:
            raise TrainError(f"{', '.join(given)} do(es) not apply to --mode fft (full fine-tuning has no experts)")
        return
    ranks, alphas, _, _ = _defaults(cfg, True)
    if len(alphas) != len(ranks):
        raise TrainError(f"--alphas has {len(alphas)} entries but there are {len(ranks)} LoRA experts "
                         f"(ranks {','.join(map(str, ranks))}): give one alpha per rank")
    if cfg.mode == "lora" and len(ranks) != 1:
        raise TrainError(f"--mode lora trains one LoRA adapter: give one rank, got --ranks {','.join(map(str, ranks))}")
    n_experts = len(ranks) + int(cfg.mode == "molf")
    if cfg.top_k is not None and not 1 <= cfg.top_k <= n_experts:
        raise TrainError(f"--top-k must be between 1 and the number of experts per layer ({n_experts} in mode "
                         f"{cfg.mode}), got {cfg.top_k}")


def _device(cfg: TrainConfig) -> torch.device:
    from ._backend import interpreting, triton_available

    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    except (RuntimeError, ValueError):
        raise TrainError(f"unknown --device {cfg.device!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {cfg.device}: no CUDA device is available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainError(f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.index not in (None, 0):
            raise TrainError(f"--device {cfg.device}: the Trainer runs on the first visible GPU; choose the GPU with "
                             f"CUDA_VISIBLE_DEVICES={device.index} and --device cuda")
        if torch.cuda.device_count() > 1:  # the Trainer would wrap the model in nn.DataParallel over all of them
            raise TrainError(f"this machine shows {torch.cuda.device_count()} GPUs: a one-process Trainer would spread "
                             "each batch over all of them with nn.DataParallel (--batch-size per GPU, a larger batch "
                             "than asked); molf train runs on one GPU: choose it with CUDA_VISIBLE_DEVICES=0 (for "
                             "several GPUs, MoLFTrainer under torchrun: README, 'Beyond one GPU')")
    elif device.type != "cpu":
        raise TrainError(f"--device {cfg.device}: molf train runs on cpu or cuda")
    if cfg.dtype == "fp16" and device.type != "cuda":
        raise TrainError("--dtype fp16 (mixed precision with loss scaling) needs a CUDA device; use bf16 or fp32 "
                         "on the CPU")
    if cfg.backend == "triton" and cfg.mode != "fft":
        if not triton_available():
            raise TrainError("--backend triton: the triton package is not importable")
        if device.type != "cuda" and not interpreting():
            raise TrainError(f"--backend triton needs a CUDA device (the run is on {device}); use --backend eager "
                             "or auto on the CPU")
    return device


def check_output(output: str) -> None:
    """--output must not exist, or be an empty folder."""
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise TrainError(f"output {output} already exists and is not empty: choose another --output")


def _dtype(cfg: TrainConfig, device) -> str:
    """--dtype, or its default: bf16 on a GPU that supports it, fp32 elsewhere."""
    if cfg.dtype is not None:
        return cfg.dtype
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def _checkpoint_steps(folder: str) -> list[int]:
    """The N of every checkpoint-N folder in `folder`, ascending."""
    if not os.path.isdir(folder):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(folder) if (m := re.fullmatch(r"checkpoint-(\d+)", d)))


def _last_checkpoint(folder: str) -> str | None:
    """The newest complete checkpoint in `folder`: the Trainer writes trainer_state.json last, so one without it
    was cut off while being written (a signal or a crash during the save)."""
    for step in reversed(_checkpoint_steps(folder)):
        path = os.path.join(folder, f"checkpoint-{step}")
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return path
    return None


def _checkpoint_step(path: str) -> int:
    """N of a checkpoint-N folder."""
    return int(re.search(r"(\d+)$", path).group(1))


def _drop_cut_off_checkpoints(folder: str, resume: str, log) -> None:
    """Remove the checkpoints newer than `resume` (cut off while being written): the resumed run writes them
    again, and must not mix its files with theirs."""
    step = _checkpoint_step(resume)
    for later in (n for n in _checkpoint_steps(folder) if n > step):
        shutil.rmtree(os.path.join(folder, f"checkpoint-{later}"))
        log(f"molf train: removed checkpoint-{later}, cut off while being written (no trainer_state.json); "
            f"resuming from checkpoint-{step}")


def _new_work_dir(output: str) -> str:
    """The hidden folder the run is written to, next to --output (so the final rename stays on one file
    system), with the permissions a plain mkdir would give. A TrainError when it cannot be made."""
    parent = os.path.dirname(os.path.abspath(output)) or "."
    try:
        os.makedirs(parent, exist_ok=True)
        work = tempfile.mkdtemp(prefix=".molf-train-", dir=parent)
    except OSError as e:
        raise TrainError(f"cannot write the output next to {output}: {e.strerror or e}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)
    return work


def _publish(work: str, output: str, log) -> str:
    """Move the finished run to `output`; if someone took that name meanwhile, to the first free
    `output-N` beside it. The finished run is never deleted: if no move works it stays in `work`."""
    try:
        os.replace(work, output)  # also replaces an empty directory
        return output
    except OSError:
        pass
    for k in range(1, 1000):
        alt = f"{output.rstrip(os.sep)}-{k}"
        if os.path.exists(alt):
            continue
        try:
            os.rename(work, alt)
        except OSError:
            continue
        log(f"molf train: warning: {output} was created by someone else during training; the run is in {alt}")
        return alt
    raise TrainError(f"{output} is taken and no free name was found next to it; the finished run is in {work}")


_CAUGHT: list[int] = []  # signals _signals_raise turned into SystemExit, see raise_if_signalled


@contextmanager
def _signals_raise():
    """SIGTERM and SIGHUP (what `timeout`, Slurm and a closed terminal send) raise SystemExit(128 + signal)
    like Ctrl-C raises KeyboardInterrupt, so that the work folder is cleaned up on the way out. A signal the
    process ignores stays ignored (`nohup molf train ...` keeps running when the terminal closes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _CAUGHT.append(signum)
        raise SystemExit(128 + signum)

    sigs = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
            if s is not None and signal.getsignal(s) is not signal.SIG_IGN]
    _CAUGHT.clear()
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def raise_if_signalled() -> None:
    """SystemExit again for a signal caught earlier: Python prints and drops an exception a signal handler raises
    while a __del__ or a weakref callback runs, and training would go on (checked after every step)."""
    if _CAUGHT:
        raise SystemExit(128 + _CAUGHT[0])


def published(output: str, build, log, on_abort=None):
    """(build(work), final folder): build writes into a hidden folder beside `output`, which becomes
    `output` (or `output-N`, see _publish) only when build returns; if build raises (Ctrl-C, SIGTERM and
    SIGHUP included) the folder is removed and on_abort() runs."""
    with _signals_raise():  # before the folder exists: a signal between the two would leave it behind
        work = _new_work_dir(output)
        try:
            result = build(work)
            raise_if_signalled()
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            if on_abort is not None:
                on_abort()
            raise
        return result, _publish(work, output, log)


def train(cfg: TrainConfig, log=print) -> dict:
    """Run one fine-tuning; returns the summary (also written to <output>/summary.json)."""
    _check(cfg)
    device = _device(cfg)
    _check_same_run(cfg, device)

    def say_checkpoints_kept():
        if _last_checkpoint(cfg.checkpoints):
            log(f"molf train: interrupted; checkpoints kept in {cfg.checkpoints}: run the same command with "
                "--resume to continue")
    (summary, lines), final = published(cfg.output, lambda work: _run(cfg, device, work, log), log,
                                        say_checkpoints_kept)
    if cfg.save_steps or cfg.resume:
        shutil.rmtree(cfg.checkpoints, ignore_errors=True)  # the run is complete: its checkpoints are spent
    summary["output"] = final
    for line in lines:
        log(line.replace("{output}", final))
    return summary


def _load(cfg: TrainConfig, records, device, dtype: str):
    """(model, tokenizer, built-in?) with the model on `device` in the dtype it trains in: bf16 weights for
    bf16, fp32 weights for fp32 and for fp16 (fp16 autocast with loss scaling over fp32 weights); with
    --quantize, its linear layers (the output head aside) quantized by bitsandbytes, computing in that dtype."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    weights = torch.bfloat16 if dtype == "bf16" else torch.float32
    torch.manual_seed(cfg.seed)
    if cfg.model is None:
        if any("messages" in r for r in records):
            raise TrainError("chat 'messages' data needs a tokenizer with a chat template (--model with one); the "
                             "built-in model's tokenizer has none")
        tok = builtin_tokenizer([r["prompt"] + r["completion"] for r in records])
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                             max_position_embeddings=64, tie_word_embeddings=True,
                                             use_cache=False)).to(weights)
        if cfg.quantize is None:
            return model.to(device), tok, True
        with tempfile.TemporaryDirectory() as folder:  # bitsandbytes quantizes as transformers loads
            model.save_pretrained(folder)
            return _quantized(folder, cfg.quantize, weights, device), tok, True
    from transformers import AutoModelForCausalLM, AutoTokenizer
    adapter = _adapter_base(cfg)
    try:
        own_tokenizer = adapter is None or os.path.isfile(os.path.join(cfg.model, "tokenizer_config.json"))
        tok = AutoTokenizer.from_pretrained(cfg.model if own_tokenizer else adapter)  # else the adapter's base's
        if tok.eos_token_id is None:  # each completion ends with it: the model learns where to stop
            raise TrainError(f"the tokenizer of {cfg.model} has no eos token (each completion ends with it): set "
                             "eos_token in its tokenizer_config.json")
        if adapter is not None:  # the base with the adapter merged in: the plain model this run starts from
            from peft import AutoPeftModelForCausalLM
            with torch.random.fork_rng(devices=[]):  # peft draws LoRA inits before it loads: not the run's draws
                try:
                    model = AutoPeftModelForCausalLM.from_pretrained(cfg.model, dtype=weights).merge_and_unload()
                except (RuntimeError, KeyError) as e:  # an adapter of another base: state-dict size mismatches
                    raise TrainError(f"cannot load the adapter {cfg.model} onto its base {adapter}: "
                                     f"{str(e).strip().splitlines()[-1].strip()}") from None
            model.requires_grad_(True)  # peft loaded it for inference (all frozen); as from_pretrained gives it
        elif cfg.quantize:
            model = _quantized(cfg.model, cfg.quantize, weights, device)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=weights)
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot load model {cfg.model}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token_id = tok.eos_token_id
    return (model if cfg.quantize else model.to(device)), tok, False


def _adapter_base(cfg: TrainConfig) -> str | None:
    """The base model an adapter's folder given as --model names (peft's adapter_config.json), or None for a
    model's folder or a hub id."""
    path = os.path.join(cfg.model, "adapter_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if not base:
        raise TrainError(f"--model {cfg.model} is a peft adapter's folder whose adapter_config.json names no "
                         "base_model_name_or_path: set it, or give the merged model")
    if cfg.quantize:
        raise TrainError(f"--model {cfg.model} is a peft adapter's folder: with --quantize, merge it into its base "
                         "first (peft's merge_and_unload, then save_pretrained) and give that model")
    if missing_modules("peft"):
        raise TrainError(f"--model {cfg.model} is a peft adapter's folder: loading it needs peft (pip install peft)")
    return base


def _quantized(path, kind: str, weights, device):
    """The causal LM at `path` with bitsandbytes' linear layers: 4-bit NF4 with double quantization (QLoRA's)
    computing in `weights`, or 8-bit; placed on `device` as it loads (bitsandbytes quantizes there)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .quant import keep_cpu_trainable
    config = BitsAndBytesConfig(load_in_8bit=True) if kind == "int8" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=weights)
    place = f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=weights,
                                                 device_map={"": place})
    keep_cpu_trainable(model)  # the evaluation before training runs it without gradients, before molf.wrap
    return model


def _peak_memory_mb(device) -> float | None:
    """The most GPU memory allocated since the last reset (training's), in MB; None on the CPU."""
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1) if device.type == "cuda" else None


def _split(rows, share: float, seed: int):
    """(train rows, held-out rows): a seeded random `share` of the rows held out (at least one when share > 0)."""
    if share <= 0:
        return rows, []
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(share * len(rows)))
    if n_eval >= len(rows):
        raise TrainError(f"--eval-split {share} holds out all {len(rows)} examples: nothing is left to train on")
    held = set(idx[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def _optimizer(cfg: TrainConfig, model, ranks, alphas, lr, lora_lr, steps):
    """The paper's recipe per mode: FFT AdamW (weight decay 0.1, none on norms and biases); LoRA (dropout 0.05)
    and the MoLF modes on MoLFAdamW; cosine schedule after a 10% warm-up whose first step is already above 0
    (at lr = 0 every EPD score is 0 and expert 0 wins by the tie rule: a first routing column that means nothing)."""
    import molf

    if cfg.mode == "fft":
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n.lower()]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n.lower())]
        opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)],
                                lr=lr, betas=(0.9, 0.999), eps=1e-8)
    else:
        try:
            molf.wrap(model, ranks=ranks, alphas=alphas, train_base=cfg.mode == "molf", backend=cfg.backend,
                      dropout=0.05 if cfg.mode == "lora" else 0.0, freeze_others=cfg.mode in ("molf-e", "lora"),
                      target_modules=cfg.target_modules)
            opt = molf.MoLFAdamW(model, lr=lr, lora_lr=lora_lr, weight_decay=0.1, lora_weight_decay=0.01,
                                 score=cfg.score, top_k=cfg.top_k or 1, backend=cfg.backend)
        except (TypeError, ValueError) as e:
            hint = " (on the command line: --target-modules)" if "target_modules" in str(e) else ""
            raise TrainError(f"{e}{hint}") from None
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else
        0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    return opt, sched


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _trainer(cfg: TrainConfig, model, tok, rows, opt, sched, steps, dtype, run_dir, device, options):
    """The transformers Trainer (MoLFTrainer unless FFT) over `rows`, padded per batch to the longest; each
    checkpoint records `options` (_run_options)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from .integrations.hf import MoLFTrainer

    # transformers 5 renames gradient_checkpointing to activation_checkpointing (the old name warns)
    ckpt_arg = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    settings = dict(
        **{ckpt_arg: cfg.gradient_checkpointing}, output_dir=run_dir, max_steps=steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=sched.base_lrs[0], max_grad_norm=1.0,
        logging_steps=10, logging_first_step=True, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500, save_only_model=False, report_to=[] if cfg.report_to == "none" else
        cfg.report_to.split(","), disable_tqdm=not cfg.progress, seed=cfg.seed, data_seed=cfg.seed,
        use_cpu=device.type == "cpu", bf16=dtype == "bf16", fp16=dtype == "fp16",
        dataloader_num_workers=0, remove_unused_columns=False)
    try:
        args = TrainingArguments(**settings)
    except (ValueError, ImportError) as e:  # e.g. --report-to naming an integration that is not installed
        raise TrainError(f"cannot set up the Trainer: {str(e).splitlines()[0]}") from None

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise_if_signalled()
            if cfg.interrupt_at_step is not None and state.global_step == cfg.interrupt_at_step:
                raise KeyboardInterrupt

    class RecordOptions(TrainerCallback):  # what --resume compares with (_check_same_run)
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                with open(os.path.join(args.output_dir, f"checkpoint-{state.global_step}", RUN_FILE), "w") as f:
                    json.dump(options, f, indent=2)

    kind = Trainer if cfg.mode == "fft" else MoLFTrainer
    extra = {} if cfg.mode == "fft" else dict(backend=cfg.backend)
    return kind(model=model, args=args, train_dataset=_Rows(rows), optimizers=(opt, sched),
                data_collator=lambda chunk: _batch(chunk, tok.pad_token_id, "cpu"),
                callbacks=[Interrupt(), RecordOptions()],
                **extra)


def _run(cfg: TrainConfig, device, work, log):
    import molf

    # An earlier run in this process (molf compare, a sweep) may still hold its model and optimizer in a
    # reference cycle (third-party code: pyplot's first import, inside plot_routing, captures the calling frames):
    # freed now, not counted in this run's peak memory nor competing with it for the GPU.
    gc.collect()
    records = read_records(cfg.data) if cfg.data else synthetic_facts(cfg.n_facts, cfg.seed)
    options = _run_options(cfg, device)  # the data's sha256 as read (not of an edit made during the run)
    dtype = _dtype(cfg, device)
    model, tok, builtin = _load(cfg, records, device, dtype)
    rows, moved, skipped = _encode(tok, records)
    if moved:
        log(f"molf train: {moved} example(s) whose prompt's last token merges with the completion's first (a prompt "
            "ending in a space?): the completion starts at the merged token")
    if skipped:
        log(f"molf train: {skipped} example(s) with an empty completion skipped")
    max_length = cfg.max_length or getattr(model.config, "max_position_embeddings", None)
    if max_length:
        rows, cut, dropped = truncate(rows, max_length)
        if cut or dropped:
            log(f"molf train: {cut} example(s) truncated to {max_length} tokens (--max-length)"
                + (f", {dropped} dropped (the prompt alone fills it)" if dropped else ""))
    if not rows:
        raise TrainError("no training example has a non-empty completion" + (f" within {max_length} tokens"
                                                                              if max_length else ""))
    train_rows, eval_rows = _split(rows, cfg.eval_split, cfg.seed)
    # The built-in Fact task measures recall of the trained facts (the paper's Fact task); user data with a
    # held-out share is measured on it.
    scored, scored_on = (eval_rows, "eval") if eval_rows and not builtin else (train_rows, "train")
    ranks, alphas, lr, lora_lr = _defaults(cfg, builtin)
    steps = cfg.steps if cfg.steps is not None else (
        math.ceil(cfg.epochs * math.ceil(len(train_rows) / cfg.batch_size) / cfg.grad_accum) if cfg.epochs else 800)
    pad = tok.pad_token_id
    loss0, recall0 = evaluate(model, scored, pad, device, cfg.batch_size)

    opt, sched = _optimizer(cfg, model, ranks, alphas, lr, lora_lr, steps)
    run_dir = cfg.checkpoints if (cfg.save_steps or cfg.resume) else os.path.join(work, "trainer")
    trainer = _trainer(cfg, model, tok, train_rows, opt, sched, steps, dtype, run_dir, device, options)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    resume = None if cfg.resume is None else (_last_checkpoint(cfg.checkpoints) if cfg.resume == "last" else cfg.resume)
    if cfg.resume == "last":
        _drop_cut_off_checkpoints(cfg.checkpoints, resume, log)
    result = trainer.train(resume_from_checkpoint=resume)
    ran = trainer.state.global_step - (_checkpoint_step(resume) if resume else 0)
    seconds = result.metrics["train_runtime"]
    peak_mb = _peak_memory_mb(device)  # training's: before the evaluation below allocates its own
    loss1, recall1 = evaluate(model, scored, pad, device, cfg.batch_size)
    eval_loss = None
    if eval_rows:  # held-out figures, evaluated once (they are the scored ones for user data)
        eval_loss, eval_recall = (loss1, recall1) if scored is eval_rows else \
            evaluate(model, eval_rows, pad, device, cfg.batch_size)
        trainer.log({"eval_loss": eval_loss, "eval_recall": eval_recall})
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    share, plots = {}, []
    if cfg.mode != "fft":
        routing_path = os.path.join(work, "routing.jsonl")
        shutil.copyfile(os.path.join(run_dir, "molf_routing.jsonl"), routing_path)
        from .plot import plot_routing, read_routing
        _, _, experts, winners = read_routing(routing_path)
        n = sum(len(row) for row in winners)
        share = {e: sum(e in w for row in winners for w in row) / n for e in experts}
        plots = [os.path.basename(p) for p in plot_routing(routing_path, work)]
        with warnings.catch_warnings():  # a quantized base: said below in one line, not as merge's warning
            warnings.filterwarnings("ignore", message="molf.merge dequantized", category=UserWarning)
            molf.merge(model)
    if run_dir.startswith(work):
        shutil.rmtree(run_dir, ignore_errors=True)
    model.save_pretrained(os.path.join(work, "model"))
    tok.save_pretrained(os.path.join(work, "model"))
    summary = {"mode": cfg.mode, "model": cfg.model or "builtin-qwen2-tiny", "data": cfg.data or "synthetic-facts",
               "examples": len(rows), "train_examples": len(train_rows), "eval_examples": len(eval_rows),
               "steps": steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "lr": lr,
               "lora_lr": lora_lr if cfg.mode != "fft" else None, "ranks": list(ranks) if ranks else None,
               "target_modules": list(cfg.target_modules) if isinstance(cfg.target_modules, tuple)
               else cfg.target_modules,
               "dtype": dtype, "quantize": cfg.quantize, "max_length": max_length, "device": str(device),
               "train_seconds": round(seconds, 2),
               "seconds_per_step": round(seconds / max(ran, 1), 5), "resumed_from": resume,
               "peak_memory_mb": peak_mb, "trainable_parameters": trainable,
               "loss_before": loss0, "loss_after": loss1, "recall_before": recall0, "recall_after": recall1,
               "scored_on": scored_on, "eval_loss": eval_loss, "routing_share": share, "plots": plots,
               "loss_curve_every_10_steps": losses}
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    base = f", {cfg.quantize} base" if cfg.quantize else ""
    lines = [f"molf train ({cfg.mode}): {steps} steps in {seconds:.1f}s on {device} ({dtype}{base})",
             f"  loss    {loss0:.3f} -> {loss1:.3f}" + (f"  (held-out {eval_loss:.3f})" if eval_rows else ""),
             f"  recall  {recall0:.1%} -> {recall1:.1%}  (exact match of the completion, {len(scored)} "
             f"{'trained' if scored_on == 'train' else 'held-out'} examples)"]
    if share:
        lines.append("  routing " + ", ".join(f"{e} {s:.0%}" for e, s in share.items()))
    lines.append("  output  {output}/ (model/, summary.json" + (", routing.jsonl, plots" if share else "") + ")")
    if cfg.quantize:
        lines.append(f"          model/ is the merged model in {dtype}: the {cfg.quantize} base dequantized")
    return summary, lines
