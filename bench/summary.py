"""Ratios between implementations measured in one run (used by the harness and by hand)."""
from collections import defaultdict
from statistics import median


def ratio_table(rows, pairs=(("eager", "molf"), ("cublas_chain", "molf"), ("molf", "base"),
                              ("reference", "molf"), ("reference", "eager"), ("torch_adamw_fused", "molf"),
                              ("eager", "torch_adamw_fused"), ("molf_fresh_grads", "molf"), ("eager", "molf_eager"),
                              ("eager", "base"), ("cublas_chain", "base"), ("two_pass", "one_pass"),
                              ("molf", "molf_fused"), ("molf_fused", "cublas_chain"), ("molf_fused", "base"),
                              ("qmolf_e", "molf_e"), ("qmolf_e", "peft_qlora"))):
    """For each bench and pair (a, b): median over shapes of time(a) / time(b)."""
    by_case = defaultdict(dict)
    for r in rows:
        key = (r["bench"], r["model"], r["module"], r["M"], r["dtype"]) if r["bench"].endswith("_quant") else \
            (r["bench"], r["model"], r["module"], r["M"], tuple(r["ranks"]), r["dtype"])  # QLoRA's r differs
        by_case[key][r["impl"]] = r["median_ms"]
    out = []
    for bench in sorted({k[0] for k in by_case}):
        for a, b in pairs:
            ratios = [c[a] / c[b] for k, c in by_case.items() if k[0] == bench and a in c and b in c]
            if ratios:
                out.append(f"{bench:24s} time({a}) / time({b}) = {median(ratios):6.2f}x  "
                           f"(median of {len(ratios)} shapes, min {min(ratios):.2f}, max {max(ratios):.2f})")
        # the planner's target: molf (auto) <= min(fused, chain) x 1.03 at every shape
        auto = [c["molf"] / min(c["molf_fused"], c["cublas_chain"]) for k, c in by_case.items()
                if k[0] == bench and {"molf", "molf_fused", "cublas_chain"} <= set(c)]
        if auto:
            out.append(f"{bench:24s} time(molf) / min(molf_fused, cublas_chain): max {max(auto):.2f}x over "
                       f"{len(auto)} shapes (target <= 1.03)")
    loops = {r["bench"]: r["median_ms"] for r in rows if r["bench"].startswith("train_loop_")}
    if {"train_loop_fixed", "train_loop_variable"} <= set(loops):
        out.append(f"{'train_loop':24s} median step, variable / fixed length = "
                   f"{loops['train_loop_variable'] / loops['train_loop_fixed']:.2f}x (target <= 1.10)")
    return out


if __name__ == "__main__":
    import json
    import sys
    for line in ratio_table(json.load(open(sys.argv[1]))["rows"]):
        print(line)
