"""MoLFAdamW on the fused Triton kernels (backend="triton") against the reference and torch.optim.AdamW.

On the CPU the kernels run under Triton's interpreter; the GPU-only tests skip there with a reason."""
import copy
import json

import pytest
import torch

import molf
from conftest import CUDA, DEVICE, gpu_only
from helpers import batch, randomize_lora_B, rel_err
from molf.reference import MoLFAdamWReference
from optim_utils import (MOLF, MOLF_E, MOLF_E_PFN, check_state_dict_roundtrip, flat_params, lockstep, make_opt,
                         train_step, wrapped)

TRITON = dict(backend="triton")


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("cfg, score", [(MOLF, "epd"), (MOLF, "pfn"), (MOLF_E, "epd"), (MOLF_E_PFN, "pfn")],
                         ids=["molf-epd", "molf-pfn", "molfe-epd", "molfe-pfn"])
def test_fp32_matches_reference_over_30_steps(cfg, score, top_k):
    r = lockstep(cfg, 30, molf.MoLFAdamW, MoLFAdamWReference, dict(score=score, top_k=top_k, **TRITON),
                 dict(score=score, top_k=top_k), device=DEVICE)
    assert torch.equal(r["routes_a"], r["routes_b"])
    assert (r["routes_a"].sum(-1) == top_k).all()
    finite = r["scores_b"].isfinite()
    assert torch.equal(finite, r["scores_a"].isfinite())
    assert rel_err(r["scores_a"][finite], r["scores_b"][finite]) <= 1e-5
    # fp32's tolerance: 30 steps of the kernels' fused arithmetic against torch's ops (1.01e-6 on an H100)
    assert rel_err(flat_params(r["model_a"]), flat_params(r["model_b"])) <= 1e-5
    if top_k == 1 and not (cfg is MOLF and score == "pfn"):
        assert (r["routes_a"].sum((0, 1)) > 0).all(), "every expert should win some steps"


def one_step_from_random_state(cfg, dtype, backend, score="epd"):
    """One step of MoLFAdamW and of the reference from the same random moments, step counts and gradients."""
    train_base, ranks, alphas, lr, lora_lr = cfg
    model = wrapped(train_base, ranks, alphas, dtype=dtype, device=DEVICE)
    randomize_lora_B(model)
    ref_model = copy.deepcopy(model)
    eps = 1e-4 if dtype == torch.float16 else 1e-6  # eps = 1e-8 vanishes in half precision
    opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, score=score, eps=eps, backend=backend)
    ref = make_opt(MoLFAdamWReference, ref_model, lr, lora_lr, score=score, eps=eps)
    gen = torch.Generator().manual_seed(7)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        g = (torch.randn(p.shape, generator=gen) * 1e-2).to(dtype).to(DEVICE)
        m = (torch.randn(p.shape, generator=gen) * 1e-2).to(dtype).to(DEVICE)
        v = (torch.rand(p.shape, generator=gen) * 1e-4).to(dtype).to(DEVICE)
        step = torch.tensor(float(torch.randint(1, 50, (1,), generator=gen)), device=DEVICE)
        for param, o in ((p, opt), (q, ref)):
            param.grad = g.clone()
            o.state[param].update(exp_avg=m.clone(), exp_avg_sq=v.clone(), step=step.clone())
    before = flat_params(model)
    opt.step()
    ref.step()
    return before, model, ref_model, opt, ref


@pytest.mark.parametrize("score", ["epd", "pfn"])
@pytest.mark.parametrize("cfg", [MOLF, MOLF_E], ids=["molf", "molfe"])
def test_fp16_step_from_random_state_matches_reference(cfg, score):
    before, model, ref_model, opt, ref = one_step_from_random_state(cfg, torch.float16, "triton", score)
    assert torch.equal(opt.routing, ref.routing)
    assert rel_err(opt.scores, ref.scores) <= 1e-2
    a, b = flat_params(model), flat_params(ref_model)
    assert rel_err(a - before, b - before) <= 1e-2  # the update itself, not just the parameters
    assert rel_err(a, b) <= 1e-3


