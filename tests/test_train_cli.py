"""`molf train` on the transformers Trainer and `molf compare`, end to end on tiny models (CPU): every data
format with the loss on the completion only, held-out split, gradient accumulation and epochs, gradient
checkpointing, an interrupted run resumed bitwise, bad input as one line with exit code 2."""
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import rel_err, tiny_qwen2, write_jsonl
from molf.cli import main
from molf.train import TrainConfig, TrainError, _encode, read_records, train


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Qwen2 folder with a byte-level BPE tokenizer and a chat template (what --model DIR loads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    texts = ["The capital city of Kalo is Valdor.", "SELECT name FROM users WHERE id = 3;", "hello there, friend"] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=[
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = tmp_path_factory.mktemp("chat-model")
    tiny_qwen2(vocab=len(fast)).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


RECORDS = {
    "pairs": [{"prompt": f"SELECT name FROM users WHERE id = {i}", "completion": f"; -- {i % 3}"} for i in range(8)],
    "text": [{"text": f"hello there, friend number {i}"} for i in range(8)],
    "messages": [{"messages": [{"role": "user", "content": f"capital of Kalo {i}?"},
                               {"role": "assistant", "content": "Valdor."}]} for i in range(8)],
    "conversational": [{"prompt": [{"role": "user", "content": f"capital of Kalo {i}?"}],  # trl's 4th format
                        "completion": [{"role": "assistant", "content": "Valdor."}]} for i in range(8)],
}


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_loss_is_masked_to_the_completion(tmp_path, chat_model, fmt):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(chat_model)
    recs = read_records(write_jsonl(tmp_path / "d.jsonl", RECORDS[fmt]))
    ((prompt, completion),), moved, skipped = _encode(tok, recs[:1])
    assert (moved, skipped) == (0, 0)
    text = tok.decode(completion[:-1])
    chat = "<|im_start|>user\ncapital of Kalo 0?<|im_end|>\n<|im_start|>assistant\n"
    want = {"pairs": "; -- 0", "text": "hello there, friend number 0", "messages": "Valdor.<|im_end|>\n",
            "conversational": "Valdor.<|im_end|>\n"}[fmt]
    assert text == want and completion[-1] == tok.eos_token_id
    assert tok.decode(prompt) == {"pairs": "SELECT name FROM users WHERE id = 0", "text": "", "messages": chat,
                                  "conversational": chat}[fmt]


def test_a_conversational_completion_of_several_messages_is_all_in_the_loss(tmp_path, chat_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(chat_model)
    rec = {"prompt": [{"role": "user", "content": "hi"}],
           "completion": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "more?"},
                          {"role": "assistant", "content": "B"}]}
    ((prompt, completion),), _, _ = _encode(tok, read_records(write_jsonl(tmp_path / "d.jsonl", [rec])))
    assert tok.decode(prompt) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(completion[:-1]) == ("A<|im_end|>\n<|im_start|>user\nmore?<|im_end|>\n<|im_start|>assistant\n"
                                           "B<|im_end|>\n")
    with pytest.raises(TrainError, match=r"d2.jsonl:1: expected .* 'prompt' and 'completion' lists of such messages"):
        read_records(write_jsonl(tmp_path / "d2.jsonl", [{"prompt": [{"role": "user", "content": "x"}],
                                                         "completion": "a string"}]))


@pytest.mark.parametrize("bos", [False, True])
def test_a_prompt_whose_last_token_merges_with_the_completion_keeps_the_whole_text(chat_model, bos):
    """A prompt ending in a space ("... is " + "Valdor."): byte-level BPE writes the text as "... is" + " Valdor.",
    so the prompt's own tokens are not a prefix of the whole text's. The rows were cut at the prompt's token
    count: "Valdor" vanished from the example (trained on "... is ."), and a completion merged whole into one
    token with its prompt dropped the example, both silently. Now the merged token starts the completion."""
    from tokenizers import processors
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(chat_model)
    if bos:  # a tokenizer that writes a BOS token first (Llama's): it has no characters and stays in the prompt
        start = tok.convert_tokens_to_ids("<|im_start|>")
        tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                                      special_tokens=[("<|im_start|>", start)])
    recs = [{"prompt": "The capital city of Kalo is ", "completion": "Valdor. hello there"},
            {"prompt": "The capital city of Kalo is", "completion": " Valdor."},  # the usual split: unchanged
            {"prompt": "hello there, friend", "completion": ""},
            {"prompt": "", "completion": "hello there"},
            {"prompt": "The capital city of Kalo is V", "completion": "aldor."}]
    rows, moved, skipped = _encode(tok, recs)
    assert (moved, skipped) == (2, 1) and len(rows) == 4
    first = ["<|im_start|>"] if bos else []
    for (prompt, completion), rec in zip(rows, [recs[0], recs[1], recs[3], recs[4]]):
        assert completion[-1] == tok.eos_token_id
        assert tok.decode(prompt + completion[:-1], skip_special_tokens=True) == rec["prompt"] + rec["completion"]
        assert tok.convert_ids_to_tokens(prompt[:len(first)]) == first
        assert prompt + completion[:-1] == tok(rec["prompt"] + rec["completion"])["input_ids"]  # the text's tokens
    assert tok.decode(rows[0][1][:-1]) == " Valdor. hello there" and rows[0][0] == rows[1][0]
    assert tok.decode(rows[3][1][:-1]).startswith(" V")  # the merged " V..." token is the completion's

    class NoOffsets:  # a Python tokenizer: no character offsets
        eos_token_id = tok.eos_token_id

        def __call__(self, text, return_offsets_mapping=False, **kw):
            if return_offsets_mapping:
                raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
            return tok(text, **kw)
    assert _encode(NoOffsets(), recs[1:2])[1:] == (0, 0)  # no merge: no offsets needed
    with pytest.raises(TrainError, match="example 0: the prompt's last token merges with the completion's first"):
        _encode(NoOffsets(), recs[:1])


