"""molf under the Hugging Face Trainer: loss goes down, routing JSONL, bitwise resume from a checkpoint."""
import json
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

import molf
from helpers import Rows, assert_close, device_for, rel_err, tiny_qwen2
from molf.layer import molf_layers

pytest.importorskip("transformers")
from transformers import TrainingArguments  # noqa: E402

from molf.integrations.hf import MoLFTrainer, unwrap_optimizer  # noqa: E402


def make_trainer(out, max_steps, molf_kw=None, eval_dataset=None, backend="eager", device=None, **kw):
    """backend: the optimizer's ("triton": on the GPU, else under the interpreter; device: where the Trainer puts
    the model, by default device_for(backend)); the layers stay eager."""
    model = molf.wrap(tiny_qwen2(), ranks=(2, 8), alphas=(8, 16), train_base=False, backend="eager")
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=3e-3, weight_decay=0.1,
                             lr_scheduler_type="cosine", warmup_steps=1, max_grad_norm=1.0, logging_steps=1,
                             save_steps=3, save_strategy="steps", report_to=[],
                             use_cpu=(device or device_for(backend)).type == "cpu", seed=0,
                             data_seed=0, dataloader_num_workers=0, disable_tqdm=True, **kw)
    return MoLFTrainer(model=model, args=args, train_dataset=Rows(), eval_dataset=eval_dataset, lora_lr=3e-3,
                       lora_weight_decay=0.01, backend=backend, **(molf_kw or {}))


def test_optimizer_options_reach_molf_adamw_and_another_optim_warns(tmp_path, recwarn):
    t = make_trainer(tmp_path / "a", 1, molf_kw=dict(state_dtype=torch.float64, stochastic_rounding=True, top_k=2))
    opt = t.create_optimizer()
    assert (opt.state_dtype, opt.stochastic_rounding, opt.top_k) == (torch.float64, True, 2)
    assert not [w for w in recwarn if "MoLFAdamW" in str(w.message)]  # the default optim is AdamW's
    for kw, said in ((dict(optim="adafactor"), "optim='adafactor' is not used"),
                     (dict(optim_args="foo=1"), "optim_args='foo=1'")):
        with pytest.warns(UserWarning, match=said):
            t = make_trainer(tmp_path / "b", 1, **kw)
        assert isinstance(t.create_optimizer(), molf.MoLFAdamW)


def test_a_model_without_molf_layers_is_refused_when_the_trainer_is_built(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"model \(Qwen2ForCausalLM\) has no MoLF layers: call molf.wrap"):
        MoLFTrainer(model=tiny_qwen2(), args=args, train_dataset=Rows())
    with pytest.raises(ValueError, match=r"model='Qwen/Qwen2.5-0.5B': MoLFTrainer needs a molf-wrapped model"):
        MoLFTrainer(model="Qwen/Qwen2.5-0.5B", args=args, train_dataset=Rows())
    plain = tiny_qwen2()  # an optimizer of the user's own: their choice, as with the Trainer, said once
    with pytest.warns(UserWarning, match=r"MoLFTrainer was given optimizers=\(AdamW, ...\): it steps with that "
                                         "optimizer, not MoLFAdamW, so nothing is routed and no routing is logged"):
        t = MoLFTrainer(model=plain, args=args, train_dataset=Rows(),
                        optimizers=(torch.optim.AdamW(plain.parameters(), lr=1e-3), None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.train()
    assert any("RoutingLogCallback: the Trainer steps with AdamW, not MoLFAdamW" in str(w.message) for w in caught)
    assert not (tmp_path / "molf_routing.jsonl").exists()
    wrapped = molf.wrap(tiny_qwen2(), ranks=(2,), alphas=(4,))  # a MoLFAdamW of the user's own: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoLFTrainer(model=wrapped, args=args, train_dataset=Rows(), optimizers=(molf.MoLFAdamW(wrapped, lr=1e-3), None))
    with pytest.warns(UserWarning, match=r"optimizer_cls_and_kwargs=\(SGD, ...\) is not used"):
        t = MoLFTrainer(model=wrapped, args=args, train_dataset=Rows(),
                        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))
    assert isinstance(t.create_optimizer(), molf.MoLFAdamW)  # as it was: silently MoLFAdamW all the same


def test_deepspeed_is_refused_when_the_trainer_is_built(tmp_path, monkeypatch):
    """DeepSpeed hands the optimizer flattened partitions instead of the experts' tensors: refused up front, from
    the TrainingArguments or from `accelerate launch` (its environment flag), before anything is built."""
    model = molf.wrap(tiny_qwen2(), ranks=(2,), alphas=(8,), backend="eager")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    args.deepspeed = "ds_config.json"  # set after construction: TrainingArguments imports deepspeed for it
    with pytest.raises(ValueError, match=r"DeepSpeed: its ZeRO and bf16 optimizers flatten the parameters .* FSDP2"):
        MoLFTrainer(model=model, args=args, train_dataset=Rows())
    args.deepspeed = None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="DeepSpeed: "):
        MoLFTrainer(model, args, train_dataset=Rows())
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    MoLFTrainer(model, args, train_dataset=Rows()).train()