@pytest.mark.parametrize("cfg", [MOLF, MOLF_E], ids=["molf", "molfe"])
def test_fp16_routes_like_reference_over_15_steps(cfg):
    # Training in fp16 is chaotic: the eager torch path and the reference drift apart as much as the kernels
    # do (about 5e-5 after one step, 9e-2 after 15), so over many steps the routing is what is compared.
    r = lockstep(cfg, 15, molf.MoLFAdamW, MoLFAdamWReference, dict(eps=1e-4, **TRITON), dict(eps=1e-4),
                 dtype=torch.float16, device=DEVICE)
    assert torch.isfinite(flat_params(r["model_a"])).all()
    agree = (r["routes_a"] == r["routes_b"]).all(-1).float().mean().item()
    # once one near-tie goes the other way the two trajectories part: 93% (28 of 30) on an H100, 100% on the CPU
    assert agree >= 0.9, f"routing agrees on {agree:.0%} of (step, layer) pairs"


@pytest.mark.parametrize("cfg", [MOLF, MOLF_E], ids=["molf", "molfe"])
def test_top_k_all_equals_torch_adamw(cfg):
    train_base, ranks, alphas, lr, lora_lr = cfg
    model = wrapped(train_base, ranks, alphas, device=DEVICE)
    ref_model = copy.deepcopy(model)
    opt = make_opt(molf.MoLFAdamW, model, lr, 2 * lora_lr, top_k=len(ranks) + int(train_base), **TRITON)
    ref_params = dict(ref_model.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    ref = torch.optim.AdamW([dict(params=[ref_params[names[id(p)]] for p in g["params"]], lr=g["lr"],
                                  weight_decay=g["weight_decay"]) for g in opt.param_groups], foreach=False)
    ids = batch().to(DEVICE)
    for _ in range(20):
        train_step(model, opt, ids)
        train_step(ref_model, ref, ids)
        assert opt.routing.all()
    assert rel_err(flat_params(model), flat_params(ref_model)) <= 1e-6


def test_bitwise_deterministic_across_runs():
    runs = [lockstep(MOLF_E, 8, molf.MoLFAdamW, molf.MoLFAdamW, TRITON, TRITON, device=DEVICE) for _ in range(2)]
    for r in runs:  # the two copies inside one run, and the two runs
        assert torch.equal(flat_params(r["model_a"]), flat_params(r["model_b"]))
        assert torch.equal(r["scores_a"], r["scores_b"])
    assert torch.equal(flat_params(runs[0]["model_a"]), flat_params(runs[1]["model_a"]))
    assert torch.equal(runs[0]["routes_a"], runs[1]["routes_a"])


@pytest.mark.parametrize("cfg", [MOLF, MOLF_E], ids=["molf", "molfe"])
def test_state_dict_roundtrip_continues_bitwise(cfg):
    check_state_dict_roundtrip(cfg, device=DEVICE, **TRITON)


def count_triton_launches(monkeypatch):
    """Patch the Triton launch entry points to count kernel launches: JITFunction.run (compiled) and, under the
    interpreter, GridExecutor.__call__ (one per launch in Triton 3.3 to 3.9; 3.3's InterpretedFunction has no
    class-level run to patch)."""
    counter = {"n": 0}
    import triton.runtime.jit as jit
    real_run = jit.JITFunction.run

    def run(self, *a, **k):
        if not k.get("warmup", False):
            counter["n"] += 1
        return real_run(self, *a, **k)
    monkeypatch.setattr(jit.JITFunction, "run", run)
    try:
        from triton.runtime.interpreter import GridExecutor
    except ImportError:
        return counter
    real_call = GridExecutor.__call__

    def call(self, *a, **k):
        counter["n"] += 1
        return real_call(self, *a, **k)
    monkeypatch.setattr(GridExecutor, "__call__", call)
    return counter


def test_launch_count_does_not_grow_with_layers(monkeypatch):
    counts = []
    for layers in (1, 4):
        model = molf.wrap(__import__("helpers").tiny_qwen2(layers=layers).to(DEVICE), ranks=(2, 8), alphas=(8, 16),
                          train_base=True, backend="eager")
        opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, **TRITON)
        ids = batch().to(DEVICE)
        train_step(model, opt, ids)  # builds the tables
        model(ids, labels=ids).loss.backward()
        counter = count_triton_launches(monkeypatch)
        opt.step()
        monkeypatch.undo()
        counts.append(counter["n"])
    assert counts[0] == counts[1] == 3, counts