WORDS = ["The", " capital", " city", " of", " Kalo", " is", " Valdor", ".", " hello", " there", ",", " friend",
         " 42", "\n", "  ", "é", "SELECT", " name"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=12), cut=st.integers(0, 200))
def test_every_split_of_a_text_trains_on_exactly_its_tokens(chat_model, words, cut):
    """Whatever the split of a text into prompt and completion (inside a word, before or after spaces): the row is
    the text's own tokens, and its completion holds every character of the completion."""
    tok = _cached_tokenizer(chat_model)
    text = "".join(words)
    cut = min(cut, len(text))
    rec = {"prompt": text[:cut], "completion": text[cut:]}
    rows, moved, skipped = _encode(tok, [rec])
    assert skipped == (not rec["completion"])
    if rows:
        (prompt, completion), = rows
        ids = tok(text, return_offsets_mapping=True)
        assert prompt + completion[:-1] == ids["input_ids"] and completion[-1] == tok.eos_token_id
        starts = [s for s, _ in ids["offset_mapping"]]
        assert starts[len(prompt)] <= cut and (len(prompt) == 0 or ids["offset_mapping"][len(prompt) - 1][1] <= cut)
        assert moved == (prompt != tok(rec["prompt"])["input_ids"])


_TOKENIZERS = {}


def _cached_tokenizer(path):
    from transformers import AutoTokenizer
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


def test_train_says_how_many_examples_were_moved_or_skipped(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"item {i} is ", "completion": f"c{i % 3}"} for i in range(6)]
                       + [{"prompt": "empty", "completion": ""}])
    assert main(["train", "--data", data, "--output", str(tmp_path / "run"), "--steps", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "6 example(s) whose prompt's last token merges with the completion's first" in printed
    assert "1 example(s) with an empty completion skipped" in printed
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["train_examples"] == 6


def test_evaluation_takes_the_training_batch_and_stays_out_of_the_peak_memory(tmp_path, monkeypatch):
    """The evaluation before and after training ran 64 rows at a time with the whole [rows, tokens, vocab] logits
    in float32 (at Qwen2.5's vocabulary and 512 tokens: 20 GB, beyond what training with --batch-size 8 needs),
    and the summary's peak memory was read after the final evaluation, so it reported the evaluation's peak as
    training's (in `molf compare`, the same figure for every mode). Now the run's batch, the completion positions'
    logits only, and the peak read before."""
    import molf.train as T
    calls, real = [], T.evaluate

    def evaluate(model, rows, pad_id, device, batch_size):
        calls.append(("evaluate", batch_size))
        return real(model, rows, pad_id, device, batch_size)
    monkeypatch.setattr(T, "evaluate", evaluate)
    monkeypatch.setattr(T, "_peak_memory_mb", lambda device: calls.append("peak"))
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS["pairs"])
    assert main(["train", "--data", data, "--output", str(tmp_path / "run"), "--steps", "2", "--batch-size", "3",
                 "--eval-split", "0.25", "--no-progress"]) == 0
    # the built-in model scores the trained rows, then the held-out ones
    assert calls == [("evaluate", 3), "peak", ("evaluate", 3), ("evaluate", 3)]

    # the figures are those of the whole logits, whatever the batch
    torch.manual_seed(0)
    model = tiny_qwen2(vocab=80)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 9, (7, 2), generator=g).tolist()
    rows = [(torch.randint(0, 80, (n,), generator=g).tolist(), torch.randint(0, 80, (c,), generator=g).tolist())
            for n, c in lengths]
    rows.append((rows[0][0], [int(model(torch.tensor([rows[0][0]])).logits[0, -1].argmax())]))  # recalled
    from molf.train import _batch
    b = _batch(rows, 0, "cpu")
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()[:, :-1]
    target = b["labels"][:, 1:]
    want_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                  reduction="sum") / (target != -100).sum()
    want_hits = ((logits.argmax(-1) == target) | (target == -100)).all(1).float().mean()
    assert want_hits > 0
    for batch_size in (1, 3, 8):
        loss, hits = real(model, rows, 0, "cpu", batch_size)
        assert abs(loss - want_loss.item()) < 1e-5 * want_loss.item() and hits == want_hits.item()


