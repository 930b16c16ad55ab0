"""wrap on real architectures built tiny from configs: every target wrapped or a clear refusal, never a
partial wrap; targets as peft names them; drop-in attributes."""
import copy
import logging
import re

import pytest
import torch
from torch import nn

import molf
from helpers import assert_close, batch, config_for, device_for, randomize_lora_B, tiny_qwen2
from optim_utils import train_step

ARCHS = ["qwen2", "qwen3", "llama", "mistral", "gemma3", "phi3", "phi", "starcoder2", "gpt_neox", "glm4", "nemotron",
         "falcon"]
# Decoders that name their projections as Llama does, built from their configs by model type (skipped where the
# installed transformers lacks one), with the fields some need beyond TINY: the same checks as ARCHS.
SAME_NAMES = dict.fromkeys(["gemma", "gemma2", "olmo", "olmo2", "olmo3", "granite", "smollm3", "cohere", "cohere2",
                            "exaone", "exaone4", "ernie4_5", "seed_oss", "hunyuan_v1_dense", "helium", "stablelm",
                            "glm", "ministral", "vaultgemma", "bitnet"], {})
# Gemma 4: per-layer inputs (their small gate and projections stay out of the defaults, as in peft), full-attention
# layers with a wider head, the last two layers reusing the keys and values of the first two
SAME_NAMES["gemma4_text"] = dict(vocab_size_per_layer_input=64, hidden_size_per_layer_input=8, num_hidden_layers=4,
                                 sliding_window=16, per_layer_config={"01": {"head_dim": 16}, "03": {"head_dim": 16}},
                                 num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2)


TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny(arch):
    import transformers as tf
    if arch in SAME_NAMES:
        known = config_for(arch).to_dict()  # (hasattr raises on Gemma 4's per-layer head_dim)
        fields = {k: v for k, v in dict(TINY, head_dim=8).items() if k in known}
        cfg = config_for(arch, **{**fields, **SAME_NAMES[arch]})
        torch.manual_seed(0)
        return tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    cfg = {
        "qwen2": lambda: tf.Qwen2Config(**TINY),
        "llama": lambda: tf.LlamaConfig(**TINY),
        "mistral": lambda: tf.MistralConfig(**TINY),
        "gemma3": lambda: tf.Gemma3TextConfig(**TINY, head_dim=8, sliding_window=16),
        "phi3": lambda: tf.Phi3Config(**TINY),
        "qwen3": lambda: tf.Qwen3Config(**TINY, head_dim=8),
        "phi": lambda: tf.PhiConfig(**TINY),
        "starcoder2": lambda: tf.Starcoder2Config(**TINY),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**TINY),
        "glm4": lambda: tf.Glm4Config(**TINY),
        "nemotron": lambda: tf.NemotronConfig(**TINY),  # an MLP without gate_proj
        "falcon": lambda: tf.FalconConfig(**TINY),  # FalconLinear layers (see test_falcon_linear_is_a_linear)
    }[arch]()
    cls = {"qwen2": tf.Qwen2ForCausalLM, "llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM,
           "gemma3": tf.Gemma3ForCausalLM, "phi3": tf.Phi3ForCausalLM, "qwen3": tf.Qwen3ForCausalLM,
           "phi": tf.PhiForCausalLM, "starcoder2": tf.Starcoder2ForCausalLM, "gpt_neox": tf.GPTNeoXForCausalLM,
           "glm4": tf.Glm4ForCausalLM, "nemotron": tf.NemotronForCausalLM, "falcon": tf.FalconForCausalLM}[arch]
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("arch", ARCHS + list(SAME_NAMES))
def test_default_targets_wrap_every_linear_but_the_head(arch, caplog):
    """...and the linear layers they leave out are named on the `molf` logger (INFO)."""
    model = tiny(arch)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    ids = batch()
    with torch.no_grad():
        want = model(ids).logits
    with caplog.at_level(logging.INFO, logger="molf"):
        molf.wrap(model, ranks=(4,), alphas=(8,), backend="eager")
    wrapped = {n for n, m in model.named_modules() if isinstance(m, molf.MoLFLinear)}
    left = {"gemma4_text": {"per_layer_input_gate", "per_layer_projection", "per_layer_model_projection"}}.get(arch)
    assert {n.rpartition(".")[2] for n in linears - wrapped} == (left or set()), sorted(linears - wrapped)
    said = [r.getMessage() for r in caplog.records if "default targets" in r.getMessage()]
    assert len(said) == bool(left) and (not left or f"leave out {len(linears - wrapped)} ({', '.join(sorted(left))}"
                                        in said[0]), said
    assert isinstance(model.lm_head, nn.Linear)
    with torch.no_grad():
        assert_close(model(ids).logits, want, 1e-6, "a fresh wrap computes what the model did")
    again = tiny(arch)
    molf.wrap(again, ranks=(4,), alphas=(8,), target_modules="all-linear", backend="eager")
    assert {n for n, m in again.named_modules() if isinstance(m, molf.MoLFLinear)} == linears


