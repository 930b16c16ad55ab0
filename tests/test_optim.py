"""MoLFAdamW (eager backend) against the reference, torch.optim.AdamW and float64 formulas."""
import copy
import io
import math
import os
import time
import warnings

import pytest
import torch
from torch import nn

import molf
from helpers import assert_close, batch, device_for, model_device, rel_err, tiny_qwen2
from molf._math import expert_score_terms
from molf.optim import route
from molf.reference import MoLFAdamWReference
from optim_utils import (MOLF, MOLF_E, MOLF_E_PFN, check_state_dict_roundtrip, flat_params, lockstep, make_opt,
                         train_step, wrapped)


@pytest.mark.parametrize("cfg, score, mixed", [
    (MOLF, "epd", True), (MOLF, "pfn", False), (MOLF_E, "epd", True), (MOLF_E_PFN, "pfn", True),
], ids=["molf-epd", "molf-pfn", "molfe-epd", "molfe-pfn"])
def test_routes_like_reference(cfg, score, mixed):
    r = lockstep(cfg, 25, molf.MoLFAdamW, MoLFAdamWReference, dict(score=score, backend="eager"), dict(score=score))
    assert torch.equal(r["routes_a"], r["routes_b"])
    assert (r["routes_a"].sum(-1) == 1).all()  # top_k = 1
    assert_close(r["scores_a"], r["scores_b"], 1e-5, "scores")
    assert rel_err(flat_params(r["model_a"]), flat_params(r["model_b"])) <= 1e-6
    if mixed:
        wins = r["routes_a"].sum((0, 1))
        assert (wins > 0).all(), f"expected every expert to win some steps, got wins per expert {wins.tolist()}"


@pytest.mark.parametrize("cfg", [MOLF, MOLF_E], ids=["molf", "molfe"])
def test_top_k_all_equals_torch_adamw(cfg):
    train_base, ranks, alphas, lr, lora_lr = cfg
    model = wrapped(train_base, ranks, alphas)
    ref_model = copy.deepcopy(model)
    n_exp = len(ranks) + int(train_base)
    opt = make_opt(molf.MoLFAdamW, model, lr, 2 * lora_lr, top_k=n_exp, backend="eager")
    ref_params = dict(ref_model.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [dict(params=[ref_params[names[id(p)]] for p in g["params"]], lr=g["lr"],
                   weight_decay=g["weight_decay"]) for g in opt.param_groups]
    ref = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1, 0.01}
    ids = batch()
    for _ in range(20):
        train_step(model, opt, ids)
        train_step(ref_model, ref, ids)
        assert opt.routing.all()
    assert rel_err(flat_params(model), flat_params(ref_model)) <= 1e-6


@pytest.mark.parametrize("which", ["eager", "triton", "reference"])
def test_betas_cycled_by_a_scheduler_are_used_as_torch_adamw_uses_them(which):
    """OneCycleLR (cycle_momentum=True, its default) sets beta1 in every param group at each step: read there,
    as torch.optim.AdamW reads them (the constructor's betas used to be kept, silently)."""
    train_base, ranks, alphas, lr, lora_lr = MOLF
    device = device_for(which)
    model = wrapped(train_base, ranks, alphas, device=device)
    ref_model = copy.deepcopy(model)
    cls, kw = (MoLFAdamWReference, {}) if which == "reference" else (molf.MoLFAdamW, dict(backend=which))
    opt = make_opt(cls, model, lr, lora_lr, top_k=len(ranks) + 1, **kw)
    ref_params = dict(ref_model.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    ref = torch.optim.AdamW([dict(params=[ref_params[names[id(p)]] for p in g["params"]], lr=g["lr"],
                                  weight_decay=g["weight_decay"]) for g in opt.param_groups], foreach=False)
    cycle = dict(max_lr=1e-2, total_steps=8, base_momentum=0.5, max_momentum=0.95)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, **cycle) for o in (opt, ref)]
    ids, beta1s = batch().to(device), set()
    for _ in range(8):
        beta1s.add(opt.param_groups[0]["betas"][0])
        train_step(model, opt, ids, scheds[0])
        train_step(ref_model, ref, ids, scheds[1])
        assert opt.routing.all()
    assert len(beta1s) > 4 and min(beta1s) < 0.6, beta1s
    assert rel_err(flat_params(model), flat_params(ref_model)) <= 1e-6


def test_param_groups_with_different_betas_raise_before_anything_changes():
    model = wrapped(*MOLF[:3])
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend="eager")
    opt.param_groups[2]["betas"] = (0.5, 0.999)
    ids = batch()
    model(ids, labels=ids).loss.backward()
    before = flat_params(model)
    with pytest.raises(ValueError, match=r"param groups have different betas \(full \(0.9, 0.999\), lora \(0.5, "
                                         r"0.999\)\): MoLFAdamW takes one pair for all groups"):
        opt.step()
    assert not opt.state and torch.equal(flat_params(model), before)
    for g in opt.param_groups:
        g["betas"] = (0.5, 1.0)
    with pytest.raises(ValueError, match=r"betas\[1\] of the param groups"):
        opt.step()
    for g in opt.param_groups:
        g["betas"] = (0.5, 0.99)
    opt.step()
    assert opt.step_betas == (0.5, 0.99)


def f64_scores(opt, score):
    """EPD / PFN of every layer and expert from the optimizer's state, in float64."""
    out = torch.full((len(opt.layer_names), len(opt.expert_names)), -math.inf, dtype=torch.float64)
    for li, experts in enumerate(opt.layout.experts):
        for ei, params in enumerate(experts):
            ps = [p for p in params if p in opt.state]
            if not ps:
                continue
            n = sum(p.numel() for p in ps)
            tot = 0.0
            for p in ps:
                m, v = opt.state[p]["exp_avg"].double(), opt.state[p]["exp_avg_sq"].double()
                d = v.sqrt() + 1e-8
                tot += ((m * m / d) if score == "epd" else (m / d) ** 2).sum().item()
            lr = opt.param_groups[opt._expert_group[ei]]["lr"]
            out[li, ei] = lr / n * tot if score == "epd" else math.sqrt(tot) / math.sqrt(n)
    return out


