"""Side by side on a noisy machine: molf eager against the reference, one step of each in turn, so a slow
phase of the machine (minutes, on a shared host) falls on both alike. `make bench` times each row on its
own; this gives the ratio the rows estimate. CPU or GPU, the shapes of test_bench_train.py.

    .venv/bin/python bench/interleaved.py [--steps 40]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import conftest  # noqa: E402,F401  (the harness's allocator set-up)
import test_bench_train as T  # noqa: E402


def runner(setting: str, impl: str):
    model, cfg, opt = T.model_and_optimizer(setting, impl)
    ids = torch.randint(0, cfg.vocab_size, (T.BATCH, T.SEQ), device=T.DEVICE)

    def step():
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if T.CUDA:
            torch.cuda.synchronize()
        return t1 - t0, time.perf_counter() - t1
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    for setting in T.SETS:
        steps = {impl: runner(setting, impl) for impl in ("eager", "reference")}
        times = {impl: [] for impl in steps}
        for i in range(args.steps + 5):
            for impl, step in steps.items():
                t = step()
                if i >= 5:
                    times[impl].append(t)
        med = {impl: [statistics.median(x[k] for x in ts) * 1e3 for k in (0, 1)] for impl, ts in times.items()}
        total = {impl: sum(v) for impl, v in med.items()}
        print(f"{T.NAME} ({setting}): " + "; ".join(
            f"{impl} forward+backward {v[0]:.2f} ms, optimizer {v[1]:.2f} ms" for impl, v in med.items())
            + f"; reference / eager {total['reference'] / total['eager']:.2f}x")


if __name__ == "__main__":
    main()