def test_routing_history_and_jsonl_match_per_step_routing(tmp_path):
    train_base, ranks, alphas, lr, lora_lr = MOLF_E
    model = wrapped(train_base, ranks, alphas, device=DEVICE)
    opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, history_size=4, **TRITON)
    ids = batch().to(DEVICE)
    per_step = []
    for _ in range(6):
        assert opt.history_full == (len(per_step) >= 4) and opt.history_size == 4
        train_step(model, opt, ids)
        per_step.append((opt.routing.cpu().clone(), opt.scores.cpu().clone()))
    with pytest.warns(UserWarning, match=r"the routing of 2 earlier step\(s\) was dropped before it was read: "
                                         r"history_size=4 keeps the last 4 steps"):
        h = opt.routing_history()
    assert h["step"].tolist() == [3, 4, 5, 6]  # the 4 most recent
    for i, s in enumerate(h["step"].tolist()):
        assert torch.equal(h["routing"][i], per_step[s - 1][0])
        assert torch.equal(h["scores"][i], per_step[s - 1][1])
    path = tmp_path / "routing.jsonl"
    assert opt.write_routing_jsonl(path) == 4
    assert opt.routing_history()["step"].numel() == 0  # flushed
    train_step(model, opt, ids)
    opt.write_routing_jsonl(path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 4, 5, 6, 7]
    last = records[-1]["selections"]
    assert list(last) == opt.layer_names
    for li, name in enumerate(opt.layer_names):
        winners = [e for e, w in zip(opt.expert_names, opt.routing[li].tolist()) if w]
        assert last[name]["winners"] == winners
        for ei, e in enumerate(opt.expert_names):
            assert last[name]["scores"][e] == pytest.approx(opt.scores[li, ei].item(), rel=1e-6)


def test_clipping_and_gradscaler_and_frozen_params_like_eager():
    train_base, ranks, alphas, lr, lora_lr = MOLF
    out = []
    for backend in ("triton", "eager"):
        model = wrapped(train_base, ranks, alphas, device=DEVICE)
        model.model.embed_tokens.weight.requires_grad_(False)  # a frozen parameter outside MoLF layers
        opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, backend=backend)
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=1024.0)
        ids = batch().to(DEVICE)
        for _ in range(5):
            scaler.scale(model(ids, labels=ids).loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        assert model.model.embed_tokens.weight not in opt.state
        out.append((flat_params(model), opt.routing.cpu()))
    assert torch.equal(out[0][1], out[1][1])
    assert rel_err(out[0][0], out[1][0]) <= 1e-6


# -- GPU only --

@gpu_only
def test_step_makes_no_host_sync():
    model = wrapped(*MOLF[:3], device=DEVICE)
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, **TRITON)
    ids = batch().to(DEVICE)
    train_step(model, opt, ids)
    model(ids, labels=ids).loss.backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu_only
def test_cuda_graph_replay_equals_eager_steps():
    train_base, ranks, alphas, lr, lora_lr = MOLF_E
    model = wrapped(train_base, ranks, alphas, device=DEVICE)
    ref_model = copy.deepcopy(model)
    ids = batch().to(DEVICE)
    opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, **TRITON)
    ref = make_opt(molf.MoLFAdamW, ref_model, lr, lora_lr, **TRITON)
    for m in (model, ref_model):  # static gradients, as a captured step needs
        m(ids, labels=ids).loss.backward()
    opt.step()
    ref.step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt.step()
    torch.cuda.current_stream().wait_stream(s)
    ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    assert torch.equal(flat_params(model), flat_params(ref_model))


@gpu_only
@pytest.mark.parametrize("cfg", [MOLF, MOLF_E], ids=["molf", "molfe"])
def test_bf16_step_from_random_state_matches_reference(cfg):
    before, model, ref_model, opt, ref = one_step_from_random_state(cfg, torch.bfloat16, "triton")
    assert torch.equal(opt.routing, ref.routing)
    a, b = flat_params(model), flat_params(ref_model)
    assert rel_err(a - before, b - before) <= 5e-2  # bf16 has 8 bits of mantissa: p + update rounds coarsely
    assert rel_err(a, b) <= 1e-2


