"""Bad state, non-finite gradients and misuse: each gets a clear error or a defined, safe behaviour.

One test (or more) per defect of the "no silent wrong answer" issue, on both optimizer backends where the
backend matters (triton under the CPU interpreter).
"""
import copy
import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

import molf
from helpers import assert_close, batch, device_for, model_device, tiny_qwen2, write_jsonl
from molf.cli import main
from molf.optim import route
from molf.reference import MoLFAdamWReference
from optim_utils import MOLF, MOLF_E, make_opt, train_step, wrapped

BACKENDS = ["eager", "triton"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that NaN == NaN when nothing was written."""
    return t.detach().clone().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def snapshot(opt):
    return {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
            for k, v in _flatten(opt.state_dict()).items()}


def _flatten(sd, prefix=""):
    out = {}
    for k, v in (sd.items() if isinstance(sd, dict) else enumerate(sd)):
        if isinstance(v, (dict, list)):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def same_snapshot(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(bits(a[k]), bits(b[k])), k
        else:
            assert a[k] == b[k], k


# -- 1. load_state_dict checks shapes, groups and kinds before changing anything --

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["smaller-into-larger", "larger-into-smaller"])
def test_load_state_dict_of_another_model_size_raises_and_keeps_state(backend, direction):
    dev = device_for(backend)
    small = molf.wrap(tiny_qwen2(hidden=32, inter=48).to(dev), ranks=(4,), alphas=(8,), backend=backend)
    large = molf.wrap(tiny_qwen2(hidden=64, inter=96).to(dev), ranks=(4,), alphas=(8,), backend=backend)
    src, dst = (small, large) if direction == "smaller-into-larger" else (large, small)
    opt_src = make_opt(molf.MoLFAdamW, src, 1e-3, 1e-3, backend=backend)
    opt_dst = make_opt(molf.MoLFAdamW, dst, 1e-3, 1e-3, backend=backend)
    ids = batch()
    train_step(src, opt_src, ids)
    train_step(dst, opt_dst, ids)
    before = snapshot(opt_dst)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.base\.weight \(expert full\).*"
                                         r"exp_avg has shape \(\d+, \d+\), the parameter \(\d+, \d+\)"):
        opt_dst.load_state_dict(opt_src.state_dict())
    same_snapshot(before, snapshot(opt_dst))
    train_step(dst, opt_dst, ids)  # still usable, and its own state is intact
    assert opt_dst.molf_step == 2


def test_load_state_dict_of_another_layout_or_optimizer_raises():
    model = wrapped(*MOLF[:3])
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend="eager")
    train_step(model, opt, batch())
    other = wrapped(*MOLF_E[:3])  # no full expert: other groups
    opt_e = make_opt(molf.MoLFAdamW, other, 1e-3, 1e-3, backend="eager")
    with pytest.raises(ValueError, match=r"param groups \(kind, size\)"):
        opt.load_state_dict(opt_e.state_dict())
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(batch(), labels=batch()).loss.backward()
    plain.step()
    with pytest.raises(ValueError, match="no 'kind' tag.*torch.optim.AdamW"):
        opt.load_state_dict(plain.state_dict())
    assert [g["kind"] for g in opt.param_groups] == ["full", "full_bias", "lora", "decay", "no_decay"]
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        opt.load_state_dict([1, 2])


@pytest.mark.parametrize("backend", ["eager", "eager-torch-ops", "triton"])
def test_moments_of_another_size_than_the_parameter_are_refused(backend, monkeypatch):
    """The kernels and the CPU loops index the moments by the parameter's numel: a moment set by hand to another
    size, or a parameter resized in place after a step (p.data = ..., e.g. more embedding rows), is a ValueError
    naming it, before anything is written (before: the CPU loops wrote past the moments' end, a heap corruption
    that killed the process; torch's ops, without the C loops, moved some tensors before failing). Resized back,
    the run goes on as if nothing had happened."""
    if backend == "eager-torch-ops":  # as on a GPU with backend="eager", or on a CPU without a C compiler
        monkeypatch.setattr(molf._cpu, "available", lambda: False)
        backend = "eager"
    model = wrapped(*MOLF[:3], backend=backend)
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend=backend)
    ids = batch().to(model_device(model))
    train_step(model, opt, ids)
    p = opt.layout.experts[0][0][0]  # layer 0's full expert weight
    opt.state[p]["exp_avg"] = torch.zeros(3, device=p.device)  # set by hand: the kernels would index it by p.numel()
    model(ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match=r"q_proj\.base\.weight \(expert full\).*moments \(3,\)"):
        opt.step()

    model = wrapped(*MOLF[:3], backend=backend)
    twin = copy.deepcopy(model)
    opt, ref = (make_opt(molf.MoLFAdamW, m, 1e-3, 1e-3, backend=backend) for m in (model, twin))
    for _ in range(2):
        train_step(model, opt, ids)
        train_step(twin, ref, ids)
    emb = model.model.embed_tokens.weight
    assert emb.requires_grad and emb in opt.state
    kept = emb.data.clone()
    emb.data = torch.cat([kept, kept[:40]])  # 40 more rows (tied: the head's too)
    model(ids).logits.float().square().mean().backward()
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight: parameter \(104, 32\) .* moments \(64, 32\) "
                                         r"and \(64, 32\) .* create the optimizer after resizing"):
        opt.step()
    emb.data = kept
    opt.zero_grad(set_to_none=True)
    for _ in range(2):
        train_step(model, opt, ids)
        train_step(twin, ref, ids)
    assert torch.equal(opt.routing.cpu(), ref.routing.cpu()) and opt.molf_step == ref.molf_step == 4
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# -- 2. a non-finite score never wins while a finite one exists --

def test_route_prefers_finite_then_non_finite_then_no_grad():
    nan, inf = math.nan, math.inf
    sums = torch.tensor([[nan, 1.0, 2.0], [inf, 0.5, nan], [nan, inf, 3.0], [nan, inf, 1.0], [2.0, 2.0, nan]])
    no_grad = torch.tensor([[False] * 3, [False] * 3, [False] * 3, [False, False, True], [False] * 3])
    win, scores = route(sums, torch.ones(5, 3), no_grad, [1.0] * 3, "epd", 1)
    assert win.tolist() == [[False, False, True], [False, True, False], [False, False, True],
                            [True, False, False], [True, False, False]]
    assert math.isnan(scores[0, 0]) and scores[3, 2] == -inf  # kept as computed
    win2, _ = route(sums, torch.ones(5, 3), no_grad, [1.0] * 3, "epd", 2)
    # second place: a non-finite score only when no other finite one is left; never an expert without grads
    assert win2.tolist() == [[False, True, True], [True, True, False], [True, False, True],
                             [True, True, False], [True, True, False]]
    all_bad = torch.tensor([[nan, inf]])
    win3, _ = route(all_bad, torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.bool), [1.0, 1.0], "pfn", 1)
    assert win3.tolist() == [[True, False]]  # all non-finite: the tie rule, lower index


def _poison_and_step(model, opt, ids, layer, value):
    """One step where one element of `layer`'s LoRA B gradient is `value`."""
    ids = ids.to(model_device(model))
    model(ids, labels=ids).loss.backward()
    mod = [m for m in model.modules() if isinstance(m, molf.MoLFLinear)][layer]
    mod.lora_B[0].grad.view(-1)[0] = value
    before = [bits(p) for p in mod.lora_B] + [bits(p) for p in mod.lora_A]
    opt.step()
    opt.zero_grad(set_to_none=True)
    return mod, before


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e30], ids=["nan", "inf", "spike"])
def test_non_finite_gradient_does_not_hijack_routing(value, tmp_path):
    ids = batch()
    runs = {}
    for backend in BACKENDS:  # both on one device: the CPU's and the GPU's forward differ at near-ties
        model = wrapped(*MOLF[:3], backend=backend, device=device_for("triton"))
        opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend=backend)
        train_step(model, opt, ids)
        mod, before = _poison_and_step(model, opt, ids, 0, value)
        assert not math.isfinite(opt.scores[0, 1]), "the poisoned expert's score should be non-finite"
        assert opt.routing[0].tolist() == [True, False], "a finite score must win over a non-finite one"
        assert all(torch.equal(b, bits(p)) for b, p in zip(before, list(mod.lora_B) + list(mod.lora_A)))
        routes = [opt.routing.cpu()]
        for _ in range(5):  # v stays inf: the poisoned expert keeps losing, the full expert keeps training
            train_step(model, opt, ids)
            routes.append(opt.routing.cpu())
            assert opt.routing[0].tolist() == [True, False]
        runs[backend] = (opt, torch.stack(routes))
    assert torch.equal(runs["eager"][1], runs["triton"][1]), "both backends route alike"
    opt = runs["triton"][0]
    h = opt.routing_history()
    assert not math.isfinite(h["scores"][1, 0, 1]), "the history keeps the non-finite score"
    path = tmp_path / "routing.jsonl"
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        runs["eager"][0].write_routing_jsonl(path)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert recs[0]["non_finite"] == 0 and recs[1]["non_finite"] >= 1
    assert recs[1]["selections"]["model.layers.0.self_attn.q_proj"]["scores"]["lora_r8"] is None
    assert runs["eager"][0].nonfinite_scores() >= 6


