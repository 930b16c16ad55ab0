"""MoLFAdamW (eager backend) against the reference, torch.optim.AdamW and float64 formulas."""
import copy
import math

import pytest
import torch

import molf
from helpers import assert_close, batch, rel_err, tiny_qwen2
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


# -- bad input --

def test_optimizer_needs_molf_layers():
    with pytest.raises(ValueError, match="no MoLF layers"):
        molf.MoLFAdamW(tiny_qwen2(), lr=1e-3)
    with pytest.raises(TypeError, match="nn.Module"):
        molf.MoLFAdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)


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


@pytest.mark.parametrize("score", ["epd", "pfn"])
def test_cpu_one_pass_loops_match_reference(monkeypatch, score):
    """The compiled one-pass CPU loops (here every tensor whose size has a row length, the others on torch
    ops in the same step) route and update like the reference."""
    from molf import _cpu_fused
    if not _cpu_fused.available():
        pytest.skip("torch.compile cannot build CPU code on this machine (no C++ compiler)")
    monkeypatch.setattr(_cpu_fused, "MIN_NUMEL", 0)
    calls = {"moments_score_": 0, "adamw_update_": 0}
    for name in calls:
        def counted(*a, _f=getattr(_cpu_fused, name), _n=name):
            calls[_n] += 1
            return _f(*a)
        monkeypatch.setattr(_cpu_fused, name, counted)
    cfg = MOLF_E_PFN if score == "pfn" else MOLF
    r = lockstep(cfg, 12, molf.MoLFAdamW, MoLFAdamWReference, dict(score=score, backend="eager"), dict(score=score))
    assert torch.equal(r["routes_a"], r["routes_b"])
    assert_close(r["scores_a"], r["scores_b"], 1e-5, "scores")
    assert rel_err(flat_params(r["model_a"]), flat_params(r["model_b"])) <= 1e-6
    assert calls["moments_score_"] > 0 and calls["adamw_update_"] > 0, calls
    sizes = [p.numel() for p in r["model_a"].parameters() if p.requires_grad]
    assert any(_cpu_fused.row_length(n) == 0 for n in sizes), "no tensor took the torch-op path beside"


@pytest.mark.parametrize("dtype, state_dtype", [(torch.bfloat16, None), (torch.float16, torch.float32)],
                         ids=["bf16", "fp16-fp32state"])
def test_cpu_one_pass_loops_low_precision_match_torch_ops(monkeypatch, dtype, state_dtype):
    """Half-precision parameters (their own moments, or fp32 moments) through the compiled loops: the same
    routing and, to the dtype's precision, the same weights as the torch-op path."""
    from molf import _cpu_fused
    if not _cpu_fused.available():
        pytest.skip("torch.compile cannot build CPU code on this machine (no C++ compiler)")
    train_base, ranks, alphas, lr, lora_lr = MOLF_E
    out = []
    for min_numel in (0, 1 << 40):  # every tensor with a row length compiled; then none
        monkeypatch.setattr(_cpu_fused, "MIN_NUMEL", min_numel)
        model = wrapped(train_base, ranks, alphas, dtype=dtype)
        opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, state_dtype=state_dtype, backend="eager")
        routes = []
        for _ in range(3):
            train_step(model, opt, batch())
            routes.append(opt.routing.clone())
        out.append((flat_params(model), torch.stack(routes)))
    assert torch.equal(out[0][1], out[1][1])
    assert rel_err(out[0][0], out[1][0]) <= 1e-3