def test_a_run_starts_after_the_last_one_is_freed(tmp_path, monkeypatch):
    """`molf compare` trains its runs in one process. pyplot's first import (inside plot_routing) leaves a
    reference cycle holding the calling frames, with the run's model and optimizer: the next run loaded its model
    beside them, and its peak memory counted them. Now each run starts with the earlier ones freed."""
    import gc
    import sys
    import weakref

    import molf.plot
    import molf.train as T
    # a first run imports what runs need: a module's first import can hold its importer's frames for good (seen
    # under pytest with transformers' Trainer), which is not what this test is about
    train(TrainConfig(output=str(tmp_path / "warm"), mode="molf-e", steps=1, n_facts=8, progress=False),
          log=lambda *a: None)
    loaded, real_load, real_plot = [], T._load, molf.plot.plot_routing

    def load(*args):
        assert all(r() is None for r in loaded), "a model of an earlier run is still alive"
        out = real_load(*args)
        loaded.append(weakref.ref(out[0]))
        return out

    def plot_routing(*args):  # as pyplot's first import does: a cycle through the caller's frame
        cycle = [sys._getframe(1)]
        cycle.append(cycle)
        return real_plot(*args)
    monkeypatch.setattr(T, "_load", load)
    monkeypatch.setattr(molf.plot, "plot_routing", plot_routing)
    enabled = gc.isenabled()
    gc.disable()
    try:
        assert main(["compare", "--output", str(tmp_path / "c"), "--modes", "molf-e,lora", "--steps", "2",
                     "--facts", "16"]) == 0
    finally:
        if enabled:
            gc.enable()
    assert len(loaded) == 2


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_every_data_format_trains_a_hub_style_model(tmp_path, chat_model, fmt):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS[fmt])
    out = tmp_path / "run"
    assert main(["train", "--model", chat_model, "--data", data, "--output", str(out), "--steps", "12",
                 "--batch-size", "4", "--lr", "3e-3", "--eval-split", "0.25", "--no-progress", "--backend",
                 "eager"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert (s["train_examples"], s["eval_examples"], s["scored_on"]) == (6, 2, "eval")
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert s["eval_loss"] is not None and s["dtype"] == ("bf16" if gpu_bf16 else "fp32")
    assert s["loss_after"] < s["loss_before"]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(out / "model")
    assert AutoTokenizer.from_pretrained(out / "model").chat_template


def test_builtin_task_keeps_recall_on_the_trained_facts(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "--steps", "20", "--facts", "20", "--eval-split", "0.2",
                 "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert (s["train_examples"], s["eval_examples"], s["scored_on"]) == (16, 4, "train")


def test_epochs_grad_accum_and_gradient_checkpointing(tmp_path):
    cfg = TrainConfig(output=str(tmp_path / "run"), epochs=2, batch_size=4, grad_accum=2, n_facts=20,
                      gradient_checkpointing=True, progress=False, backend="eager", mode="molf-e")
    s = train(cfg, log=lambda *a: None)
    assert s["steps"] == 5  # ceil(2 epochs x 5 batches / 2 accumulated)
    assert len(json.loads((tmp_path / "run" / "routing.jsonl").read_text().splitlines()[-1])["selections"]) == 14
    assert (tmp_path / "run" / "routing.jsonl").read_text().count("\n") == 5


def test_target_modules_choose_the_wrapped_layers(tmp_path, capsys):
    """--target-modules as wrap's target_modules: only the named projections carry experts (routing log, the
    trainable count of MoLF-E: LoRA parameters alone) and the summary records them."""
    out = tmp_path / "run"
    assert main(["train", "--mode", "molf-e", "--target-modules", "q_proj,v_proj", "--ranks", "2,4",
                 "--output", str(out), "--steps", "2", "--facts", "8", "--no-progress", "--backend", "eager"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["target_modules"] == ["q_proj", "v_proj"]
    layers = json.loads((out / "routing.jsonl").read_text().splitlines()[0])["selections"]
    assert {name.rpartition(".")[2] for name in layers} == {"q_proj", "v_proj"}
    from transformers import AutoModelForCausalLM
    attn = AutoModelForCausalLM.from_pretrained(out / "model").model.layers[0].self_attn
    per_layer = sum((2 + 4) * (p.in_features + p.out_features) for p in (attn.q_proj, attn.v_proj))
    assert s["trainable_parameters"] == len(layers) // 2 * per_layer
    with pytest.raises(SystemExit, match="2"):
        main(["train", "--target-modules", "q_proj,,v_proj", "--output", str(tmp_path / "bad")])
    assert "--target-modules: expected all-linear or comma-separated module names, got 'q_proj,,v_proj'" in \
        capsys.readouterr().err


@pytest.mark.parametrize("mode, kind", [("molf-e", "nf4"), ("lora", "int8")])
def test_quantized_base_trains_resumes_and_writes_a_float_model(tmp_path, capsys, mode, kind):
    """--quantize: the base loaded 4-bit (NF4, double quantization) or 8-bit by bitsandbytes and frozen, the experts
    training on it (MoLF-E or LoRA, QLoRA-style); an interrupted run resumes to the uninterrupted one's weights; the
    output model is the merge, dequantized, that plain transformers loads."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install molf[quant])")
    import warnings

    import molf.train as T
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    layers, load = [], T._load

    def spy(*args):
        model, tok, builtin = load(*args)
        layers.extend(type(m).__name__ for m in model.modules() if "bit" in type(m).__name__)
        return model, tok, builtin
    base = dict(mode=mode, quantize=kind, steps=6, batch_size=4, n_facts=16, save_steps=3, progress=False,
                backend="eager", device="cpu")  # on a GPU too: bitwise resume, and the CPU's message below
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="bitsandbytes")
        T._load = spy
        try:
            full = train(TrainConfig(output=str(tmp_path / "full"), **base))
        finally:
            T._load = load
        assert layers == ["Linear4bit" if kind == "nf4" else "Linear8bitLt"] * 14
        assert full["quantize"] == kind and full["loss_after"] < full["loss_before"]
        assert f"on cpu (fp32, {kind} base)" in capsys.readouterr().out
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(output=str(tmp_path / "cut"), interrupt_at_step=4, **base), log=lambda *a: None)
        resumed = train(TrainConfig(output=str(tmp_path / "cut"), resume="last", **base), log=lambda *a: None)
    assert resumed["resumed_from"].endswith("checkpoint-3")
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    assert getattr(plain.config, "quantization_config", None) is None
    assert plain.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU case runs above)")
def test_quantized_base_trains_on_the_gpu_in_bf16(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install molf[quant])")
    from transformers import AutoModelForCausalLM
    s = train(TrainConfig(output=str(tmp_path / "run"), mode="molf-e", quantize="nf4", steps=8, n_facts=16,
                          batch_size=4, progress=False), log=lambda *a: None)
    assert (s["device"], s["dtype"], s["quantize"]) == ("cuda", "bf16", "nf4") and s["loss_after"] < s["loss_before"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype="auto")  # as saved
    assert plain.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_quantize_without_bitsandbytes_is_one_error_line(tmp_path, monkeypatch):
    import molf.train as T
    monkeypatch.setattr(T, "missing_modules", lambda *names: [n for n in names if n == "bitsandbytes"])
    with pytest.raises(TrainError, match=r"--quantize nf4 needs bitsandbytes: pip install bitsandbytes, or pip "
                                         r"install 'molf\[quant\]'"):
        train(TrainConfig(output=str(tmp_path / "o"), mode="molf-e", quantize="nf4"))


@pytest.mark.parametrize("mode", ["molf", "lora", "fft"])
def test_interrupted_run_resumes_bitwise(tmp_path, mode):
    """A run interrupted after step 7 (as Ctrl-C would) keeps its checkpoints and no output; --resume then
    finishes it with the very weights of an uninterrupted run (data order, dropout RNG, optimizer, schedule),
    from the newest complete checkpoint (a newer one cut off while being written is removed, not resumed from),
    and only with the options the run started with (before: another batch size or seed resumed, silently not
    the same run)."""
    base = dict(mode=mode, steps=12, batch_size=4, n_facts=16, save_steps=5, progress=False, backend="eager")
    full = train(TrainConfig(output=str(tmp_path / "full"), **base), log=lambda *a: None)
    messages = []
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(output=str(tmp_path / "cut"), interrupt_at_step=7, **base), log=messages.append)
    assert not (tmp_path / "cut").exists()
    assert sorted(p for p in os.listdir(tmp_path / "cut.checkpoints") if p.startswith("checkpoint-")) == ["checkpoint-5"]
    assert any("--resume" in m for m in messages)
    with pytest.raises(TrainError, match="holds checkpoints of an interrupted run: add --resume"):
        train(TrainConfig(output=str(tmp_path / "cut"), **base), log=lambda *a: None)
    # the options that define the run must be the ones it started with (checkpoint-5/molf_train.json)
    with pytest.raises(TrainError, match=r"--resume continues the run with the options it started with, but "
                                         r"--batch-size \(was 4, now 2\), --seed \(was 0, now 1\) differ"):
        train(TrainConfig(output=str(tmp_path / "cut"), resume="last", **dict(base, batch_size=2, seed=1)),
              log=lambda *a: None)
    cut_off = tmp_path / "cut.checkpoints" / "checkpoint-10"  # a save that a signal cut off: no trainer_state.json
    cut_off.mkdir()
    (cut_off / "config.json").write_text("{}")
    said = []
    # a default given explicitly is the same option (lr 2e-3 is the built-in model's default)
    resumed = train(TrainConfig(output=str(tmp_path / "cut"), resume="last", lr=2e-3, **base), log=said.append)
    assert resumed["resumed_from"].endswith("checkpoint-5")
    assert any("removed checkpoint-10, cut off while being written" in m for m in said), said
    assert not (tmp_path / "cut.checkpoints").exists()  # the finished run's checkpoints are removed
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "full" / "model" / "model.safetensors"), load_file(tmp_path / "cut" / "model" /
                                                                                   "model.safetensors")
    assert a.keys() == b.keys()
    if torch.cuda.is_available():
        # on a GPU, attention's backward (SDPA) and the embedding's (fft) add with atomics in no fixed order:
        # two runs differ in the last bits (2e-7 of the loss on an H100), so close, not bitwise
        assert all(rel_err(b[k], a[k]) <= 1e-2 for k in a)
        assert abs(full["loss_after"] - resumed["loss_after"]) <= 1e-3 * abs(full["loss_after"])
        return
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["loss_after"] == resumed["loss_after"]
    if mode != "fft":
        assert (tmp_path / "full" / "routing.jsonl").read_text() == (tmp_path / "cut" / "routing.jsonl").read_text()


@pytest.mark.parametrize("mode", ["molf", "molf-e", "fft"])
def test_an_adapters_folder_as_model_starts_from_the_merged_model(tmp_path, chat_model, mode):
    """--model a peft adapter's folder (a LoRA run to go on from): the base it names with the adapter merged in,
    its tokenizer where the adapter's folder has none; the run equals one from that merged model saved by hand
    (before: molf.wrap refused the adapter transformers had loaded into the model). With --quantize, or without
    a base named, one error line before anything is built."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    adapter = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(chat_model),
                                  peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for n, p in adapter.named_parameters():
        if "lora_B" in n:
            p.data.normal_(std=0.5)
    adapter.save_pretrained(tmp_path / "adapter")  # base_model_name_or_path: chat_model; no tokenizer
    merged = adapter.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(chat_model).save_pretrained(tmp_path / "merged")
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS["pairs"])
    # fp32 (a GPU's default is bf16, where peft merges in bf16 and the hand-made merge is rounded once)
    base = dict(data=data, steps=3, batch_size=4, progress=False, backend="eager", mode=mode, dtype="fp32")
    runs = {name: train(TrainConfig(model=str(tmp_path / name) if name != "base" else chat_model,
                                    output=str(tmp_path / f"run-{name}"), **base), log=lambda *a: None)
            for name in ("adapter", "merged", "base")}
    for key in ("loss_before", "loss_after", "recall_after", "routing_share", "trainable_parameters"):
        assert runs["adapter"][key] == runs["merged"][key], key
    assert runs["adapter"]["loss_before"] != runs["base"]["loss_before"]
    with pytest.raises(TrainError, match=r"is a peft adapter's folder: with --quantize, merge it into its base"):
        train(TrainConfig(model=str(tmp_path / "adapter"), output=str(tmp_path / "q"), quantize="nf4", **base),
              log=lambda *a: None)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    tiny_qwen2(vocab=len(AutoTokenizer.from_pretrained(chat_model)), hidden=64).save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(chat_model).save_pretrained(tmp_path / "other")
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps(dict(config, base_model_name_or_path=str(tmp_path / "other"))))
    with pytest.raises(TrainError, match=r"cannot load the adapter .* onto its base .*other: size mismatch"):
        train(TrainConfig(model=str(tmp_path / "adapter"), output=str(tmp_path / "o"), **base), log=lambda *a: None)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path=None)))
    with pytest.raises(TrainError, match=r"adapter_config.json names no base_model_name_or_path"):
        train(TrainConfig(model=str(tmp_path / "adapter"), output=str(tmp_path / "n"), **base), log=lambda *a: None)
    assert not any((tmp_path / name).exists() for name in ("q", "o", "n"))