def test_reference_applies_the_same_rule():
    ids = batch()
    model = wrapped(*MOLF[:3])
    opt = make_opt(MoLFAdamWReference, model, 1e-3, 1e-3)
    train_step(model, opt, ids)
    _poison_and_step(model, opt, ids, 0, math.nan)
    assert opt.routing[0].tolist() == [True, False]


# -- 3. losers bitwise unchanged, whatever their moments hold --

@pytest.mark.parametrize("path", ["triton", "eager-host", "eager-device"])
def test_losers_unchanged_with_nan_moments_and_eps_zero(path):
    backend = "triton" if path == "triton" else "eager"
    model = wrapped(*MOLF_E[:3], backend=backend)
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend=backend, eps=0.0)
    if path == "eager-device":  # the torch.where selection a GPU uses (no host read of the routing)
        opt._backend_impl().host_routing = False
    mods = [m for m in model.modules() if isinstance(m, molf.MoLFLinear)]
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = (torch.randn(p.shape, generator=gen) + 3.0).to(p.device)  # nonzero: the winners' v > 0
        for m in mods:  # expert 0 (lora_r2): zero gradients, m = v = 0, so with eps = 0 its update is 0/0;
            m.lora_A[0].grad.zero_()  # from step 3 on a NaN element too
            m.lora_B[0].grad.zero_()
            if step >= 2:
                m.lora_B[0].grad[0, 0] = math.nan
        before = [[bits(p) for p in (m.lora_A[0], m.lora_B[0])] for m in mods]
        opt.step()
        assert not opt.routing[:, 0].any() and opt.routing[:, 1].all()
        for m, b in zip(mods, before):
            assert torch.equal(b[0], bits(m.lora_A[0])) and torch.equal(b[1], bits(m.lora_B[0]))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- 4. add_param_group --