def test_fsdp1_is_refused_when_the_trainer_is_built(tmp_path, monkeypatch):
    """FSDP1 (accelerate launch --use_fsdp without --fsdp_version 2, or fsdp_config version 1) is refused before
    anything is built, naming FSDP2; FSDP2 is not."""
    model = molf.wrap(tiny_qwen2(), ranks=(2,), alphas=(8,), backend="eager")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(ValueError, match=r"FSDP1: .* --fsdp_version 2"):
        MoLFTrainer(model, args, train_dataset=Rows())
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert not molf.integrations.hf._fsdp1_requested(args)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    args.fsdp, args.fsdp_config = "full_shard", {"version": 1}  # set after construction, as a launcher would
    with pytest.raises(ValueError, match=r"FSDP1: .*fsdp_config=\{'version': 2\}"):
        MoLFTrainer(model, args, train_dataset=Rows())
    args.fsdp_config = {"version": 2}
    assert not molf.integrations.hf._fsdp1_requested(args)


def test_trainer_on_the_triton_optimizer_trains_as_eager_and_resumes_bitwise(tmp_path):
    """The Trainer's loop around the fused optimizer (fresh gradients every step, gradient accumulation, clipping
    in place, a cosine schedule, checkpoints and resume_from_checkpoint, which loads the optimizer's state into
    new tables): the routing of every step equals the eager optimizer's, and a resumed run ends bitwise as the
    uninterrupted one. The Trainer tests above run the eager optimizer only (also on a GPU)."""
    runs, device = {}, device_for("triton")  # both on one device: no CPU/GPU near-tie in the routing
    for backend in ("triton", "eager"):
        t = runs[backend] = make_trainer(tmp_path / backend, 6, backend=backend, device=device)
        t.train()
        assert t.molf_optimizer._backend_impl().name == backend
    logs = {b: [json.loads(line)["selections"] for line in (tmp_path / b / "molf_routing.jsonl").read_text()
                .splitlines()] for b in runs}
    assert len(logs["triton"]) == 6
    assert [{n: s["winners"] for n, s in step.items()} for step in logs["triton"]] == \
        [{n: s["winners"] for n, s in step.items()} for step in logs["eager"]]
    flat = {b: torch.cat([p.detach().cpu().flatten() for p in t.model.parameters()]) for b, t in runs.items()}
    assert rel_err(flat["triton"], flat["eager"]) <= 1e-5
    part = make_trainer(tmp_path / "part", 6, backend="triton")
    part.train(resume_from_checkpoint=str(tmp_path / "triton" / "checkpoint-3"))
    assert torch.equal(part.molf_optimizer.routing, runs["triton"].molf_optimizer.routing)
    for (n, p), q in zip(runs["triton"].model.named_parameters(), part.model.parameters()):
        if device.type == "cpu":
            assert torch.equal(p, q), n
        else:  # a GPU's embedding backward adds with atomics: the resumed run is close, not bitwise
            assert rel_err(q, p) <= 1e-5, n


