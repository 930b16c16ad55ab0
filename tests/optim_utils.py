"""Shared by the optimizer tests: wrapped tiny models and lockstep training loops."""
import copy

import torch

import molf
from helpers import batch, device_for, model_device, tiny_qwen2

# (train_base, ranks, alphas, lr, lora_lr): learning rates chosen so that both experts win some steps.
MOLF = (True, (8,), (8,), 1e-3, 1e-3)
MOLF_E = (False, (2, 8), (8, 16), 1e-3, 1e-3)
MOLF_E_PFN = (False, (2, 8), (8, 24), 1e-3, 1e-3)


def wrapped(train_base, ranks, alphas, seed=0, dtype=torch.float32, backend="eager", layers=2, device=None):
    model = tiny_qwen2(seed=seed, dtype=dtype, layers=layers).to(device_for(backend) if device is None else device)
    return molf.wrap(model, ranks=ranks, alphas=alphas, train_base=train_base, backend=backend)


def make_opt(cls, model, lr, lora_lr, **kw):
    kw.setdefault("weight_decay", 0.1)
    kw.setdefault("lora_weight_decay", 0.01)
    return cls(model, lr=lr, lora_lr=lora_lr, **kw)


def train_step(model, opt, ids, scheduler=None):
    ids = ids.to(model_device(model))
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return loss.detach()


def flat_params(model):
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def lockstep(cfg, steps, cls_a, cls_b, kw_a=None, kw_b=None, dtype=torch.float32, ids=None, device="cpu"):
    """Train two copies of one wrapped model side by side; returns models, optimizers and routings."""
    train_base, ranks, alphas, lr, lora_lr = cfg
    model_a = wrapped(train_base, ranks, alphas, dtype=dtype, device=device)
    model_b = copy.deepcopy(model_a)
    opt_a = make_opt(cls_a, model_a, lr, lora_lr, **(kw_a or {}))
    opt_b = make_opt(cls_b, model_b, lr, lora_lr, **(kw_b or {}))
    ids = batch().to(device) if ids is None else ids
    routes_a, routes_b, scores_a, scores_b = [], [], [], []
    for _ in range(steps):
        train_step(model_a, opt_a, ids)
        train_step(model_b, opt_b, ids)
        routes_a.append(opt_a.routing.cpu().clone())
        routes_b.append(opt_b.routing.cpu().clone())
        scores_a.append(opt_a.scores.cpu().clone())
        scores_b.append(opt_b.scores.cpu().clone())
    return dict(model_a=model_a, model_b=model_b, opt_a=opt_a, opt_b=opt_b, routes_a=torch.stack(routes_a),
                routes_b=torch.stack(routes_b), scores_a=torch.stack(scores_a), scores_b=torch.stack(scores_b))


def _through_bytes(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def check_state_dict_roundtrip(cfg, device="cpu", dtype=torch.float32, **opt_kw):
    """8 uninterrupted steps == 4 steps, save (through bytes), load into a fresh model and optimizer, 4 more:
    bitwise the same routing every step and the same parameters at the end."""
    train_base, ranks, alphas, lr, lora_lr = cfg
    ids = batch().to(device)
    model = wrapped(train_base, ranks, alphas, dtype=dtype, device=device)
    start = copy.deepcopy(model.state_dict())
    opt = make_opt(molf.MoLFAdamW, model, lr, lora_lr, **opt_kw)
    routes = []
    for _ in range(8):
        train_step(model, opt, ids)
        routes.append(opt.routing.clone())
    model2 = wrapped(train_base, ranks, alphas, seed=5, dtype=dtype, device=device)
    model2.load_state_dict(start)
    opt2 = make_opt(molf.MoLFAdamW, model2, lr, lora_lr, **opt_kw)
    for _ in range(4):
        train_step(model2, opt2, ids)
    saved_model, saved_opt = _through_bytes(model2.state_dict()), _through_bytes(opt2.state_dict())
    model3 = wrapped(train_base, ranks, alphas, seed=7, dtype=dtype, device=device)
    model3.load_state_dict(saved_model)
    opt3 = make_opt(molf.MoLFAdamW, model3, 0.5, 0.5, **opt_kw)  # the state dict restores the lrs
    opt3.load_state_dict(saved_opt)
    assert opt3.param_groups[0]["lr"] == lr and opt3.molf_step == 4
    for i in range(4, 8):
        train_step(model3, opt3, ids)
        assert torch.equal(opt3.routing, routes[i]), f"routing differs at step {i + 1}"
    for (n, p), q in zip(model.named_parameters(), model3.parameters()):
        assert torch.equal(p, q), n
    return opt3