@pytest.mark.parametrize("cls", [molf.MoLFAdamW])
def test_add_param_group_raises(cls):
    model = wrapped(*MOLF[:3])
    opt = make_opt(cls, model, 1e-3, 1e-3, backend="eager")
    extra = nn.Parameter(torch.zeros(3))
    n = len(opt.param_groups)
    with pytest.raises(NotImplementedError, match="cannot take more"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == n


def test_molf_layers_on_several_devices_are_refused_naming_them():
    """A model split over devices (device_map="auto" over GPUs; here the CPU and the meta device, the only two
    a CPU machine has): MoLFAdamW names a layer on each and the ways that are supported."""
    model = tiny_qwen2(layers=3)
    model.model.layers[2].to("meta")
    molf.wrap(model, ranks=(2,), alphas=(4,))
    model.model.layers[0].requires_grad_(False)  # a layer frozen whole names no device
    with pytest.raises(ValueError, match=r"MoLF layers must live on one device, found 2: cpu \(e.g. "
                                         r"model.layers.1.self_attn.q_proj\), meta \(e.g. model.layers.2.self_attn"
                                         r".q_proj\)\. A model split over GPUs by device_map='auto' is not "
                                         r"supported: load it on one GPU .* DDP or FSDP2"):
        molf.MoLFAdamW(model, lr=1e-3)


# -- 5. parameters replaced after the optimizer was built --

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["molf-layer", "embedding"])
def test_replaced_parameters_raise_at_every_step(backend, where):
    model = wrapped(*MOLF[:3], backend=backend)
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend=backend)
    ids = batch().to(model_device(model))
    train_step(model, opt, ids)
    sd = copy.deepcopy(model.state_dict())
    part = "embed" if where == "embedding" else "layers.0.self_attn.q_proj"
    sd = {k: v for k, v in sd.items() if part in k}
    model.load_state_dict(sd, assign=True, strict=False)
    model(ids, labels=ids).loss.backward()
    opt.zero_grad(set_to_none=False)  # the cached plan would be reused: the check must not depend on it
    model(ids, labels=ids).loss.backward()
    name = "embed_tokens.weight" if where == "embedding" else r"q_proj\.base\.weight \(expert full\)"
    with pytest.raises(RuntimeError, match=f"{name} was replaced"):
        opt.step()


