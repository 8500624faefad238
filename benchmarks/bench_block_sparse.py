#!/usr/bin/env python
"""Benchmark of the 16×16 block-sparse adapter kernels against dense, torch BSR and cuBLAS.

Phi-3-mini qkv_proj shape, several keep ratios and token counts, every launcher (delta forward,
delta dX, dBlocks, fused forward and dX); rows go to ``benchmarks/results/block_sparse.jsonl``,
only from CUDA runs. ``--smoke``: a small correctness check, no timing, nothing recorded;
``--compile-check``: compile every kernel config for sm_90 (no GPU needed). The compared
implementations, what is timed and the goals: docs/kernels.md, section "Block-sparse kernels".
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from common import append_rows, run_metadata, sm90_compile_check  # benchmarks/common.py (the script's folder)

_DEVICE = "cuda"  # the timed device (a module constant so a CPU dry run of the script's logic can swap it)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("delta_fwd", "delta_dx", "dblocks", "fused_fwd", "fused_dx")
BASELINE = {  # the implementation each op's speed-up is reported against
    "delta_fwd": "dense_ref",
    "delta_dx": "dense_ref",
    "dblocks": "dense_dW_gather",
    "fused_fwd": "cublas_W",
    "fused_dx": "cublas_W",
}
GOALS = (  # (op, compared impl, minimum speed-up) at keep 0.1, 8192 tokens (docs/kernels.md)
    ("delta_fwd", "dense_ref", 5.0),
    ("delta_fwd", "torch_bsr", 2.0),
    ("dblocks", "dense_dW_gather", 4.0),
    ("fused_fwd", "cublas_W", 1 / 1.1),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark the block-sparse (16x16) adapter kernels against dense, torch BSR and cuBLAS.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--keep", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.25], help="fractions of tiles kept")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 2048, 8192], help="token counts")
    p.add_argument("--d-in", type=int, default=3072, help="weight input dim (Phi-3-mini qkv: 3072)")
    p.add_argument("--d-out", type=int, default=9216, help="weight output dim (Phi-3-mini qkv: 9216)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="activations and base weight")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "block_sparse.jsonl"))
    p.add_argument("--no-record", action="store_true", help="print the table only, append nothing")
    p.add_argument("--smoke", action="store_true", help="small correctness run of every launcher; records nothing")
    p.add_argument("--compile-check", action="store_true",
                   help="compile every kernel config for sm_90 (no GPU needed); print resources; records nothing")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ------------------------------------------------------------------------- helpers


def _import_kernels():
    sys.path.insert(0, ROOT)
    try:
        from sparse_engine.kernels import block_sparse as bsk
        from sparse_engine.kernels import reference as ref
    except ImportError:  # running from a checkout without the package installed
        from kernels import block_sparse as bsk
        from kernels import reference as ref
    return bsk, ref


def _random_pattern(torch, n_rb, n_cb, keep, gen, device):
    n = max(1, round(keep * n_rb * n_cb))
    ids = torch.randperm(n_rb * n_cb, generator=gen)[:n]
    return torch.sort(ids).values.to(torch.int32).to(device)


def _rel(torch, a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# --------------------------------------------------------------------------- smoke


def run_smoke(args):
    """A small correctness check of every launcher against fp64 (CPU: Triton interpreter)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    bsk, ref = _import_kernels()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if dev.type == "cuda" else [])
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
    gen = torch.Generator().manual_seed(args.seed)
    bs = args.block_size
    failures = 0
    print(f"smoke: device {dev}, interpreter {os.environ.get('TRITON_INTERPRET') == '1'}")
    print(f"{'op':10s} {'dtype':9s} {'shape':>8s} {'tok':>4s} {'keep':>5s} {'rel err':>9s}")
    for d_out, d_in in ((96, 48), (48, 96)):
        n_rb, n_cb = d_out // bs, d_in // bs
        for keep in (0.3, 1.0):
            idx = _random_pattern(torch, n_rb, n_cb, keep, gen, dev)
            blocks = torch.randn(idx.numel(), bs, bs, generator=gen).to(dev)
            delta = ref.densify_blocks(blocks.cpu(), idx.cpu(), (d_out, d_in)).double()
            lay = bsk.build_block_layout(idx, (d_out, d_in), bs)
            for dtype in dtypes:
                tokens = 17
                x = torch.randn(tokens, d_in, generator=gen).to(dtype).to(dev)
                dy = torch.randn(tokens, d_out, generator=gen).to(dtype).to(dev)
                w = torch.randn(d_out, d_in, generator=gen).to(dtype).to(dev)
                x64, dy64, w64 = x.cpu().double(), dy.cpu().double(), w.cpu().double()
                checks = {
                    "delta_fwd": (bsk.block_delta_matmul(x, blocks, idx, d_out, layout=lay), x64 @ delta.t()),
                    "delta_dx": (bsk.block_delta_grad_input(dy, blocks, idx, d_in, layout=lay), dy64 @ delta),
                    "dblocks": (bsk.block_grad_blocks(dy, x, idx, bs, layout=lay),
                                ref.gather_blocks(dy64.t() @ x64, idx.cpu(), bs)),
                    "fused_fwd": (bsk.block_delta_linear(x, w, blocks, idx, layout=lay), x64 @ (w64 + delta).t()),
                    "fused_dx": (bsk.block_grad_input(dy, w, blocks, idx, layout=lay), dy64 @ (w64 + delta)),
                }
                for op, (got, want) in checks.items():
                    err = _rel(torch, got.cpu(), want)
                    bad = not math.isfinite(err) or err > tol[dtype]
                    failures += bad
                    print(f"{op:10s} {str(dtype)[6:]:9s} {d_out:>3d}x{d_in:<4d} {tokens:>4d} {keep:>5.2f} {err:>9.2e}"
                          + ("  FAIL" if bad else ""))
    print(f"smoke: {'FAILED' if failures else 'ok'} ({failures} failures); nothing recorded")
    return 1 if failures else 0