@pytest.mark.parametrize("n", [256, 768, 4096 * 3, 4096 * 40 + 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_one_pass_moments_score_matches_torch_ops(n, dtype):
    """moments_score_ over every row length it takes (256 up to 4096, rows of one and many): the moments as
    torch's lerp_/mul_/addcmul_ store them, the score sum as the fp32 formula over them."""
    from molf import _cpu_fused
    if not _cpu_fused.available():
        pytest.skip("torch.compile cannot build CPU code on this machine (no C++ compiler)")
    torch.manual_seed(n)
    g, m = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    v = torch.rand(n).to(dtype)
    m_ref, v_ref = m.clone(), v.clone()
    m_ref.lerp_(g, 0.1)
    v_ref.mul_(0.999).addcmul_(g, g, value=0.001)
    for score in ("epd", "pfn"):
        mm, vv = m.clone(), v.clone()
        got = _cpu_fused.moments_score_(g, mm, vv, 0.9, 0.999, score == "pfn")
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert_close(mm.float(), m_ref.float(), tol, "m")
        assert_close(vv.float(), v_ref.float(), tol, "v")
        want = expert_score_terms(mm, vv, score).double().sum()
        assert abs(got.double() - want) <= 1e-5 * want, (score, float(got), float(want))


def test_cpu_one_pass_loops_take_non_contiguous_moments(monkeypatch):
    """Moments loaded from a state dict with other strides (load_state_dict keeps them) take the torch-op path
    and step like contiguous ones."""
    from molf import _cpu_fused
    if not _cpu_fused.available():
        pytest.skip("torch.compile cannot build CPU code on this machine (no C++ compiler)")
    monkeypatch.setattr(_cpu_fused, "MIN_NUMEL", 0)
    train_base, ranks, alphas, lr, lora_lr = MOLF
    out = []
    for transposed in (False, True):
        model = wrapped(train_base, ranks, alphas)
        opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, backend="eager")
        train_step(model, opt, batch())
        sd = copy.deepcopy(opt.state_dict())
        if transposed:
            for st in sd["state"].values():
                for key in ("exp_avg", "exp_avg_sq"):
                    if st[key].dim() == 2:
                        st[key] = st[key].t().contiguous().t()
        opt.load_state_dict(sd)
        assert any(not st["exp_avg"].is_contiguous() for st in opt.state.values()) == transposed
        train_step(model, opt, batch())
        out.append(flat_params(model))
    assert rel_err(out[1], out[0]) <= 1e-6


def test_cpu_one_pass_loops_fall_back_past_the_recompile_limit(monkeypatch):
    """A process that meets more dtype/shape combinations than dynamo recompiles for (fullgraph=True raises
    then) keeps going with the same loop uncompiled: one warning, the same moments and score."""
    from molf import _cpu_fused
    if not _cpu_fused.available():
        pytest.skip("torch.compile cannot build CPU code on this machine (no C++ compiler)")
    if not _cpu_fused._LIMIT_HIT:
        pytest.skip("this torch raises no recompile-limit exception")

    def limit_hit(*args):
        raise _cpu_fused._LIMIT_HIT[0]("recompile limit reached")
    monkeypatch.setitem(_cpu_fused._state, "fns", [limit_hit] + _cpu_fused._state["fns"][1:])
    monkeypatch.setitem(_cpu_fused._state, "warned", False)
    torch.manual_seed(0)
    g, m, v = torch.randn(4096), torch.randn(4096), torch.rand(4096)
    m_ref, v_ref = m.clone(), v.clone()
    _cpu_fused.moments_score_(g, m_ref, v_ref, 0.9, 0.999, True)  # the compiled (PFN) loop: the moments
    with pytest.warns(RuntimeWarning, match="recompile limit"):
        got = _cpu_fused.moments_score_(g, m, v, 0.9, 0.999, False)  # EPD: falls back
    assert _cpu_fused._state["fns"][0] is _cpu_fused._moments_epd
    assert_close(m, m_ref, 1e-6, "m")
    assert_close(v, v_ref, 1e-6, "v")
    assert_close(got, expert_score_terms(m, v, "epd").sum(), 1e-5, "score")


def test_cpu_one_pass_loops_give_nan_for_an_overflowed_moment(monkeypatch):
    """A spike that overflows v makes the score NaN on every path (kernels, foreach, compiled), never 0."""
    from molf import _cpu_fused
    from molf.optim import EagerRoutedAdamW
    m = torch.tensor([1e29, 1.0, 2.0])
    v = torch.tensor([math.inf, 1.0, 4.0])
    for score in ("epd", "pfn"):
        foreach = EagerRoutedAdamW._score_sums([m], [v], score)[0]
        assert math.isnan(foreach) == (score == "epd"), (score, foreach)
    if _cpu_fused.available():
        g = torch.ones(2 * _cpu_fused.MIN_ROW)
        g[0] = 1e30
        got = _cpu_fused.moments_score_(g, torch.zeros_like(g), torch.zeros_like(g), 0.9, 0.999, False)
        assert math.isnan(got)