@pytest.mark.parametrize("score", ["epd", "pfn"])
@pytest.mark.parametrize("cfg", [MOLF, MOLF_E], ids=["molf", "molfe"])
def test_scores_equal_f64_formula(cfg, score):
    train_base, ranks, alphas, lr, lora_lr = cfg
    model = wrapped(train_base, ranks, alphas)
    opt = make_opt(molf.MoLFAdamW, model, lr, 3 * lora_lr, score=score, backend="eager")
    ids = batch()
    for _ in range(3):
        train_step(model, opt, ids)
        assert_close(opt.scores.double(), f64_scores(opt, score), 1e-5, "scores")
        expect = opt.scores == opt.scores.max(dim=1, keepdim=True).values
        first = expect.int().argmax(1)
        assert torch.equal(opt.routing, torch.nn.functional.one_hot(first, opt.routing.shape[1]).bool())


def test_route_ties_go_to_lower_index_and_no_grad_never_wins():
    sums = torch.tensor([[1.0, 1.0, 1.0], [0.5, 2.0, 2.0], [3.0, 3.0, 0.0], [9.0, 1.0, 1.0]])
    inv_n = torch.ones(4, 3)
    no_grad = torch.tensor([[False, False, False], [False, False, False], [True, False, False],
                            [True, True, True]])
    win, scores = route(sums, inv_n, no_grad, [1.0, 1.0, 1.0], "epd", 1)
    assert win.tolist() == [[True, False, False], [False, True, False], [False, True, False], [False] * 3]
    assert scores[2, 0] == -math.inf and scores[3].eq(-math.inf).all()
    win2, _ = route(sums, inv_n, no_grad, [1.0, 1.0, 1.0], "epd", 2)
    assert win2.tolist() == [[True, True, False], [False, True, True], [False, True, True], [False] * 3]


def test_warmup_at_lr_zero_picks_expert_zero():
    train_base, ranks, alphas, lr, lora_lr = MOLF_E
    model = wrapped(train_base, ranks, alphas)
    before = flat_params(model)
    opt = make_opt(molf.MoLFAdamW, model, 0.0, 0.0, backend="eager")
    train_step(model, opt, batch())
    assert opt.scores.eq(0).all()
    assert opt.routing[:, 0].all() and not opt.routing[:, 1:].any()
    assert torch.equal(flat_params(model), before)


@pytest.mark.parametrize("top_k", [1, 2])
def test_expert_without_grads_is_never_picked(top_k):
    train_base, ranks, alphas, lr, lora_lr = MOLF
    model = wrapped(train_base, ranks, alphas)
    ref_model = copy.deepcopy(model)
    opt = make_opt(molf.MoLFAdamW, model, 1.0, 1e-6, top_k=top_k, backend="eager")  # full would win by far
    ref = make_opt(MoLFAdamWReference, ref_model, 1.0, 1e-6, top_k=top_k)
    layer0 = next(m for m in model.modules() if isinstance(m, molf.MoLFLinear))
    ref_layer0 = next(m for m in ref_model.modules() if isinstance(m, molf.MoLFLinear))
    w_before = layer0.base.weight.detach().clone()
    ids = batch()
    for _ in range(3):
        for mdl, o, lay in ((model, opt, layer0), (ref_model, ref, ref_layer0)):
            mdl(ids, labels=ids).loss.backward()
            lay.base.weight.grad = None
            lay.base.bias.grad = None
            o.step()
            o.zero_grad()
        assert opt.scores[0, 0] == -math.inf and not opt.routing[0, 0]
        assert opt.routing[0, 1]
        assert opt.routing[1:, 0].all()
        assert torch.equal(opt.routing, ref.routing)
    assert torch.equal(layer0.base.weight, w_before)
    assert layer0.base.weight not in opt.state


def _freeze(model, what):
    """Parameters frozen by hand before the optimizer is built, as users freeze the lower layers."""
    layers = model.model.layers
    if what == "decoder-layer-0":
        layers[0].requires_grad_(False)
    elif what == "one-base":
        layers[1].self_attn.q_proj.base.requires_grad_(False)
    elif what == "every-base":
        for _, m in molf.layer.molf_layers(model):
            m.base.requires_grad_(False)
    elif what == "every-lora":
        for _, m in molf.layer.molf_layers(model):
            m.lora_A.requires_grad_(False)
            m.lora_B.requires_grad_(False)
    elif what == "one-lora-pair":
        layers[1].mlp.up_proj.lora_A[1].requires_grad_(False)
        layers[1].mlp.up_proj.lora_B[1].requires_grad_(False)


FROZEN_CASES = [(MOLF, "decoder-layer-0", "eager"), (MOLF, "one-base", "eager"), (MOLF, "every-base", "eager"),
                (MOLF, "every-lora", "eager"), (MOLF_E, "decoder-layer-0", "eager"),
                (MOLF_E, "one-lora-pair", "eager"), (MOLF, "decoder-layer-0", "triton"), (MOLF, "every-lora", "triton"),
                (MOLF_E, "one-lora-pair", "triton")]


@pytest.mark.parametrize("cfg, what, backend", FROZEN_CASES,
                         ids=[f"{'molf' if c is MOLF else 'molfe'}-{w}-{b}" for c, w, b in FROZEN_CASES])
def test_parameters_frozen_by_hand_are_not_trained_and_never_win(cfg, what, backend):
    """Whatever is frozen before MoLFAdamW is built stays bitwise; an expert left without a trainable parameter
    in a layer scores -inf there and never wins; everything else routes and trains as the reference does."""
    train_base, ranks, alphas, lr, lora_lr = cfg
    model = wrapped(train_base, ranks, alphas, device=device_for(backend))  # the optimizer's backend under test
    _freeze(model, what)
    ref_model = copy.deepcopy(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, backend=backend)
    ref = make_opt(MoLFAdamWReference, ref_model, lr, lora_lr)
    assert opt.expert_names == ref.expert_names == molf.layer.expert_names(ranks, what != "every-base" and train_base)
    empty = torch.tensor([[not ps for ps in per] for per in opt.layout.experts])
    assert empty.any() or what == "every-base"
    ids = batch().to(model_device(model))
    for _ in range(4):
        train_step(model, opt, ids)
        train_step(ref_model, ref, ids)
        assert torch.equal(opt.routing.cpu(), ref.routing)
        assert opt.scores.cpu()[empty].eq(-math.inf).all() and not opt.routing.cpu()[empty].any()
    assert (opt.routing.cpu() | empty).any(1).all()  # a layer with a trainable expert moves one
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p not in opt.state, n
    assert rel_err(flat_params(model), flat_params(ref_model)) <= 1e-5


@pytest.mark.parametrize("cfg, what", [(MOLF, "decoder-layer-0"), (MOLF, "every-lora"), (MOLF_E, "one-lora-pair"),
                                       (MOLF_E, "a-bias-unfrozen")])