def test_trainer_trains_logs_routing_and_resumes_bitwise(tmp_path):
    full = make_trainer(tmp_path / "full", 6)
    full.train()
    losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    opt = full.molf_optimizer
    assert isinstance(opt, molf.MoLFAdamW) and opt.molf_step == 6
    lora = next(g for g in opt.param_groups if g["kind"] == "lora")
    assert lora["weight_decay"] == 0.01
    records = [json.loads(line) for line in (tmp_path / "full" / "molf_routing.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert list(records[-1]["selections"]) == opt.layer_names
    final_routing = opt.routing.clone()

    part = make_trainer(tmp_path / "part", 6)
    part.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert torch.equal(part.molf_optimizer.routing, final_routing)
    for (n, p), q in zip(full.model.named_parameters(), part.model.parameters()):
        assert torch.equal(p, q), n
    resumed = [json.loads(line)["step"] for line in (tmp_path / "part" / "molf_routing.jsonl").read_text().splitlines()]
    assert resumed == [4, 5, 6]


def test_a_plain_trainer_with_molf_adamw_and_the_routing_callback(tmp_path):
    """The README's route for any other Trainer: optimizers=(MoLFAdamW, None) plus RoutingLogCallback. The
    routing log has every step once, also after a resume (which continues bitwise) from a run killed while
    writing a record (the cut-off record used to be kept and the next one appended to it); the checkpoints are
    transformers' own, the wrapped layout."""
    from safetensors import safe_open
    from transformers import Trainer

    from molf.integrations.hf import RoutingLogCallback

    def trainer(out):
        model = molf.wrap(tiny_qwen2(), ranks=(2, 8), alphas=(8, 16), train_base=False, backend="eager")
        opt = molf.MoLFAdamW(model, lr=3e-3, backend="eager")
        args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                                 save_steps=2, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
        return Trainer(model=model, args=args, train_dataset=Rows(), optimizers=(opt, None),
                       callbacks=[RoutingLogCallback()])

    full = trainer(tmp_path / "full")
    full.train()
    log = tmp_path / "full" / "molf_routing.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    with safe_open(str(tmp_path / "full" / "checkpoint-2" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.base.weight" in f.keys()
    part = trainer(tmp_path / "part")
    (tmp_path / "part").mkdir(exist_ok=True)
    lines = log.read_text().splitlines(keepends=True)  # as a kill during step 4's write leaves it: cut mid-record
    (tmp_path / "part" / "molf_routing.jsonl").write_text("".join(lines[:3]) + lines[3][:len(lines[3]) // 2])
    part.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "molf_routing.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    for (n, p), q in zip(full.model.named_parameters(), part.model.parameters()):
        assert torch.equal(p, q), n
    # Its save_model (the wrapped layout) comes back through molf.load into a model wrapped alike; from there
    # molf.save_pretrained writes the merged checkpoint plain transformers loads. molf.from_pretrained says how.
    from transformers import AutoModelForCausalLM
    full.save_model(str(tmp_path / "final"))
    with pytest.raises(ValueError, match=r"holds a wrapped model as model.save_pretrained \(or transformers' Trainer\) "
                                         r"wrote it, not a molf checkpoint: 14 MoLF layers \(ranks \(2, 8\)\).*"
                                         r"molf.wrap\(model, <as in training>\); molf.load\(model, "):
        molf.from_pretrained(tmp_path / "final")
    back = molf.load(molf.wrap(tiny_qwen2(seed=1), ranks=(2, 8), alphas=(8, 16), train_base=False), tmp_path / "final")
    for (n, p), q in zip(full.model.named_parameters(), back.parameters()):
        assert torch.equal(p, q), n
    molf.save_pretrained(back, tmp_path / "merged")
    ids = Rows().ids[:2]
    with torch.no_grad():
        assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits,
                     full.model.eval()(ids).logits, 1e-5)


def test_molf_load_of_the_wrapped_layout_checks_everything_before_it_copies(tmp_path):
    """model.save_pretrained on a wrapped model (sharded, tied embeddings saved once; also a pytorch_model.bin):
    molf.load takes it into a model wrapped with the same ranks, bitwise; other ranks, other targets, an unwrapped
    model or a checkpoint of another size are ValueErrors that leave the model as it was."""
    model = molf.wrap(tiny_qwen2(), ranks=(2, 8), alphas=(8, 16), backend="eager")
    for _, m in molf_layers(model):
        for b in m.lora_B:
            torch.nn.init.normal_(b)
    model.save_pretrained(tmp_path / "wl", max_shard_size="20KB")
    assert len(json.loads((tmp_path / "wl" / "model.safetensors.index.json").read_text())["weight_map"]) == \
        len(model.state_dict()) - 1  # lm_head.weight is the embedding's, saved once
    from transformers import AutoModelForCausalLM
    own = AutoModelForCausalLM.from_pretrained(tmp_path / "wl")  # the folder's own model: its MoLF layers random
    for base in (tiny_qwen2(seed=1), own):
        back = molf.load(molf.wrap(base, ranks=(2, 8), alphas=(8, 16)), tmp_path / "wl")
        assert back.lm_head.weight is back.model.embed_tokens.weight
        for (n, p), q in zip(model.state_dict().items(), back.state_dict().values()):
            assert torch.equal(p, q), n
    cases = {"ranks": (molf.wrap(tiny_qwen2(seed=1), ranks=(2, 4), alphas=(8, 16)),
                       r"\(14 layers differ\).* has ranks \(2, 8\) there, ranks \(2, 4\) here"),
             "targets": (molf.wrap(tiny_qwen2(seed=1), ranks=(2, 8), alphas=(8, 16), target_modules=["q_proj"]),
                         r"\(12 layers differ\).*is not a MoLF layer here"),
             "unwrapped": (tiny_qwen2(seed=1), r"\(14 layers differ\)"),
             "width": (molf.wrap(tiny_qwen2(seed=1, inter=40), ranks=(2, 8), alphas=(8, 16)),
                       r"shapes \['model.layers.0.mlp")}
    for case, (other, match) in cases.items():
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            molf.load(other, tmp_path / "wl")
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items()), case
    # transformers 4 with save_safetensors=False: pytorch_model.bin (tied weights saved once there too)
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    torch.save({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"},
               tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="holds a wrapped model"):
        molf.from_pretrained(tmp_path / "bin")
    back = molf.load(molf.wrap(tiny_qwen2(seed=1), ranks=(2, 8), alphas=(8, 16)), tmp_path / "bin")
    for (n, p), q in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(p, q), n
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not a pickle")  # unreadable: not taken for the layout
    with pytest.raises(ValueError, match="is not a molf checkpoint"):
        molf.from_pretrained(tmp_path / "bin")
    # saved again unsharded over the shards: transformers leaves the earlier index beside the new single file,
    # which it prefers; so does molf.load (it read the index first, naming shards that are gone)
    for _, m in molf_layers(model):
        for b in m.lora_B:
            torch.nn.init.normal_(b)
    model.save_pretrained(tmp_path / "wl")
    assert {"model.safetensors", "model.safetensors.index.json"} <= {p.name for p in (tmp_path / "wl").iterdir()}
    back = molf.load(molf.wrap(tiny_qwen2(seed=1), ranks=(2, 8), alphas=(8, 16)), tmp_path / "wl")
    for (n, p), q in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("history_size, logging_steps, flushes", [(3, 8, 4), (10000, 0.25, 5), (0, 1, 9)])
def test_the_routing_callback_flushes_before_the_history_drops_a_step(tmp_path, history_size, logging_steps,
                                                                       flushes):
    """A history_size below logging_steps lost the older steps of each logging interval from the log, silently;
    a logging_steps ratio (0.25 of the run) flushed every step (each flush is a device-to-host copy); a
    history_size of 0 kept an empty log without a word."""
    from transformers import Trainer

    from molf.integrations.hf import RoutingLogCallback
    model = molf.wrap(tiny_qwen2(), ranks=(2, 4), alphas=(8, 8), train_base=False, backend="eager")
    opt = molf.MoLFAdamW(model, lr=1e-3, backend="eager", history_size=history_size)
    calls, write = [], opt.write_routing_jsonl
    opt.write_routing_jsonl = lambda *a, **k: calls.append(1) or write(*a, **k)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, logging_steps=logging_steps, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), optimizers=(opt, None),
                      callbacks=[RoutingLogCallback()])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in seen if "history_size" in str(w.message)]
    log = (tmp_path / "molf_routing.jsonl").read_text().splitlines()
    assert len(calls) == flushes
    if history_size:
        assert [json.loads(line)["step"] for line in log] == list(range(1, 9)) and not said
    else:
        assert log == [] and said == [f"MoLFAdamW(history_size=0) keeps no routing: {tmp_path / 'molf_routing.jsonl'} "
                                      "gets no records (pass a history_size of at least 1, e.g. the default)"]


