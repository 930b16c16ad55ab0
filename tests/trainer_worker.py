"""One rank of `torchrun --nproc-per-node 2 tests/trainer_worker.py OUT` (tests/test_distributed.py): MoLFTrainer
under DDP on gloo, as a user's script launched by torchrun or accelerate runs it."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from transformers import TrainingArguments  # noqa: E402

import molf  # noqa: E402
from helpers import Rows, exit_rank_without_finalizing, tiny_qwen2  # noqa: E402
from molf.integrations.hf import MoLFTrainer  # noqa: E402


if __name__ == "__main__":
    out = sys.argv[1]
    model = molf.wrap(tiny_qwen2(), ranks=(8,), alphas=(8,), train_base=True, backend="eager")
    args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=2, learning_rate=3e-3,
                             logging_steps=1, save_steps=2, report_to=[], use_cpu=True, seed=0, data_seed=0,
                             dataloader_num_workers=0, disable_tqdm=True, ddp_backend="gloo")
    trainer = MoLFTrainer(model=model, args=args, train_dataset=Rows(), backend="eager")
    trainer.train()
    opt = trainer.molf_optimizer
    torch.save({"world": int(os.environ["WORLD_SIZE"]), "step": opt.molf_step, "routing": opt.routing,
                "params": torch.cat([p.detach().flatten() for p in trainer.model.parameters()])},
               os.path.join(out, f"rank{os.environ['RANK']}.pt"))
    exit_rank_without_finalizing()  # the results are on disk