def test_flags_set_by_hand_come_back_with_from_pretrained(tmp_path, cfg, what):
    """molf.from_pretrained rebuilds which parameters train as they did when saved, inside the MoLF layers too
    (before: a LoRA pair frozen by hand came back trainable, a base bias unfrozen by hand frozen)."""
    model = wrapped(*cfg[:3])
    if what == "a-bias-unfrozen":
        model.model.layers[0].self_attn.q_proj.base.bias.requires_grad_(True)
    else:
        _freeze(model, what)
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend="eager")
    train_step(model, opt, batch())
    molf.save_pretrained(model, tmp_path)
    again = molf.from_pretrained(tmp_path)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {n: p.requires_grad for n, p in again.named_parameters()} == flags
    assert make_opt(molf.MoLFAdamW, again, 1e-3, 1e-3).expert_names == opt.expert_names


def test_a_layer_whose_weight_the_model_reads_directly_warns_once():
    """A model that uses a wrapped layer's weight without calling it (Mamba's kernels take dt_proj.weight): the
    base gets a gradient, the LoRA experts none and never apply; MoLFAdamW says so once, naming the layer."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.a(x) @ self.b.weight.T

    for train_base in (True, False):
        net = molf.wrap(Net(), ranks=(2,), alphas=(4,), train_base=train_base, target_modules="all-linear",
                        backend="eager")
        opt = molf.MoLFAdamW(net, lr=1e-3)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(3):
                net(torch.randn(3, 8)).sum().backward()
                opt.step()
                opt.zero_grad()
        said = [w for w in seen if "LoRA experts none" in str(w.message)]
        if train_base:
            assert len(said) == 1 and str(said[0].message).startswith("['b'] (1 MoLF layers): the base weight got a "
                                                                      "gradient")
            assert said[0].filename == __file__  # points at the caller of step()
        else:  # nothing trains in b: an unused layer, as far as the optimizer can tell
            assert not said


def test_parameters_unfrozen_after_the_optimizer_was_built_warn_once():
    """Progressive unfreezing: MoLFAdamW's groups come from what required grad when it was built, so a parameter
    unfrozen later is not trained; the first step that sees its gradient says so (once), naming it."""
    model = molf.wrap(tiny_qwen2(), ranks=(4,), alphas=(8,), train_base=False, freeze_others=True, backend="eager")
    opt = molf.MoLFAdamW(model, lr=1e-3)
    ids = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model, opt, ids)
    emb = model.model.embed_tokens.weight
    emb.requires_grad_(True)
    before = emb.detach().clone()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            train_step(model, opt, ids)
    said = [w for w in seen if "were frozen when MoLFAdamW was built" in str(w.message)]
    assert len(said) == 1 and str(said[0].message).startswith("['model.embed_tokens.weight'] (1 parameters) have "
                                                              "gradients")
    assert torch.equal(emb, before)


def test_scheduler_changes_step_and_epd_score():
    train_base, ranks, alphas, lr, lora_lr = MOLF
    model = wrapped(train_base, ranks, alphas)
    ref_model = copy.deepcopy(model)
    opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, backend="eager")
    ref = make_opt(MoLFAdamWReference, ref_model, lr, lora_lr)

    def cosine_with_warmup(step, warmup=3, total=15):
        if step < warmup:
            return step / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, cosine_with_warmup)
    ids = batch()
    seen_lrs = []
    for step in range(12):
        lrs = [g["lr"] for g in opt.param_groups]
        seen_lrs.append(lrs[0])
        before = flat_params(model)
        train_step(model, opt, ids)
        train_step(ref_model, ref, ids)
        assert_close(opt.scores.double(), f64_scores(opt, "epd"), 1e-5, f"scores at step {step}")
        if step == 0:
            assert lrs[0] == 0.0 and opt.scores.eq(0).all() and opt.routing[:, 0].all()
            assert torch.equal(flat_params(model), before)
        assert torch.equal(opt.routing, ref.routing)
        sched.step()
        ref_sched.step()
    assert len(set(seen_lrs)) > 8
    assert rel_err(flat_params(model), flat_params(ref_model)) <= 1e-6


@pytest.mark.parametrize("state_dtype", [None, torch.float32], ids=["param-dtype", "fp32-state"])
@pytest.mark.parametrize("cfg", [MOLF, MOLF_E], ids=["molf", "molfe"])
def test_state_dict_roundtrip_continues_bitwise(cfg, state_dtype):
    dtype = torch.float32 if state_dtype is None else torch.float16
    opt = check_state_dict_roundtrip(cfg, dtype=dtype, backend="eager", state_dtype=state_dtype)
    if state_dtype is not None:
        st = next(iter(opt.state.values()))
        assert st["exp_avg"].dtype == torch.float32


def test_loading_a_state_saved_with_another_score_or_top_k_warns():
    """score and top_k are not in the param groups (torch restores what is): a state dict records them, and
    loading it into an optimizer that routes otherwise says so (the optimizer keeps its own)."""
    model = wrapped(*MOLF[:3])
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend="eager", score="pfn", top_k=2)
    train_step(model, opt, batch())
    sd = opt.state_dict()
    assert (sd["molf_score"], sd["molf_top_k"]) == ("pfn", 2)
    other = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend="eager")
    with pytest.warns(UserWarning, match=r"saved routing with score='pfn', top_k=2; this optimizer routes with "
                                         r"score='epd', top_k=1 \(kept"):
        other.load_state_dict(sd)
    assert (other.score, other.top_k) == ("epd", 1)
    same = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend="eager", score="pfn", top_k=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(sd)
        for d in (sd, sd["param_groups"][0]):  # a state dict from before molf recorded them
            del d["molf_score"], d["molf_top_k"]
        other.load_state_dict(sd)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_parameters_replaced_before_the_first_step_are_taken(backend):
    """transformers' Trainer under FSDP2 builds the optimizer, then accelerate shards the model (new parameters)
    and points the param groups at them; load_state_dict(assign=True) and to_empty replace parameters too.
    Before the first step (no state) MoLFAdamW takes the model's new parameters, as torch.optim would: the run
    equals one whose optimizer was built after, and the groups' hyperparameters (set since) are kept."""
    model = wrapped(*MOLF[:3], backend=backend)
    later = copy.deepcopy(model)
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend=backend)
    for g in opt.param_groups:
        g["lr"] *= 0.5  # as a scheduler's first step would
    old = dict(model.named_parameters())
    sd = {k: v for k, v in copy.deepcopy(model.state_dict()).items() if "embed" not in k and "lm_head" not in k}
    model.load_state_dict(sd, assign=True, strict=False)  # the tied embedding left alone: assign unties it
    assert all(p is not old[n] for n, p in model.named_parameters() if "embed" not in n)
    ref = make_opt(molf.MoLFAdamW, later, 1e-3, 1e-3, backend=backend)
    for g in ref.param_groups:
        g["lr"] *= 0.5
    ids = batch()
    for _ in range(4):
        train_step(model, opt, ids)
        train_step(later, ref, ids)
        assert torch.equal(opt.routing.cpu(), ref.routing.cpu())
    assert torch.equal(flat_params(model), flat_params(later))
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for p in model.parameters() if p.requires_grad}
    assert opt.molf_step == 4 and len(opt.state) == sum(p.requires_grad for p in model.parameters())