def test_trainer_with_torch_compile(tmp_path):
    """TrainingArguments(torch_compile=True): the routing log names the model's layers (not the compiled
    wrapper's `_orig_mod.` ones) and the checkpoint reloads bitwise."""
    t = make_trainer(tmp_path / "tc", 3, torch_compile=True, torch_compile_backend="eager")
    t.train()
    record = json.loads((tmp_path / "tc" / "molf_routing.jsonl").read_text().splitlines()[-1])
    assert list(record["selections"])[0] == "model.layers.0.self_attn.q_proj"
    again = molf.from_pretrained(tmp_path / "tc" / "checkpoint-3", backend="eager")
    for (n, p), q in zip(t.accelerator.unwrap_model(t.model).named_parameters(), again.parameters()):
        assert torch.equal(p, q), n


def test_trainer_with_gradient_checkpointing_and_bf16_autocast(tmp_path):
    t = make_trainer(tmp_path / "gc", 2, gradient_checkpointing=True, bf16=True)
    t.train()
    opt = t.molf_optimizer
    assert opt.molf_step == 2 and opt.routing.any(dim=1).all()


def test_checkpoints_load_exactly_as_plain_models_and_with_the_molf_loader(tmp_path):
    from transformers import AutoModelForCausalLM

    t = make_trainer(tmp_path / "run", 4)
    t.train()
    ids = Rows().ids[:2]
    t.model.eval()
    with torch.no_grad():
        want = t.model(ids).logits
    t.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-3"):
        plain = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert not any(isinstance(m, molf.MoLFLinear) for m in plain.modules())
        wrapped = molf.from_pretrained(folder, backend="eager").eval()
        assert len([m for m in wrapped.modules() if isinstance(m, molf.MoLFLinear)]) == 14
        with torch.no_grad():
            got_plain, got_molf = plain(ids).logits, wrapped(ids).logits
        assert torch.allclose(got_plain, got_molf, atol=1e-5), folder  # merged == wrapped, the same checkpoint
        if folder.name == "final":
            assert torch.equal(got_molf, want)  # the molf loader: bitwise
            for (n, p), q in zip(t.model.named_parameters(), wrapped.parameters()):
                assert torch.equal(p, q) and p.requires_grad == q.requires_grad, n