def test_phi3_with_llama_names_is_an_error_not_a_partial_wrap():
    model = tiny("phi3")
    with pytest.raises(ValueError, match=r"\['q_proj', 'k_proj', 'v_proj', 'gate_proj', 'up_proj'\] match no "
                                         r"module.*gate_up_proj.*qkv_proj"):
        molf.wrap(model, ranks=(4,), alphas=(8,), target_modules=molf.DEFAULT_TARGETS)
    assert not any(isinstance(m, molf.MoLFLinear) for m in model.modules())


def test_multimodal_defaults_wrap_the_language_model_only(tmp_path):
    """Gemma-3 4B+ loads as Gemma3ForConditionalGeneration: the defaults are its language model's projections
    (its SigLIP tower also has q/k/v_proj, but out_proj/fc1/fc2: matching there would wrap half of it)."""
    import transformers as tf
    text = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=16)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                          boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(cfg).eval()
    ids = batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    lm = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".language_model." in n}
    vision_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "vision" in n}
    pooled = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    assert pooled and pooled <= vision_linears  # SigLIP's pooling head: read by weight, left out of all-linear
    everything = copy.deepcopy(model)
    molf.wrap(model, ranks=(4,), alphas=(8,), backend="eager")
    assert {n for n, _ in molf.layer.molf_layers(model)} == lm and len(lm) == 14
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, want, 1e-6, "a fresh wrap computes what the model did")
    molf.wrap(everything, ranks=(4,), alphas=(8,), target_modules="all-linear", backend="eager")
    assert vision_linears - pooled <= {n for n, _ in molf.layer.molf_layers(everything)}
    molf.save_pretrained(model, tmp_path)
    back = molf.from_pretrained(tmp_path, backend="eager").eval()
    assert {n for n, _ in molf.layer.molf_layers(back)} == lm


@pytest.mark.parametrize("model_type", ["idefics3", "smolvlm"])
def test_vlm_whose_language_model_is_text_model_wraps_only_it(model_type, tmp_path):
    """Idefics3 and SmolVLM name their language model `text_model`: the defaults are its projections (before: its
    SigLIP tower's q/k/v_proj were wrapped too, not its out_proj, fc1, fc2: half of its attention, silently)."""
    import transformers as tf
    text = dict(TINY, head_dim=8, model_type="llama")
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)
    cfg = config_for(model_type, text_config=text, vision_config=vision)
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(cfg).eval()
    ids = batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    lm = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".text_model." in n}
    molf.wrap(model, ranks=(4,), alphas=(8,), backend="eager")
    assert {n for n, _ in molf.layer.molf_layers(model)} == lm and len(lm) == 14
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, want, 1e-6, "a fresh wrap computes what the model did")
    molf.save_pretrained(model, tmp_path)
    back = molf.from_pretrained(tmp_path, backend="eager")
    assert type(back) is type(model) and {n for n, _ in molf.layer.molf_layers(back)} == lm


def test_gemma4_multimodal_defaults_wrap_the_language_model_only(tmp_path):
    """Gemma 4 loads as Gemma4ForConditionalGeneration: the defaults are its language model's projections (its
    vision tower's q/k/v/o_proj and gate/up/down_proj are modules holding a `linear`, left alone)."""
    import transformers as tf
    text = dict(vocab_size=300, vocab_size_per_layer_input=300, hidden_size=32, hidden_size_per_layer_input=8,
                intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=64, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8)
    cfg = config_for("gemma4", text_config=text, vision_config=vision, image_token_id=299, boi_token_id=297,
                     eoi_token_id=298, audio_token_id=296, boa_token_id=295, eoa_token_index=294, video_token_id=293)
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(cfg).eval()
    ids = batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    lm = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".language_model.layers." in n
          and ".per_layer_" not in n}
    tower = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".vision_tower." in n}
    molf.wrap(model, ranks=(4,), alphas=(8,), backend="eager")
    assert {n for n, _ in molf.layer.molf_layers(model)} == lm and len(lm) == 14 and tower
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, want, 1e-6, "a fresh wrap computes what the model did")
    molf.save_pretrained(model, tmp_path)
    back = molf.from_pretrained(tmp_path, backend="eager").eval()
    assert type(back) is type(model) and {n for n, _ in molf.layer.molf_layers(back)} == lm