def test_parameters_replaced_before_the_first_step_but_frozen_since_raise():
    model = wrapped(*MOLF[:3])
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3)
    sd = {k: v for k, v in copy.deepcopy(model.state_dict()).items() if "layers.0.self_attn.q_proj" in k}
    model.load_state_dict(sd, assign=True, strict=False)
    model.model.layers[1].mlp.up_proj.lora_B[0].requires_grad_(False)
    train_ids = batch()
    model(train_ids, labels=train_ids).loss.backward()
    with pytest.raises(RuntimeError, match=r"q_proj.base.weight \(expert full\) was replaced after MoLFAdamW was "
                                           r"created .* and the "
                                           r"model's trainable parameters now fill the param groups \(kind, size\) "
                                           r".*\(frozen or unfrozen since\)"):
        opt.step()


def test_model_cast_to_another_dtype_after_a_step_keeps_training_alike_on_both_backends():
    """model.half() after a step keeps the Parameter objects but moves their storage into float16: the triton
    tables (one launch per dtype combination) must be regrouped, not repointed (they read float16 storage as
    float32 before: heap corruption under the interpreter, out-of-bounds reads on a GPU). The moments stay
    float32, as with the eager backend."""
    runs = {}
    for backend in ("eager", "triton"):
        model = wrapped(*MOLF[:3], backend=backend)
        opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend=backend)
        train_step(model, opt, batch())
        model.half()
        routes = []
        for _ in range(3):
            train_step(model, opt, batch())
            routes.append(opt.routing.clone())
        assert all(st["exp_avg"].dtype == torch.float32 for st in opt.state.values())
        runs[backend] = torch.stack(routes).cpu(), flat_params(model).cpu()  # the backends may sit on two devices
    assert torch.equal(runs["eager"][0], runs["triton"][0])
    assert runs["triton"][1].isfinite().all() and rel_err(runs["triton"][1], runs["eager"][1]) <= 1e-3


def test_two_dtype_launches_refresh_their_own_rows_when_gradients_move():
    """A float16 norm weight among float32 parameters: the triton step runs one launch per dtype combination,
    each over a subset of the step's tensors, and refreshes its rows' pointers from the gradients and states
    the optimizer read (fresh gradient storage every step) without rebuilding. It trains as the eager step."""
    runs = {}
    for backend in ("eager", "triton"):
        model = wrapped(*MOLF[:3], backend=backend)
        model.model.norm.half()
        opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend=backend)
        routes = []
        for i in range(4):
            train_step(model, opt, batch())
            routes.append(opt.routing.clone())
            if backend == "triton":
                if i == 1:
                    launches = opt._impl.launches
                    assert sorted(len(ln.ids) for ln in launches)[0] == 1 and len(launches) == 2
                elif i > 1:
                    assert opt._impl.launches is launches, "the tables were rebuilt"
        assert model.model.norm.weight.dtype == torch.float16
        runs[backend] = torch.stack(routes).cpu(), flat_params(model).cpu()  # the backends may sit on two devices
    assert torch.equal(runs["eager"][0], runs["triton"][0])
    assert rel_err(runs["triton"][1], runs["eager"][1]) <= 1e-5


