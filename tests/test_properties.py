"""Property-based tests of the routed optimizer (hypothesis): small random layouts, hyperparameters, top_k
and injected non-finite or huge gradient elements; eager (CPU) and triton (the GPU, or the interpreter) side by side."""
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import molf
from helpers import device_for

INJECT = [math.nan, math.inf, -math.inf, 1e30, -1e30]  # overflow in any evaluation order: both backends agree


class Net(nn.Module):
    """Linears named l0, l1, ... (the MoLF targets) plus a vector outside them (plain AdamW)."""

    def __init__(self, sizes, bias):
        super().__init__()
        self.lins = nn.ModuleDict({f"l{i}": nn.Linear(k, n, bias=bias) for i, (k, n) in enumerate(sizes)})
        self.scale = nn.Parameter(torch.ones(sizes[0][0]))


def bits(t):
    return t.detach().view(torch.int32).clone()


def molf_layers(model):
    return [m for m in model.modules() if isinstance(m, molf.MoLFLinear)]


@st.composite
def setups(draw):
    n_layers = draw(st.integers(1, 3))
    sizes = [(draw(st.integers(1, 40)), draw(st.integers(1, 40))) for _ in range(n_layers)]
    train_base = draw(st.booleans())
    n_lora = draw(st.integers(1, 3 - int(train_base)))
    ranks = tuple(draw(st.integers(1, 6)) for _ in range(n_lora))
    alphas = tuple(draw(st.sampled_from([1.0, 8.0, 16.0])) for _ in ranks)
    n_exp = n_lora + int(train_base)
    return dict(
        sizes=sizes, bias=draw(st.booleans()), train_base=train_base, ranks=ranks, alphas=alphas,
        lr=draw(st.sampled_from([0.0, 1e-4, 1e-3, 3e-2])), lora_lr=draw(st.sampled_from([1e-4, 1e-3, 1e-2])),
        weight_decay=draw(st.sampled_from([0.0, 0.1])), eps=draw(st.sampled_from([0.0, 1e-8, 1e-3])),
        betas=draw(st.sampled_from([(0.9, 0.999), (0.5, 0.9)])), score=draw(st.sampled_from(["epd", "pfn"])),
        top_k=draw(st.integers(1, n_exp)), seed=draw(st.integers(0, 2 ** 16)),
        # per step: None, or (which trainable tensor, which value) to inject
        inject=[draw(st.none() | st.tuples(st.integers(0, 10 ** 6), st.sampled_from(INJECT))) for _ in range(3)],
    )


def build(s, backend):
    torch.manual_seed(s["seed"])
    model = Net(s["sizes"], s["bias"]).to(device_for(backend))
    molf.wrap(model, ranks=s["ranks"], alphas=s["alphas"], train_base=s["train_base"],
              target_modules=tuple(f"l{i}" for i in range(len(s["sizes"]))), backend=backend)
    opt = molf.MoLFAdamW(model, lr=s["lr"], lora_lr=s["lora_lr"], weight_decay=s["weight_decay"],
                         lora_weight_decay=s["weight_decay"], betas=s["betas"], eps=s["eps"], score=s["score"],
                         top_k=s["top_k"], backend=backend)
    return model, opt


def set_grads(model, s, step):
    gen = torch.Generator().manual_seed(s["seed"] * 7 + step)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)
    inj = s["inject"][step]
    if inj is not None:
        p = params[inj[0] % len(params)]
        p.grad.view(-1)[inj[0] % p.numel()] = inj[1]


def check_step(model, opt):
    """Losers bitwise unchanged; a non-finite score wins only when too few finite ones exist."""
    layers = molf_layers(model)
    experts = [[ps for ps in per] for per in opt.layout.experts]
    before = [[[bits(p) for p in ps] for ps in per] for per in experts]
    opt.step()
    win, scores = opt.routing.cpu(), opt.scores.cpu()
    for li in range(len(layers)):
        finite = scores[li].isfinite()
        n_win_finite = int((win[li] & finite).sum())
        assert n_win_finite == min(opt.top_k, int(finite.sum())), (scores[li], win[li])
        for ei, ps in enumerate(experts[li]):
            if not win[li, ei]:
                for b, p in zip(before[li][ei], ps):
                    assert torch.equal(b, bits(p)), f"loser {opt.expert_names[ei]} of layer {li} moved"
    return win


def decisive(scores, top_k, rel=1e-5):
    """True unless the top_k cut falls between two finite scores within `rel` of each other: fp32 scores summed
    in another order (the kernels' partials against torch's sums) may order such a near-tie either way. One is
    systematic: PFN's first step, where m / sqrt(v) = (1 - b1) / sqrt(1 - b2) for every element of every expert."""
    for row in scores:
        finite = row[row.isfinite()].sort(descending=True).values
        if len(finite) > top_k:
            a, b = finite[top_k - 1].item(), finite[top_k].item()
            if abs(a - b) <= rel * max(abs(a), abs(b)):
                return False
    return True


def roundtrip(model, opt, s, backend):
    """A fresh model and optimizer loaded from (model, opt) through bytes."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, opt2 = build(dict(s, seed=s["seed"] + 1), backend)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    return model2, opt2


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(setups())
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_routed_adamw_properties(s):
    runs = {b: build(s, b) for b in ("eager", "triton")}
    lockstep = True
    for step in range(2):
        routes = {}
        for b, (model, opt) in runs.items():
            set_grads(model, s, step)
            routes[b] = check_step(model, opt)
        if lockstep:
            if decisive(runs["eager"][1].scores.cpu(), s["top_k"]):
                assert torch.equal(routes["eager"], routes["triton"]), "eager and triton route alike"
            else:
                lockstep = False  # the two trajectories may part at a near-tie: compare no further
    for b, (model, opt) in runs.items():  # a state_dict round trip continues bitwise
        model2, opt2 = roundtrip(model, opt, s, b)
        for m, o in ((model, opt), (model2, opt2)):
            set_grads(m, s, 2)
            check_step(m, o)
        assert torch.equal(opt.routing, opt2.routing)
        for p, q in zip(model.parameters(), model2.parameters()):
            assert torch.equal(bits(p), bits(q))