MOE = {"mixtral": ["k_proj", "o_proj", "q_proj", "v_proj"],
       # Qwen2-MoE's shared expert is a plain MLP: the defaults matched it and left the routed experts out
       "qwen2_moe": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "shared_expert_gate", "up_proj",
                     "v_proj"]}


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_moe_experts_are_not_linear_layers_so_the_defaults_are_an_error_naming_what_is(model_type):
    import transformers as tf
    cfg = config_for(model_type, vocab_size=64, hidden_size=32, intermediate_size=48,
                     moe_intermediate_size=48, shared_expert_intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts=4,
                     num_experts_per_tok=2)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    experts = r"model\.layers\.0\.mlp\.experts: gate_up_proj \[4, 96, 32\], down_proj \[4, 32, 48\]; 2 such"
    named = re.escape(str(MOE[model_type]))
    with pytest.raises(ValueError, match=rf"mixture of experts: its experts \({experts}.*named {named}"):
        molf.wrap(model, ranks=(4,), alphas=(8,))
    if model_type == "mixtral":
        with pytest.raises(ValueError, match=r"\['gate_proj'\] match no module.*its MoE experts, e\.g\. "
                                             r"model\.layers\.0\.mlp\.experts, are 3-D"):
            molf.wrap(model, ranks=(4,), alphas=(8,), target_modules=["q_proj", "gate_proj"])
    assert not any(isinstance(m, molf.MoLFLinear) for m in model.modules())
    molf.wrap(model, ranks=(4,), alphas=(8,), target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert len(molf.layer.molf_layers(model)) == 8


@pytest.mark.parametrize("model_type", ["nemotron", "apertus", "modernbert-decoder"])
def test_defaults_skip_a_projection_the_architecture_lacks_but_never_wrap_part_of_it(model_type):
    """Nemotron's and Apertus' MLPs have no gate_proj: the other defaults cover every linear layer, so they are
    the targets (was an error: "['gate_proj'] match no module", though the user passed None). ModernBERT's
    decoder names its projections otherwise (Wi, Wo, dense): the defaults would wrap q/k/v only, so that stays an
    error."""
    import transformers as tf
    cfg = config_for(model_type, vocab_size=64, hidden_size=32, intermediate_size=48, head_dim=8,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    if model_type == "modernbert-decoder":
        with pytest.raises(ValueError, match=r"architecture \(modernbert-decoder\): \['o_proj', 'gate_proj', "
                                             r"'up_proj', 'down_proj'\] match no module.*'Wi', 'Wo', 'dense'.*\]\); "
                                             r"pass target_modules naming this model's projections"):
            molf.wrap(model, ranks=(4,), alphas=(8,))
        assert not molf.layer.molf_layers(model)
        return
    molf.wrap(model, ranks=(4,), alphas=(8,), backend="eager")
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith(".base")]
    assert plain == ["lm_head"]
    assert {n.rpartition(".")[2] for n, _ in molf.layer.molf_layers(model)} == {"q_proj", "k_proj", "v_proj",
                                                                              "o_proj", "up_proj", "down_proj"}


# Architectures whose projections have their own names (molf.layer.ARCH_TARGETS), built tiny from their configs;
# each: (config fields beyond the common ones, the linear layers the defaults leave to the user).
NAMED_OTHERWISE = {
    "bloom": ({}, set()), "persimmon": ({}, set()), "gpt_bigcode": ({}, set()), "xglm": ({}, set()),
    "biogpt": ({}, set()), "mpt": ({}, set()), "nanochat": ({}, set()), "lfm2": ({}, set()),
    "gpt_neo": ({"attention_types": [[["global", "local"], 1]]}, set()),  # one pair of layers
    "opt": ({"word_embed_proj_dim": 16}, {"project_in", "project_out"}),  # between the embeddings and the blocks
    "gptj": ({"rotary_dim": 4}, set()), "codegen": ({"rotary_dim": 4, "n_ctx": 64}, set()),
    "minicpm3": ({"q_lora_rank": 16, "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4,
                  "v_head_dim": 8, "head_dim": 4}, set()),
    "youtu": ({"q_lora_rank": None, "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4,
               "v_head_dim": 8, "head_dim": 4}, set()),  # no low-rank query pair: q_proj
    "lfm3": ({"num_hidden_layers": 4}, {"g_proj"}),  # layer 2 attends, the others are short convs
    "olmo_hybrid": ({}, {"a_proj", "b_proj"}),  # Gated DeltaNet, then attention; its per-head gates left out
    "qwen3_5_text": ({"num_hidden_layers": 4, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
                      "linear_key_head_dim": 8, "linear_value_head_dim": 8}, {"in_proj_a", "in_proj_b"}),
    "zamba2": ({"num_hidden_layers": 4, "hybrid_layer_ids": [1, 3], "layer_types": ["linear_attention", "hybrid"] * 2,
                "num_mem_blocks": 1, "mamba_d_state": 8, "mamba_headdim": 8, "n_mamba_heads": 8,
                "attention_head_dim": 16}, {"0", "1"}),  # its shared block's own adapters (Linear pairs 0 and 1)
}


@pytest.mark.parametrize("model_type", sorted(NAMED_OTHERWISE))
def test_architectures_named_otherwise_wrap_with_their_defaults(model_type, caplog):
    """Was an error ("the default target_modules ... match no module"): the defaults now name each decoder
    block's linear layers (per-head gates, Qwen3.5's in_proj_a/b and LFM3's g_proj, and OPT's embedding
    projections left out), the fresh wrap computes what the model did and every expert gets a gradient."""
    import transformers as tf
    extra, left = NAMED_OTHERWISE[model_type]
    # TINY under the other names some of these configs use (GPT-2 style n_embd, OPT's ffn_dim)
    common = dict(TINY, head_dim=8, n_embd=32, n_layer=2, n_head=4, n_positions=64, ffn_dim=48)
    known = config_for(model_type)
    cfg = config_for(model_type, **{**{k: v for k, v in common.items() if hasattr(known, k)}, **extra})
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    linears = {n for n, _ in molf.layer._match_targets(model, "all-linear")}
    ids = batch()
    with torch.no_grad():
        want = model(ids).logits
    with caplog.at_level(logging.INFO, logger="molf"):
        molf.wrap(model, ranks=(4,), alphas=(8,), backend="eager")
    wrapped = {n for n, _ in molf.layer.molf_layers(model)}
    assert wrapped <= linears and {n.rpartition(".")[2] for n in linears - wrapped} == left
    assert len(wrapped) >= 4 * cfg.num_hidden_layers
    said = [r.getMessage() for r in caplog.records if "default targets" in r.getMessage()]
    assert len(said) == bool(left) and (not left or f"({', '.join(sorted(left))}, e.g." in said[0]), said
    with torch.no_grad():
        assert_close(model(ids).logits, want, 1e-6, "a fresh wrap computes what the model did")
    randomize_lora_B(model)
    model(ids, labels=ids).loss.backward()
    assert not [n for n, m in molf.layer.molf_layers(model) if any(p.grad is None for p in (*m.lora_A, *m.lora_B))]


def test_an_architecture_this_transformers_lacks_is_a_skip_with_the_reason():
    with pytest.raises(pytest.skip.Exception, match=r"transformers .* has no model type 'no_such_model'"):
        config_for("no_such_model")


def test_target_forms_suffix_regex_and_unmatched_names():
    model = molf.wrap(tiny_qwen2(), ranks=(4,), alphas=(8,), target_modules=r".*\.self_attn\.(q|v)_proj")
    names = sorted(n for n, m in model.named_modules() if isinstance(m, molf.MoLFLinear))
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    one = molf.wrap(tiny_qwen2(), ranks=(4,), alphas=(8,), target_modules=["layers.1.mlp.down_proj"])
    assert [n for n, m in one.named_modules() if isinstance(m, molf.MoLFLinear)] == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match=r"\['vv_proj'\] match no module"):
        molf.wrap(tiny_qwen2(), ranks=(4,), alphas=(8,), target_modules=("q_proj", "vv_proj"))
    with pytest.raises(ValueError, match="matches no module"):
        molf.wrap(tiny_qwen2(), ranks=(4,), alphas=(8,), target_modules=r"nothing\..*")
    with pytest.raises(ValueError, match="not an nn.Linear"):
        molf.wrap(tiny_qwen2(), ranks=(4,), alphas=(8,), target_modules=["mlp"])
    with pytest.raises(ValueError, match=r"names the output head \(lm_head\), which molf never wraps"):
        molf.wrap(tiny_qwen2(), ranks=(4,), alphas=(8,), target_modules=["q_proj", "lm_head"])  # was "match no module"