def test_model_cast_to_float64_after_a_step_takes_torch_ops_under_auto(monkeypatch):
    """backend="auto" takes torch ops where the kernels lack the dtype; the optimizer picked its backend from the
    dtypes at construction, so model.double() after a step met the triton tables' TypeError. Now the step
    falls back to the eager backend and trains as an eager optimizer does, and goes back to the kernels after
    model.float() (before: it stayed on torch ops for good). "auto" picks the kernels on a GPU only: here the CPU
    (Triton's interpreter) stands in for one; backend="triton" still raises, naming a parameter."""
    from molf import _backend
    real = _backend.resolve
    monkeypatch.setattr(_backend, "resolve", lambda backend, device, dtypes=(): real(
        backend, torch.device("cuda") if backend == "auto" else device, dtypes))
    runs = {}
    for backend in ("eager", "auto", "triton"):
        model = wrapped(*MOLF[:3], backend="eager", device=device_for("triton"))  # the GPU where there is one
        opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend=backend)
        train_step(model, opt, batch())
        assert opt._impl.name == ("eager" if backend == "eager" else "triton")
        model.double()
        if backend == "triton":
            with pytest.raises(TypeError, match=r"the triton backend supports float32/float16/bfloat16 tensors, got "
                                                r"\(torch.float64, torch.float64, torch.float32\) for model\.layers"):
                train_step(model, opt, batch())
            continue
        routes = []
        for _ in range(3):
            train_step(model, opt, batch())
            routes.append(opt.routing.clone())
        assert opt._impl.name == "eager"
        model.float()  # back in float32 (the moments are float32 too): "auto" goes back to the kernels
        for _ in range(2):
            train_step(model, opt, batch())
            routes.append(opt.routing.clone())
        assert opt._impl.name == ("eager" if backend == "eager" else "triton")
        runs[backend] = torch.stack(routes).cpu(), flat_params(model).cpu()  # the backends may sit on two devices
    assert torch.equal(runs["auto"][0], runs["eager"][0])
    assert rel_err(runs["auto"][1], runs["eager"][1]) <= 1e-5  # the first and last steps ran on the kernels


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_a_dropped_model_and_optimizer_are_freed_at_once(backend):
    """`del model, opt` frees their memory there and then, as with torch.optim (no garbage collection needed):
    the backend held the optimizer that holds it, a reference cycle that kept the model, its gradients and the
    Adam moments (GBs on a GPU) alive until Python's cycle collector ran, e.g. from one run of a sweep or of
    `molf compare` into the next."""
    import gc
    import weakref
    dev = device_for(backend)
    names = [f"l{i}" for i in range(3)]

    def train():
        net = molf.wrap(nn.ModuleDict({n: nn.Linear(16, 16) for n in names}).to(dev), ranks=(4,), alphas=(8,),
                        target_modules=names, backend=backend)
        opt = molf.MoLFAdamW(net, lr=1e-3, backend=backend)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        for _ in range(2):
            sum(m(torch.randn(4, 16, device=dev)).sum() for m in net.values()).backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return net, opt, sched
    train()  # first imports and kernel compilations happen here, not while the pair below is watched
    net, opt, sched = train()
    assert opt._impl.name == backend
    moments = opt.state[net["l0"].base.weight]["exp_avg"]
    refs = [weakref.ref(x) for x in (net, opt, moments)]
    enabled = gc.isenabled()
    gc.disable()
    try:
        del net, opt, sched, moments
        assert [r() is None for r in refs] == [True] * 3
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_deepcopy_and_pickle_of_model_and_optimizer_continue_as_the_original(backend):
    """copy.deepcopy((model, opt)) and a pickle round trip (torch.save of both) give a pair that trains as the
    original does, bitwise; the copies step their own model. torch.optim's __getstate__ keeps only defaults,
    state and param groups: the copy had no molf_step, layout or plans (AttributeError at its first step). An
    LR scheduler's patched step stays behind (it would step the original)."""
    model = wrapped(*MOLF_E[:3], backend=backend, device=device_for(backend))
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, score="pfn", backend=backend)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ids = [batch() for _ in range(4)]
    for i in range(2):
        train_step(model, opt, ids[i], sched)
    buf = io.BytesIO()
    torch.save((model, opt), buf)
    buf.seek(0)
    pairs = {"original": (model, opt), "deepcopy": copy.deepcopy((model, opt)),
             "pickle": torch.load(buf, weights_only=False)}
    before = flat_params(model)
    for name in ("deepcopy", "pickle"):
        m, o = pairs[name]
        assert o.molf_step == 2 and "step" not in o.__dict__ and o._model is m
        assert all(p is q for p, q in zip(o.param_groups[0]["params"], o.layout.groups[0]["params"]))
        train_step(m, o, ids[2])
        assert opt.molf_step == 2 and torch.equal(flat_params(model), before), f"{name}: the original moved"
    runs = {}
    for name, (m, o) in pairs.items():
        routes = []
        for i in range(2, 4) if name == "original" else range(3, 4):
            train_step(m, o, ids[i])
            routes.append(o.routing.clone())
        runs[name] = routes[-1], flat_params(m), o.molf_step
    for name in ("deepcopy", "pickle"):
        assert torch.equal(runs[name][0], runs["original"][0]) and runs[name][2] == 4
        assert torch.equal(runs[name][1], runs["original"][1]), name


def test_state_dict_through_torch_distributed_checkpoint_keeps_the_step_and_routing_log():
    """get/set_optimizer_state_dict (accelerate's FSDP2 checkpoints) keep only "state" and "param_groups", and
    set_ calls step() once with zero gradients and lr 0 on an optimizer without state before loading. The
    step count, seed, score and top_k travel in the first param group; the extra step's routing record is
    dropped with the replaced state; the run continues as an uninterrupted one."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    model = wrapped(*MOLF[:3])
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, score="pfn")
    ids = batch()
    for _ in range(3):
        train_step(model, opt, ids)
    osd = get_optimizer_state_dict(model, opt)
    assert set(osd) == {"state", "param_groups"}
    resumed = copy.deepcopy(model)
    opt2 = make_opt(molf.MoLFAdamW, resumed, 1e-3, 1e-3, score="pfn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same score and top_k: no warning
        set_optimizer_state_dict(resumed, opt2, copy.deepcopy(osd))
    assert opt2.molf_step == 3 and opt2.routing_history()["step"].numel() == 0
    assert all("molf_step" not in g for g in opt2.param_groups)
    opt.routing_history(clear=True)
    for _ in range(2):
        train_step(model, opt, ids)
        train_step(resumed, opt2, ids)
        assert torch.equal(opt.routing, opt2.routing)
    assert torch.equal(flat_params(model), flat_params(resumed))
    assert opt2.routing_history()["step"].tolist() == [4, 5]


def test_train_merge_save_reload_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    train_base, ranks, alphas, lr, lora_lr = MOLF
    model = wrapped(train_base, ranks, alphas)
    opt = make_opt(molf.MoLFAdamW, model, 3e-3, 3e-3, backend="eager")
    ids = batch()
    losses = [train_step(model, opt, ids).item() for _ in range(10)]
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    molf.merge(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, molf.MoLFLinear) for m in reloaded.modules())
    with torch.no_grad():
        assert_close(reloaded(ids).logits, trained, 1e-5, "reloaded logits")


def test_step_with_closure_returns_its_loss_and_steps_like_without():
    """step(closure) as torch.optim's: the closure runs with grad enabled (step is no_grad), its loss is returned,
    and the update is the one a plain backward + step gives."""
    train_base, ranks, alphas, lr, lora_lr = MOLF
    model = wrapped(train_base, ranks, alphas)
    twin = copy.deepcopy(model)
    opt, opt2 = (make_opt(molf.MoLFAdamW, m, 3e-3, 3e-3, backend="eager") for m in (model, twin))
    ids = batch()
    for _ in range(3):
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids).loss
            loss.backward()
            return loss
        loss = opt.step(closure)
        expected = train_step(twin, opt2, ids)
        assert torch.equal(loss.detach(), expected)
        assert torch.equal(opt.routing, opt2.routing)
    assert torch.equal(flat_params(model), flat_params(twin))


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_step_called_inside_torch_compile_runs_as_without(backend):
    """PyTorch's "compile the optimizer" recipe (`torch.compile` of a function calling opt.step()): dynamo does
    not trace into MoLFAdamW.step (its tables of pointers, C loops and Triton launches are already one launch
    per phase), so the step runs as it does uncompiled; before, dynamo traced it: warnings on the CPU's C loops,
    and a failed trace of the Triton tables."""
    train_base, ranks, alphas, lr, lora_lr = MOLF_E
    model = wrapped(train_base, ranks, alphas, backend=backend)
    twin = copy.deepcopy(model)
    opt, opt2 = (make_opt(molf.MoLFAdamW, m, 3e-3, 3e-3, backend=backend) for m in (model, twin))
    compiled_step = torch.compile(lambda: opt.step())
    ids = batch().to(model_device(model))
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*Dynamo")  # "Dynamo does not know how to trace ...": traced
        for _ in range(3):
            model(ids, labels=ids).loss.backward()
            compiled_step()
            opt.zero_grad(set_to_none=True)
            train_step(twin, opt2, ids)
            assert torch.equal(opt.routing, opt2.routing)
    assert opt.molf_step == 3
    assert torch.equal(flat_params(model), flat_params(twin))


# -- bad input --

def test_optimizer_needs_molf_layers():
    with pytest.raises(ValueError, match="no MoLF layers"):
        molf.MoLFAdamW(tiny_qwen2(), lr=1e-3)
    with pytest.raises(TypeError, match="nn.Module"):
        molf.MoLFAdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    frozen = molf.wrap(tiny_qwen2(), ranks=(4,), alphas=(8,)).requires_grad_(False)
    with pytest.raises(ValueError, match="every expert of the model's 14 MoLF layers is frozen"):
        molf.MoLFAdamW(frozen, lr=1e-3)
    two = torch.nn.Sequential(molf.MoLFLinear(torch.nn.Linear(4, 4), ranks=(2,), alphas=(4,)),
                              molf.MoLFLinear(torch.nn.Linear(4, 4), ranks=(4,), alphas=(4,)))
    with pytest.raises(ValueError, match=r"0 has LoRA ranks \[2\] but 1 has \[4\]"):
        molf.MoLFAdamW(two, lr=1e-3)


@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1.0), "lr"), (dict(lora_lr=-1e-3), "lora_lr"), (dict(betas=(0.9, 1.0)), "betas"),
    (dict(betas=(-0.1, 0.9)), "betas"), (dict(eps=-1.0), "eps"), (dict(top_k=0), "top_k"),
    (dict(top_k=3), r"top_k.*\[1, 2\]"), (dict(score="l2"), r"'epd', 'pfn'"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(backend="gpu"), "backend"),
], ids=["lr", "lora_lr", "beta1", "beta0", "eps", "topk0", "topk3", "score", "wd", "backend"])
def test_bad_hyperparameters(kw, match):
    model = wrapped(*MOLF[:3])
    args = dict(lr=1e-3)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        molf.MoLFAdamW(model, **args)


def cpu_loops():
    """molf._cpu, or a skip where its C loops cannot be built on this machine (no C compiler)."""
    from molf import _cpu
    if not _cpu.available():
        pytest.skip("the CPU loops (molf/_cpu.c) cannot be built here: no working C compiler")
    return _cpu


def without_cpu_loops(monkeypatch):
    """Runs what follows on torch's ops, as on a machine without a C compiler."""
    from molf import _cpu
    monkeypatch.setitem(_cpu._state, "lib", None)
    monkeypatch.setitem(_cpu._state, "tried", True)