@gpu_only
def test_cuda_launch_count_does_not_grow_with_layers():
    from torch.profiler import ProfilerActivity, profile
    counts = []
    for layers in (1, 4):
        model = molf.wrap(__import__("helpers").tiny_qwen2(layers=layers).to(DEVICE), ranks=(2, 8),
                          alphas=(8, 16), train_base=True)
        opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, **TRITON)
        ids = batch().to(DEVICE)
        train_step(model, opt, ids)
        model(ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        counts.append(sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA"))
    assert counts[0] == counts[1], counts


def test_fp32_state_for_fp16_params_matches_eager():
    train_base, ranks, alphas, lr, lora_lr = MOLF_E
    out = []
    for backend in ("triton", "eager"):
        model = wrapped(train_base, ranks, alphas, dtype=torch.float16, device=DEVICE)
        opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, eps=1e-6, state_dtype=torch.float32, backend=backend)
        ids = batch().to(DEVICE)
        for _ in range(3):
            train_step(model, opt, ids)
        st = opt.state[next(p for p in model.parameters() if p.requires_grad)]
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
        out.append((flat_params(model), opt.routing.cpu(), opt.scores.cpu()))
    assert torch.equal(out[0][1], out[1][1])
    # fp16 parameters round each update: one ulp apart after a step, the next gradients (and scores) differ at
    # fp16's precision (7e-5 on an H100)
    assert rel_err(out[0][2], out[1][2]) <= 1e-3
    assert rel_err(out[0][0], out[1][0]) <= 1e-3


def test_bias_correction_over_many_steps():
    """Step counts far past the first few: 1 - b2^t in float64 by repeated squaring, vs math.pow."""
    before, model, ref_model, opt, ref = one_step_from_random_state(MOLF_E, torch.float32, "triton")
    for p, q in zip(model.parameters(), ref_model.parameters()):
        if p in opt.state:
            opt.state[p]["step"].fill_(123456.0)
            ref.state[q]["step"].fill_(123456.0)
            p.grad = torch.randn_like(p) * 1e-2
            q.grad = p.grad.clone()
    opt.step()
    ref.step()
    assert torch.equal(opt.routing, ref.routing)
    assert rel_err(flat_params(model), flat_params(ref_model)) <= 1e-6
    assert next(iter(opt.state.values()))["step"].item() == 123457.0


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_stochastic_rounding_of_bf16_is_unbiased(backend):
    """Weights at 1.5 and an Adam step of lr = 1e-3, below half a bf16 ulp (2^-8 there): round-to-nearest
    leaves every weight at 1.5; stochastic rounding moves the mean by -lr (to within sampling noise).
    Triton's CPU interpreter truncates fp32 -> bf16 casts (1.499 -> 1.492, also with
    fp_downcast_rounding="rtne"), so there the round-to-nearest half is checked on the GPU only; the
    stochastic half works on the bits and is exact everywhere."""
    means = {}
    for sr in (False, True):
        torch.manual_seed(0)
        layer = molf.MoLFLinear(torch.nn.Linear(64, 96, bias=False, device=DEVICE, dtype=torch.bfloat16),
                                ranks=(4,), alphas=(8,), backend="eager")
        model = torch.nn.Sequential(layer)
        opt = molf.MoLFAdamW(model, lr=1e-3, top_k=2, backend=backend, stochastic_rounding=sr)
        with torch.no_grad():
            layer.base.weight.fill_(1.5)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        means[sr] = layer.base.weight.double().mean().item()
        losers = layer.lora_B[0]  # its update is exact in bf16 too: bitwise what nearest rounding gives
        assert torch.isfinite(losers).all()
    if backend == "eager" or CUDA:
        assert means[False] == 1.5
    assert abs(means[True] - (1.5 - 1e-3)) < 2e-4, means


def triton_and_eager_around(cfg, change, steps=(2, 2)):
    """Train cfg on the triton and the eager backend, calling change(model, opt) between steps[0] and steps[1]
    steps; both must end with the same routing, moments and weights."""
    train_base, ranks, alphas, lr, lora_lr = cfg
    out = []
    for backend in ("triton", "eager"):
        model = wrapped(train_base, ranks, alphas, device=DEVICE)  # one device: no CPU/GPU near-tie in routing
        opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, backend=backend)
        ids = batch()
        for i in range(steps[0] + steps[1]):
            if i == steps[0]:
                change(model, opt)
            train_step(model, opt, ids)
        m = torch.cat([st["exp_avg"].double().flatten().cpu() for st in opt.state.values()])
        out.append((flat_params(model).cpu(), opt.routing.cpu(), m))
    assert torch.equal(out[0][1], out[1][1])
    assert rel_err(out[0][2], out[1][2]) <= 1e-5
    assert rel_err(out[0][0], out[1][0]) <= 1e-5


def _clear_state(model, opt):
    opt.state.clear()


def _replace_moments(model, opt):
    for st in opt.state.values():  # new storage, same values: the kernels must write the new one
        st["exp_avg"] = st["exp_avg"].clone()


def _replace_state_entries(model, opt):
    for p in list(opt.state):  # a new dict per parameter, as a hand-written state loader would assign
        opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}


def _move_parameters(model, opt):
    for p in model.parameters():
        p.data = p.data.clone()


@pytest.mark.parametrize("change", [_clear_state, _replace_moments, _replace_state_entries],
                         ids=["state cleared", "moment replaced", "state entry replaced"])