def test_save_pretrained_from_a_given_full_state_dict(tmp_path):
    """state_dict= (FSDP2: the full state dict gathered on rank 0, the model holding shards) is what is written,
    merged and unmerged; the model gives only the layout. One that does not fit the model (a shard's shape, a
    missing key) raises before anything is written."""
    from transformers import AutoModelForCausalLM
    model = molf.wrap(tiny_qwen2(), ranks=(2, 8), alphas=(8, 16), train_base=True, backend="eager")
    trained = molf.wrap(tiny_qwen2(seed=3), ranks=(2, 8), alphas=(8, 16), train_base=True, backend="eager")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the LoRA Bs nonzero: the merge has something to add
    full = {k: v.clone() for k, v in trained.state_dict().items()}
    molf.save_pretrained(model, tmp_path / "ckpt", state_dict=full)
    ids = Rows().ids[:2]
    loaded = molf.from_pretrained(tmp_path / "ckpt", backend="eager").eval()
    for (n, p), q in zip(trained.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), n
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert_close(plain(ids).logits, trained.eval()(ids).logits, 1e-5, "merged from the state dict")
    key = "model.layers.0.self_attn.q_proj.lora_A.1"
    for bad, said in (({**full, key: full[key][:4]}, rf"state_dict\['{key}'\] has shape \(4, 32\), the model's "
                                                     r"is \(8, 32\) \(a shard\?"),
                      ({k: v for k, v in full.items() if k != key}, rf"missing \['{key}'\]")):
        with pytest.raises(ValueError, match=said):
            molf.save_pretrained(model, tmp_path / "bad", state_dict=bad)
        assert not (tmp_path / "bad").exists()