@pytest.mark.parametrize("whole", [True, False], ids=["one-call", "in-parts"])
@pytest.mark.parametrize("score", ["epd", "pfn"])
def test_cpu_loops_match_reference(monkeypatch, score, whole):
    """The C loops route and update like the reference: the whole step in one call (routing in C, a few layers
    at a time), and in parts (moments + sums, torch's route, the update: the path with a collective between)."""
    _cpu = cpu_loops()
    from molf.optim import EagerRoutedAdamW
    if not whole:
        monkeypatch.setattr(EagerRoutedAdamW, "routed_step", lambda self, plan, lrs: None)
    monkeypatch.setattr(_cpu, "RUN_BYTES", 1)  # one layer per run: every layer routed between two runs
    calls = {"moments_score_": 0, "adamw_update_": 0, "routed_step_": 0}
    for name in calls:
        def counted(*a, _f=getattr(_cpu, name), _n=name):
            calls[_n] += 1
            return _f(*a)
        monkeypatch.setattr(_cpu, name, counted)
    cfg = MOLF_E_PFN if score == "pfn" else MOLF
    r = lockstep(cfg, 12, molf.MoLFAdamW, MoLFAdamWReference, dict(score=score, backend="eager"), dict(score=score))
    assert torch.equal(r["routes_a"], r["routes_b"])
    assert_close(r["scores_a"], r["scores_b"], 1e-5, "scores")
    assert rel_err(flat_params(r["model_a"]), flat_params(r["model_b"])) <= 1e-6
    want = dict(moments_score_=0, adamw_update_=0, routed_step_=12) if whole else \
        dict(moments_score_=12, adamw_update_=12, routed_step_=0)
    assert calls == want, calls


@pytest.mark.parametrize("dtype, state_dtype", [(torch.bfloat16, None), (torch.float16, torch.float32),
                                                (torch.bfloat16, torch.float32)],
                         ids=["bf16", "fp16-fp32state", "bf16-fp32state"])
def test_cpu_loops_low_precision_match_torch_ops(monkeypatch, dtype, state_dtype):
    """Half-precision parameters (their own moments, or fp32 moments) through the C loops: the same routing
    and, to the dtype's precision, the same weights as torch's ops."""
    cpu_loops()
    train_base, ranks, alphas, lr, lora_lr = MOLF_E
    out = []
    for native in (True, False):
        if not native:
            without_cpu_loops(monkeypatch)
        model = wrapped(train_base, ranks, alphas, dtype=dtype)
        opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, state_dtype=state_dtype, backend="eager")
        routes = []
        for _ in range(3):
            train_step(model, opt, batch())
            routes.append(opt.routing.clone())
        assert (opt._impl._tables != {}) == native
        out.append((flat_params(model), torch.stack(routes)))
    assert torch.equal(out[0][1], out[1][1])
    assert rel_err(out[0][0], out[1][0]) <= 1e-3


def random_rows(data, _cpu):
    """1-6 tensors of 0-20000 elements (several blocks of 8192, ragged tails), each of a dtype the loops store,
    owned by one of 3 experts or none (-1)."""
    import hypothesis.strategies as st
    dtypes = sorted(_cpu.CODES, key=str)
    n = data.draw(st.integers(1, 6))
    sizes = [data.draw(st.sampled_from([0, 1, 15, 16, 257, 8191, 8192, 8193, 20000])) for _ in range(n)]
    kinds = [data.draw(st.sampled_from(dtypes)) for _ in range(n)]
    owner = [data.draw(st.integers(-1, 2)) for _ in range(n)]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31)))
    rows = []
    for size, dt in zip(sizes, kinds):
        g, m = (torch.randn(size, generator=gen) * 3).to(dt), torch.randn(size, generator=gen).to(dt)
        v = (torch.rand(size, generator=gen) * 2).to(dt)
        rows.append(dict(p=torch.randn(size, generator=gen).to(dt), g=g, m=m, v=v,
                         step=torch.tensor(data.draw(st.sampled_from([0.0, 1.0, 99.0])))))
    return rows, owner