def test_triton_tables_follow_state_made_anew(change):
    """The tables' pointers are re-read only when they moved: state made anew (opt.state cleared, a moment
    replaced by hand with one of the right size) must be what the kernels then read and write (before, a
    cleared state left the tables on freed moments: the process crashed)."""
    triton_and_eager_around(MOLF_E, change)


def test_triton_tables_follow_moved_parameters_and_refuse_strided_gradients():
    """A parameter whose storage moved (p.data = a copy) is what the kernels then update; a gradient with other
    strides (assigned by hand) is refused with its strides, not read as if contiguous."""
    triton_and_eager_around(MOLF, _move_parameters, steps=(1, 1))
    train_base, ranks, alphas, lr, lora_lr = MOLF
    model = wrapped(train_base, ranks, alphas, device=DEVICE)
    opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, backend="triton")
    train_step(model, opt, batch())
    model(batch().to(DEVICE), labels=batch().to(DEVICE)).loss.backward()
    w = opt.layout.experts[0][0][0]
    w.grad = w.grad.t().contiguous().t()
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\b.*laid out alike.*strides \(1, 32\)"):
        opt.step()


def _column_major(model, opt):
    """Every matrix and its moments moved to the transposed layout (same values): a weight made as nn.Parameter(
    w.t()), e.g. a GPT-2 Conv1D turned into an nn.Linear by hand."""
    for p in model.parameters():
        if p.dim() == 2:
            p.data = p.data.t().contiguous().t()
            for k in ("exp_avg", "exp_avg_sq"):
                if k in opt.state.get(p, {}):
                    opt.state[p][k] = opt.state[p][k].t().contiguous().t()


@pytest.mark.parametrize("steps", [(0, 3), (1, 2)], ids=["from-the-start", "after-a-step"])
@pytest.mark.parametrize("cfg", [MOLF, MOLF_E], ids=["molf", "molfe"])
def test_column_major_parameters_train_as_on_the_eager_backend(cfg, steps):
    """Dense parameters in another layout than row-major (a transposed weight): their gradients and moments
    follow it, and the kernels walk each alike as a flat array. Before, the triton backend refused them (a
    ValueError at the first step), the eager one trained them."""
    triton_and_eager_around(cfg, _column_major, steps=steps)


def test_a_row_major_gradient_for_a_column_major_parameter_is_refused():
    """Where a parameter is column-major and stays put, a gradient assigned by hand in row-major order is checked
    against it (not only moved tensors for contiguity): the kernels would pair element i of one layout with
    element i of the other, silently."""
    train_base, ranks, alphas, lr, lora_lr = MOLF
    model = wrapped(train_base, ranks, alphas, device=DEVICE)
    opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, backend="triton")
    w = opt.layout.experts[0][0][0]
    w.data = w.data.t().contiguous().t()  # the only column-major tensor: every other row is contiguous
    train_step(model, opt, batch())
    train_step(model, opt, batch())  # fresh gradients in the parameters' layout: accepted
    model(batch().to(DEVICE), labels=batch().to(DEVICE)).loss.backward()
    assert w.stride() == (1, 32) and w.grad.stride() == (1, 32)
    w.grad = w.grad.contiguous()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"q_proj\b.*laid out alike.*\(32, 32\) strides \(32, 1\)"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def _column_major_then_row_major_state_loaded(model, opt):
    """The parameters turned column-major, then an optimizer state saved while they were row-major loaded."""
    saved = copy.deepcopy(opt.state_dict())  # as from a file: state_dict() shares the state's dicts
    _column_major(model, opt)
    opt.load_state_dict(saved)


@pytest.mark.parametrize("cfg", [MOLF, MOLF_E], ids=["molf", "molfe"])
def test_moments_loaded_take_their_parameters_layout(cfg):
    """Moments saved for row-major parameters and loaded for column-major ones (another way of converting a
    checkpoint) are laid out as their parameters, as the step makes them. Before, load_state_dict kept the
    saved strides and the triton backend refused the next step."""
    triton_and_eager_around(cfg, _column_major_then_row_major_state_loaded, steps=(1, 2))
    model = wrapped(cfg[0], cfg[1], cfg[2], device=DEVICE)
    opt = make_opt(molf.MoLFAdamW, model, cfg[3], cfg[4], backend="triton")
    train_step(model, opt, batch())
    _column_major_then_row_major_state_loaded(model, opt)
    for p, st in opt.state.items():
        assert st["exp_avg"].stride() == st["exp_avg_sq"].stride() == p.stride()
