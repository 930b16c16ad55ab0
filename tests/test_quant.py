"""MoLF-E on bitsandbytes 4-bit and 8-bit bases (molf.quant): forward and LoRA gradients against a float64
formula on the dequantized weight, the base untouched, a tiny Qwen2 loaded the way users load it
(from_pretrained with a BitsAndBytesConfig) training on both backends, merge, export and checkpoints.

bitsandbytes' CPU backend runs here (a dev extra); without it (the GPU image) these tests skip."""
import json
import warnings

import pytest
import torch
from torch import nn

import molf
from conftest import DEVICE
from helpers import assert_close, batch, randomize_lora_B, rel_err, tiny_qwen2

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install molf[quant])")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes")

KINDS = ["nf4", "fp4", "nf4-double", "int8"]


def quantized(lin: nn.Linear, kind: str, compute_dtype=torch.float32) -> nn.Module:
    """lin as a bitsandbytes layer, quantized on its device as transformers' loader does."""
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False)
        q.load_state_dict(lin.state_dict())
        return q.to(DEVICE)
    qtype, double = kind.split("-")[0], kind.endswith("double")
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                          quant_type=qtype, compress_statistics=double)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=qtype,
                                 compress_statistics=double)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to(DEVICE)


def quantized_qwen2(tmp_path, kind="nf4-double", layers=2, **config):
    """A tiny Qwen2 saved and loaded back with a BitsAndBytesConfig: what a user's from_pretrained gives
    (widths multiples of 64: bitsandbytes' CPU inference repacking fails below its block size)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    tiny_qwen2(layers=layers, hidden=64, inter=128, **config).save_pretrained(tmp_path / "float")
    if kind == "int8":
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind.split("-")[0],
                                 bnb_4bit_use_double_quant=kind.endswith("double"),
                                 bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg, device_map=str(DEVICE),
                                                dtype=torch.float32)


def train(model, opt, ids, steps):
    """(losses, routing per step) of `steps` language-modelling steps on one batch."""
    losses, routes = [], []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        routes.append(opt.routing.clone())
    return losses, torch.stack(routes)


def f64_layer(layer, x, g):
    """y and the gradients of x and every expert from the float64 formula on the dequantized weight."""
    w = molf.quant.dequantize(layer.base, torch.float64)
    b = layer.base.bias.double() if layer.base.bias is not None else 0
    xd = x.detach().double().requires_grad_(True)
    a = [t.detach().double().requires_grad_(True) for t in layer.lora_A]
    bb = [t.detach().double().requires_grad_(True) for t in layer.lora_B]
    y = xd @ w.T + b + sum(s * (xd @ ai.T) @ bi.T for s, ai, bi in zip(layer.scalings, a, bb))
    y.backward(g.double())
    return y.detach(), xd.grad, [t.grad for t in a], [t.grad for t in bb]


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_lora_gradients_match_float64(kind, bias, backend):
    torch.manual_seed(0)
    lin = nn.Linear(45, 37, bias=bias, device=DEVICE)  # odd sizes: not a multiple of any block
    layer = molf.MoLFLinear(quantized(lin, kind), ranks=(3, 8), alphas=(8, 16), train_base=False, backend=backend)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(std=0.5)
    assert layer.lora_A[0].dtype == torch.float32 and layer.quantized
    x = torch.randn(2, 9, 45, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 9, 37, device=DEVICE)
    y = layer(x)
    y.backward(g)
    y64, dx64, da64, db64 = f64_layer(layer, x, g)
    tol = 1e-5 if kind != "int8" else 5e-3  # bitsandbytes' CPU int8 matmul rounds its input to fp16
    assert_close(y, y64, tol, "y")
    assert_close(x.grad, dx64, tol, "dx")
    for i in range(2):
        assert_close(layer.lora_A[i].grad, da64[i], tol, f"dA{i}")
        assert_close(layer.lora_B[i].grad, db64[i], tol, f"dB{i}")
    assert layer.base.weight.grad is None and not layer.base.weight.requires_grad
    with molf.disable_experts(layer), torch.no_grad():  # the quantized base alone, through bitsandbytes
        assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_fp16_compute_dtype_and_autocast(kind):
    """LoRA experts in the compute dtype (fp16 here), the output in the input's dtype, as bitsandbytes and peft."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 24, device=DEVICE)
    base = quantized(lin, kind, compute_dtype=torch.float16)
    if kind == "int8":
        base.bias.data = base.bias.data.half()
    layer = molf.MoLFLinear(base, ranks=(4,), alphas=(8,), train_base=False, backend="eager")
    assert layer.lora_A[0].dtype == torch.float16
    with torch.no_grad():
        layer.lora_B[0].normal_()
    x = torch.randn(5, 32, device=DEVICE)
    y = layer(x)
    assert y.dtype == torch.float32
    y64 = f64_layer(layer, x, torch.ones(5, 24, device=DEVICE))[0]
    assert_close(y, y64, 1e-2, "fp16 compute")


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_base_storage_untouched_by_training(backend):
    torch.manual_seed(0)
    model = nn.Sequential(quantized(nn.Linear(40, 48), "nf4-double"), nn.GELU(), quantized(nn.Linear(48, 16), "int8"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    molf.wrap(model, ranks=(2, 8), alphas=(8, 8), train_base=False, target_modules=["0", "2"], backend=backend)
    opt = molf.MoLFAdamW(model, lr=1e-2, backend=backend)
    x, t = torch.randn(12, 40, device=DEVICE), torch.randn(12, 16, device=DEVICE)
    for _ in range(4):
        nn.functional.mse_loss(model(x), t).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for name in ("0", "2"):
        base = model.get_submodule(name).base
        assert base.weight.grad is None and not base.weight.requires_grad
        for k, v in base.state_dict().items():
            assert torch.equal(v, before[f"{name}.{k}"]), f"{name}.{k} changed"
    assert opt.routing.shape == (2, 2)


@pytest.mark.parametrize("kind", ["nf4-double", "int8"])
def test_tiny_qwen2_from_pretrained_quantized_trains_routing_alike_on_both_backends(tmp_path, kind):
    """Loss goes down, and the eager and triton backends route identically step by step."""
    ids = batch(n=2, t=8).to(DEVICE)
    runs = {}
    for backend in ("eager", "triton"):
        model = quantized_qwen2(tmp_path, kind, layers=1)
        molf.wrap(model, ranks=(2, 8), alphas=(8, 8), train_base=False, freeze_others=True, backend=backend)
        model.train()
        opt = molf.MoLFAdamW(model, lr=1e-2, lora_lr=1e-2, backend=backend)
        runs[backend] = train(model, opt, ids, 8)
    for backend, (losses, _) in runs.items():
        assert losses[-1] < 0.9 * losses[0], (backend, losses)
    assert torch.equal(runs["eager"][1], runs["triton"][1])
    assert rel_err(torch.tensor(runs["triton"][0]), torch.tensor(runs["eager"][0])) < 1e-3


def test_prepare_model_for_kbit_training_and_gradient_checkpointing(tmp_path):
    """peft's QLoRA conventions: norms in fp32, input gradients on, gradient checkpointing; then molf.wrap."""
    peft = pytest.importorskip("peft")
    model = peft.prepare_model_for_kbit_training(quantized_qwen2(tmp_path),
                                                 gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    molf.wrap(model, ranks=(2, 8), alphas=(8, 8), train_base=False, backend="eager")
    model.train()
    losses, _ = train(model, molf.MoLFAdamW(model, lr=1e-2), batch(n=4, t=12).to(DEVICE), 8)
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_train_base_refused_on_quantized_bases(tmp_path):
    model = quantized_qwen2(tmp_path)
    with pytest.raises(ValueError, match=r"train_base=True needs float bases, but model.layers.0.self_attn.q_proj is "
                                         r"a bitsandbytes 4-bit nf4 \(double quantization\) layer \(14 quantized"):
        molf.wrap(model, ranks=(8,), alphas=(16,), train_base=True)
    assert not molf.layer.molf_layers(model)  # nothing wrapped
    with pytest.raises(ValueError, match="a quantized weight cannot be the full expert"):
        molf.MoLFLinear(model.model.layers[0].mlp.up_proj, train_base=True)


def test_unquantized_bitsandbytes_layer_refused():
    layer = bnb.nn.Linear4bit(16, 8, quant_type="nf4")  # still float: quantized only when moved to its device
    layer.weight = bnb.nn.Params4bit(torch.randn(8, 16), requires_grad=False, quant_type="nf4")
    with pytest.raises(ValueError, match="not quantized yet"):
        molf.MoLFLinear(layer, train_base=False)


def test_other_quantized_layers_refused():
    """A non-float weight that is not bitsandbytes' (torchao-style int8 tensor): an error naming the layer."""
    lin = nn.Linear(8, 4)
    lin.weight = nn.Parameter(torch.randint(-8, 8, (4, 8), dtype=torch.int8), requires_grad=False)
    model = nn.Sequential(lin)
    with pytest.raises(ValueError, match=r"0 is a quantized layer .*supported as bitsandbytes Linear4bit and "
                                         r"Linear8bitLt"):
        molf.wrap(model, target_modules=["0"], train_base=False)


@pytest.mark.parametrize("kind", ["nf4-double", "int8"])
def test_merge_dequantizes_and_saves_a_float_checkpoint(tmp_path, kind):
    from transformers import AutoModelForCausalLM
    model = quantized_qwen2(tmp_path, kind)
    molf.wrap(model, ranks=(2, 8), alphas=(8, 8), train_base=False, backend="eager")
    randomize_lora_B(model)
    ids = batch().to(DEVICE)
    want = model(ids).logits
    with pytest.warns(UserWarning, match=r"molf.merge dequantized 14 .* into float nn.Linear \(torch.float32\): the "
                                         r"merged model is no longer quantized there; its quantization_config was"):
        molf.merge(model)
    assert not any(molf.quant.quant_kind(m) for m in model.modules())
    assert_close(model(ids).logits, want, 2e-2 if kind == "int8" else 1e-5, "merged")  # int8: LLM.int8 activations
    model.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).to(DEVICE)
    assert_close(again(ids).logits, model(ids).logits, 1e-6, "reloaded")


def test_export_peft_loads_on_the_quantized_base(tmp_path):
    peft = pytest.importorskip("peft")
    model = quantized_qwen2(tmp_path)
    molf.wrap(model, ranks=(2, 8), alphas=(8, 8), train_base=False, freeze_others=True, backend="eager")
    randomize_lora_B(model)
    ids = batch().to(DEVICE)
    want = model.train()(ids).logits  # train mode: bitsandbytes' bf16 CPU inference kernels stay out of it
    molf.export_peft(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(quantized_qwen2(tmp_path), tmp_path / "adapter").train()
    assert type(loaded.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert_close(loaded(ids).logits, want, 1e-5, "peft on the quantized base")


def test_checkpoint_of_a_quantized_model_restores_exactly(tmp_path):
    """molf.save_pretrained (MoLFTrainer's checkpoints): a peft adapter plus molf's float state, no quantized
    weights; molf.load restores the experts bitwise into a freshly loaded and wrapped quantized model."""
    model = quantized_qwen2(tmp_path)
    molf.wrap(model, ranks=(2, 8), alphas=(8, 8), train_base=False, backend="eager")
    ids = batch().to(DEVICE)
    train(model, molf.MoLFAdamW(model, lr=1e-2), ids, 3)
    molf.save_pretrained(model, tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "molf_config.json", "molf_model.safetensors"]
    fresh = quantized_qwen2(tmp_path)
    molf.wrap(fresh, ranks=(2, 8), alphas=(8, 8), train_base=False, backend="eager")
    molf.load(fresh, tmp_path / "ckpt")
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="saved from a quantized base"):
        molf.from_pretrained(tmp_path / "ckpt")
    plain = molf.wrap(tiny_qwen2(), ranks=(2, 8), alphas=(8, 8), train_base=False)
    with pytest.raises(ValueError, match="does not fit this model"):
        molf.load(plain, tmp_path / "ckpt")


def test_a_full_state_dict_file_loads_its_float_tensors_only(tmp_path):
    """checkpoint.load_fsdp_quantized of a file torch.save wrote a full state dict to (accelerate's
    pytorch_model_fsdp.bin, FULL_STATE_DICT; here one process, no shards): the experts and float tensors load,
    the quantized weights and their quantization state stay as loaded; a file without them is refused."""
    from molf.checkpoint import load_fsdp_quantized
    model = molf.wrap(quantized_qwen2(tmp_path), ranks=(2, 8), alphas=(8, 8), train_base=False, backend="eager")
    ids = batch().to(DEVICE)
    train(model, molf.MoLFAdamW(model, lr=1e-2), ids, 2)
    full = model.state_dict()
    assert any(k.endswith("absmax") for k in full)
    torch.save(full, tmp_path / "pytorch_model_fsdp.bin")
    fresh = molf.wrap(quantized_qwen2(tmp_path), ranks=(2, 8), alphas=(8, 8), train_base=False, backend="eager")
    assert not torch.equal(fresh(ids).logits, model(ids).logits)
    load_fsdp_quantized(fresh, str(tmp_path / "pytorch_model_fsdp.bin"))
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    torch.save({k: v for k, v in full.items() if "lora_B" not in k}, tmp_path / "partial.bin")
    with pytest.raises(ValueError, match=r"partial.bin does not fit this model: missing \['model.layers.0"):
        load_fsdp_quantized(fresh, str(tmp_path / "partial.bin"))


def test_saves_of_both_kinds_into_one_folder_leave_nothing_stale_behind(tmp_path):
    """A float model's molf save into a folder that holds a quantized model's (an adapter) removes the adapter:
    plain transformers, finding adapter_config.json, loaded that adapter onto its base instead of the new merged
    weights, and molf.from_pretrained crashed. The other way, the earlier merged weights go; a folder holding
    the base model itself keeps its weights."""
    from transformers import AutoModelForCausalLM
    ids = batch().to(DEVICE)
    quant = molf.wrap(quantized_qwen2(tmp_path), ranks=(2, 8), alphas=(8, 8), train_base=False, backend="eager")
    train(quant, molf.MoLFAdamW(quant, lr=1e-2), ids, 2)
    full = molf.wrap(AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.float32).to(DEVICE),
                     ranks=(2, 8), alphas=(8, 8), train_base=False, backend="eager")
    train(full, molf.MoLFAdamW(full, lr=5e-2), ids, 3)
    molf.save_pretrained(quant, tmp_path / "out")
    molf.save_pretrained(full, tmp_path / "out")
    assert not {"adapter_config.json", "adapter_model.safetensors"} & {p.name for p in (tmp_path / "out").iterdir()}
    want = full(ids).logits
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).to(DEVICE)
    assert_close(plain(ids).logits, want, 1e-5)
    assert torch.equal(molf.from_pretrained(tmp_path / "out").to(DEVICE)(ids).logits, want)

    molf.save_pretrained(quant, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
        "molf_config.json", "molf_model.safetensors"]
    fresh = molf.wrap(quantized_qwen2(tmp_path), ranks=(2, 8), alphas=(8, 8), train_base=False, backend="eager")
    molf.load(fresh, tmp_path / "out")
    assert torch.equal(fresh(ids).logits, quant(ids).logits)

    molf.save_pretrained(quant, tmp_path / "float")  # the base model's own folder: its weights stay
    assert (tmp_path / "float" / "model.safetensors").is_file()
    assert (tmp_path / "float" / "adapter_config.json").is_file()


def test_model_save_pretrained_of_a_wrapped_quantized_model_comes_back_through_molf_load(tmp_path):
    """The wrapped layout transformers writes for a wrapped quantized model (the quantized base's weights and
    quantization state under base.): molf.load takes the float tensors into a freshly loaded and wrapped
    quantized model, which then computes the same logits bitwise."""
    model = quantized_qwen2(tmp_path)
    molf.wrap(model, ranks=(2, 8), alphas=(8, 8), train_base=False, backend="eager")
    ids = batch().to(DEVICE)
    train(model, molf.MoLFAdamW(model, lr=1e-2), ids, 3)
    model.save_pretrained(tmp_path / "wl")
    fresh = quantized_qwen2(tmp_path)
    molf.wrap(fresh, ranks=(2, 8), alphas=(8, 8), train_base=False, backend="eager")
    assert not torch.equal(fresh(ids).logits, model(ids).logits)
    molf.load(fresh, tmp_path / "wl")
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_checkpoint_of_a_quantized_model_with_a_bias_trained_by_hand(tmp_path):
    """A base bias unfrozen by hand trains as the full expert: the LoRA adapter cannot hold it, so none is
    written (a warning says so) and molf's state restores the model exactly."""
    model = quantized_qwen2(tmp_path)
    molf.wrap(model, ranks=(2, 8), alphas=(8, 8), train_base=False, backend="eager")
    bias = model.model.layers[0].self_attn.q_proj.base.bias
    bias.requires_grad_(True)
    before = bias.detach().clone()
    opt = molf.MoLFAdamW(model, lr=1e-2)
    train(model, opt, batch().to(DEVICE), 3)
    assert not torch.equal(bias, before)
    molf.export_peft(molf.wrap(quantized_qwen2(tmp_path), ranks=(2, 8), alphas=(8, 8), train_base=False),
                     tmp_path / "ckpt")  # an earlier adapter in the folder: it would not fit, so it goes
    with pytest.warns(UserWarning, match=r"no peft adapter written, since \['model.layers.0.self_attn.q_proj.base.bias"
                                         r"'\] trains"):
        molf.save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["molf_config.json", "molf_model.safetensors"]
    fresh = quantized_qwen2(tmp_path)
    molf.wrap(fresh, ranks=(2, 8), alphas=(8, 8), train_base=False, backend="eager")
    molf.load(fresh, tmp_path / "ckpt")
    ids = batch().to(DEVICE)
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert json.loads((tmp_path / "ckpt" / "molf_config.json").read_text())["requires_grad_inside"] == {
        "model.layers.0.self_attn.q_proj.base.bias": True}


def test_trainer_checkpoint_and_resume_on_a_quantized_base(tmp_path):
    from torch.utils.data import Dataset
    from transformers import TrainingArguments

    from molf.integrations.hf import MoLFTrainer

    class Data(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = batch(seed=i, n=1, t=12)[0]
            return {"input_ids": ids, "labels": ids}

    def trainer(out, steps):
        model = quantized_qwen2(tmp_path)
        molf.wrap(model, ranks=(2, 8), alphas=(8, 8), train_base=False, freeze_others=True, backend="eager")
        args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                                 save_steps=2, logging_steps=1, report_to=[], use_cpu=DEVICE.type == "cpu", seed=0,
                                 save_only_model=False)
        return MoLFTrainer(model=model, args=args, train_dataset=Data()), model
    t, full = trainer(tmp_path / "a", 4)
    t.train()
    r, resumed = trainer(tmp_path / "b", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    ids = batch().to(DEVICE)
    assert torch.equal(resumed(ids).logits, full(ids).logits)


def test_inference_before_training_leaves_the_gradients_right(tmp_path):
    """On CPUs with AVX512-BF16, an eval forward without gradients let bitsandbytes repack 4-bit weights in place
    for its inference kernels, through which it computes no gradient (0.50.2): the experts before such a layer then
    trained on wrong gradients, silently (13% off in dx, measured), or failed with a bias. wrap turns that repacking
    off for every 4-bit layer (the unwrapped MLP here too): the gradients after inference are the ones before, and
    merging still gives the model the layers compute."""
    model = quantized_qwen2(tmp_path, "nf4")
    molf.wrap(model, ranks=(2, 8), alphas=(8, 8), train_base=False, freeze_others=True, backend="eager",
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    randomize_lora_B(model, std=0.5)
    ids = batch().to(DEVICE)

    def grads():
        model.train()
        model(ids, labels=ids).loss.backward()
        out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return out

    before = grads()
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    assert not [n for n, m in model.named_modules() if molf.quant.quant_kind(m) and molf.quant.cpu_repacked(m)]
    after = grads()
    assert len(after) == len(before) == 32 and all(torch.equal(a, b) for a, b in zip(after, before))
    with pytest.warns(UserWarning, match="no longer quantized"):
        molf.merge(model)
    with torch.no_grad():
        assert_close(model.eval()(ids).logits, want, 1e-5, "merged")


def test_a_layer_repacked_before_wrapping_is_refused(tmp_path):
    """A layer bitsandbytes repacked before molf.wrap (inference first) cannot train right: refused, whether it
    is a target or a layer between them, naming the remedy."""
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    model = quantized_qwen2(tmp_path, "nf4").eval()
    with torch.no_grad():
        model(batch().to(DEVICE))
    assert molf.quant.cpu_repacked(model.model.layers[0].mlp.up_proj)
    for targets, name in ((None, "base"), (["q_proj"], "model.layers.0.self_attn.k_proj")):
        with pytest.raises(ValueError, match=r"was repacked by bitsandbytes for its CPU inference kernels .* load "
                                             r"the model again and wrap it before running it"):
            molf.wrap(model, ranks=(2,), alphas=(8,), train_base=False, target_modules=targets, backend="eager")
        assert not molf.layer.molf_layers(model), "nothing wrapped"
    with pytest.raises(ValueError, match="base was repacked"):
        molf.MoLFLinear(model.model.layers[0].mlp.up_proj, ranks=(2,), alphas=(8,), train_base=False)


def test_qlora_dpo_reference_is_the_quantized_base_with_the_experts_off(tmp_path):
    """MoLF-E on a 4-bit base under DPO: the reference is the policy with its experts off (no second quantized
    model), run in eval mode without gradients, which no longer lets bitsandbytes repack the weights on the CPU
    (see test_inference_before_training_leaves_the_gradients_right): training after it works."""
    trl = pytest.importorskip("trl", reason="trl is a dev extra")
    from test_trl import TEXTS, preference_pairs

    from molf.integrations.trl import ExpertsOffReference, MoLFDPOTrainer
    from molf.train import builtin_tokenizer

    tok = builtin_tokenizer(TEXTS)
    model = quantized_qwen2(tmp_path, "nf4", vocab=len(tok))
    molf.wrap(model, ranks=(2, 8), alphas=(8, 16), train_base=False, freeze_others=True, backend="eager")
    args = trl.DPOConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=3e-3, report_to=[], use_cpu=DEVICE.type == "cpu", max_length=32,
                         save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)
    trainer = MoLFDPOTrainer(model, None, args, train_dataset=preference_pairs(), processing_class=tok,
                             lora_lr=3e-3, backend="eager")
    assert isinstance(trainer.ref_model, ExpertsOffReference)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and abs(losses[0] - 0.6931) < 1e-3, losses
    layers = molf.layer.molf_layers(model)
    assert not [n for n, m in layers if getattr(m.base.weight.quant_state, "packing_format_for_cpu", False)]
    ids = batch(vocab=len(tok)).to(DEVICE)
    with torch.no_grad(), molf.disable_experts(model):
        base = model(ids).logits
    with torch.no_grad():
        assert torch.equal(trainer.ref_model(ids).logits, base)
        assert not torch.equal(model(ids).logits, base)