def test_cpu_moments_score_matches_torch_ops():
    """moments_score_ over random tables: every row's moments as torch's lerp_/mul_/addcmul_ store them
    (computed in fp32, rounded once), its step advanced, each expert's sum the fp32 terms over the stored
    moments (rows outside MoLF layers add nothing), and the sums bitwise the same on 1 and 2 threads."""
    hypothesis = pytest.importorskip("hypothesis")
    _cpu = cpu_loops()

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
    @hypothesis.given(hypothesis.strategies.data())
    def check(data):
        rows, owner = random_rows(data, _cpu)
        for score in ("epd", "pfn"):
            sums = {}
            for threads in (1, 2):
                rs = [{k: t.clone() for k, t in r.items()} for r in rows]
                tab = _cpu.Table(0, [r["p"] for r in rs], [r["m"] for r in rs], [r["v"] for r in rs],
                                 [r["step"] for r in rs], owner, [0] * len(rs))
                tab.set_grads([r["g"] for r in rs])
                out = torch.zeros(3, dtype=torch.float64)
                with torch_threads(threads):
                    _cpu.moments_score_(tab, 0.9, 0.999, score == "pfn", out)
                sums[threads] = out
            assert torch.equal(sums[1], sums[2])
            want = torch.zeros(3, dtype=torch.float64)
            for r, new, o in zip(rows, rs, owner):
                g, m, v = r["g"].float(), r["m"].float(), r["v"].float()
                m_want, v_want = (m + 0.1 * (g - m)).to(r["m"].dtype), (0.999 * v + 0.001 * g * g).to(r["v"].dtype)
                tol = 1e-6 if r["m"].dtype == torch.float32 else 0.0  # fp32: torch's lerp_ rounds differently
                assert_close(new["m"].float(), m_want.float(), tol, "m")
                assert_close(new["v"].float(), v_want.float(), tol, "v")
                assert float(new["step"]) == float(r["step"]) + 1
                assert torch.equal(new["p"], r["p"]) and torch.equal(new["g"], r["g"])
                if o >= 0:
                    want[o] += expert_score_terms(new["m"], new["v"], score).double().sum()
            assert torch.allclose(sums[1], want, rtol=1e-5, atol=0), (score, sums[1], want)
    check()


def test_cpu_adamw_update_matches_torch_ops():
    """adamw_update_ over random tables: rows outside MoLF layers and winners' rows take AdamW (fp32 math,
    bias corrections in float64, one rounding to the parameter's dtype), losers' parameters stay bitwise."""
    hypothesis = pytest.importorskip("hypothesis")
    _cpu = cpu_loops()

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
    @hypothesis.given(hypothesis.strategies.data())
    def check(data):
        rows, owner = random_rows(data, _cpu)
        for r in rows:
            r["v"] = r["v"].abs()
            r["step"] += 1
        win = torch.tensor(data.draw(hypothesis.strategies.lists(hypothesis.strategies.booleans(), min_size=3,
                                                                  max_size=3)))
        group = [data.draw(hypothesis.strategies.integers(0, 1)) for _ in rows]
        hp = torch.tensor([[1e-2, 0.1, 1e-8], [3e-3, 0.0, 1e-6]], dtype=torch.float64)
        ps = [r["p"].clone() for r in rows]
        tab = _cpu.Table(0, ps, [r["m"] for r in rows], [r["v"] for r in rows], [r["step"] for r in rows], owner,
                         group)
        _cpu.adamw_update_(tab, win, hp, 0.9, 0.999)
        for r, p, o, gi in zip(rows, ps, owner, group):
            if o >= 0 and not win[o]:
                assert torch.equal(p, r["p"])
                continue
            lr, wd, eps = hp[gi].tolist()
            t = float(r["step"])
            step_size, bc2 = lr / (1 - 0.9 ** t), math.sqrt(1 - 0.999 ** t)
            want = r["p"].float() * (1 - lr * wd) - step_size * r["m"].float() / (r["v"].float().sqrt() / bc2 + eps)
            if p.dtype == torch.float32:
                assert_close(p, want, 1e-6, "p")
            else:  # one rounding of the fp32 result: at most one ulp apart where the fp32 values differ slightly
                assert_close(p.float(), want.to(p.dtype).float(), 1e-2, "p")
    check()


