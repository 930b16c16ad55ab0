"""One rank of `torchrun --nproc-per-node 2 tests/trainer_worker.py OUT MODE` (or `accelerate launch ...`;
tests/test_distributed.py): MoLFTrainer on gloo, as a user's script launched by torchrun or accelerate runs it. MODE
"ddp", "fsdp2[:STATE_DICT_TYPE]" or "fsdp2-nf4[:STATE_DICT_TYPE[:best]]" (MoLF-E over a 4-bit base): the Trainer's
fsdp_config={"version": 2, "state_dict_type": ...}, with which transformers builds the optimizer before accelerate
shards the model and points the optimizer at the shards; "launcher": TrainingArguments without FSDP options, the
set-up `accelerate launch` gives through the environment (DDP, or FSDP with --use_fsdp). Under FSDP a second run
resumes from the step-2 checkpoint. The first run ends with trainer.save_model(OUT/final) on every rank. ":best":
evaluated at each checkpoint, the greater eval loss best (step 2's), load_best_model_at_end; no resume.
"accelerate-nf4:STATE_DICT_TYPE": no Trainer, a loop of the user's own around Accelerator(fsdp_plugin=FSDP2) and
MoLF-E over a 4-bit base, accelerator.save_state at step 2, resumed there by molf.integrations.accelerate.load_state."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from transformers import TrainingArguments  # noqa: E402

import molf  # noqa: E402
from helpers import Rows, exit_rank_without_finalizing, tiny_qwen2  # noqa: E402
from molf.integrations.hf import MoLFTrainer  # noqa: E402


def force_fsdp_on_cpu_ranks():
    """accelerate turns FSDP on only for GPU-type distributed states (multi-GPU, NPU, ...), never for gloo CPU
    ranks: there it silently trains with DDP. Set the state it sets on GPUs, so that the Trainer's FSDP2 path
    (accelerate's fully_shard, its optimizer switch, its state-dict gathering and checkpoints) runs here."""
    import accelerate.state as st
    init = st.AcceleratorState.__init__

    def forced(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == st.DistributedType.MULTI_CPU:
            self.distributed_type = st.DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            st.PartialState._shared_state["distributed_type"] = self.distributed_type
    st.AcceleratorState.__init__ = forced


def build(out, mode):
    """MoLF on a tiny Qwen2; "...-nf4": MoLF-E on one loaded with a 4-bit BitsAndBytesConfig."""
    if "-nf4" in mode:
        from pathlib import Path

        from test_quant import quantized_qwen2
        # written by each rank before the process group exists (transformers then saves on rank 0 only)
        base = quantized_qwen2(Path(sys.argv[1]) / f"float-rank{os.environ['RANK']}")
        return molf.wrap(base, ranks=(2, 8), alphas=(8, 16), train_base=False, backend="eager")
    return molf.wrap(tiny_qwen2(), ranks=(8,), alphas=(8,), train_base=True, backend="eager")


def train(out, mode, resume=None):
    model = build(out, mode)
    fsdp = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"],
                                        "state_dict_type": mode.split(":")[1] if ":" in mode else "FULL_STATE_DICT"})
    best = dict(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                greater_is_better=True) if mode.endswith(":best") else {}
    args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=2, learning_rate=3e-3,
                             logging_steps=1, save_steps=2, report_to=[], use_cpu=True, seed=0, data_seed=0,
                             dataloader_num_workers=0, disable_tqdm=True, ddp_backend="gloo",
                             **(fsdp if mode.startswith("fsdp2") else {}), **best)
    trainer = MoLFTrainer(model=model, args=args, train_dataset=Rows(), eval_dataset=Rows(n=4) if best else None,
                          backend="eager")
    trainer.train(resume_from_checkpoint=resume)
    if resume is None:
        trainer.save_model(os.path.join(out, "final"))  # every rank, as scripts call it
    opt = trainer.molf_optimizer
    float_params = [p for p in trainer.model.parameters() if p.is_floating_point()]  # not 4-bit packed weights
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in float_params]
    sharded = sum(hasattr(p, "full_tensor") for p in float_params)
    return {"world": int(os.environ["WORLD_SIZE"]), "step": opt.molf_step, "routing": opt.routing, "sharded": sharded,
            "n_params": len(params), "fsdp": trainer.is_fsdp_enabled,
            "params": torch.cat([p.detach().flatten() for p in params]),
            "best": trainer.state.best_model_checkpoint}


def accelerate_loop(out, mode, resume=None):
    """4 steps (from step 2 with `resume`) of a plain loop that accelerate.prepare's FSDP2 shards; the state saved
    (accelerator.save_state) after step 2 of the first run."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    from molf.integrations.accelerate import load_state
    model = build(out, "-nf4")
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=mode.split(":")[1],
                                            auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["Qwen2DecoderLayer"])
    accelerator = Accelerator(fsdp_plugin=plugin, cpu=True)
    opt = molf.MoLFAdamW(model, lr=3e-3, backend="eager")
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
    model, opt, schedule = accelerator.prepare(model, opt, schedule)

    def floats():
        ps = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters() if p.is_floating_point()]
        return torch.cat([p.detach().flatten() for p in ps])
    result = {"fsdp": accelerator.is_fsdp2}
    if resume:
        load_state(accelerator, resume)
        result["loaded"] = floats()
    rows = Rows()
    for step in range(2 if resume else 0, 4):
        accelerator.backward(model(**{k: v[None] for k, v in rows[step].items()}).loss)
        opt.step()
        schedule.step()
        opt.zero_grad()
        if step == 1 and not resume:
            accelerator.save_state(os.path.join(out, "state"))
            result["saved"] = floats()
    return {**result, "params": floats(), "routing": opt.optimizer.routing.clone(), "step": opt.optimizer.molf_step,
            "lr": schedule.get_last_lr()}


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    if mode.startswith("accelerate-nf4"):
        force_fsdp_on_cpu_ranks()
        result = accelerate_loop(os.path.join(out, "run"), mode)
        resumed = accelerate_loop(os.path.join(out, "resumed"), mode, resume=os.path.join(out, "run", "state"))
        result.update({f"resumed_{k}": v for k, v in resumed.items()})
        torch.save(result, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
        exit_rank_without_finalizing()
    if mode.startswith("fsdp2") or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        force_fsdp_on_cpu_ranks()
    result = train(out, mode)
    if result["fsdp"] and not mode.endswith(":best"):
        resumed = train(os.path.join(out, "resumed"), mode, resume=os.path.join(out, "checkpoint-2"))
        result.update({f"resumed_{k}": v for k, v in resumed.items()})
    torch.save(result, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
    exit_rank_without_finalizing()  # the results are on disk