# -- 6, 7, 8: molf train --

def _run_main(args, capsys):
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, err


def test_train_keeps_a_finished_run_when_output_is_taken(tmp_path, monkeypatch, capsys):
    import molf.train as mt
    out = tmp_path / "run"
    real_run = mt._run

    def run_then_take_output(cfg, device, work, log):
        result = real_run(cfg, device, work, log)
        os.makedirs(cfg.output, exist_ok=True)
        (out / "someone-elses.txt").write_text("keep me")
        return result

    monkeypatch.setattr(mt, "_run", run_then_take_output)
    assert main(["train", "--output", str(out), "--steps", "3", "--facts", "8", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert (out / "someone-elses.txt").read_text() == "keep me"
    alt = tmp_path / "run-1"
    assert (alt / "summary.json").exists() and (alt / "model").is_dir()
    assert f"the run is in {alt}" in printed and f"output  {alt}/" in printed
    umask = os.umask(0)
    os.umask(umask)
    assert alt.stat().st_mode & 0o777 == 0o777 & ~umask, "normal permissions, not mkdtemp's 0700"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".molf-train-")]


def test_train_unwritable_output_is_one_line_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    import molf.train as mt
    monkeypatch.setattr(mt, "_run", lambda *a: pytest.fail("the model must not be built"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = _run_main(["train", "--output", str(blocker / "run"), "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and "cannot write the output" in err[0], err


def _train_in_a_child(tmp_path, sighup=signal.SIG_DFL):
    """`molf train` for 100000 steps in a child process, once its work folder exists, with SIGHUP's disposition
    `sighup` (SIG_IGN: as under nohup; SIG_DFL: the default, whatever the test runner's own disposition)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")

    def dispositions():
        signal.signal(signal.SIGHUP, sighup)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-m", "molf", "train", "--output", str(tmp_path / "run"), "--steps",
                             "100000", "--facts", "20", "--no-progress", "--backend", "eager"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=dispositions)
    deadline = time.time() + 120
    while not [p for p in os.listdir(tmp_path) if p.startswith(".molf-train-")]:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"molf train ended or took over 120 s before its work folder: {proc.communicate()}")
        time.sleep(0.2)
    time.sleep(3)  # inside training (or model building): either way the handler runs
    return proc


def _exits_cleaned_up(tmp_path, proc, sig):
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        pytest.fail(f"molf train did not exit within 60 s of {sig}; its stacks:\n{proc.communicate()[1][-6000:]}")
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, proc.stderr.read()
    assert not (tmp_path / "run").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".molf-train-")], "the work folder is removed"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_train_cleans_up_on_sigterm_and_sighup(tmp_path, sig):
    proc = _train_in_a_child(tmp_path)
    proc.send_signal(getattr(signal, sig))
    _exits_cleaned_up(tmp_path, proc, getattr(signal, sig))


def test_train_under_nohup_keeps_running_on_sighup(tmp_path):
    """nohup ignores SIGHUP so that a run outlives its terminal: molf train keeps it ignored (it used to install
    its handler over it and stop, removing the run); SIGTERM still stops it cleanly."""
    proc = _train_in_a_child(tmp_path, sighup=signal.SIG_IGN)
    proc.send_signal(signal.SIGHUP)
    time.sleep(3)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _exits_cleaned_up(tmp_path, proc, signal.SIGTERM)


def test_a_signal_whose_exit_was_swallowed_still_stops_the_run(tmp_path, monkeypatch):
    """Python prints and drops an exception a signal handler raises while a __del__ or a weakref callback runs:
    the SIGTERM's SystemExit then never reaches molf, and training went on. Caught again after the step."""
    import molf.train as mt
    real_batch, calls = mt._batch, []

    def batch_that_swallows_a_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs on the next bytecode, in here
                time.sleep(0.5)
            except SystemExit:
                pass  # as Python does for an exception raised in __del__
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(mt, "_batch", batch_that_swallows_a_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--output", str(tmp_path / "run"), "--steps", "200", "--facts", "20", "--no-progress"])
    assert stopped.value.code == 128 + signal.SIGTERM and len(calls) < 6, len(calls)
    assert not (tmp_path / "run").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".molf-train-")], "the work folder is removed"
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_train_truncates_to_max_length_and_says_so(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    lines = [{"prompt": f"item {i} is", "completion": f" c{i % 3}"} for i in range(6)]
    lines.append({"prompt": "long", "completion": " " + " ".join(f"w{i}" for i in range(20000))})
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert main(["train", "--data", str(data), "--output", str(out), "--steps", "3", "--no-progress"]) == 0
    assert time.perf_counter() - t0 < 120
    printed = capsys.readouterr().out
    assert "1 example(s) truncated to 64 tokens" in printed  # the built-in model's max positions
    assert json.loads((out / "summary.json").read_text())["max_length"] == 64
    out2 = tmp_path / "run2"
    assert main(["train", "--data", str(data), "--output", str(out2), "--steps", "2", "--max-length", "3",
                 "--no-progress"]) == 0
    assert "dropped" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--ranks", "0"], "every --ranks entry must be an int in [1, inf], got 0"),
    (["--ranks", "8,16", "--alphas", "16"], "--alphas has 1 entries but there are 2 LoRA experts"),
    (["--lr", "-1"], "--lr must be a finite number in [0"),
    (["--lora-lr", "nan"], "--lora-lr must be a finite number"),
    (["--top-k", "5"], "--top-k must be between 1 and the number of experts per layer (2 in mode molf)"),
    (["--mode", "fft", "--ranks", "8"], "--ranks do(es) not apply to --mode fft"),
    (["--mode", "lora", "--ranks", "8,16"], "--mode lora trains one LoRA adapter"),
    (["--device", "meta"], "molf train runs on cpu or cuda"),
    (["--device", "nonsense"], "unknown --device"),
    (["--steps", "0"], "--steps must be an int in [1"),
    (["--ranks", "8,x"], "argument --ranks: expected comma-separated integers, got '8,x'"),
    (["--alphas", "16,"], "argument --alphas: expected comma-separated numbers, got '16,'"),
    (["--mode", "molf", "--quantize", "nf4"], "--quantize nf4 needs a frozen base: --mode molf-e or lora"),
    (["--mode", "fft", "--quantize", "int8"], "--quantize int8 needs a frozen base"),
    (["--mode", "molf-e", "--quantize", "fp8"], "argument --quantize: invalid choice: 'fp8'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_train_bad_arguments_are_one_line_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code, err = _run_main(["train", "--output", str(out), "--no-progress", *args], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".molf-train-")]


@pytest.mark.parametrize("command", ["train", "compare"])
def test_train_under_torchrun_is_one_error_line(tmp_path, capsys, monkeypatch, command):
    """`torchrun -m molf train` ran one whole run per rank, each in its own folder: rank 1 crashed looking for the
    routing log only rank 0 writes, and rank 0's run was published as if complete. One error line now, on every
    rank, before anything is built."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    code, err = _run_main([command, "--output", str(out), "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and "runs in one process (launched with WORLD_SIZE=2)" in err[0], err
    assert "MoLFTrainer with torchrun or accelerate" in err[0]
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".molf-train-")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_train_cuda_or_triton_on_a_cpu_machine(tmp_path, capsys, monkeypatch):
    code, err = _run_main(["train", "--output", str(tmp_path / "o"), "--device", "cuda", "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and "no CUDA device is available" in err[0], err
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a user's shell: no interpreter
    code, err = _run_main(["train", "--output", str(tmp_path / "o"), "--backend", "triton", "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and "--backend triton needs a CUDA device" in err[0], err


def test_train_non_utf8_data_names_the_file(tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(json.dumps({"prompt": "a", "completion": " b"}).encode() + b"\n"
                     + '{"prompt": "caf\u00e9", "completion": " x"}'.encode("latin-1") + b"\n")
    code, err = _run_main(["train", "--data", str(data), "--output", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and f"{data}:2: not UTF-8" in err[0], err


def test_train_data_with_a_byte_order_mark_and_crlf_reads_as_written(tmp_path):
    """JSONL saved by Windows tools: a UTF-8 BOM first ("not valid JSON (Unexpected UTF-8 BOM)" before) and CRLF
    line ends. Read as the same records; a BOM further down is still an error."""
    from molf.train import TrainError, read_records
    recs = [{"prompt": "caf\u00e9 is", "completion": " open"}, {"text": "hello"}]
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in recs))
    assert read_records(str(data)) == [recs[0], {"prompt": "", "completion": "hello"}]
    data.write_bytes(json.dumps(recs[0]).encode() + b"\n\xef\xbb\xbf" + json.dumps(recs[1]).encode() + b"\n")
    with pytest.raises(TrainError, match=r"bom.jsonl:2: not valid JSON"):
        read_records(str(data))


def test_train_data_as_a_json_array_reads_as_jsonl_does(tmp_path):
    """A .json file holding a JSON array of examples (as `datasets.load_dataset("json")` reads, and many datasets
    ship: before, "not valid JSON" on its first line): the same records as the JSONL of them, indented or on one
    line, with a BOM; errors name the element (or the line, for JSON that does not parse)."""
    from molf.train import TrainError, read_records
    recs = [{"prompt": "caf\u00e9 is", "completion": " open"}, {"text": "hello"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    want = read_records(write_jsonl(tmp_path / "d.jsonl", recs))
    for name, raw in (("indented.json", json.dumps(recs, indent=2).encode()),
                      ("one-line.json", b"  " + json.dumps(recs).encode()),
                      ("bom.json", b"\xef\xbb\xbf\n" + json.dumps(recs, indent=1).encode())):
        (tmp_path / name).write_bytes(raw)
        assert read_records(str(tmp_path / name)) == want, name
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([recs[0], {"prompt": 3}], indent=2))
    with pytest.raises(TrainError, match=r"bad.json\[1\]: expected an object with string keys 'prompt'"):
        read_records(str(bad))
    bad.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]')
    with pytest.raises(TrainError, match=r"bad.json:3: not valid JSON \(Expecting property name"):
        read_records(str(bad))
    bad.write_bytes(b'[\n{"text": "caf\xe9"}]')
    with pytest.raises(TrainError, match=r"bad.json:2: not UTF-8 text \(byte 0xe9\)"):
        read_records(str(bad))
    bad.write_text("[]")
    with pytest.raises(TrainError, match=r"bad.json: no examples"):
        read_records(str(bad))


def test_train_data_as_csv_or_parquet_reads_as_jsonl_does(tmp_path):
    """CSV (a header naming prompt and completion, or text; quoted commas and newlines) and Parquet files (chat
    messages too), as many datasets ship them: the same records as their JSONL (before: "not valid JSON" on the
    first line). Errors name the row, or say the Parquet file is unreadable."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from molf.train import TrainError, read_records
    pairs = [{"prompt": "caf\u00e9, is", "completion": " open\nnow"}, {"prompt": "b ", "completion": "c"}]
    csv_text = 'id,prompt,completion\n1,"caf\u00e9, is"," open\nnow"\n2,b ,c\n'
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbf" + csv_text.encode())
    assert read_records(str(tmp_path / "d.csv")) == read_records(write_jsonl(tmp_path / "d.jsonl", pairs))
    long = "word " * 60000  # 300 KB in one cell: past csv's default field limit
    (tmp_path / "t.csv").write_text(f"text\nhello\n{long}\n")
    assert read_records(str(tmp_path / "t.csv")) == [{"prompt": "", "completion": c} for c in ("hello", long)]
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
             {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"},
                           {"role": "assistant", "content": "y"}]}]
    for name, recs in (("p.parquet", pairs), ("m.parquet", chats)):
        pq.write_table(pa.Table.from_pylist(recs), tmp_path / name)
        assert read_records(str(tmp_path / name)) == read_records(write_jsonl(tmp_path / "x.jsonl", recs)), name
    (tmp_path / "bad.csv").write_text("prompt,answer\na,b\n")
    with pytest.raises(TrainError, match=r"bad.csv:2: expected an object with string keys 'prompt' and "):
        read_records(str(tmp_path / "bad.csv"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(TrainError, match=r"bad.parquet: not a Parquet file pyarrow can read \(ArrowInvalid"):
        read_records(str(tmp_path / "bad.parquet"))


# -- 8. argument validation of the Python API --

@pytest.mark.parametrize("kw, exc, match", [
    (dict(lr=None), TypeError, "lr must be a real number, got None"),
    (dict(lr=True), TypeError, "lr must be a real number, got True"),
    (dict(lr="1e-3"), TypeError, "lr must be a real number"),
    (dict(lr=math.inf), ValueError, "lr must be a finite number"),
    (dict(eps=math.nan), ValueError, "eps must be a finite number"),
    (dict(betas=(0.9,)), ValueError, "betas must be two floats"),
    (dict(betas=0.9), TypeError, "betas must be a pair"),
    (dict(top_k=1.0), TypeError, "top_k.*must be an int"),
    (dict(stochastic_rounding="False"), TypeError, "stochastic_rounding must be True or False"),
    (dict(history_size=-1), ValueError, "history_size"),
], ids=lambda v: None)
def test_optimizer_argument_types(kw, exc, match):
    model = wrapped(*MOLF[:3])
    args = dict(lr=1e-3)
    args.update(kw)
    with pytest.raises(exc, match=match):
        molf.MoLFAdamW(model, **args)


def test_optimizer_accepts_numpy_scalars_and_a_betas_generator():
    model = wrapped(*MOLF[:3])
    opt = molf.MoLFAdamW(model, lr=np.float32(1e-3), lora_lr=np.float64(2e-3), weight_decay=np.float32(0.1),
                         betas=(b for b in (0.9, 0.999)), top_k=np.int64(2), backend="eager")
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.top_k == 2 and type(opt.top_k) is int
    assert all(type(g["lr"]) is float for g in opt.param_groups)
    train_step(model, opt, batch())
    assert opt.routing.all()


def test_sparse_gradients_are_a_clear_error_as_in_torch():
    model = wrapped(*MOLF[:3])
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend="eager")
    ids = batch()
    model(ids, labels=ids).loss.backward()
    emb = model.model.embed_tokens.weight
    emb.grad = emb.grad.to_sparse()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"sparse gradients: model.embed_tokens.weight has a torch.sparse_coo"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and not opt.state


def test_float16_moments_with_an_eps_that_vanishes_warn_once_at_construction(recwarn):
    """What the warning says happens does happen (inf/NaN weights within two steps), and its advice works."""
    ids = batch()
    for kw, warns in ((dict(), True), (dict(state_dtype=torch.float32), False), (dict(eps=1e-4), False)):
        model = wrapped(*MOLF[:3], dtype=torch.float16)
        recwarn.clear()
        opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend="eager", **kw)
        said = [w for w in recwarn if "float16" in str(w.message)]
        assert len(said) == warns
        assert all(w.category is RuntimeWarning and w.filename.endswith("optim_utils.py") for w in said)  # the caller
        for _ in range(2):
            train_step(model, opt, ids)
        finite = all(p.isfinite().all() for p in model.parameters())
        assert finite != warns, kw
    with pytest.warns(RuntimeWarning, match=r"float16 \(state_dtype\) with eps=1e-08"):
        make_opt(molf.MoLFAdamW, wrapped(*MOLF[:3]), 1e-3, 1e-3, state_dtype=torch.float16)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(alphas=(math.inf,)), ValueError, r"alphas\[0\] must be a finite number"),
    (dict(alphas=(math.nan,)), ValueError, r"alphas\[0\]"),
    (dict(dropout="0.1"), TypeError, "dropout must be a real number, got '0.1'"),
    (dict(dropout=None), TypeError, "dropout must be a real number, got None"),
    (dict(train_base="False"), TypeError, "train_base must be True or False"),
    (dict(rslora="False"), TypeError, "rslora must be True or False"),
    (dict(freeze_others="False"), TypeError, "freeze_others must be True or False"),
    (dict(ranks=(8.0,)), TypeError, r"ranks\[0\] must be an int"),
    (dict(target_modules=5), TypeError, "target_modules must be None, .all-linear., a regular expression"),
    (dict(target_modules=("q_proj", 3)), TypeError, "target_modules must be a non-empty sequence of str"),
], ids=lambda v: None)
def test_wrap_argument_types(kw, exc, match):
    model = tiny_qwen2()
    before = copy.deepcopy(model.state_dict())
    args = dict(ranks=(4,), alphas=(8,))
    args.update(kw)
    with pytest.raises(exc, match=match):
        molf.wrap(model, **args)
    assert not any(isinstance(m, molf.MoLFLinear) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_wrap_accepts_numpy_and_none_targets():
    model = molf.wrap(tiny_qwen2(), ranks=np.array([4, 8]), alphas=(np.float32(8), 16), target_modules=None,
                      train_base=np.bool_(False))
    layers = [m for m in model.modules() if isinstance(m, molf.MoLFLinear)]
    assert len(layers) == 2 * len(molf.DEFAULT_TARGETS) and layers[0].ranks == (4, 8)
    assert all(type(r) is int for r in layers[0].ranks) and not layers[0].train_base


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: a second device to move the model to")
def test_model_moved_after_the_optimizer_raises():
    model = wrapped(*MOLF[:3], device="cuda")
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3)
    train_step(model, opt, batch())
    model.to("cpu")  # the same Parameter objects, their storage now on the CPU
    ids = batch()
    model(ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="is on cpu, but MoLFAdamW was created for parameters on cuda"):
        opt.step()


