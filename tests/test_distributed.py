"""DDP and FSDP2 (2 processes, gloo, CPU): identical routing on every rank, equal to one process; FSDP1 refused."""
import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import molf
from dist_worker import CFG, OPT, full_params, steps
from helpers import batch, rel_err, tiny_qwen2

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
WORLD = 2
# FSDP2's gradient averaging rounds otherwise than one process's mean (torch 2.7's reduce-scatter with ReduceOp.AVG:
# 4e-5 from one process after 10 steps, on both backends, Adam magnifying the rounding of near-zero gradients;
# within 1e-5 on torch 2.11 and later). The routing is compared exactly.
FSDP2_TOL = 1e-4


@pytest.fixture(scope="module")
def single_process():
    torch.manual_seed(0)
    model = molf.wrap(tiny_qwen2(seed=0), backend="eager", **CFG)
    opt = molf.MoLFAdamW(model, backend="eager", **OPT)
    routes = steps(model, opt, batch(n=2 * WORLD), 10)
    return torch.stack(routes), full_params(model), opt.scores


def spawn(tmp_path, mode, backend, nccl=False):
    import dist_worker
    with contextlib.nullcontext() if nccl else dist_worker.cpu_ranks():
        mp.spawn(dist_worker.run, args=(WORLD, str(tmp_path / "init"), mode, backend, str(tmp_path), nccl),
                 nprocs=WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in results:
        assert "error" not in r, r.get("error")
    return results


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_routing_identical_on_ranks_and_equal_to_one_process(tmp_path, single_process, mode, backend):
    if mode == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
        from torch.distributed import fsdp
        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available in this torch")
    ref_routes, ref_params, _ = single_process
    r0, r1 = spawn(tmp_path, mode, backend)
    assert torch.equal(r0["routes"], r1["routes"])
    assert torch.equal(r0["routes"], ref_routes)
    assert (ref_routes.sum((0, 1)) > 0).all(), "the run should route to both experts"
    assert torch.equal(r0["params"], r1["params"])
    assert rel_err(r0["params"], ref_params) <= (FSDP2_TOL if mode == "fsdp2" else 1e-5)
    # save after 5 steps and resume: the same last 5 steps
    assert torch.equal(r0["resumed_routes"], ref_routes[5:])
    assert torch.equal(r0["resumed_params"], r0["params"])
    if mode == "fsdp2":
        assert r0["lora_sharded"] and r1["lora_sharded"]
        assert rel_err(r0["merged_logits"], r0["sharded_logits"]) <= 1e-5
        assert torch.equal(r0["late_shard_routes"], ref_routes) and torch.equal(r0["late_shard_params"], r0["params"])
        assert "is a DTensor (this rank's shard of it)" in (r0["dtensor_save_error"] or "")
        assert not (tmp_path / "shards0").exists()


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="NCCL needs 2 CUDA GPUs")
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_nccl_routing_identical_on_ranks(tmp_path, mode):
    r0, r1 = spawn(tmp_path, mode, "triton", nccl=True)
    assert torch.equal(r0["routes"], r1["routes"])
    assert torch.equal(r0["params"], r1["params"])
    assert torch.equal(r0["resumed_routes"], r0["routes"][5:])