# ------------------------------------------------------------------- compile check


def run_compile_check(args):
    """Compile every autotune config for sm_90 with the installed Triton; no GPU is needed."""
    os.environ.pop("TRITON_INTERPRET", None)
    bsk, _ = _import_kernels()
    if getattr(bsk.runtime, "INTERPRET", False):
        print("compile-check: kernels were defined in interpreter mode; unset TRITON_INTERPRET")
        return 1
    dt = {"bf16": "bf16", "fp16": "fp16"}[args.dtype]
    # integer arguments the JIT would specialise as multiples of 16 on the benchmark shapes
    div16 = ("P", "Q", "n_out_blocks", "n_rb")

    ptr = f"*{dt}"
    kern, configs = bsk.jit_kernels(), bsk.autotune_configs()
    jobs = []
    for cfg in configs["dsd"]:
        for name, extra in (("dsd fwd", {"stride_bt": 1}), ("dsd dx ", {"stride_bo": 1})):
            jobs.append((f"{name} BM{cfg.kwargs['BLOCK_M']:<3d} KG{cfg.kwargs['KG']} C{cfg.kwargs['COLS']}", kern["dsd"],
                         {"a_ptr": ptr, "blk_ptr": "*fp32", "ptr_ptr": "*i32", "slot_ptr": "*i32",
                          "other_ptr": "*i32", "c_ptr": ptr},
                         dict(B=16, ACCUMULATE=False, IEEE=False, UPCAST=False, stride_ak=1, stride_cn=1, **extra), cfg))
    for cfg in configs["sdd"]:
        jobs.append((f"sdd BK{cfg.kwargs['BLOCK_K']}", kern["sdd"],
                     {"dy_ptr": ptr, "x_ptr": ptr, "row_ptr_ptr": "*i32", "chunk_ptr_ptr": "*i32",
                      "cols_ptr": "*i32", "c_ptr": "*fp32"},
                     dict(B=16, KG=4, ACCUMULATE=False, IEEE=False, UPCAST=False, stride_dn=1, stride_xk=1,
                          stride_ct=1), cfg))
    for cfg in configs["fused"]:
        kw = cfg.kwargs
        for name, extra in (("fused fwd", {"stride_wq": 1, "stride_bq": 1}), ("fused dx ", {"stride_wp": 1, "stride_bp": 1})):
            jobs.append((f"{name} {kw['BLOCK_P']}x{kw['BLOCK_M']}x{kw['BLOCK_Q']}", kern["fused"],
                         {"a_ptr": ptr, "w_ptr": ptr, "blk_ptr": "*fp32", "slot_ptr": "*i32", "bias_ptr": ptr,
                          "c_ptr": ptr},
                         dict(B=16, HAS_BIAS=True, IEEE=False, UPCAST=False, stride_aq=1, stride_cp=1, **extra), cfg))
    return sm90_compile_check(jobs, div16)