def test_wrapping_twice_is_a_clear_error():
    model = molf.wrap(tiny_qwen2(), ranks=(4,), alphas=(8,))
    with pytest.raises(ValueError, match=r"already wrapped \(14 MoLF layers"):
        molf.wrap(model, ranks=(4,), alphas=(8,))


def test_gpt2_conv1d_is_refused_with_the_reason():
    import transformers as tf
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, bos_token_id=0,
                                             eos_token_id=0))
    for targets in (None, "all-linear"):
        with pytest.raises(ValueError, match="Conv1D.*in_features x out_features"):
            molf.wrap(model, ranks=(4,), alphas=(8,), target_modules=targets)
    assert not any(isinstance(m, molf.MoLFLinear) for m in model.modules())


class PlainSubclass(nn.Linear):
    """Behaves as an nn.Linear (no forward of its own): wrapped."""


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_linear_subclasses_wrapped_when_they_behave_as_one():
    model = nn.Sequential()
    model.add_module("q_proj", PlainSubclass(4, 4))
    molf.wrap(model, ranks=(2,), alphas=(4,), target_modules=["q_proj"])
    assert isinstance(model.q_proj, molf.MoLFLinear)
    odd = nn.Sequential()
    odd.add_module("q_proj", OwnForward(4, 4))
    with pytest.raises(ValueError, match=r"q_proj is a .*OwnForward, a subclass of nn.Linear with its own forward"):
        molf.wrap(odd, ranks=(2,), alphas=(4,), target_modules="all-linear")