def launch(out, mode, accelerate=None):
    """tests/trainer_worker.py on 2 ranks (gloo), launched by torchrun, or by `accelerate launch` with the options
    `accelerate` (a list): (exit code, log)."""
    import os
    import signal
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "trainer_worker.py")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    if accelerate is None:
        launcher = ["torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD)]
    else:  # a free port (port 0): launches side by side (pytest -n) must not meet on accelerate's default one
        launcher = ["accelerate.commands.launch", "--num_processes", str(WORLD), "--num_machines", "1",
                    "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", *accelerate]
    run = subprocess.Popen([sys.executable, "-m", *launcher, worker, str(out), mode], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:  # a hung rendezvous: the ranks too, not only the launcher
            os.killpg(run.pid, signal.SIGKILL)
    return run.returncode, log


def trainer_ranks(out, mode, accelerate=None):
    """Each rank's results of tests/trainer_worker.py (launched as `launch` does)."""
    code, log = launch(out, mode, accelerate)
    assert code == 0, log[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def logged_steps(path):
    import json
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_trainer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, trainer_ranks(out, "ddp")


def test_molf_trainer_under_torchrun_ddp(ddp_trainer_run):
    """MoLFTrainer in a script launched by torchrun (2 ranks, gloo): the Trainer wraps the model in DDP after the
    optimizer's layout is read; both ranks route and train alike, rank 0 alone writes the routing log (every step
    once) and the checkpoints, which load as plain models."""
    from transformers import AutoModelForCausalLM
    out, (r0, r1) = ddp_trainer_run
    assert r0["world"] == WORLD and r0["step"] == r1["step"] == 4 and not r0["fsdp"] and r0["sharded"] == 0
    assert torch.equal(r0["routing"], r1["routing"]) and torch.equal(r0["params"], r1["params"])
    assert logged_steps(out / "molf_routing.jsonl") == [1, 2, 3, 4]
    plain = AutoModelForCausalLM.from_pretrained(out / "checkpoint-4")
    assert not any(isinstance(m, molf.MoLFLinear) for m in plain.modules())


@pytest.mark.parametrize("state_dict_type", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_molf_trainer_under_fsdp2(tmp_path, ddp_trainer_run, state_dict_type):
    """MoLFTrainer with fsdp_config={"version": 2} (accelerate's FSDP2, forced on for gloo CPU ranks: see
    trainer_worker.py). transformers builds the optimizer before accelerate shards the model: MoLFAdamW takes
    the shards at its first step (it refused them before) and trains as under DDP, same routing. A run resumed
    from step 2 (the Trainer's FSDP files; the optimizer state through torch.distributed.checkpoint) ends equal,
    its routing log at steps 3 and 4. trainer.save_model writes the merged plain model and molf's state from the
    gathered full state dict (not from the shards), also under SHARDED_STATE_DICT, where the Trainer writes
    nothing; FULL_STATE_DICT checkpoints hold them too."""
    from transformers import AutoModelForCausalLM
    _, (d0, _) = ddp_trainer_run
    r0, r1 = trainer_ranks(tmp_path, f"fsdp2:{state_dict_type}")
    assert r0["fsdp"] and r0["sharded"] == r0["n_params"] > 0  # every parameter a DTensor
    assert r0["step"] == r1["step"] == 4
    assert torch.equal(r0["routing"], r1["routing"]) and torch.equal(r0["params"], r1["params"])
    assert torch.equal(r0["routing"], d0["routing"]) and rel_err(r0["params"], d0["params"]) <= 1e-5
    assert logged_steps(tmp_path / "molf_routing.jsonl") == [1, 2, 3, 4]
    assert r0["resumed_step"] == 4 and torch.equal(r0["resumed_routing"], r0["routing"])
    assert torch.equal(r0["resumed_params"], r0["params"])
    assert logged_steps(tmp_path / "resumed" / "molf_routing.jsonl") == [3, 4]
    full = state_dict_type == "FULL_STATE_DICT"
    ckpt = tmp_path / "checkpoint-4"
    assert (ckpt / ("pytorch_model_fsdp.bin" if full else "pytorch_model_fsdp_0")).exists()
    assert (ckpt / "config.json").is_file() == full
    ids = batch()
    for folder in [tmp_path / "final"] + [ckpt] * full:
        trained = molf.from_pretrained(folder, backend="eager")
        assert torch.equal(torch.cat([p.detach().flatten() for p in trained.parameters()]), r0["params"])
        plain = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            assert rel_err(plain(ids).logits, trained(ids).logits) <= 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="the worker's ranks train on the CPU, where the tests "
                                                     "quantize on the GPU when there is one")
@pytest.mark.parametrize("state_dict_type", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_molf_trainer_under_fsdp2_with_a_4bit_base(tmp_path, state_dict_type):
    """MoLF-E over a bitsandbytes nf4 base under the FSDP2 Trainer (routing equal to DDP's, checked by hand: 4e-9
    on the experts after 2 steps). FULL_STATE_DICT checkpoints and save_model write the peft adapter and molf's
    float state from the gathered state dict (before: a ValueError on rank 0 at the first checkpoint, the other
    rank left in a collective), which molf.load restores exactly into the quantized model wrapped alike. A run
    resumed from step 2 ends as the uninterrupted one, bitwise, from either kind of checkpoint (before: refused,
    accelerate's load_fsdp_model cannot load bitsandbytes' quantization state into the shards)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install molf[quant])")
    from safetensors.torch import load_file
    from test_quant import quantized_qwen2
    r0, r1 = trainer_ranks(tmp_path, f"fsdp2-nf4:{state_dict_type}")
    assert r0["fsdp"] and r0["sharded"] == r0["n_params"] > 0 and r0["step"] == 4
    assert torch.equal(r0["routing"], r1["routing"]) and torch.equal(r0["params"], r1["params"])
    assert r0["resumed_step"] == 4 and torch.equal(r0["resumed_routing"], r0["routing"])
    assert torch.equal(r0["resumed_params"], r0["params"]) and torch.equal(r1["resumed_params"], r0["params"])
    assert logged_steps(tmp_path / "resumed" / "molf_routing.jsonl") == [3, 4]
    full = state_dict_type == "FULL_STATE_DICT"
    assert (tmp_path / "checkpoint-2" / "molf_model.safetensors").is_file() == full
    for folder in [tmp_path / "final"] + [tmp_path / "checkpoint-4"] * full:
        model = molf.wrap(quantized_qwen2(tmp_path / "load"), ranks=(2, 8), alphas=(8, 16), train_base=False,
                          backend="eager")
        molf.load(model, folder)
        got = torch.cat([p.detach().flatten() for p in model.parameters() if p.is_floating_point()])
        assert torch.equal(got, r0["params"]), folder
        q = model.model.layers[0].self_attn.q_proj
        adapter = load_file(folder / "adapter_model.safetensors")
        assert torch.equal(adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                           torch.cat(list(q.lora_A), 0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the worker's ranks train on the CPU, where the tests "
                                                     "quantize on the GPU when there is one")
@pytest.mark.parametrize("state_dict_type", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_accelerate_state_of_an_fsdp2_run_on_a_4bit_base(tmp_path, state_dict_type):
    """A loop of the user's own (no Trainer) under accelerate's FSDP2, MoLF-E over an nf4 base: the state
    accelerator.save_state wrote at step 2 loads with molf.integrations.accelerate.load_state (the experts and
    float tensors into the shards; optimizer, scheduler, RNG as accelerate loads them) and the resumed run ends
    bitwise as the uninterrupted one (accelerator.load_state itself fails there in torch, on every rank: a
    KeyError on the quantization state for FULL_STATE_DICT, unexpected keys for SHARDED_STATE_DICT)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install molf[quant])")
    r0, r1 = trainer_ranks(tmp_path, f"accelerate-nf4:{state_dict_type}")
    assert r0["fsdp"] and r0["step"] == r0["resumed_step"] == 4 and r0["lr"] == r0["resumed_lr"]
    assert not torch.equal(r0["saved"], r0["params"])
    for r in (r0, r1):
        assert torch.equal(r["resumed_loaded"], r0["saved"]) and torch.equal(r["resumed_params"], r0["params"])
        assert torch.equal(r["resumed_routing"], r0["routing"]) and torch.equal(r["params"], r0["params"])


@pytest.mark.parametrize("base", ["float", "nf4"])
def test_load_best_model_at_end_under_fsdp2(tmp_path, base):
    """load_best_model_at_end under the FSDP2 Trainer loads the best checkpoint into the shards; with a 4-bit base,
    its experts and float tensors (before: accelerate's load_fsdp_model failed on bitsandbytes' quantization
    state, a KeyError on every rank)."""
    if base == "nf4":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install molf[quant])")
        if torch.cuda.is_available():
            pytest.skip("the worker's ranks train on the CPU, where the tests quantize on the GPU when there is one")
        from test_quant import quantized_qwen2
    r0, r1 = trainer_ranks(tmp_path, f"fsdp2{'-nf4' * (base == 'nf4')}:FULL_STATE_DICT:best")
    assert r0["best"] == r1["best"] == str(tmp_path / "checkpoint-2") and r0["step"] == 4
    saved = {}
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        if base == "nf4":
            model = molf.wrap(quantized_qwen2(tmp_path / "load"), ranks=(2, 8), alphas=(8, 16), train_base=False,
                              backend="eager")
            molf.load(model, folder)
        else:
            model = molf.from_pretrained(folder, backend="eager")
        saved[step] = torch.cat([p.detach().flatten() for p in model.parameters() if p.is_floating_point()])
    assert not torch.equal(saved[2], saved[4])
    assert torch.equal(r0["params"], saved[2]) and torch.equal(r1["params"], saved[2])


def test_molf_load_into_a_model_sharded_by_fsdp2(tmp_path):
    """molf.load into a wrapped model after fully_shard (a script resuming its own FSDP2 run), on every rank:
    the full tensors of a molf checkpoint, and of a folder that model.save_pretrained wrote in the wrapped
    layout, go to each rank's shards, tied embeddings included (before: a RuntimeError on every rank). Rank 0
    alone reads the tensors and broadcasts them (the host holds one copy of the checkpoint, not one per rank)."""
    import dist_worker
    torch.manual_seed(1)
    model = molf.wrap(tiny_qwen2(seed=0), backend="eager", **dist_worker.CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)  # every tensor differs from a fresh wrap's
    molf.save_pretrained(model, tmp_path / "molf")
    model.save_pretrained(tmp_path / "wrapped")
    folders = [str(tmp_path / "molf"), str(tmp_path / "wrapped")]
    with dist_worker.cpu_ranks():
        mp.spawn(dist_worker.load_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path), folders), nprocs=WORLD)
    want = full_params(model)
    assert not torch.equal(want, full_params(molf.wrap(tiny_qwen2(seed=0), backend="eager", **dist_worker.CFG)))
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"load-{rank}.pt", weights_only=True)
        assert "error" not in result, result["error"]
        for folder in folders:
            assert torch.equal(result[folder], want), (rank, folder)
        assert (result["reads"] > 0) == (rank == 0), (rank, result["reads"])


