"""Ratios between implementations measured in one run (used by the harness and by hand)."""
from collections import defaultdict
from statistics import median


def ratio_table(rows, pairs=(("eager", "molf"), ("cublas_chain", "molf"), ("molf", "base"),
                              ("reference", "molf"), ("reference", "eager"), ("torch_adamw_fused", "molf"),
                              ("eager", "torch_adamw_fused"), ("molf_fresh_grads", "molf"), ("eager", "molf_eager"),
                              ("eager", "base"), ("cublas_chain", "base"), ("two_pass", "one_pass"))):
    """For each bench and pair (a, b): median over shapes of time(a) / time(b)."""
    by_case = defaultdict(dict)
    for r in rows:
        key = (r["bench"], r["model"], r["module"], r["M"], tuple(r["ranks"]), r["dtype"])
        by_case[key][r["impl"]] = r["median_ms"]
    out = []
    for bench in sorted({k[0] for k in by_case}):
        for a, b in pairs:
            ratios = [c[a] / c[b] for k, c in by_case.items() if k[0] == bench and a in c and b in c]
            if ratios:
                out.append(f"{bench:24s} time({a}) / time({b}) = {median(ratios):6.2f}x  "
                           f"(median of {len(ratios)} shapes, min {min(ratios):.2f}, max {max(ratios):.2f})")
    return out


if __name__ == "__main__":
    import json
    import sys
    for line in ratio_table(json.load(open(sys.argv[1]))["rows"]):
        print(line)