def test_resume_refuses_a_data_file_whose_examples_changed(tmp_path, chat_model):
    """--resume of a run on a data file edited since the run started (same path, other examples): refused, as
    other options are (before: it resumed, silently not the same run); the same contents written again resume."""
    original = [{"prompt": f"SELECT name FROM users WHERE id = {i}", "completion": f"; -- {i % 3}"} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", original)
    base = dict(model=chat_model, data=data, output=str(tmp_path / "run"), steps=4, batch_size=2, save_steps=2,
                progress=False, backend="eager")
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(interrupt_at_step=3, **base), log=lambda *a: None)
    write_jsonl(tmp_path / "d.jsonl", original[:7] + [dict(original[7], completion="; -- changed")])
    with pytest.raises(TrainError, match=r"but --data's examples \(the file changed since the run started: "
                                         r"sha256 was [0-9a-f]{12}\.\.\., now [0-9a-f]{12}\.\.\.\) differ"):
        train(TrainConfig(resume="last", **base), log=lambda *a: None)
    write_jsonl(tmp_path / "d.jsonl", original)
    assert train(TrainConfig(resume="last", **base), log=lambda *a: None)["resumed_from"].endswith("checkpoint-2")


def test_only_a_cut_off_checkpoint_is_not_resumed_nor_overwritten(tmp_path):
    """A checkpoints folder whose only checkpoint was cut off while being written: a new run refuses to mix with
    it, and --resume says there is nothing complete to resume from."""
    cut_off = tmp_path / "run.checkpoints" / "checkpoint-5"
    cut_off.mkdir(parents=True)
    base = dict(output=str(tmp_path / "run"), steps=3, n_facts=8, save_steps=2, progress=False, backend="eager")
    with pytest.raises(TrainError, match="holds checkpoints of an interrupted run"):
        train(TrainConfig(**base), log=lambda *a: None)
    with pytest.raises(TrainError, match=r"--resume: no checkpoint in .* \(only checkpoints cut off while being "):
        train(TrainConfig(resume="last", **base), log=lambda *a: None)
    assert cut_off.is_dir() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--steps", "5", "--epochs", "1"], "give --steps or --epochs, not both"),
    (["--eval-split", "1"], "--eval-split must be a finite number in [0, 1), got 1.0"),
    (["--epochs", "0"], "--epochs must be a finite number in (0"),
    (["--grad-accum", "0"], "--grad-accum must be an int in [1"),
    (["--resume"], "--resume: no checkpoint in"),
    (["--dtype", "fp16"], "--dtype fp16 (mixed precision with loss scaling) needs a CUDA device"),
    (["--target-modules", "nope"], "target_modules ['nope'] match no module of the model"),
    (["--target-modules", "nope"], "or None for the architecture's defaults (on the command line: --target-modules)"),
    (["--mode", "fft", "--target-modules", "all-linear"], "--target-modules do(es) not apply to --mode fft"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_train_bad_options_one_line_exit_2(tmp_path, capsys, args, message):
    if "fp16" in args and torch.cuda.is_available():
        pytest.skip("checks the CPU message")
    out = tmp_path / "out"
    assert main(["train", "--output", str(out), "--no-progress", *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".molf-train-")]


@pytest.mark.parametrize("module", ["matplotlib", "transformers", "accelerate"])
def test_a_missing_optional_dependency_is_one_line_before_training(tmp_path, capsys, monkeypatch, module):
    """`pip install molf` without the train extra: molf train used to train, then fail drawing the routing plots
    (matplotlib) and publish nothing; molf plot printed a traceback; without accelerate (which transformers'
    Trainer needs and pip install transformers does not bring) a traceback from transformers."""
    import sys
    monkeypatch.setitem(sys.modules, module, None)  # import fails, as when the package is not installed
    out = tmp_path / "out"
    assert main(["train", "--output", str(out), "--no-progress", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"molf train: error: molf train needs {module} (the Trainer, the routing plots): pip install "
                   f"{module}, or pip install 'molf[train]'"]
    assert not out.exists()
    if module == "matplotlib":
        assert main(["plot", str(tmp_path / "any.jsonl"), "-o", str(tmp_path)]) == 2
        assert "molf plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err


def test_a_transformers_4_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """Under transformers 4.57 (the last 4.x) the suite failed in 34 tests: the Trainer integration refuses a
    transformers before 5 when it is imported, and molf train says so in one line before anything runs."""
    import importlib
    import sys
    import transformers
    monkeypatch.setattr(transformers, "__version__", "4.57.6")
    monkeypatch.delitem(sys.modules, "molf.integrations.hf", raising=False)
    monkeypatch.delitem(sys.modules, "molf.integrations.trl", raising=False)
    with pytest.raises(ImportError, match=r"needs transformers >= 5\.17, found 4\.57\.6: pip install -U"):
        importlib.import_module("molf.integrations.hf")
    out = tmp_path / "out"
    assert main(["train", "--output", str(out), "--no-progress", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "molf train: error: molf's Trainer integration needs transformers >= 5.17" in err[0], err
    assert not out.exists()


def test_messages_need_a_chat_template(tmp_path, capsys):
    data = write_jsonl(tmp_path / "m.jsonl", RECORDS["messages"])
    assert main(["train", "--data", data, "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "needs a tokenizer with a chat template" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert main(["train", "--data", bad, "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "b.jsonl:1: the last message must be the assistant's" in capsys.readouterr().err


def test_a_chat_template_that_refuses_an_example_is_one_error_line(tmp_path, chat_model):
    """Llama-2's and Mistral's templates raise on roles that do not alternate (jinja2's TemplateError, not a
    ValueError): a traceback before; now a TrainError naming the example and the template's words."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(chat_model)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System roles are "
                         "not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    recs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "yo"}]}]
    assert len(_encode(tok, recs[:1])[0]) == 1
    with pytest.raises(TrainError, match="example 1: the tokenizer's chat template refuses it: System roles are not"):
        _encode(tok, recs)


def test_a_tokenizer_without_an_eos_token_is_one_error_line(tmp_path, capsys, chat_model):
    """Each completion ends with the eos token; a tokenizer without one crashed in torch.tensor with a None."""
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(chat_model, folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token"] = None
    cfg_path.write_text(json.dumps(cfg))
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS["pairs"])
    assert main(["train", "--model", str(folder), "--data", data, "--output", str(tmp_path / "o"), "--steps", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no eos token (each completion ends with it)" in err[0], err


def test_compare_writes_table_and_figure(tmp_path, capsys):
    from PIL import Image
    from molf.compare import COLOURS
    out = tmp_path / "cmp"
    assert main(["compare", "--output", str(out), "--steps", "15", "--facts", "12", "--seeds", "2", "--no-progress",
                 "--backend", "eager", "--lrs", "fft=3e-3", "--target-modules", "all-linear"]) == 0
    result = json.loads((out / "table.json").read_text())
    assert list(result["modes"]) == ["fft", "lora", "molf", "molf-e"]
    for mode, row in result["modes"].items():
        assert row["seeds"] == 2 and 0 <= row["recall"] <= 1 and row["recall_sd"] >= 0 and row["trainable_parameters"]
    assert result["molf_vs_best"]["best_baseline"] in ("fft", "lora")
    assert [r["output"] for r in result["runs"]][:2] == ["fft-seed0", "fft-seed1"]
    assert json.loads((out / "fft-seed0" / "summary.json").read_text())["lr"] == 3e-3
    assert json.loads((out / "lora-seed1" / "summary.json").read_text())["lr"] == 2e-3
    targets = {m: json.loads((out / f"{m}-seed0" / "summary.json").read_text())["target_modules"]
               for m in result["modes"]}
    assert targets == {"fft": None, "lora": "all-linear", "molf": "all-linear", "molf-e": "all-linear"}
    table = (out / "table.md").read_text()
    assert "| MoLF |" in table and "MoLF vs the better baseline" in table and table in capsys.readouterr().out
    png = Image.open(out / "compare.png").convert("RGB")
    assert png.size == (600, 400)
    colours = {c for _, c in png.getcolors(maxcolors=1 << 20)}
    for hexa in COLOURS.values():
        assert tuple(int(hexa[k:k + 2], 16) for k in (1, 3, 5)) in colours
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".molf-train-")]


@pytest.mark.parametrize("args, message", [
    (["--modes", "fft,qlora"], "--modes must be a comma-separated subset of fft,lora,molf,molf-e"),
    (["--modes", "fft,molf", "--lrs", "lora=1e-3"], "--lrs names modes that do not run: lora"),
    (["--seeds", "0"], "--seeds must be an int >= 1"),
    (["--lrs", "fft"], "expected MODE=LR items"),
    (["--lrs", "fft=abc"], "argument --lrs: expected MODE=LR items with a number LR, got 'fft=abc'"),
    (["--lrs", "fft=1e-3,fft=2e-3"], "argument --lrs: names fft more than once"),  # the last one won, silently
    (["--modes", "molf,molf"], "argument --modes: names molf more than once"),  # after a first run, naming a temp dir
])
def test_compare_bad_input_one_line_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "cmp"
    try:
        code = main(["compare", "--output", str(out), "--no-progress", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("alpha_128, low, high", [(32.0, 2.0, 4.5), (32.0 * 8 ** 0.5, 0.6, 1.6)])
def test_molf_e_prefers_r16_by_its_rslora_scale(alpha_128, low, high):
    """Why MoLF-E on the built-in task routes to lora_r16 at every step: with B = 0 at the start only the B's
    have gradients, dB_i = s_i g^T (x A_i^T), and EPD per element is about |g| after Adam's first step, so
    S_r16 / S_r128 = s_16 / s_128 = sqrt(128 / 16) = 2.83 at equal alphas (rsLoRA). Equal scales (alpha_128 =
    32 sqrt(8)) make the scores comparable: the preference is the algorithm's, not a bug."""
    import molf
    from molf.train import _batch, _load, synthetic_facts
    recs = synthetic_facts(64)
    model, tok, _ = _load(TrainConfig(output="unused"), recs, torch.device("cpu"), "fp32")
    molf.wrap(model, ranks=(16, 128), alphas=(32.0, alpha_128), train_base=False, freeze_others=True, backend="eager")
    opt = molf.MoLFAdamW(model, lr=2e-3)
    model(**_batch(_encode(tok, recs[:16])[0], tok.pad_token_id, "cpu")).loss.backward()
    opt.step()
    ratio = opt.scores[:, 0] / opt.scores[:, 1]
    assert low < ratio.median().item() < high, ratio


def test_a_second_gpu_is_chosen_by_cuda_visible_devices(monkeypatch):
    """The Trainer places the model on the first visible GPU: --device cuda:1 would split model and optimizer."""
    from molf.train import _device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(TrainError, match="CUDA_VISIBLE_DEVICES=1 and --device cuda"):
        _device(TrainConfig(device="cuda:1", output="unused"))
    # several visible GPUs: the Trainer would run nn.DataParallel over them, each taking --batch-size (a larger
    # batch than asked, the schedule's epochs miscounted), silently; one error line instead
    for device in ("auto", "cuda", "cuda:0"):
        with pytest.raises(TrainError, match="this machine shows 2 GPUs: .* choose it with CUDA_VISIBLE_DEVICES=0"):
            _device(TrainConfig(device=device, output="unused"))