def test_fsdp2_after_other_device_meshes_routes_as_one_process(tmp_path, single_process):
    """Other device meshes made earlier in the process (another model sharded, accelerate's own): FSDP2 then gives
    the MoLF model's parameters distinct but equal DeviceMesh objects, which are one mesh to MoLFAdamW (before:
    refused with a NotImplementedError at construction)."""
    import dist_worker
    with dist_worker.cpu_ranks():
        mp.spawn(dist_worker.other_meshes_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    ref_routes, ref_params, _ = single_process
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"meshes-{rank}.pt", weights_only=True)
        assert "error" not in result, result["error"]
        assert torch.equal(result["routes"], ref_routes)
        assert rel_err(result["params"], ref_params) <= FSDP2_TOL


@pytest.mark.parametrize("kind, world", [("hsdp", 4), ("bf16-compute", 2)])
def test_hsdp_and_fsdp2_mixed_precision_route_as_one_process(tmp_path, single_process, kind, world):
    """HSDP (a 2-D mesh, 2 replicas x 2 shards, 4 ranks): the per-expert score sums are reduced over the shard
    dimension only, so routing, scores and parameters equal one process's (a sum over every rank would double
    each score; over the replicas, route on pieces). FSDP2 with bf16 compute (MixedPrecisionPolicy): every rank
    routes alike, the fp32 parameters within bf16's tolerance of fp32 training."""
    import dist_worker
    with dist_worker.cpu_ranks():
        mp.spawn(dist_worker.mesh_kinds_worker, args=(world, str(tmp_path / "init"), str(tmp_path), kind),
                 nprocs=world)
    ref_routes, ref_params, ref_scores = single_process
    results = [torch.load(tmp_path / f"{kind}-{rank}.pt", weights_only=True) for rank in range(world)]
    for result in results:
        if "Cannot use ReduceOp.AVG with Gloo" in result.get("error", ""):
            pytest.skip(f"torch {torch.__version__}'s HSDP all-reduces fp32 gradients with ReduceOp.AVG, which gloo "
                        "lacks (NCCL has it); later torch (2.11 here) runs it on gloo")
        assert "error" not in result, result["error"]
        assert torch.equal(result["routes"], results[0]["routes"])
        assert torch.equal(result["params"], results[0]["params"])
    if kind == "hsdp":
        assert torch.equal(results[0]["routes"], ref_routes)
        assert rel_err(results[0]["params"], ref_params) <= 1e-5
        assert rel_err(results[0]["scores"], ref_scores) <= 1e-5
    else:
        assert rel_err(results[0]["params"], ref_params) <= 1e-2