def test_a_device_change_before_the_first_step_is_taken():
    """accelerate.prepare(model, opt) moves the model to the GPU after the optimizer was built (the same Parameter
    objects, new storage): before its first step MoLFAdamW takes the parameters where they are now, as torch.optim
    does. Here the optimizer is made to believe it was built on another device (a CPU machine has one)."""
    model = wrapped(*MOLF[:3])
    twin = copy.deepcopy(model)
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3)
    ref = make_opt(molf.MoLFAdamW, twin, 1e-3, 1e-3)
    opt.device = torch.device("meta")
    for _ in range(3):
        train_step(model, opt, batch())
        train_step(twin, ref, batch())
    assert opt.device == torch.device("cpu") and torch.equal(opt.routing, ref.routing)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_parameters_left_on_another_device_than_the_experts_raise():
    model = wrapped(*MOLF[:3])
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3)
    model.model.norm.to("meta")  # a trainable parameter outside the MoLF layers, alone on another device
    with pytest.raises(RuntimeError, match=r"model.norm.weight is on meta but the MoLF layers' experts on cpu: "
                                           r"MoLFAdamW steps the trainable parameters of one device"):
        opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: a second device to move the model to")
def test_accelerate_prepare_moves_the_model_after_the_optimizer_is_built():
    Accelerator = pytest.importorskip("accelerate").Accelerator
    model = wrapped(*MOLF[:3], device="cpu")
    twin = copy.deepcopy(model).cuda()
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3)
    ref = make_opt(molf.MoLFAdamW, twin, 1e-3, 1e-3)
    model, popt = Accelerator().prepare(model, opt)
    assert next(model.parameters()).is_cuda
    for _ in range(3):
        train_step(model, popt, batch())
        train_step(twin, ref, batch())
        assert torch.equal(opt.routing, ref.routing)
    assert opt.device.type == "cuda"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