def test_save_pretrained_on_a_process_that_is_not_the_main_one_writes_nothing(tmp_path):
    """is_main_process=False (accelerate's recipe: every rank calls it, the main one writes) writes nothing, as
    transformers: before, molf's own files were written on every rank, and an earlier save's files moved aside
    beside the main process's writes; an empty state_dict there (FSDP2's gathered one on another rank) is fine."""
    model = molf.wrap(tiny_qwen2(), ranks=(2, 8), alphas=(8, 16), train_base=True, backend="eager")
    molf.save_pretrained(model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    for state_dict in (None, {}):
        molf.save_pretrained(model, tmp_path / "ckpt", is_main_process=False, state_dict=state_dict)
        molf.save_pretrained(model, tmp_path / "other", is_main_process=False, state_dict=state_dict)
        assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
        assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("first, second", [("20KB", None), (None, "20KB")], ids=["shards-then-one", "one-then-shards"])
def test_a_save_over_an_earlier_one_with_other_shards_loads_as_written(tmp_path, first, second):
    """molf.save_pretrained into a folder holding an earlier save sharded otherwise (max_shard_size): transformers
    removes the earlier shards but leaves an earlier single file, which from_pretrained then prefers to the new
    shards (the earlier weights, silently), and an earlier index, which molf's loader read first. Only this save's
    weight files remain now, and both loaders take them."""
    from transformers import AutoModelForCausalLM
    ids = Rows().ids[:2]
    models = [molf.wrap(tiny_qwen2(seed=s), ranks=(2, 8), alphas=(8, 16), backend="eager") for s in (1, 2)]
    for model, shard in zip(models, (first, second)):
        molf.save_pretrained(model, tmp_path / "ckpt", **({} if shard is None else {"max_shard_size": shard}))
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert ("model.safetensors" in names) == (second is None)
    assert ("model.safetensors.index.json" in names) == (second is not None)
    assert not any(n.startswith(".") for n in names)
    want = models[1].eval()(ids).logits
    with torch.no_grad():
        assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()(ids).logits, want, 1e-5, "plain")
        assert torch.equal(molf.from_pretrained(tmp_path / "ckpt", backend="eager").eval()(ids).logits, want)