FSDP_OPTIONS = ["--use_fsdp", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                "--fsdp_transformer_layer_cls_to_wrap", "Qwen2DecoderLayer", "--fsdp_state_dict_type", "FULL_STATE_DICT"]


@pytest.mark.parametrize("setup", ["ddp", "fsdp2"])
def test_molf_trainer_under_accelerate_launch(tmp_path, ddp_trainer_run, setup):
    """`accelerate launch` itself around the script (2 ranks, gloo; `--multi_gpu` starts torchrun's launcher on a
    machine without GPUs too), its options reaching the Trainer through the environment only, as in a user's run:
    DDP equals the torchrun run bitwise; `--use_fsdp --fsdp_version 2` shards every parameter (forced on for CPU
    ranks, see trainer_worker.py), routes as DDP and resumes from step 2 to the same end."""
    _, (d0, _) = ddp_trainer_run
    options = ["--multi_gpu"] if setup == "ddp" else [*FSDP_OPTIONS, "--fsdp_version", "2"]
    r0, r1 = trainer_ranks(tmp_path, "launcher", accelerate=options)
    assert r0["world"] == WORLD and r0["step"] == r1["step"] == 4 and r0["fsdp"] == (setup == "fsdp2")
    assert r0["sharded"] == (r0["n_params"] if setup == "fsdp2" else 0)
    assert torch.equal(r0["routing"], r1["routing"]) and torch.equal(r0["params"], r1["params"])
    assert torch.equal(r0["routing"], d0["routing"]) and rel_err(r0["params"], d0["params"]) <= 1e-5
    if setup == "ddp":
        assert torch.equal(r0["params"], d0["params"])
    else:
        assert r0["resumed_step"] == 4 and torch.equal(r0["resumed_params"], r0["params"])
        assert logged_steps(tmp_path / "resumed" / "molf_routing.jsonl") == [3, 4]
    assert logged_steps(tmp_path / "molf_routing.jsonl") == [1, 2, 3, 4]
    trained = molf.from_pretrained(tmp_path / "final", backend="eager")
    assert torch.equal(torch.cat([p.detach().flatten() for p in trained.parameters()]), r0["params"])