@pytest.mark.parametrize("bias", [True, False])
def test_falcon_linear_is_a_linear(bias):
    """molf wraps the nn.Linear subclasses of LINEAR_FORWARDS as nn.Linear (their forward computes x W^T + b in
    other ops; before, Falcon's FalconLinear was refused, so no Falcon model could be wrapped): their installed
    forward still gives F.linear's values, and each wraps as an nn.Linear (Falcon's training and checkpoints: the
    "falcon" cases of ARCHS)."""
    import importlib
    for path in molf.layer.LINEAR_FORWARDS:
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        torch.manual_seed(0)
        lin, x = cls(12, 5, bias=bias), torch.randn(3, 7, 12)
        with torch.no_grad():
            assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias), 1e-6, path)
        model = nn.Sequential()
        model.add_module("dense", lin)
        molf.wrap(model, ranks=(2,), alphas=(4,), target_modules=["dense"], backend="eager")
        assert isinstance(model.dense, molf.MoLFLinear) and model.dense.base is lin
        with torch.no_grad():
            assert_close(model(x), nn.functional.linear(x, lin.weight, lin.bias), 1e-6, f"{path} wrapped")


@pytest.mark.parametrize("how", ["forward hook", "forward pre-hook", "backward hook", "weight_norm", "parametrize",
                                 "replaced forward"])