def test_a_save_that_fails_leaves_the_earlier_one_in_place(tmp_path, monkeypatch):
    """The earlier weights set aside during a save come back where transformers' save raises (a full disk)."""
    model = molf.wrap(tiny_qwen2(seed=1), ranks=(2, 8), alphas=(8, 16), backend="eager")
    molf.save_pretrained(model, tmp_path / "ckpt", max_shard_size="20KB")
    (tmp_path / "ckpt" / "adapter_config.json").write_text("{}")  # an adapter the save would remove
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())

    def full_disk(self, path, **kwargs):
        (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(type(model), "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        molf.save_pretrained(model, tmp_path / "ckpt")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    (tmp_path / "ckpt" / "adapter_config.json").unlink()
    ids = Rows().ids[:2]
    assert torch.equal(molf.from_pretrained(tmp_path / "ckpt", backend="eager").eval()(ids).logits,
                       model.eval()(ids).logits)


def test_the_molf_loaders_take_a_hub_repo_id(tmp_path, monkeypatch):
    """A checkpoint pushed to the Hub (push_to_hub of a MoLFTrainer output) loads by its repo id, as transformers'
    from_pretrained does; it used to be "not a molf checkpoint". No network here: the download is stubbed."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    model = molf.wrap(tiny_qwen2(), ranks=(2,), alphas=(4,), backend="eager")
    molf.save_pretrained(model, tmp_path / "pushed")
    calls = []

    def download(repo_id, **kw):
        calls.append((repo_id, kw))
        if repo_id != "user/molf-run":
            raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder (no network)")
        return str(tmp_path / "pushed")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    back = molf.from_pretrained("user/molf-run", revision="v1", backend="eager")
    assert calls == [("user/molf-run", {"revision": "v1"})]
    for (n, p), q in zip(model.named_parameters(), back.parameters()):
        assert torch.equal(p, q), n
    molf.load(back, "user/molf-run")
    with pytest.raises(ValueError, match=r"user/missing is not a local folder and could not be downloaded from the "
                                         r"Hugging Face Hub \(LocalEntryNotFoundError: Cannot find"):
        molf.from_pretrained("user/missing")
    with pytest.raises(ValueError, match=r"/nonexistent/run is not a folder \(nor a Hugging Face Hub repo id"):
        molf.from_pretrained("/nonexistent/run")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a folder"):
        molf.load(back, tmp_path / "file")


def test_save_pretrained_pushes_the_whole_folder(tmp_path, monkeypatch):
    """molf.save_pretrained(..., push_to_hub=True) handed the flag to transformers, which pushed the merged model
    before molf's own files were written: the Hub repo was no molf checkpoint. The folder is now pushed once it
    is complete. No network here: huggingface_hub's API is stubbed."""
    import huggingface_hub

    uploads = []

    class Api:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            assert exist_ok
            return SimpleNamespace(repo_id=f"user/{repo_id}" if "/" not in repo_id else repo_id)

        def upload_folder(self, repo_id, folder_path, commit_message, create_pr):
            uploads.append((repo_id, sorted(os.listdir(folder_path)), commit_message, create_pr, self.token))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    model = molf.wrap(tiny_qwen2(), ranks=(2,), alphas=(4,), backend="eager")
    molf.save_pretrained(model, tmp_path / "run", push_to_hub=True, token="t", max_shard_size="1GB")
    molf.save_pretrained(model, tmp_path / "run2", push_to_hub=True, repo_id="org/molf", commit_message="c",
                         create_pr=True)
    files = ["config.json", "generation_config.json", "model.safetensors", "molf_config.json",
             "molf_model.safetensors"]
    assert [u[:2] for u in uploads] == [("user/run", files), ("org/molf", files)]
    assert uploads[0][2:] == ("Upload MoLF model (merged, and molf's state)", False, "t")
    assert uploads[1][2:] == ("c", True, None)
    molf.save_pretrained(model, tmp_path / "local", repo_id="ignored")  # as transformers: no push, no upload
    assert len(uploads) == 2


def test_evaluation_and_load_best_model_at_end_restore_the_best_checkpoint(tmp_path):
    """eval_strategy with load_best_model_at_end: the Trainer evaluates at each checkpoint and reloads the best
    one at the end, through molf's loader (the wrapped model, bitwise). greater_is_better=True on the eval loss
    makes the first checkpoint the best, so the reload is seen."""
    t = make_trainer(tmp_path / "run", 6, eval_dataset=Rows(n=8, t=8), eval_strategy="steps", eval_steps=3,
                     load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    t.train()
    evals = [h["eval_loss"] for h in t.state.log_history if "eval_loss" in h]
    assert len(evals) >= 2 and evals[0] > evals[1]  # training lowered the eval loss
    assert t.state.best_model_checkpoint == str(tmp_path / "run" / "checkpoint-3")
    best = molf.from_pretrained(tmp_path / "run" / "checkpoint-3", backend="eager")
    last = molf.from_pretrained(tmp_path / "run" / "checkpoint-6", backend="eager")
    for (n, p), q, r in zip(t.model.named_parameters(), best.parameters(), last.parameters()):
        assert torch.equal(p, q), n
    assert not all(torch.equal(p, r) for p, r in zip(t.model.parameters(), last.parameters()))
    assert t.molf_optimizer.molf_step == 6


def test_resume_in_the_same_folder_logs_every_step_once(tmp_path):
    from molf.plot import read_routing

    first = make_trainer(tmp_path / "run", 5)  # "crashes" after step 5; the last checkpoint is step 3
    first.train()
    again = make_trainer(tmp_path / "run", 6)
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    log = tmp_path / "run" / "molf_routing.jsonl"
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    log.write_text(log.read_text() + log.read_text().splitlines()[3] + "\n")  # a duplicated step 4
    with pytest.warns(UserWarning, match="the last record of each step is used"):
        got, _, _, _ = read_routing(log)
    assert got == [1, 2, 3, 4, 5, 6]


def test_accelerate_prepare_with_accumulation_and_clipping_matches_a_plain_loop():
    """accelerate's AcceleratedOptimizer around MoLFAdamW (what accelerate-launched scripts get): with
    `accumulate` over two micro-batches and `clip_grad_norm_`, the same weights and routing as a plain loop."""
    accelerate = pytest.importorskip("accelerate")
    ids = Rows().ids
    results = []
    for use_accelerate in (True, False):
        torch.manual_seed(0)
        model = molf.wrap(tiny_qwen2(), ranks=(8,), alphas=(8,), train_base=True, backend="eager").train()
        opt = molf.MoLFAdamW(model, lr=1e-3, weight_decay=0.1, backend="eager")
        routes = []
        if use_accelerate:
            acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
            model, opt = acc.prepare(model, opt)
            for i in range(8):
                with acc.accumulate(model):
                    acc.backward(model(ids[2 * i:2 * i + 2], labels=ids[2 * i:2 * i + 2]).loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad()
                if acc.sync_gradients:
                    routes.append(unwrap_optimizer(opt).routing.clone())
            assert unwrap_optimizer(opt).molf_step == 4
        else:
            for i in range(8):
                (model(ids[2 * i:2 * i + 2], labels=ids[2 * i:2 * i + 2]).loss / 2).backward()
                if i % 2 == 1:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad()
                    routes.append(opt.routing.clone())
        results.append((torch.stack(routes), [p.detach().clone() for p in model.parameters()]))
    (ra, pa), (rb, pb) = results
    assert torch.equal(ra, rb) and ra[:, :, 0].any() and ra[:, :, 1].any()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(pa, pb))


def test_molf_accelerate_load_state_outside_fsdp_is_accelerate_s(tmp_path):
    """molf.integrations.accelerate.load_state on a run without FSDP2 (one process): accelerate's load_state, the
    weights and the optimizer's state back as saved, accelerate's own functions as they were."""
    accelerate = pytest.importorskip("accelerate")
    from molf.integrations.accelerate import load_state, saved_model_path
    ids = Rows().ids
    model = molf.wrap(tiny_qwen2(), ranks=(8,), alphas=(8,), train_base=True, backend="eager")
    acc = accelerate.Accelerator(cpu=True)
    model, opt = acc.prepare(model, molf.MoLFAdamW(model, lr=1e-3, backend="eager"))

    def train():
        acc.backward(model(ids[:2], labels=ids[:2]).loss)
        opt.step()
        opt.zero_grad()
    train()
    acc.save_state(str(tmp_path))
    saved = [p.detach().clone() for p in model.parameters()], unwrap_optimizer(opt).molf_step
    train()
    loader = accelerate.accelerator.load_fsdp_model
    load_state(acc, str(tmp_path))
    assert accelerate.accelerator.load_fsdp_model is loader
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), saved[0]))
    assert unwrap_optimizer(opt).molf_step == saved[1] == 1
    full, sharded, local = (SimpleNamespace(state_dict_type=SimpleNamespace(name=n))
                            for n in ("FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT"))
    assert saved_model_path(full, "ck", 1) == os.path.join("ck", "pytorch_model_fsdp_1.bin")
    folder = os.path.join("ck", "pytorch_model_fsdp_0")
    assert saved_model_path(sharded, "ck") == saved_model_path(sharded, folder) == folder
    with pytest.raises(ValueError, match="state_dict_type=LOCAL_STATE_DICT: an FSDP2 run on a quantized base"):
        saved_model_path(local, "ck")


