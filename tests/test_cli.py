"""`molf train`, `molf plot` and `molf.export_peft`, end to end on the CPU."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import molf
from helpers import assert_close, batch, tiny_qwen2
from molf.cli import main
from optim_utils import make_opt, train_step


def test_train_default_task_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "--steps", "80", "--facts", "40", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recall_after"] > summary["recall_before"]
    assert summary["loss_after"] < summary["loss_before"]
    assert set(summary["routing_share"]) == {"full", "lora_r128"}
    assert {"routing_heatmap.png", "routing_share.png", "routing.jsonl", "model"} <= set(os.listdir(out))
    records = (out / "routing.jsonl").read_text().splitlines()
    assert len(records) == 80 and json.loads(records[-1])["step"] == 80
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any(isinstance(m, molf.MoLFLinear) for m in merged.modules())
    assert "recall" in capsys.readouterr().out
    from transformers import AutoTokenizer
    # A complete Hugging Face folder: AutoTokenizer loads the built-in byte-level BPE tokenizer and encodes as it did
    tok = AutoTokenizer.from_pretrained(out / "model")
    from molf.train import builtin_tokenizer, synthetic_facts
    facts = synthetic_facts(40)
    fact = facts[0]["prompt"] + facts[0]["completion"]
    same = builtin_tokenizer([f["prompt"] + f["completion"] for f in facts])
    assert tok(fact)["input_ids"] == same(fact)["input_ids"] and tok.decode(tok(fact)["input_ids"]) == fact
    assert len(tok(facts[0]["completion"], add_special_tokens=False)["input_ids"]) == 1  # a word, a token
    assert (tok.pad_token, tok.eos_token) == ("<pad>", "<eos>")
    first = json.loads(records[0])["selections"]
    assert any(v["scores"]["full"] > 0 for v in first.values()), "warm-up starts above lr = 0"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".molf-train-")]  # no leftovers


@pytest.mark.parametrize("mode", ["fft", "lora", "molf-e"])
def test_train_baselines_and_molf_e_run(tmp_path, mode):
    out = tmp_path / mode
    assert main(["train", "--mode", mode, "--output", str(out), "--steps", "30", "--facts", "20", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == mode and summary["loss_after"] < summary["loss_before"]
    assert (out / "routing.jsonl").exists() == (mode != "fft")


def test_train_on_jsonl_data(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"the code of item {i} is", "completion": f" c{i % 3}"})
                              for i in range(12)) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), "--steps", "10", "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["examples"] == 12


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "molf", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    cases = {
        "missing data": (["--data", str(tmp_path / "nope.jsonl")], "data file not found"),
        "bad line": (["--data", str(bad)], "bad.jsonl:2: expected an object with string keys 'prompt' and 'completion'"),
        "unknown mode": (["--mode", "qlora"], "invalid choice: 'qlora'"),
        "missing model": (["--model", str(tmp_path / "no-model")], "model path does not exist"),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        r = _cli("train", "--output", str(out), "--steps", "2", "--no-progress", *args, cwd=tmp_path)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2, (name, r.stderr)
        assert len(lines) == 1 and message in lines[0], (name, r.stderr)
        assert not out.exists(), name
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".molf-train-")]


def routing_jsonl(tmp_path, layers, name):
    model = molf.wrap(tiny_qwen2(layers=layers), ranks=(2, 8), alphas=(8, 16), train_base=True, backend="eager")
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend="eager", top_k=1)
    ids = batch()
    for _ in range(12):
        train_step(model, opt, ids)
    path = tmp_path / name
    opt.write_routing_jsonl(path)
    return path, opt


def test_plot_writes_readable_pngs(tmp_path):
    from PIL import Image
    from molf.plot import PALETTE

    sizes = []
    for layers in (1, 3):
        path, opt = routing_jsonl(tmp_path, layers, f"r{layers}.jsonl")
        out = tmp_path / f"plots{layers}"
        assert main(["plot", str(path), "-o", str(out)]) == 0
        heat = Image.open(out / "routing_heatmap.png").convert("RGB")
        sizes.append(heat.size)
        colors = {c for _, c in heat.getcolors(maxcolors=1 << 20)}
        used = {e for e, w in zip(opt.expert_names, opt.routing_history()["routing"].any(0).any(0).tolist())}
        for i, name in enumerate(opt.expert_names):
            rgb = tuple(int(PALETTE[i][k:k + 2], 16) for k in (1, 3, 5))
            assert rgb in colors, f"the color of expert {name} is missing from the heatmap"
        assert used == set(opt.expert_names)
        assert (out / "routing_share.png").stat().st_size > 5000
    assert sizes[1][1] > sizes[0][1], "a heatmap with more layers should be taller"


def test_plot_bad_file(tmp_path):
    assert main(["plot", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path)]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    assert main(["plot", str(bad), "-o", str(tmp_path)]) == 2
    cut = tmp_path / "cut.jsonl"  # a log whose writer was killed mid-record: the complete records are drawn
    path, _ = routing_jsonl(tmp_path, 1, "whole.jsonl")
    text = path.read_text()
    cut.write_text(text[:-len(text.splitlines()[-1]) // 2])
    with pytest.warns(UserWarning, match=r"cut\.jsonl:\d+: the last line is cut off"):
        assert main(["plot", str(cut), "-o", str(tmp_path / "cut")]) == 0
    assert (tmp_path / "cut" / "routing_heatmap.png").is_file()
    bad.write_text("{not json}\n{\"step\": 1, \"selections\": {}}\n")  # a bad line that is not the last one
    assert main(["plot", str(bad), "-o", str(tmp_path)]) == 2


@pytest.mark.parametrize("selections, why", [
    ({}, "'selections' must map each layer name"),  # no layer: matplotlib's "Invalid shape (0,)" traceback
    ([["q", {}]], "'selections' must map each layer name"),  # a list: AttributeError traceback
    ({"q": {"winners": "full"}}, "'selections' must map each layer name"),  # a string: drawn as experts f, u, l
    ({"q": {"winners": ["full"], "scores": 1.0}}, "'selections' must map each layer name"),
    ({"q": {"winners": [1]}}, "'selections' must map each layer name"),
    ({"k": {"winners": ["full"]}}, "other layers than the first record"),  # two models' logs in one file
])
def test_plot_malformed_records_are_one_error_line(tmp_path, capsys, selections, why):
    """A hand-edited or mixed routing log: one error line and exit code 2, never a traceback or a wrong plot."""
    path = tmp_path / "r.jsonl"
    first = {"step": 1, "selections": {"q": {"winners": ["full"], "scores": {"full": 1.0, "lora_r8": 0.5}}}}
    path.write_text(json.dumps(first) + "\n" + json.dumps({"step": 2, "selections": selections}) + "\n")
    assert main(["plot", str(path), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "r.jsonl:2: " in err[0] and why in err[0], err
    path.write_text(json.dumps(first) + "\n")
    assert main(["plot", str(path), "-o", str(tmp_path / "o")]) == 0


@pytest.mark.parametrize("freeze_others", [True, False], ids=["lora-only", "embeddings-and-norms-train"])
def test_export_peft_roundtrip_equals_molf_logits(tmp_path, freeze_others):
    peft = pytest.importorskip("peft")
    base = tiny_qwen2()
    model = molf.wrap(copy.deepcopy(base), ranks=(2, 8), alphas=(8, 16), train_base=False, backend="eager",
                      freeze_others=freeze_others)
    opt = make_opt(molf.MoLFAdamW, model, 3e-3, 3e-3, backend="eager", top_k=2)
    ids = batch()
    for _ in range(5):
        train_step(model, opt, ids)
    if not freeze_others:  # the tied embedding and the norms moved too: the adapter must carry them
        assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    with torch.no_grad():
        want = model(ids).logits
    molf.export_peft(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = loaded(ids).logits
    assert_close(got, want, 1e-5, "peft logits")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 10 and len(cfg["target_modules"]) == 14
    assert (cfg["modules_to_save"] is None) == freeze_others
    merged = loaded.merge_and_unload()
    with torch.no_grad():
        assert_close(merged(ids).logits, want, 1e-5, "merged peft logits")


def test_export_peft_writes_the_layers_dropout(tmp_path):
    """The adapter's lora_dropout is the layers' (before: 0.0 always, so training the adapter further with peft
    dropped nothing); peft takes one value, so layers with different ones warn and the most common is written."""
    model = molf.wrap(tiny_qwen2(), ranks=(2, 8), alphas=(8, 16), train_base=False, backend="eager", dropout=0.1)
    molf.export_peft(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    model.model.layers[0].self_attn.q_proj.dropout = 0.3
    with pytest.warns(UserWarning, match=r"LoRA dropouts \[0.1, 0.3\]; peft takes one, lora_dropout=0.1"):
        molf.export_peft(model, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["lora_dropout"] == 0.1


def test_export_peft_of_layers_with_different_ranks_gives_each_its_own(tmp_path):
    """MoLF layers of different total ranks (MoLFLinear built by hand, here the MLP's): the adapter's r is the most
    common rank and peft's rank_pattern / alpha_pattern give every layer its own (before: a ValueError); peft
    computes what the molf model does, and a layer whose full name ends with another's gets its own rank too."""
    peft = pytest.importorskip("peft")
    from helpers import randomize_lora_B
    base = tiny_qwen2()
    extra = base.extra = torch.nn.Module()  # extra.model.layers.0.mlp.up_proj ends with model.layers.0.mlp.up_proj
    extra.model = torch.nn.Module()
    extra.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    extra.model.layers[0].mlp = torch.nn.Module()
    extra.model.layers[0].mlp.up_proj = torch.nn.Linear(16, 16)
    model = molf.wrap(copy.deepcopy(base), ranks=(2, 8), alphas=(8, 16), train_base=False, backend="eager",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    for mlp in [layer.mlp for layer in model.model.layers] + [model.extra.model.layers[0].mlp]:
        for name in ("gate_proj", "up_proj", "down_proj"):
            if hasattr(mlp, name):
                ranks = (1, 2) if mlp is model.extra.model.layers[0].mlp else (4, 12)
                setattr(mlp, name, molf.MoLFLinear(getattr(mlp, name), ranks=ranks, alphas=(8, 16),
                                                   train_base=False, backend="eager"))
    torch.manual_seed(1)
    randomize_lora_B(model)
    ids = batch()
    with torch.no_grad():
        want = model(ids).logits
    molf.export_peft(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 10 and cfg["rank_pattern"]["model.layers.0.mlp.up_proj"] == 16
    assert cfg["rank_pattern"]["extra.model.layers.0.mlp.up_proj"] == 3
    assert cfg["alpha_pattern"] == cfg["rank_pattern"] and len(cfg["rank_pattern"]) == 15
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_close(loaded(ids).logits, want, 1e-5, "peft logits")
    shapes = {n: tuple(p.shape) for n, p in loaded.named_parameters() if "lora_A" in n}
    assert shapes["base_model.model.extra.model.layers.0.mlp.up_proj.lora_A.default.weight"] == (3, 16)
    assert shapes["base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"] == (16, 32)


@pytest.mark.parametrize("outer", ["torch.compile", "DataParallel"])
def test_checkpoints_exports_and_routing_names_see_through_compile_and_data_parallel(tmp_path, outer):
    """A model passed inside torch.compile's wrapper or (D)DP's: its names gained `_orig_mod.` / `module.`, so
    molf.from_pretrained refused the checkpoint ("wraps _orig_mod.model.layers.0...") and the routing log and the
    adapter were named otherwise than the model's. They see through to the model now."""
    from safetensors import safe_open

    model = molf.wrap(tiny_qwen2(), ranks=(2, 4), alphas=(8, 8), train_base=False, backend="eager")
    wrapped = torch.compile(model, backend="eager") if outer == "torch.compile" else torch.nn.DataParallel(model)
    opt = molf.MoLFAdamW(wrapped, lr=1e-2)
    assert opt.layer_names[0] == "model.layers.0.self_attn.q_proj"
    ids = batch()
    wrapped(ids, labels=ids).loss.backward()
    opt.step()
    molf.save_pretrained(wrapped, tmp_path / "ckpt")
    again = molf.from_pretrained(tmp_path / "ckpt", backend="eager")
    assert again.state_dict().keys() == model.state_dict().keys()
    for (n, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), n
    assert molf.load(wrapped, tmp_path / "ckpt") is wrapped
    molf.export_peft(wrapped, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys, keys[:3]
    assert not [k for k in keys if "_orig_mod." in k or "model.module." in k]


@pytest.mark.parametrize("task,peft_task", [("SequenceClassification", "SEQ_CLS"),
                                             ("TokenClassification", "TOKEN_CLS"),
                                             ("QuestionAnswering", "QUESTION_ANS")])
def test_export_peft_of_a_task_model_loads_as_its_peft_task(tmp_path, task, peft_task):
    """A classifier's or QA model's adapter (its trained head in modules_to_save) loads with
    PeftModel.from_pretrained and computes what the molf model does (CAUSAL_LM failed to load there)."""
    peft = pytest.importorskip("peft")
    base = tiny_qwen2(task=task, num_labels=3, pad_token_id=0)
    model = molf.wrap(copy.deepcopy(base), ranks=(2, 6), alphas=(8, 16), train_base=False, freeze_others=True,
                      backend="eager")
    opt = molf.MoLFAdamW(model, lr=3e-2, backend="eager", top_k=2)
    ids = batch()
    out = "start_logits" if task == "QuestionAnswering" else "logits"
    for _ in range(3):
        model(ids)[out].square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    molf.export_peft(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == peft_task
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        want, got, before = model(ids), loaded(input_ids=ids), base(ids)
    assert not torch.equal(want[out], before[out])  # training moved it: the comparison below means something
    for key in ("start_logits", "end_logits") if task == "QuestionAnswering" else ("logits",):
        assert_close(got[key], want[key], 1e-5, f"peft {key}")


def test_a_module_unfrozen_by_hand_trains_saves_and_exports_like_peft_modules_to_save(tmp_path):
    """New tokens (resize_token_embeddings) with MoLF-E and freeze_others=True: the user unfreezes the
    embedding by hand, as peft's modules_to_save. It trains (plain AdamW), molf.from_pretrained restores it
    trainable and bitwise, export_peft carries it (peft's logits equal molf's)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = tiny_qwen2()
    base.resize_token_embeddings(70, mean_resizing=False)
    base.save_pretrained(tmp_path / "base")
    model = molf.wrap(copy.deepcopy(base), ranks=(2, 8), alphas=(8, 16), train_base=False, freeze_others=True,
                      backend="eager")
    model.get_input_embeddings().requires_grad_(True)
    opt = molf.MoLFAdamW(model, lr=1e-2, backend="eager")
    ids = torch.cat([batch(), torch.full((2, 2), 68)], 1)  # a new token
    for _ in range(3):
        train_step(model, opt, ids)
    assert not torch.equal(model.get_input_embeddings().weight[68], base.get_input_embeddings().weight[68])
    molf.save_pretrained(model, tmp_path / "ckpt")
    again = molf.from_pretrained(tmp_path / "ckpt", backend="eager").eval()
    assert [n for n, p in again.named_parameters() if p.requires_grad and "lora_" not in n] == \
        ["model.embed_tokens.weight"]
    molf.export_peft(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(again(ids).logits, want)
        assert_close(loaded(ids).logits, want, 1e-5, "peft logits")


def test_export_peft_refuses_a_trained_base(tmp_path):
    model = molf.wrap(tiny_qwen2(), ranks=(2,), alphas=(8,), train_base=True)
    with pytest.raises(ValueError, match="frozen base"):
        molf.export_peft(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    model = molf.wrap(tiny_qwen2(), ranks=(2,), alphas=(8,), train_base=False)
    model.model.layers[0].self_attn.q_proj.base.bias.requires_grad_(True)  # unfrozen by hand: trains as "full"
    with pytest.raises(ValueError, match=r"frozen base .*\['model.layers.0.self_attn.q_proj.base.bias'\] trains"):
        molf.export_peft(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"molf {molf.__version__}"