# ------------------------------------------------------------------------ GPU bench


def run_bench(args):
    import torch

    if not torch.cuda.is_available():
        print("bench_block_sparse: no CUDA device here. Kernel timings from the CPU interpreter are not "
              "performance figures, so nothing is measured or recorded. Run this on a GPU machine; "
              "use --smoke for a small correctness run or --compile-check to compile for sm_90.")
        return 0
    import torch.nn.functional as F
    from triton.testing import do_bench

    bsk, ref = _import_kernels()
    dev = torch.device(_DEVICE)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    bs = args.block_size
    d_in, d_out = args.d_in, args.d_out
    n_rb, n_cb = d_out // bs, d_in // bs
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    meta = run_metadata("block_sparse")
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}")
    print(f"weight {d_out}x{d_in} {args.dtype}, {bs}x{bs} blocks, L2 {l2 >> 20} MiB")
    gen = torch.Generator().manual_seed(args.seed)
    w = (torch.randn(d_out, d_in, generator=gen) * 0.02).to(dtype).to(dev)
    rows, table = [], []

    def bench(fn, n_sets):
        state = {"i": 0}

        def step():
            i = state["i"]
            state["i"] = (i + 1) % n_sets
            return fn(i)

        ms = do_bench(step, warmup=args.warmup, rep=args.rep, return_mode="median")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(0)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return ms, peak, out

    for keep in args.keep:
        idx = _random_pattern(torch, n_rb, n_cb, keep, gen, dev)
        n = idx.numel()
        lay = bsk.build_block_layout(idx, (d_out, d_in), bs)
        for tokens in args.tokens:
            set_bytes = tokens * (d_in + d_out) * 2 + n * bs * bs * 4
            n_sets = max(1, min(8, math.ceil(2 * l2 / set_bytes)))
            sets = []
            for _ in range(n_sets):
                blocks = (torch.randn(n, bs, bs, generator=gen) * 0.02).to(dev)
                dense = ref.densify_blocks(blocks, idx, (d_out, d_in)).to(dtype)
                sets.append({
                    "x": torch.randn(tokens, d_in, generator=gen).to(dtype).to(dev),
                    "dy": torch.randn(tokens, d_out, generator=gen).to(dtype).to(dev),
                    "blocks": blocks,
                    "dense": dense,
                })
            delta_flop = 2.0 * tokens * n * bs * bs
            gemm_flop = 2.0 * tokens * d_out * d_in
            impls = _impls(torch, F, bsk, ref, sets, w, idx, lay, bs, d_in, d_out)
            for op in args.ops:
                flop = delta_flop if op in ("delta_fwd", "delta_dx", "dblocks") else gemm_flop
                results, truth, out_ours = {}, None, None
                for name, fn in impls[op]:
                    rec = {"op": op, "impl": name, "keep_ratio": keep, "tokens": tokens, "d_in": d_in,
                           "d_out": d_out, "dtype": args.dtype, "block_size": bs, "n_blocks": n,
                           "useful_gflop": flop / 1e9, "input_sets": n_sets, **meta}
                    try:
                        ms, peak, out = bench(fn, n_sets)
                        rec.update(ms=ms, tflops=flop / (ms * 1e-3) / 1e12, peak_extra_mib=peak)
                        if name == "ours":
                            out_ours = out
                        elif name == _truth_impl(op):
                            truth = out
                        results[name] = ms
                    except Exception as exc:  # noqa: BLE001 - a peer that does not run is reported, not fatal
                        rec.update(ms=None, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                        results[name] = None
                    rows.append(rec)
                have = truth is not None and out_ours is not None
                err = _rel(torch, out_ours.float(), truth.float()) if have else float("nan")
                base = results.get(BASELINE[op])
                for rec in rows[-len(impls[op]):]:
                    rec["rel_err_vs_" + _truth_impl(op)] = err if rec["impl"] == "ours" else None
                    if rec.get("ms") and base:
                        rec["speedup_vs_" + BASELINE[op]] = base / rec["ms"]
                table.append((op, keep, tokens, n, results, err,
                               next(r for r in rows[-len(impls[op]):] if r["impl"] == "ours")))
                if not args.no_record:  # op by op: a run cut off by a time limit keeps what it measured
                    append_rows(args.results, rows[-len(impls[op]):], quiet=True)
            del sets, impls
            torch.cuda.empty_cache()

    _print_table(table)
    _print_goals(table)
    print("--no-record: nothing appended" if args.no_record else f"appended {len(rows)} rows to {args.results}")
    return 0


def _truth_impl(op):
    return "reference" if op == "dblocks" else "dense_ref" if op.startswith("delta") else "reference"


def _impls(torch, F, bsk, ref, sets, w, idx, lay, bs, d_in, d_out):
    """Per op: [(name, fn(i) -> output)], fn reading input set i."""
    bsr_cache = {}

    def bsr(i, transposed=False):
        key = (i, transposed)
        if key not in bsr_cache:
            dense = sets[i]["dense"]
            bsr_cache[key] = (dense.t().contiguous() if transposed else dense).to_sparse_bsr((bs, bs))
        return bsr_cache[key]

    def bsr_linear(i):
        return F.linear(sets[i]["x"], bsr(i))

    def bsr_triton_mm(i):
        from torch.sparse._triton_ops import bsr_dense_mm

        s = sets[i]
        if "xt" not in s:  # its natural operand is Xᵀ: transposed once, outside the timing (best case)
            s["xt"] = s["x"].t().contiguous()
        return bsr_dense_mm(bsr(i), s["xt"]).t()

    def bsr_dx(i):
        return F.linear(sets[i]["dy"], bsr(i, transposed=True))

    def bsr_sampled(i):
        from torch.sparse._triton_ops import sampled_addmm

        s = sets[i]
        return sampled_addmm(bsr(i), s["dy"].t(), s["x"], beta=0.0, alpha=1.0)

    def fused_two_kernels(i):
        s = sets[i]
        y = F.linear(s["x"], w)
        return bsk.block_delta_matmul(s["x"], s["blocks"], idx, d_out, y, layout=lay)

    def fused_dx_two_kernels(i):
        s = sets[i]
        dx = s["dy"] @ w
        return bsk.block_delta_grad_input(s["dy"], s["blocks"], idx, d_in, dx, layout=lay)

    return {
        "delta_fwd": [
            ("ours", lambda i: bsk.block_delta_matmul(sets[i]["x"], sets[i]["blocks"], idx, d_out, layout=lay)),
            ("ours_ids_only", lambda i: bsk.block_delta_matmul(sets[i]["x"], sets[i]["blocks"], idx, d_out)),
            ("dense_ref", lambda i: F.linear(sets[i]["x"], sets[i]["dense"])),
            ("reference", lambda i: ref.block_delta_matmul(sets[i]["x"], sets[i]["blocks"], idx, d_out)),
            ("torch_bsr", bsr_linear),
            ("torch_bsr_triton", bsr_triton_mm),
            ("cublas_W", lambda i: F.linear(sets[i]["x"], w)),
        ],
        "delta_dx": [
            ("ours", lambda i: bsk.block_delta_grad_input(sets[i]["dy"], sets[i]["blocks"], idx, d_in, layout=lay)),
            ("dense_ref", lambda i: sets[i]["dy"] @ sets[i]["dense"]),
            ("torch_bsr", bsr_dx),
            ("cublas_W", lambda i: sets[i]["dy"] @ w),
        ],
        "dblocks": [
            ("ours", lambda i: bsk.block_grad_blocks(sets[i]["dy"], sets[i]["x"], idx, bs, layout=lay)),
            ("ours_ids_only", lambda i: bsk.block_grad_blocks(sets[i]["dy"], sets[i]["x"], idx, bs)),
            ("dense_dW_gather",
             lambda i: ref.gather_blocks(sets[i]["dy"].t() @ sets[i]["x"], idx, bs).float()),
            ("reference", lambda i: ref.block_grad_blocks(sets[i]["dy"], sets[i]["x"], idx, bs)),
            ("torch_bsr", bsr_sampled),
            ("cublas_dW", lambda i: sets[i]["dy"].t() @ sets[i]["x"]),
        ],
        "fused_fwd": [
            ("ours", lambda i: bsk.block_delta_linear(sets[i]["x"], w, sets[i]["blocks"], idx, layout=lay)),
            ("cublas_W", lambda i: F.linear(sets[i]["x"], w)),
            ("reference", lambda i: ref.block_delta_linear(sets[i]["x"], w, sets[i]["blocks"], idx)),
            ("cublas_plus_ours_delta", fused_two_kernels),
        ],
        "fused_dx": [
            ("ours", lambda i: bsk.block_grad_input(sets[i]["dy"], w, sets[i]["blocks"], idx, layout=lay)),
            ("cublas_W", lambda i: sets[i]["dy"] @ w),
            ("reference", lambda i: ref.block_grad_input(sets[i]["dy"], w, sets[i]["blocks"], idx)),
            ("cublas_plus_ours_delta", fused_dx_two_kernels),
        ],
    }


def _best_bsr(res):
    """The fastest torch BSR variant that ran (F.linear on BSR, torch.sparse Triton ops)."""
    times = [ms for name, ms in res.items() if name.startswith("torch_bsr") and ms]
    return min(times) if times else None


def _fmt(ms):
    return f"{ms:9.4f}" if ms else f"{'-':>9s}"


def _print_table(table):
    print()
    print(f"{'op':10s} {'keep':>5s} {'tok':>5s} {'blocks':>6s} {'ours ms':>9s} {'TFLOP/s':>7s} {'MiB':>6s} "
          f"{'base ms':>9s} {'x base':>7s} {'bsr ms':>9s} {'x bsr':>6s} {'cuBLAS W':>9s} {'rel err':>8s}")
    for op, keep, tokens, n, res, err, rec in table:
        ours, base, bsr_ms = res.get("ours"), res.get(BASELINE[op]), _best_bsr(res)
        cub = res.get("cublas_W") or res.get("cublas_dW")
        print(f"{op:10s} {keep:5.2f} {tokens:5d} {n:6d} {_fmt(ours)} {rec.get('tflops') or 0:7.1f} "
              f"{rec.get('peak_extra_mib') or 0:6.1f} {_fmt(base)} "
              f"{(base / ours) if ours and base else float('nan'):7.2f} {_fmt(bsr_ms)} "
              f"{(bsr_ms / ours) if ours and bsr_ms else float('nan'):6.2f} {_fmt(cub)} {err:8.1e}")
    names = ", ".join(f"{op}: {name}" for op, name in BASELINE.items())
    print(f"x base = base ms / ours ms, base = {names}; x bsr against the fastest torch BSR variant; "
          "MiB = extra peak memory of ours; rel err of ours against dense_ref (delta) or the reference")


def _print_goals(table):
    hits = [t for t in table if abs(t[1] - 0.1) < 1e-9 and t[2] == 8192]
    if not hits:
        return
    print("\ngoals at keep 0.1, 8192 tokens:")
    for op, other, need in GOALS:
        for t in hits:
            if t[0] != op:
                continue
            ours = t[4].get("ours")
            peer = _best_bsr(t[4]) if other == "torch_bsr" else t[4].get(other)
            if ours and peer:
                got = peer / ours
                print(f"  {op:10s} vs {other:16s} speed-up {got:6.2f} (goal >= {need:.2f}): "
                      f"{'met' if got >= need else 'NOT met'}")
            else:
                print(f"  {op:10s} vs {other:16s} not measured")


def main(argv=None):
    args = parse_args(argv)
    if args.compile_check:
        return run_compile_check(args)
    if args.smoke:
        return run_smoke(args)
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