@pytest.mark.filterwarnings("ignore:.*weight_norm. is deprecated:FutureWarning")
def test_linears_with_hooks_or_parametrizations_are_refused(how):
    """molf computes the base product in its own kernels and never calls the nn.Linear's forward: a hook on it
    would silently stop running (weight_norm's pre-hook recomputes the weight from weight_g and weight_v, so the
    trained g and v would never reach the output), a parametrization would be trained around."""
    model = tiny_qwen2()
    q = model.model.layers[1].self_attn.q_proj
    if how == "forward hook":
        q.register_forward_hook(lambda mod, args, out: None)
    elif how == "forward pre-hook":
        q.register_forward_pre_hook(lambda mod, args: None)
    elif how == "backward hook":
        q.register_full_backward_hook(lambda mod, gin, gout: None)
    elif how == "weight_norm":
        model.model.layers[1].self_attn.q_proj = q = nn.utils.weight_norm(q)
    elif how == "parametrize":
        nn.utils.parametrize.register_parametrization(q, "weight", nn.Identity())
    else:
        q.forward = lambda x: nn.functional.linear(x, q.weight, q.bias)
    what = {"weight_norm": "forward pre-hook", "parametrize": "parametrized tensors (weight"}.get(how, how)
    with pytest.raises(ValueError, match=rf"model.layers.1.self_attn.q_proj has (a )?{re.escape(what)}"):
        molf.wrap(model, ranks=(4,), alphas=(8,), backend="eager")
    assert not any(isinstance(m, molf.MoLFLinear) for m in model.modules())
    with pytest.raises(TypeError, match=rf"base has (a )?{re.escape(what)}"):
        molf.MoLFLinear(q, ranks=(4,), alphas=(8,))
    molf.wrap(model, ranks=(4,), alphas=(8,), target_modules=["k_proj", "v_proj"], backend="eager")  # the others