def test_accelerate_launch_with_fsdp1_is_refused(tmp_path):
    """`accelerate launch --use_fsdp` without --fsdp_version 2 (accelerate's default is FSDP1): every rank stops
    when MoLFTrainer is built, saying to use FSDP2, before a step."""
    code, log = launch(tmp_path, "launcher", accelerate=FSDP_OPTIONS)
    assert code != 0
    assert "FSDP1: the Trainer would shard the model with FullyShardedDataParallel" in log
    assert "accelerate launch --use_fsdp --fsdp_version 2" in log
    assert not (tmp_path / "checkpoint-2").exists() and not (tmp_path / "molf_routing.jsonl").exists()


def test_fsdp1_and_wrapping_after_sharding_are_refused(tmp_path):
    """FSDP1 flattens each unit's parameters into per-rank pieces (use_orig_params=True leaves every rank a
    different piece of each expert, False one flat tensor): MoLFAdamW would score and route on a rank's own piece.
    molf.wrap after DDP or FSDP (1 or 2) adds experts they do not see. save_pretrained, export_peft and merge of
    FSDP2's shards need the gathered state dict (the first two say how to pass it). Each refused on every rank."""
    import os

    import dist_worker
    mp.spawn(dist_worker.refusals_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"refusals-{rank}.pt", weights_only=False)
        assert "error" not in result, result["error"]
        assert len(result) == 10, sorted(result)
        for case, said in result.items():
            assert said is not None, case
            if case.startswith("full-"):
                assert said.startswith(f"molf.{case[5:]}: the model is sharded by FSDP2"), (case, said)
                assert ("get_model_state_dict" if case != "full-merge" else "molf.from_pretrained") in said
                assert not os.path.exists(tmp_path / f"s{rank}") and not os.path.exists(tmp_path / f"p{rank}")
            elif case.startswith("optimizer"):
                assert said.startswith("model is sharded with FSDP1") and "fsdp_version 2" in said, (case, said)
            else:
                wrapper = {"wrap-ddp": "DistributedDataParallel", "wrap-fsdp1": "FSDP1",
                           "wrap-fsdp2": "FSDP2 (fully_shard, at model.layers.0)"}[case]
                assert said.startswith(f"model is already wrapped by {wrapper}"), (case, said)
                assert "call molf.wrap on the plain model first" in said