# -- 9. layer edge cases agree on both backends --

@pytest.mark.parametrize("k, n", [(0, 5), (4, 0)])
def test_zero_width_linear_on_both_backends(k, n):
    outs, dev = {}, device_for("triton")  # both backends on the device the kernels run on
    for backend in BACKENDS:
        torch.manual_seed(0)
        with pytest.warns(UserWarning):
            layer = molf.MoLFLinear(nn.Linear(k, n, device=dev), ranks=(2,), alphas=(4,), backend=backend)
        x = torch.randn(3, k, device=dev, requires_grad=True)
        y = layer(x)
        y.backward(torch.ones_like(y))
        outs[backend] = [y.detach(), x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(outs["eager"], outs["triton"]):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_input_is_a_type_error_under_autocast(backend):
    dev = device_for(backend)
    layer = molf.MoLFLinear(nn.Linear(4, 3, device=dev), ranks=(2,), alphas=(4,), backend=backend)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
            layer(torch.ones(2, 4, dtype=torch.long, device=dev))
    y = layer(torch.ones(2, 4, device=dev))  # and a float input still works
    assert_close(y, layer.base(torch.ones(2, 4, device=dev)), 1e-6, "fresh layer == base")


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_experts_in_another_dtype_than_the_base_are_a_type_error(backend):
    """LoRA experts cast apart from the base (peft keeps fp32 adapters on a bf16 base): a clear TypeError on both
    backends (before: torch's "expected m1 and m2 to have the same dtype", Triton's interpreter assertion)."""
    dev = device_for(backend)
    layer = molf.MoLFLinear(nn.Linear(16, 8, device=dev, dtype=torch.float16), ranks=(4,), alphas=(8,),
                            backend=backend)
    layer.lora_B[0].data = layer.lora_B[0].data.float()
    x = torch.randn(5, 16, device=dev, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"LoRA experts are torch.float32 but its base weight is torch.float16: a "
                                        r"MoLF layer computes in one dtype; cast the layer as a whole"):
        layer(x)
    if backend == "eager":  # under autocast every product runs in its dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert_close(layer(x).float(), layer.base(x).float(), 1e-2, "B = 0: the base's output")
    layer.to(torch.float16)
    assert_close(layer(x), layer.base(x), 1e-3, "cast as a whole")


def test_state_dict_through_bytes_still_loads():  # the checks accept what torch.save/torch.load give back
    model = wrapped(*MOLF[:3])
    opt = make_opt(molf.MoLFAdamW, model, 1e-3, 1e-3, backend="eager")
    train_step(model, opt, batch())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    train_step(model, opt, batch())