def test_multihead_attention_out_proj_is_left_out_or_refused():
    """nn.MultiheadAttention reads out_proj.weight itself and never calls out_proj: wrapped, its experts never
    applied, silently. "all-linear" leaves it out (the layer's own linears wrap); naming it is an error."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    molf.wrap(layer, ranks=(4,), alphas=(8,), target_modules="all-linear", backend="eager")
    assert [n for n, m in layer.named_modules() if isinstance(m, molf.MoLFLinear)] == ["linear1", "linear2"]
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    with pytest.raises(ValueError, match=r"self_attn.out_proj: its parent \(MultiheadAttention\) reads its weight "
                                         r"directly without calling the layer"):
        molf.wrap(layer, ranks=(4,), alphas=(8,), target_modules=["out_proj", "linear1"], backend="eager")
    assert not any(isinstance(m, molf.MoLFLinear) for m in layer.modules())


def test_mamba_mixer_weights_its_kernels_read_are_left_out_or_refused():
    """Mamba's mixer multiplies by dt_proj.weight and hands x_proj, dt_proj and out_proj weights to its CUDA kernel
    (mamba_inner_fn): only in_proj is called as a module. "all-linear" and the defaults wrap in_proj alone; naming
    another is an error."""
    import transformers as tf
    cfg = tf.MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2)
    model = tf.MambaForCausalLM(cfg)
    molf.wrap(model, ranks=(2,), alphas=(4,), target_modules="all-linear", backend="eager")
    assert [n for n, _ in molf.layer.molf_layers(model)] == [f"backbone.layers.{i}.mixer.in_proj" for i in (0, 1)]
    ids = batch()
    model(ids, labels=ids).loss.backward()
    assert all(m.lora_B[0].grad is not None for _, m in molf.layer.molf_layers(model))
    model = tf.MambaForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"backbone.layers.0.mixer.dt_proj: its parent \(MambaMixer\) reads its "
                                         r"weight directly"):
        molf.wrap(model, ranks=(2,), alphas=(4,), target_modules=["in_proj", "dt_proj"])
    molf.wrap(model, ranks=(2,), alphas=(4,))
    assert [n for n, _ in molf.layer.molf_layers(model)] == [f"backbone.layers.{i}.mixer.in_proj" for i in (0, 1)]


def test_unsupported_quantized_bases_are_refused_naming_the_layer():
    """Non-float weights and bitsandbytes layers other than Linear4bit/Linear8bitLt (tests/test_quant.py
    covers those); the class below stands for one without importing bitsandbytes."""
    model = tiny_qwen2()
    q = model.model.layers[0].self_attn.q_proj
    q.weight = nn.Parameter(torch.zeros(q.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj is a quantized layer.*that molf cannot "
                                         r"wrap: quantized bases are supported as bitsandbytes Linear4bit"):
        molf.wrap(model, ranks=(4,), alphas=(8,), train_base=False)

    class SwitchBackLinear(nn.Linear):
        pass
    SwitchBackLinear.__module__ = "bitsandbytes.nn.triton_based_modules"
    model = tiny_qwen2()
    model.model.layers[1].mlp.down_proj = SwitchBackLinear(48, 32, bias=False)
    with pytest.raises(ValueError, match=r"layers.1.mlp.down_proj is a quantized layer \(bitsandbytes"):
        molf.wrap(model, ranks=(4,), alphas=(8,))
    assert not any(isinstance(m, molf.MoLFLinear) for m in model.modules())


def test_peft_models_are_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_qwen2(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="peft model.*merge_and_unload"):
        molf.wrap(model, ranks=(4,), alphas=(8,))


def test_a_model_holding_an_adapter_transformers_loaded_is_refused_with_what_to_do(tmp_path):
    """from_pretrained of an adapter's folder: transformers loads the base and puts peft's layers in it; the
    model has no merge_and_unload (the peft model's remedy), so the error says how to merge it with peft."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    tiny_qwen2().save_pretrained(tmp_path / "base")
    adapter = peft.get_peft_model(tiny_qwen2(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    adapter.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    adapter.save_pretrained(tmp_path / "adapter")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"holds a peft adapter that transformers loaded into it .* "
                                         r"peft.PeftModel.from_pretrained\(base, adapter\).merge_and_unload\(\)"):
        molf.wrap(model, ranks=(4,), alphas=(8,))
    assert not any(isinstance(m, molf.MoLFLinear) for m in model.modules())


def test_train_base_true_trains_a_frozen_base_and_dropin_attributes(capsys):
    model = tiny_qwen2()
    model.requires_grad_(False)
    molf.wrap(model, ranks=(4,), alphas=(8,), train_base=True)
    q = model.model.layers[0].self_attn.q_proj
    assert q.expert_names == ["full", "lora_r4"] and q.base.weight.requires_grad
    assert q.weight is q.base.weight and q.bias is q.base.bias and q.weight.dtype == torch.float32
    with pytest.raises((AttributeError, KeyError)):
        q.weight = nn.Parameter(torch.zeros(1))
    counts = molf.trainable_parameters(model)
    assert counts["lora_r4"] == 2 * 7 * 0 + sum(a.numel() + b.numel() for m in model.modules()
                                                if isinstance(m, molf.MoLFLinear) for a, b in zip(m.lora_A, m.lora_B))
    assert counts["other"] == 0 and counts["trainable"] == counts["full"] + counts["lora_r4"]
    molf.print_trainable_parameters(model)
    assert "trainable params:" in capsys.readouterr().out


def test_copy_of_a_wrapped_model_is_independent():
    model = molf.wrap(tiny_qwen2(), ranks=(4,), alphas=(8,))
    clone = copy.deepcopy(model)
    assert clone.model.layers[0].self_attn.q_proj.weight is not model.model.layers[0].self_attn.q_proj.weight


@pytest.mark.parametrize("arch", ARCHS + list(SAME_NAMES))
def test_trained_checkpoint_loads_as_a_plain_model_and_exactly_with_molf(arch, tmp_path):
    from transformers import AutoModelForCausalLM
    model = molf.wrap(tiny(arch), ranks=(4,), alphas=(8,), backend="eager").train()
    opt = molf.MoLFAdamW(model, lr=1e-2, backend="eager")
    ids = batch()
    for _ in range(2):
        train_step(model, opt, ids)
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    molf.save_pretrained(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    back = molf.from_pretrained(tmp_path, backend="eager").eval()
    with torch.no_grad():
        assert_close(plain(ids).logits, trained, 1e-5, "merged checkpoint under plain transformers")
        assert torch.equal(back(ids).logits, trained)


def test_tied_bases_zamba2_molf_e_trains_and_reloads_exactly_and_molf_is_refused(tmp_path):
    """Zamba2's shared attention: each hybrid layer has its own modules whose weights are one tensor (tied).
    MoLF-E (the tied bases frozen) trains a LoRA per layer; its checkpoint reloads with the bases tied again
    (the merged checkpoint unties them: each layer's merged weight differs; molf.from_pretrained failed on the
    missing names). MoLF, whose full expert would be two layers' (its moments advanced twice a step, seen), is
    refused by MoLFAdamW."""
    import transformers as tf
    cfg = config_for("zamba2", hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=64, mamba_d_state=8, mamba_headdim=8,
                     n_mamba_heads=8, intermediate_size=48, hybrid_layer_ids=[1, 3],
                     layer_types=["linear_attention", "hybrid"] * 2, num_mem_blocks=1,
                     attention_head_dim=16, use_shared_attention_adapter=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    q = lambda m, i: m.model.layers[i].shared_transformer.self_attn.q_proj  # noqa: E731
    torch.manual_seed(0)
    full = molf.wrap(tf.AutoModelForCausalLM.from_config(cfg), ranks=(4,), alphas=(8,), target_modules=targets,
                     backend="eager")
    assert q(full, 1).base.weight is q(full, 3).base.weight and q(full, 1) is not q(full, 3)
    with pytest.raises(ValueError, match=r"the base weight of model\.layers\.3\.shared_transformer\.self_attn\."
                                         r"q_proj is the same tensor as model\.layers\.1\..*\(tied weights\)"):
        molf.MoLFAdamW(full, lr=1e-2)
    model = molf.wrap(tf.AutoModelForCausalLM.from_config(cfg), ranks=(2, 4), alphas=(8, 8), train_base=False,
                      target_modules=targets, freeze_others=True, backend="eager")
    opt = molf.MoLFAdamW(model, lr=1e-2, backend="eager")
    ids = batch()
    for _ in range(2):
        train_step(model, opt, ids)
    assert not torch.equal(q(model, 1).lora_B[0], q(model, 3).lora_B[0])  # a LoRA per layer
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    molf.save_pretrained(model, tmp_path)
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    back = molf.from_pretrained(tmp_path, backend="eager").eval()
    assert q(back, 1).base.weight is q(back, 3).base.weight  # tied again
    with torch.no_grad():
        assert_close(plain(ids).logits, trained, 1e-5, "merged checkpoint under plain transformers")
        assert torch.equal(back(ids).logits, trained)
    partial = molf.wrap(plain, ranks=(2, 4), alphas=(8, 8), train_base=False, target_modules=["q_proj"],
                        backend="eager")  # bases untied (merged), fewer targets: the load fails, nothing changes
    with pytest.raises(ValueError, match="does not fit this model"):
        molf.load(partial, tmp_path)
    assert q(partial, 1).base.weight is not q(partial, 3).base.weight


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_generate_with_the_kv_cache_equals_the_merged_model(backend):
    """generate() mid-training (an eval callback, a sample print): decoding steps of one token per row go
    through the MoLF layers; greedy tokens equal the merged model's, with and without the cache."""
    dev = device_for(backend)
    model = molf.wrap(tiny("llama").to(dev), ranks=(2, 8), alphas=(8, 16), train_base=True, dropout=0.1,
                      backend=backend)
    randomize_lora_B(model, std=0.3)
    merged = molf.merge(copy.deepcopy(model)).eval()
    model.eval()
    ids = batch(n=2, t=5).to(dev)
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(ids, use_cache=True, **greedy)
    assert out.shape == (2, 13)
    assert torch.equal(out, merged.generate(ids, use_cache=True, **greedy))
    assert torch.equal(out, model.generate(ids, use_cache=False, **greedy))
    with torch.no_grad():
        assert_close(model(out).logits, merged(out).logits, 1e-5, "logits of the generated rows")


@pytest.mark.parametrize("task", ["SequenceClassification", "TokenClassification", "QuestionAnswering"])
def test_task_heads_are_not_wrapped_by_all_linear_and_stay_trainable_under_freeze_others(task):
    """A classifier's or QA model's head is new (random): wrapping it with a frozen base (MoLF-E) or freezing it
    with freeze_others would train nothing useful there, silently. peft keeps such heads in modules_to_save."""
    model = tiny_qwen2(layers=1, task=task, num_labels=3, pad_token_id=0)
    head = "qa_outputs" if task == "QuestionAnswering" else "score"
    molf.wrap(model, ranks=(4,), alphas=(8,), train_base=False, target_modules="all-linear", freeze_others=True)
    wrapped = {n for n, _ in molf.layer.molf_layers(model)}
    assert len(wrapped) == 7 and not any(n.startswith(head) for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    outside = {n for n in trainable if ".lora_" not in n}
    assert outside == {n for n, _ in getattr(model, head).named_parameters(prefix=head)}
    molf.MoLFAdamW(model, lr=1e-3)  # the head trains as a plain AdamW parameter
    explicit = molf.wrap(tiny_qwen2(layers=1, task=task, num_labels=3, pad_token_id=0), ranks=(4,), alphas=(8,),
                         target_modules=[head])
    assert isinstance(getattr(explicit, head), molf.MoLFLinear)  # named explicitly: wrapped as asked
