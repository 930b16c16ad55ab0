"""MoLFLinear, wrap and merge on the eager backend, against float64 formulas and peft."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import molf
from helpers import assert_close, batch, device_for, randomize_lora_B, tiny_qwen2


def f64_formula(x, w, b, As, Bs, scalings):
    y = x.double() @ w.double().T
    if b is not None:
        y = y + b.double()
    for s, a, bb in zip(scalings, As, Bs):
        y = y + s * (x.double() @ a.double().T) @ bb.double().T
    return y


def make_layer(k, n, ranks, bias, train_base=True, dtype=torch.float64, backend="eager"):
    lin = nn.Linear(k, n, bias=bias, dtype=dtype)
    layer = molf.MoLFLinear(lin, ranks=ranks, alphas=[16.0 + 8 * i for i in range(len(ranks))],
                            train_base=train_base, backend=backend)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    return layer


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(7,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("ranks", [(3,), (2, 5)], ids=["r3", "r2-5"])
def test_forward_and_grads_match_f64_formula(bias, shape, ranks):
    k, n = 13, 11
    layer = make_layer(k, n, ranks, bias)
    x = torch.randn(*shape, k, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape, n)
    ref = f64_formula(x, layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B, layer.scalings)
    assert_close(y, ref, 1e-12, "y")
    g = torch.randn_like(y)
    y.backward(g)
    params = [x, layer.base.weight] + ([layer.base.bias] if bias else []) + list(layer.lora_A) + list(layer.lora_B)
    x2 = x.detach().clone().requires_grad_(True)
    leaves = [x2] + [p.detach().clone().requires_grad_(True) for p in params[1:]]
    w2 = leaves[1]
    b2 = leaves[2] if bias else None
    off = 3 if bias else 2
    A2, B2 = leaves[off:off + len(ranks)], leaves[off + len(ranks):]
    f64_formula(x2, w2, b2, A2, B2, layer.scalings).backward(g)
    names = ["x", "W"] + (["b"] if bias else []) + [f"A{i}" for i in range(len(ranks))] + [f"B{i}" for i in range(len(ranks))]
    for name, p, q in zip(names, params, leaves):
        assert_close(p.grad, q.grad, 1e-12, f"d{name}")


def test_scalings_rslora_and_plain():
    lin = nn.Linear(8, 8)
    assert molf.MoLFLinear(lin, ranks=(4, 16), alphas=(32, 32)).scalings == (16.0, 8.0)
    assert molf.MoLFLinear(nn.Linear(8, 8), ranks=(4,), alphas=(32,), rslora=False).scalings == (8.0,)


def test_frozen_base_gets_no_grad_and_names():
    layer = make_layer(6, 4, (2, 3), True, train_base=False)
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    assert layer.expert_names == ["lora_r2", "lora_r3"]
    layer(torch.randn(5, 6, dtype=torch.float64)).sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert all(a.grad is not None for a in layer.lora_A)
    assert make_layer(6, 4, (3,), True).expert_names == ["full", "lora_r3"]


@pytest.mark.parametrize("lead", [(10,), (2, 5)])
def test_dropout_only_on_lora_path_and_reproducible(lead):
    layer = molf.MoLFLinear(nn.Linear(16, 8, dtype=torch.float64), ranks=(4,), alphas=(8,), dropout=0.5,
                            backend="eager").train()
    x = torch.randn(*lead, 16, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B[0].normal_()
    torch.manual_seed(3)
    y1 = layer(x)
    torch.manual_seed(3)
    mask = molf.reference.dropout_mask(x, 0.5)
    expect = layer.base(x) + layer.scalings[0] * ((x * mask / 0.5) @ layer.lora_A[0].T) @ layer.lora_B[0].T
    assert_close(y1, expect, 1e-12, "dropout forward")
    assert 0.3 < mask.float().mean().item() < 0.7
    layer.eval()
    assert_close(layer(x), f64_formula(x, layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B,
                                       layer.scalings), 1e-12, "eval has no dropout")


def test_dropout_under_torch_compile_has_no_graph_break_and_equals_eager():
    """The CPU keep-mask (a C call that reads the seed) is a custom op under torch.compile: fullgraph works,
    and with inductor drawing random numbers as eager does, the compiled layer equals the eager one."""
    import torch._inductor.config as inductor
    layer = molf.MoLFLinear(nn.Linear(16, 8), ranks=(4,), alphas=(8,), dropout=0.3, backend="eager").train()
    with torch.no_grad():
        layer.lora_B[0].normal_()
    x = torch.randn(6, 16, requires_grad=True)
    torch.manual_seed(3)
    want = layer(x)
    (gx_want,) = torch.autograd.grad(want.square().sum(), x)
    with inductor.patch(fallback_random=True):
        compiled = torch.compile(layer, fullgraph=True)
        torch.manual_seed(3)
        got = compiled(x)
    (gx_got,) = torch.autograd.grad(got.square().sum(), x)
    assert_close(got, want, 1e-6, "compiled dropout forward")
    assert_close(gx_got, gx_want, 1e-6, "compiled dropout backward")


def test_merge_equals_forward():
    layer = make_layer(9, 7, (2, 3), True, train_base=True)
    x = torch.randn(4, 9, dtype=torch.float64)
    merged = layer.merge()
    assert type(merged) is nn.Linear and merged.weight.requires_grad and merged.bias.requires_grad  # as its base
    assert_close(merged(x), layer(x), 1e-12, "merged")
    assert layer.lora_B[0].abs().sum() > 0  # the layer itself is unchanged


def test_fresh_wrap_gives_same_logits():
    model = tiny_qwen2()
    ids = batch()
    before = model(ids).logits
    molf.wrap(model, ranks=(4, 8), alphas=(8, 8), train_base=True, backend="eager")
    wrapped = [n for n, m in model.named_modules() if isinstance(m, molf.MoLFLinear)]
    assert len(wrapped) == 2 * 7 and not any("lm_head" in n for n in wrapped)
    assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_disable_experts_computes_the_plain_model_and_restores(backend):
    """Inside molf.disable_experts the wrapped model is the one it was wrapped from (its experts are not zero);
    on exit, also through an exception, and nested, each layer is as before."""
    dev = device_for(backend)
    plain = tiny_qwen2().to(dev)
    ids = batch().to(dev)
    want = plain(ids).logits
    model = molf.wrap(copy.deepcopy(plain), ranks=(2, 4), alphas=(8, 8), train_base=False, backend=backend)
    randomize_lora_B(model, std=0.5)
    wrapped = model(ids).logits
    assert (wrapped - want).abs().max() > 1e-2
    layers = [m for m in model.modules() if isinstance(m, molf.MoLFLinear)]
    layers[0].experts_enabled = False  # one layer off by hand: the context manager restores it so
    with molf.disable_experts(model) as same:
        assert same is model
        assert torch.equal(model(ids).logits, want)
        with molf.disable_experts(model.model.layers[0]):
            assert torch.equal(model(ids).logits, want)
        assert not any(m.experts_enabled for m in layers)
        model(ids).logits.sum().backward()
    assert all(p.grad is None for m in layers for p in m.parameters())  # the experts took no part
    assert [m.experts_enabled for m in layers] == [False] + [True] * (len(layers) - 1)
    layers[0].experts_enabled = True
    with pytest.raises(RuntimeError, match="inside"):
        with molf.disable_experts(model):
            raise RuntimeError("inside")
    assert all(m.experts_enabled for m in layers)
    assert torch.equal(model(ids).logits, wrapped)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("ranks", [(4,), (2, 4)], ids=["r4", "r2-4"])
def test_training_after_a_forward_under_inference_mode(backend, ranks):
    """A forward under torch.inference_mode (transformers' pipelines run so; a sanity check before training)
    left the layer's cached column scales an inference tensor: the next training forward failed to save it for
    backward ("Inference tensors cannot be saved for backward"). The gradients equal a fresh model's."""
    dev = device_for(backend)
    model = molf.wrap(tiny_qwen2().to(dev), ranks=ranks, alphas=(8,) * len(ranks), train_base=False, backend=backend)
    randomize_lora_B(model, std=0.5)
    twin = copy.deepcopy(model)
    ids = batch().to(dev)
    with torch.inference_mode():
        seen = model(ids).logits
    assert torch.equal(seen, twin(ids).logits)
    model(ids, labels=ids).loss.backward()
    twin(ids, labels=ids).loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:  # close, not equal: a GPU's embedding backward adds with atomics
            assert_close(p.grad, q.grad, 1e-6, name)


def test_wrapping_on_the_meta_device_warns_once_and_the_reset_gives_the_plain_model():
    """Experts made on the meta device hold nothing: after to_empty, B is whatever memory comes (seen 2e13).
    wrap says so once (not per layer) with the remedy, which gives the plain model back."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        molf.wrap(model, ranks=(2,), alphas=(8,), train_base=False, target_modules=["0", "2"], backend="eager")
    said = [w for w in caught if "created on the meta device" in str(w.message)]
    assert len(said) == 1 and "reset_lora_parameters()" in str(said[0].message)
    with pytest.warns(UserWarning, match="created on the meta device"):
        molf.MoLFLinear(nn.Linear(4, 4, device="meta"), ranks=(2,), alphas=(8,))
    model.to_empty(device="cpu")
    model.load_state_dict({k.replace(".", ".base.", 1): v for k, v in plain.state_dict().items()}, strict=False)
    for _, m in molf.layer.molf_layers(model):
        m.reset_lora_parameters()
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_disable_experts_needs_molf_layers():
    with pytest.raises(ValueError, match=r"model \(Qwen2ForCausalLM\) has no MoLF layers to disable"):
        with molf.disable_experts(tiny_qwen2()):
            pass
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        with molf.disable_experts("Qwen/Qwen2.5-1.5B"):
            pass


def test_wrap_sees_through_torch_compile_and_data_parallel():
    """wrap on torch.compile's or DataParallel's wrapper wraps the model inside and returns the wrapper; a
    classifier's head is found there (before: under torch.compile it was wrapped and frozen like any linear)."""
    classifier = tiny_qwen2(task="SequenceClassification", num_labels=2)
    compiled = torch.compile(classifier, backend="eager")
    assert molf.wrap(compiled, ranks=(2,), alphas=(8,), train_base=False, target_modules="all-linear",
                     freeze_others=True, backend="eager") is compiled
    assert isinstance(classifier.model.layers[0].self_attn.q_proj, molf.MoLFLinear)
    assert type(classifier.score) is nn.Linear and classifier.score.weight.requires_grad
    inner = tiny_qwen2()
    parallel = nn.DataParallel(inner)
    assert molf.wrap(parallel, ranks=(2,), alphas=(8,), backend="eager") is parallel
    assert isinstance(inner.model.layers[0].mlp.down_proj, molf.MoLFLinear)


def test_wrap_freeze_others():
    model = molf.wrap(tiny_qwen2(), ranks=(2, 4), alphas=(8, 8), train_base=False, freeze_others=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


def test_matches_peft_rslora_and_merge_and_unload():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tiny_qwen2()
    ids = batch()
    ours = molf.wrap(copy.deepcopy(base), ranks=(8,), alphas=(16,), train_base=False, backend="eager")
    cfg = peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.0,
                          target_modules=list(molf.DEFAULT_TARGETS), init_lora_weights=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    # Same (random, nonzero) adapter weights in both.
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, molf.MoLFLinear):
                m.lora_B[0].normal_(std=0.1)
                pm = theirs.base_model.model.get_submodule(name)
                pm.lora_A["default"].weight.copy_(m.lora_A[0])
                pm.lora_B["default"].weight.copy_(m.lora_B[0])
                assert math.isclose(pm.scaling["default"], m.scalings[0])
    assert_close(ours(ids).logits, theirs(ids).logits, 1e-5, "peft logits")
    merged_theirs = theirs.merge_and_unload()
    merged_ours = molf.merge(ours)
    assert not any(isinstance(m, molf.MoLFLinear) for m in merged_ours.modules())
    for (n1, p1), (n2, p2) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        assert n1 == n2
        assert_close(p1, p2, 1e-6, n1)
    # the merged layers train as peft leaves them: a frozen base stays frozen once merged
    merged_names = [n for n, m in merged_ours.named_modules() if n.rpartition(".")[2] in molf.DEFAULT_TARGETS]
    assert merged_names and all(not merged_theirs.get_submodule(n).weight.requires_grad for n in merged_names)
    assert not any(p.requires_grad for n in merged_names for p in merged_ours.get_submodule(n).parameters())


# -- bad input: clear errors, nothing changed --

def test_wrap_without_match_names_target_modules():
    model = tiny_qwen2()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"target_modules.*q_proj"):
        molf.wrap(model, target_modules=("nope",))
    assert not any(isinstance(m, molf.MoLFLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("other", [dict(alphas=(32,)), dict(rslora=False), dict(ranks=(2,), alphas=(8,))],
                         ids=["alphas", "rslora", "ranks"])
def test_load_refuses_a_model_wrapped_with_another_scaling(tmp_path, other):
    """molf.load into a model wrapped with other alphas or rslora loaded without a shape error and computed
    another function (0.59 of the logits with alpha 32 for 8), silently; now a ValueError naming the layer."""
    model = molf.wrap(tiny_qwen2(), ranks=(4,), alphas=(8,), backend="eager")
    randomize_lora_B(model)
    molf.save_pretrained(model, tmp_path)
    kw = dict(dict(ranks=(4,), alphas=(8,)), **other)
    fresh = molf.wrap(tiny_qwen2(seed=3), backend="eager", **kw)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"saved with model\.layers\.0\.self_attn\.q_proj wrapped as ranks=\[4\], "
                                         r"alphas=\[8\.0\], rslora=True, but this model's is"):
        molf.load(fresh, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing loaded
    same = molf.wrap(tiny_qwen2(seed=3), ranks=(4,), alphas=(8,), backend="eager", dropout=0.1)  # dropout may differ
    molf.load(same, tmp_path)
    ids = batch()
    assert torch.equal(same.eval()(ids).logits, model.eval()(ids).logits)


def test_wrap_refuses_weights_offloaded_by_a_device_map(tmp_path):
    """accelerate's offloading keeps placeholders (meta) in the modules between forwards: wrap used to warn about
    the meta device (and suggest reset_lora_parameters) and the first forward failed deep inside."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    plain = tiny_qwen2()
    plain.save_pretrained(tmp_path / "plain")
    molf.save_pretrained(molf.wrap(copy.deepcopy(plain), ranks=(2,), alphas=(4,), backend="eager"), tmp_path / "molf")
    budget = {"cpu": "20KB", **({0: "20KB"} if torch.cuda.is_available() else {})}  # too small: all to disk
    offload = dict(device_map="auto", max_memory=budget, offload_folder=str(tmp_path / "offload"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", **offload)
    with pytest.raises(ValueError, match=r"weights offloaded by its device_map \(model\.embed_tokens, \d+ modules: "
                                         r"hf_device_map \{'': 'disk'\}\)"):
        molf.wrap(model, ranks=(2,), alphas=(4,), backend="eager")
    assert not any(isinstance(m, molf.MoLFLinear) for m in model.modules())
    with pytest.raises(ValueError, match="offloaded by its device_map"):
        molf.from_pretrained(tmp_path / "molf", **offload)
    on_cpu = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", device_map="cpu")  # one device: wraps
    molf.wrap(on_cpu, ranks=(2,), alphas=(4,), backend="eager")
    ids = batch()
    assert_close(on_cpu(ids).logits, plain(ids).logits, 1e-6, "logits")


def test_wrap_refuses_a_linear_shared_by_two_places_and_wraps_one_inside_a_shared_block():
    """One nn.Linear set at two places: wrap used to replace one of them and leave the other computing the plain
    layer. A linear inside a block used at several places is one place (the block's attribute): wrapped once,
    every use of the block sees the experts."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 8)
            self.down = nn.Linear(8, 8)
            self.blocks = nn.ModuleList([nn.ModuleDict(dict(proj=self.up)), nn.ModuleDict(dict(proj=nn.Linear(8, 8)))])

        def forward(self, x):
            return self.down(self.blocks[0]["proj"](self.up(x)))

    model = Tied()
    with pytest.raises(ValueError, match=r"up is the same module as blocks\.0\.proj \(2 places"):
        molf.wrap(model, ranks=(2,), alphas=(4,), target_modules="all-linear", backend="eager")
    assert not any(isinstance(m, molf.MoLFLinear) for m in model.modules())
    molf.wrap(model, ranks=(2,), alphas=(4,), target_modules=["down", "blocks.1.proj"], backend="eager")
    assert type(model.up) is nn.Linear and isinstance(model.down, molf.MoLFLinear)

    class SharedBlock(nn.Module):
        def __init__(self):
            super().__init__()
            block = nn.ModuleDict(dict(proj=nn.Linear(8, 8)))
            self.layers = nn.ModuleList([block, block])

        def forward(self, x):
            return self.layers[1]["proj"](self.layers[0]["proj"](x))

    model = SharedBlock()
    plain_keys = list(model.state_dict())
    molf.wrap(model, ranks=(2,), alphas=(4,), target_modules="all-linear", backend="eager")
    assert isinstance(model.layers[1]["proj"], molf.MoLFLinear) and model.layers[0]["proj"] is model.layers[1]["proj"]
    from molf.checkpoint import merged_state_dict  # the merged checkpoint: plain names under both paths
    assert sorted(merged_state_dict(model)) == sorted(plain_keys)


@pytest.mark.parametrize("kw, match", [
    (dict(ranks=(4, 8), alphas=(8,)), "same length"),
    (dict(ranks=(0,), alphas=(8,)), "rank"),
    (dict(ranks=(4,), alphas=(0,)), "alpha"),
    (dict(ranks=(4,), alphas=(-1.0,)), "alpha"),
    (dict(ranks=(4,), alphas=(8,), dropout=1.0), "dropout"),
    (dict(ranks=(4,), alphas=(8,), dropout=-0.1), "dropout"),
    (dict(ranks=(4,), alphas=(8,), backend="cuda"), "backend"),
], ids=["lengths", "rank0", "alpha0", "alpha-neg", "dropout1", "dropout-neg", "backend"])
def test_bad_config_raises_before_changing_anything(kw, match):
    model = tiny_qwen2()
    with pytest.raises(ValueError, match=match):
        molf.wrap(model, **kw)
    assert not any(isinstance(m, molf.MoLFLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=match):
        molf.MoLFLinear(nn.Linear(8, 8), **kw)


def test_wrong_input_width_names_both_shapes():
    layer = molf.MoLFLinear(nn.Linear(8, 4), ranks=(2,), alphas=(4,))
    with pytest.raises(ValueError, match=r"\(3, 7\).*in_features = 8.*\(4, 8\)"):
        layer(torch.randn(3, 7))


def test_mixed_dtype_is_a_type_error():
    layer = molf.MoLFLinear(nn.Linear(8, 4), ranks=(2,), alphas=(4,))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 8, dtype=torch.float64))


def test_rank_above_min_dim_warns_but_works():
    with pytest.warns(UserWarning, match="exceeds"):
        layer = molf.MoLFLinear(nn.Linear(8, 4), ranks=(6,), alphas=(4,))
    assert layer(torch.randn(2, 8)).shape == (2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        molf.MoLFLinear(nn.Linear(8, 4), ranks=(4,), alphas=(4,))


def test_backend_resolution(monkeypatch):
    from molf import _backend
    cpu = torch.device("cpu")
    monkeypatch.delenv("MOLF_BACKEND", raising=False)
    assert _backend.resolve("auto", cpu) == "eager"
    monkeypatch.setenv("MOLF_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors take the kernels only under the interpreter
    assert _backend.resolve("auto", cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' got tensors on cpu"):
        _backend.resolve("auto", cpu)
    assert _backend.resolve("eager", cpu) == "eager"
    monkeypatch.setenv("MOLF_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MOLF_BACKEND"):
        _backend.resolve("auto", cpu)
