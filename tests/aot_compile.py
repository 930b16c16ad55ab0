"""Compile every Triton kernel of molf for a real GPU target (no GPU needed): run as a script, without
TRITON_INTERPRET. Catches what the interpreter cannot: type errors and unsupported ops in the CUDA backend.
Prints one line per compiled variant; exits non-zero on the first failure. Also checks that the generic product,
specialised as the launcher does it, keeps its software pipelining (its shared memory holds the stages)."""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from molf.kernels import molf_linear as L  # noqa: E402
from molf.kernels import multi_tensor as MT  # noqa: E402
from molf.kernels import routed_adamw as R  # noqa: E402

TL = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}


def raw(fn):
    """The @triton.jit function under an @triton.autotune wrapper."""
    return fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn


def compile_one(fn, sig, constexprs, target, **options):
    src = ASTSource(fn=raw(fn), signature={**sig, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    return triton.compile(src, target=target, options=options or None)


def variants():
    i32, f32 = "i32", "fp32"
    for dt in ("fp32", "fp16", "bf16"):
        for second, drop, bias, scale, split in ((True, 0, True, False, False), (False, 0, False, True, False),
                                                 (True, 3, False, False, False), (False, 0, False, False, True),
                                                 (False, 1, False, True, True), (False, 2, False, False, True)):
            sig = {"a1": f"*{dt}", "b1": f"*{dt}", "a2": f"*{dt}", "b2": f"*{dt}", "seed_ptr": "*i64",
                   "bias": f"*{dt}", "colscale": "*fp32", "c": "*fp32" if split else f"*{dt}", "M": i32,
                   "M_BUCKET": i32, "N": i32, "K": i32, "R": i32,
                   "k_split": i32, **{s: i32 for s in ("s_a1m", "s_a1k", "s_b1k", "s_b1n", "s_a2m", "s_a2r", "s_b2r",
                                                       "s_b2n", "s_cs", "s_cm", "s_cn")},
                   "p_drop": f32, "inv_keep": f32}
            cx = dict(HAS_SECOND=second, DROP=drop, HAS_BIAS=bias, HAS_SCALE=scale, IEEE=dt == "fp32",
                      SPLIT_K=split, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
            yield (f"_mm2 {dt} second={second} drop={drop} split_k={split}", L._mm2_kernel, sig, cx,
                   dict(num_warps=8, num_stages=3))
        for dbias in (False, True):
            sig = {"g": f"*{dt}", "b": f"*{dt}", "u": f"*{dt}", "vp": "*fp32", "dbp": "*fp32", "dbias_p": "*fp32",
                   **{n: i32 for n in ("M", "N", "R", "cols", "s_gm", "s_gn", "s_bn", "s_br", "s_um", "s_ur")}}
            bm, bn = (64, 32) if dt == "fp32" else (128, 64)  # as molf_linear._one_pass_grid
            cx = dict(HAS_DBIAS=dbias, IEEE=dt == "fp32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=16 if dbias else 64)
            yield f"lowrank_grads {dt} dbias={dbias}", L._lowrank_grads_kernel, sig, cx, dict(num_warps=8)
    # the Hopper descriptor path: forward (B operands transposed) and dx (not); a Triton without host-side
    # descriptors (before 3.4) has no tensordesc type, and the layer never takes that path there
    for dt in ("fp16", "bf16") if L.tensor_descriptor_class() is not None else ():
        for nk, drop, (bm, bn, warps, sub) in ((True, 0, (128, 256, 8, True)), (False, 3, (128, 128, 8, True)),
                                               (True, 0, (64, 128, 4, False))):
            bk = 64
            def desc(*shape):
                return f"tensordesc<{dt}{list(shape)}>"
            b = desc(bn, bk) if nk else desc(bk, bn)
            sig = {"a1_d": desc(bm, bk), "b1_d": b, "a2_d": desc(bm, bk), "b2_d": b,
                   "c_d": desc(bm, bn // 2) if sub else desc(bm, bn), "seed_ptr": "*i64", "bias": f"*{dt}",
                   **{n: i32 for n in ("M", "M_BUCKET", "N", "K", "R")}, "p_drop": f32, "inv_keep": f32,
                   "NUM_SMS": i32}
            cx = dict(B1_NK=nk, B2_NK=nk, DROP=drop, HAS_BIAS=drop == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                      GROUP_M=8, SUBTILE=sub)
            yield (f"_mm2_tma {dt} {bm}x{bn} nk={nk} drop={drop}", L._mm2_tma_kernel, sig, cx,
                   dict(num_warps=warps, num_stages=3 if bn == 256 else 4))
    sig = {"part": "*fp32", "out": "*bf16", "colscale": "*fp32", "bias": "*bf16", "n_parts": i32, "numel": i32,
           "n_cols": i32}
    yield "keep_mask", L._keep_mask_kernel, {"seed_ptr": "*i64", "out": "*i8", "rows": i32, "cols": i32,
                                             "p": f32}, dict(BLOCK=1024), {}
    yield "sum_partials bf16", L._sum_partials_kernel, sig, dict(HAS_SCALE=True, HAS_BIAS=True, BLOCK=1024), {}
    table = {"ptrs": "*i64", "first": "*i64", "numel": "*i64", "n_rows": i32}
    for p, s in (("bf16", "bf16"), ("fp32", "fp32"), ("fp16", "fp32")):
        for pfn in (False, True):
            sig = {**table, "out_block": "*i64", "owner": "*i32", "partials": "*fp32", "beta1": f32, "beta2": f32}
            cx = dict(P_DTYPE=TL[p], G_DTYPE=TL[p], S_DTYPE=TL[s], PFN=pfn, EPS_SCORE=1e-8, BLOCK=1024, STEPS=8)
            yield f"moments_score p={p} s={s} pfn={pfn}", R._moments_score_kernel, sig, cx, {}
        for sr in (False, True):
            sig = {**table, "owner": "*i32", "group": "*i32", "tensor_id": "*i32", "winners": "*u8",
                   "bias_corr": "*fp32", **{f"{n}{i}": f32 for n in ("lr", "wd", "eps") for i in range(5)},
                   "seed": i32}
            cx = dict(P_DTYPE=TL[p], S_DTYPE=TL[s], STOCHASTIC=sr and p == "bf16", BLOCK=1024, STEPS=8)
            yield f"masked_update p={p} s={s} sr={sr}", R._masked_update_kernel, sig, cx, {}
    yield "finish", R._finish_kernel, {"partials": "*fp32", "seg_start": "*i64", "sums": "*fp32", "n_seg": i32,
                                       "step_ptrs": "*i64", "n_tensors": i32, "betas64": "*fp64",
                                       "bias_corr": "*fp32"}, dict(BLOCK=128, TB=128), {}
    yield "sumsq_partials", MT._sumsq_partials_kernel, {**table, "partials": "*fp32"}, \
        dict(DTYPE=tl.bfloat16, BLOCK=1024, STEPS=8), {}
    yield "segment_sum", MT._segment_sum_kernel, {"partials": "*fp32", "seg_start": "*i64", "out": "*fp32"}, \
        dict(BLOCK=128), {}


def specialised(fn, values, constexprs):
    """The kernel as Triton's launcher specialises it for these arguments: ints equal to 1 become constants,
    other ints and the pointers (strings: their type) are marked divisible by 16 where they are."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(raw(fn).arg_names):
        v = values.get(name)
        if name in constexprs:
            sig[name] = "constexpr"
        elif isinstance(v, str):
            sig[name], attrs[(i,)] = v, [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=raw(fn), signature=sig, constexprs=consts, attrs=attrs)


def pipelined_variants():
    """(name, source, options, minimal shared memory): the generic product at Qwen2.5-1.5B q_proj shapes (M 8192,
    K = N = 1536, R = 128, bf16) in the config MOLF_AUTOTUNE=0 keeps, as launched. Software pipelining keeps
    num_stages tiles of A and B in shared memory; a change that defeats it (a load cp.async cannot take)
    leaves one, and the kernel waits on every load."""
    M, K, N, R = 8192, 1536, 1536, 128
    c = L._configs()[3]
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    need = (c.num_stages - 1) * (bm * bk + bk * bn) * 2  # stages - 1 loads in flight, at least, in any Triton
    common = dict(a1="*bf16", b1="*bf16", a2="*bf16", b2="*bf16", c="*bf16", seed_ptr="*i64", bias="*bf16",
                  colscale="*fp32", k_split=K, s_a2m=0, s_a2r=0, s_b2r=0, s_b2n=0, s_cs=0, p_drop=0.0, inv_keep=1.0)
    flags = dict(HAS_SECOND=False, DROP=0, HAS_BIAS=False, IEEE=False, SPLIT_K=False, **c.kwargs)
    u = dict(common, M=M, M_BUCKET=M, N=R, K=K, R=0, s_a1m=K, s_a1k=1, s_b1k=1, s_b1n=K, s_cm=R, s_cn=1)
    dw = dict(common, M=N, M_BUCKET=N, N=K, K=M, R=0, s_a1m=1, s_a1k=N, s_b1k=K, s_b1n=1, s_cm=K, s_cn=1)
    opts = dict(num_warps=c.num_warps, num_stages=c.num_stages)
    yield "_mm2 u = x A^T", specialised(L._mm2_kernel, u, dict(flags, HAS_SCALE=True)), opts, need
    yield "_mm2 dW = g^T x", specialised(L._mm2_kernel, dw, dict(flags, HAS_SCALE=False)), opts, need


if __name__ == "__main__":
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    target = GPUTarget("cuda", arch, 32)
    if L.tensor_descriptor_class() is None:
        print(f"no descriptors in Triton {triton.__version__}: the _mm2_tma variants are not compiled")
    for name, fn, sig, cx, opts in variants():
        k = compile_one(fn, sig, cx, target, **opts)
        print(f"ok sm_{arch} {name}: {len(k.asm['ptx'])} chars of PTX")
    for name, src, opts, need in pipelined_variants():
        k = triton.compile(src, target=target, options=opts)
        if k.metadata.shared < need:
            sys.exit(f"{name}: {k.metadata.shared} bytes of shared memory, under the {need} that "
                     f"{opts['num_stages']} pipeline stages take: the loads are not software-pipelined")
        print(f"pipelined sm_{arch} {name}: {k.metadata.shared} bytes of shared memory")