def test_cpu_route_matches_route():
    """The routing inside the C step against molf._math.route: the same fp32 scores (bitwise for EPD, within
    two ulps for PFN's square root) and the same winners, over ties, NaN and inf sums, experts without gradients,
    per-expert learning rates and top_k."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    _cpu = cpu_loops()
    values = st.sampled_from([0.0, 1e-30, 0.5, 0.5, 3.0, 1e30, math.nan, math.inf]) | st.floats(0, 1e3)

    @hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
    @hypothesis.given(st.data())
    def check(data):
        n_layers, n_experts = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
        shape = (n_layers, n_experts)
        sums = torch.tensor(data.draw(st.lists(values, min_size=n_layers * n_experts,
                                               max_size=n_layers * n_experts)), dtype=torch.float64).view(shape)
        inv_n = torch.tensor(data.draw(st.lists(st.sampled_from([1.0, 0.25, 1 / 3, 1e-6]), min_size=sums.numel(),
                                                max_size=sums.numel())), dtype=torch.float32).view(shape)
        no_grad = torch.tensor(data.draw(st.lists(st.booleans(), min_size=sums.numel(), max_size=sums.numel()))
                               ).view(shape)
        lrs = data.draw(st.lists(st.sampled_from([1e-4, 3e-4, 0.1]), min_size=n_experts, max_size=n_experts))
        score, top_k = data.draw(st.sampled_from(["epd", "pfn"])), data.draw(st.integers(1, n_experts))
        want_w, want_s = route(sums.float(), inv_n, no_grad, lrs, score, top_k)
        got_w, got_s = _cpu.route(sums, inv_n, no_grad, lrs, score == "pfn", top_k)
        # EPD: products, correctly rounded on both sides; PFN: torch's CPU sqrt is not (1 ulp off at times)
        torch.testing.assert_close(got_s, want_s, rtol=0 if score == "epd" else 2.4e-7, atol=0, equal_nan=True)
        # the winners are route's order on the scores the C loop computed (x * 1 is exact)
        ones = torch.ones(shape)
        assert torch.equal(got_w, route(got_s.clone(), ones, no_grad, [1.0] * n_experts, "epd", top_k)[0])
        if torch.equal(got_s.nan_to_num(), want_s.nan_to_num()):
            assert torch.equal(got_w, want_w), (sums, no_grad, got_w, want_w)
    check()


class torch_threads:
    def __init__(self, n):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


@pytest.mark.parametrize("transpose", ["moments", "grads"])
def test_cpu_loops_leave_strided_tensors_to_torch_ops(transpose):
    """Moments in other strides than their parameter's (assigned by hand: load_state_dict lays them out as
    their parameter) leave their rows to torch's ops; a strided gradient sends the whole step there: both step
    like contiguous ones."""
    cpu_loops()
    train_base, ranks, alphas, lr, lora_lr = MOLF
    out = []
    for strided in (False, True):
        model = wrapped(train_base, ranks, alphas)
        opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, backend="eager")
        train_step(model, opt, batch())
        sd = copy.deepcopy(opt.state_dict())
        for st in sd["state"].values():  # saved in another layout: loaded in the parameter's
            for key in ("exp_avg", "exp_avg_sq"):
                if st[key].dim() == 2:
                    st[key] = st[key].t().contiguous().t()
        opt.load_state_dict(sd)
        assert all(st["exp_avg"].is_contiguous() for st in opt.state.values())
        if strided and transpose == "moments":
            for st in opt.state.values():
                for key in ("exp_avg", "exp_avg_sq"):
                    if st[key].dim() == 2:
                        st[key] = st[key].t().contiguous().t()
        model.zero_grad()
        model(input_ids=batch(), labels=batch()).loss.backward()
        if strided and transpose == "grads":
            for p in model.parameters():
                if p.grad is not None and p.grad.dim() == 2:
                    p.grad = p.grad.t().contiguous().t()
        opt.step()
        out.append(flat_params(model))
    assert rel_err(out[1], out[0]) <= 1e-6


def test_cpu_loops_keep_no_gradient_alive():
    """zero_grad(set_to_none=True) frees the gradients: the C loops' tables keep pointers, not tensors."""
    import gc
    import weakref
    cpu_loops()
    train_base, ranks, alphas, lr, lora_lr = MOLF
    model = wrapped(train_base, ranks, alphas)
    opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, backend="eager")
    train_step(model, opt, batch())
    model(input_ids=batch(), labels=batch()).loss.backward()
    refs = [weakref.ref(p.grad) for p in model.parameters() if p.grad is not None]
    opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert opt._impl._tables and all(r() is None for r in refs)


def test_cpu_loops_missing_compiler_warns_and_falls_back(monkeypatch, tmp_path):
    """Without a C compiler: one RuntimeWarning naming the cause, then torch's ops, routing as the reference."""
    from molf import _cpu
    monkeypatch.setitem(_cpu._state, "lib", None)
    monkeypatch.setitem(_cpu._state, "tried", False)
    monkeypatch.setenv("MOLF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_cpu.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert not _cpu.available()
    r = lockstep(MOLF, 4, molf.MoLFAdamW, MoLFAdamWReference, dict(backend="eager"), {})
    assert torch.equal(r["routes_a"], r["routes_b"])
    assert rel_err(flat_params(r["model_a"]), flat_params(r["model_b"])) <= 1e-6


def test_cpu_loops_give_nan_for_an_overflowed_moment():
    """A spike that overflows v makes the EPD score NaN on every path (kernels, foreach, C loops), never 0."""
    from molf.optim import EagerRoutedAdamW
    m = torch.tensor([1e29, 1.0, 2.0])
    v = torch.tensor([math.inf, 1.0, 4.0])
    for score in ("epd", "pfn"):
        foreach = EagerRoutedAdamW._score_sums([m], [v], score)[0]
        assert math.isnan(foreach) == (score == "epd"), (score, foreach)
    _cpu = cpu_loops()
    g = torch.ones(300)
    g[0] = 1e30
    zeros = [torch.zeros_like(g), torch.zeros_like(g)]
    tab = _cpu.Table(0, [g.clone()], [zeros[0]], [zeros[1]], [torch.tensor(0.0)], [0], [0])
    tab.set_grads([g])
    sums = torch.zeros(1, dtype=torch.float64)
    _cpu.moments_score_(tab, 0.9, 0.999, False, sums)
    assert math.isnan(sums[0])


def test_cpu_loops_build_prunes_stale_builds_and_leaves_no_temporaries(monkeypatch, tmp_path):
    """A new build removes builds unused for 30 days and temporaries of dead builds (a day old), nothing else;
    a build that times out leaves no temporary behind (before, every source version stayed forever, and a
    timed-out build's file too)."""
    import subprocess

    from molf import _cpu
    monkeypatch.setitem(_cpu._state, "lib", None)
    monkeypatch.setitem(_cpu._state, "tried", False)
    monkeypatch.setenv("MOLF_CACHE_DIR", str(tmp_path))
    day = 86400
    ages = {"cpu-old.so": 40 * day, "cpu-recent.so": 2 * day, "tmpk2j1.so": 2 * day, "tmp-cpu-now.so": 60,
            "layer_plans.json": 40 * day}
    for name, age in ages.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (time.time() - age,) * 2)
    assert _cpu.available()
    built = [f.name for f in tmp_path.glob("cpu-*.so") if f.name not in ages]
    assert len(built) == 1
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(
        [built[0], "cpu-recent.so", "tmp-cpu-now.so", "layer_plans.json"])
    os.utime(tmp_path / built[0], (time.time() - 40 * day,) * 2)
    monkeypatch.setitem(_cpu._state, "tried", False)
    assert _cpu.available()  # loaded again: touched, so kept
    assert time.time() - (tmp_path / built[0]).stat().st_mtime < day

    def timeout(cmd, **kw):
        open(cmd[cmd.index("-o") + 1], "wb").write(b"partial")
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))

    monkeypatch.setitem(_cpu._state, "lib", None)
    monkeypatch.setitem(_cpu._state, "tried", False)
    monkeypatch.setenv("MOLF_CACHE_DIR", str(tmp_path / "fresh"))
    monkeypatch.setattr(_cpu.subprocess, "run", timeout)
    with pytest.warns(RuntimeWarning, match="TimeoutExpired"):
        assert not _cpu.available()
    assert list((tmp_path / "fresh").iterdir()) == []