def test_sequence_classifier_trains_and_its_checkpoint_loads_as_its_own_class(tmp_path):
    """A classification head on a wrapped model (the head is new, so it trains as a plain parameter, also under
    freeze_others): the checkpoint loads with AutoModelForSequenceClassification (merged) and with
    molf.from_pretrained as the same class (bitwise, the same parameters trainable), not as a causal LM."""
    from transformers import AutoModelForSequenceClassification, Qwen2ForSequenceClassification

    classifier = tiny_qwen2(task="SequenceClassification", num_labels=3, pad_token_id=0)
    model = molf.wrap(classifier, ranks=(2, 8), alphas=(8, 16), train_base=False,
                      freeze_others=True, backend="eager")  # MoLF-E: the LoRA experts and the new head train
    assert model.score.weight.requires_grad and not isinstance(model.score, molf.MoLFLinear)
    rows = Rows(n=16, t=8)
    data = [{"input_ids": r["input_ids"].clamp_min(1), "labels": r["input_ids"][0] % 3} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2,
                             save_steps=6, logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = MoLFTrainer(model=model, args=args, train_dataset=data, backend="eager")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    ids = torch.stack([d["input_ids"] for d in data[:4]])
    model.eval()
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "checkpoint-6").eval()
    wrapped = molf.from_pretrained(tmp_path / "checkpoint-6", backend="eager").eval()
    assert type(wrapped) is Qwen2ForSequenceClassification
    with torch.no_grad():
        want = model(ids).logits
        assert_close(plain(ids).logits, want, 1e-5, "merged classifier")
        assert torch.equal(wrapped(ids).logits, want)
    assert [n for n, p in wrapped.named_parameters() if p.requires_grad and "lora_" not in n] == ["score.weight"]
