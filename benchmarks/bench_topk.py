"""Benchmark of the batched top-k mask selection (sparse_engine/kernels/topk_mask.py).

Shapes: 32 Phi-3-mini qkv layers (d_out 9216, d_in 3072: 906M scores), keep ratios
0.01 / 0.1 / 0.5, per-layer and global (layer drop) selection, fp32 and bf16 inputs, and four
sources:

* ``scores``       element scores [9216, 3072] per layer (what a score producer hands over);
* ``tiles``        16x16 tile scores [576, 192] per layer;
* ``fused``        Ŵ and G (MCS = Ŵ⊙G computed on the fly, never stored), element selection;
* ``fused-block``  Ŵ and G, 16x16 tile selection.

In the same run and on the same inputs: ours, a ``torch.topk(sorted=False)`` loop over the
layers (global: one topk over the concatenation), ``torch.kthvalue`` + threshold mask, and a
``torch.sort`` threshold + mask; for the fused sources the baselines first materialise the
score (and its tile sums), as a PyTorch implementation has to. Times are
``triton.testing.do_bench`` medians. Bandwidth is reported for the bytes that must move (every
input byte read once, every output index written once) against the measured device-to-device
copy bandwidth (bytes read + written by a large ``copy_``); for ours, ``ours_traffic_gbps``
also counts the passes the chosen path really makes (with 32-bit keys the common path reads
element inputs once: the bracket pass writes one bit per unit and the write pass works from
those bits and the candidates; 16-bit keys, groups resolved exactly from their sample, and
fallbacks read the input again in the write pass). Peak extra memory is ``max_memory_allocated``
during one call minus what was allocated before it; ``ours_extra_frac`` excludes the returned
indices themselves (4 bytes per kept entry) and is relative to the input bytes.

Two numbers (H100 SXM, datasheet 3.35 TB/s; use the measured copy figure): 32 fp32 score
layers are 3.62 GB, so one read costs about 1.1-1.3 ms and the common path (one read, a
~1% sample, 1/16 of the input's bytes of bits written and read back, 4 bytes per kept index
written) about 1.3-1.6 ms; there is no arithmetic
worth counting. bf16 halves the input bytes; the fused sources read Ŵ and G (twice the bytes
of the score); the block sources reduce to 1/256 as many tile keys after the first pass.

Each configuration's result is checked against ``sparse_engine/kernels/reference.py`` (index for index)
before it is timed. Rows are appended as JSON lines to ``benchmarks/results/topk.jsonl``.
Without CUDA nothing is measured or recorded; ``--smoke`` runs a small correctness check
(on the CPU through the Triton interpreter) and writes nothing. ``--cpu-reference`` times the
CPU path instead (``reference.topk_flat_indices``, what mask updates use without a GPU) on
one layer against ``torch.topk`` and ``torch.kthvalue``; it prints and records nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from common import append_rows, run_metadata, sm90_compile_check  # benchmarks/common.py (the script's folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "topk.jsonl")
DEVICE = "cuda"


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: python benchmarks/bench_topk.py --ratios 0.1 --dtypes bf16")
    p.add_argument("--layers", type=int, default=32, help="number of qkv layers (default 32)")
    p.add_argument("--d-out", type=int, default=9216)
    p.add_argument("--d-in", type=int, default=3072)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.1, 0.5], help="keep ratios")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--sources", nargs="+", default=["scores", "tiles", "fused", "fused-block"],
                   choices=["scores", "tiles", "fused", "fused-block"])
    p.add_argument("--modes", nargs="+", default=["per-layer", "global"], choices=["per-layer", "global"])
    p.add_argument("--methods", nargs="+", default=["ours", "topk", "kthvalue", "sort"],
                   choices=["ours", "topk", "kthvalue", "sort"])
    p.add_argument("--rep-ms", type=int, default=300, help="do_bench repetition time per measurement (ms)")
    p.add_argument("--no-check", action="store_true", help="skip the index-for-index check against the reference")
    p.add_argument("--no-record", action="store_true", help="print the table but append nothing")
    p.add_argument("--out", default=RESULTS, help="JSON-lines file to append to")
    p.add_argument("--smoke", action="store_true",
                   help="small correctness run (CPU: Triton interpreter); measures and records nothing")
    p.add_argument("--cpu-reference", action="store_true",
                   help="time the CPU reference top-k on one d_out x d_in layer against torch.topk / kthvalue "
                        "(min of --cpu-repeats, methods interleaved); prints, records nothing")
    p.add_argument("--cpu-repeats", type=int, default=5)
    p.add_argument("--compile-check", action="store_true",
                   help="compile every kernel of the selection for sm_90 with the installed Triton (no GPU needed); "
                        "print resources; records nothing")
    return p.parse_args(argv)


def _import_kernels():
    try:
        from sparse_engine.kernels import reference as ref
        from sparse_engine.kernels import topk_mask as tk
    except ImportError:
        sys.path.insert(0, ROOT)
        from kernels import reference as ref
        from kernels import topk_mask as tk
    return tk, ref


# ----------------------------------------------------------------------- compile check


def run_compile_check(layers: int) -> int:
    """Compile each selection kernel for sm_90, for every input kind the benchmark feeds it."""
    import triton

    os.environ.pop("TRITON_INTERPRET", None)
    tk, _ = _import_kernels()
    if sys.modules[tk.__package__ + ".runtime"].INTERPRET:
        print("compile-check: kernels were defined in interpreter mode; unset TRITON_INTERPRET")
        return 1
    runtime = sys.modules[tk.__package__ + ".runtime"]
    cfg = tk.DEFAULT_CONFIG
    kern = tk.jit_kernels()
    common = dict(MAXL=max(2, runtime.pow2(layers)))
    i64, i32 = "*i64", "*i32"
    # (label, KIND, ADT, BDT, K16, a/b pointer types): what the benchmark's sources hand over
    inputs = [("fp32 scores", 0, 0, 0, False, "*fp32", "*fp32"),
              ("bf16 scores", 0, 2, 2, True, "*i16", "*i16"),
              ("fp32 W,G mcs", 1, 0, 0, False, "*fp32", "*fp32"),
              ("bf16 W,G mcs", 1, 2, 2, False, "*i16", "*i16")]
    jobs = []

    def job(label, name, types, consts, warps):
        jobs.append((label, kern[name], types, consts, triton.Config({}, num_warps=warps, num_stages=1)))

    for name, kind, adt, bdt, k16, at, bt in inputs:
        src = dict(KIND=kind, ADT=adt, BDT=bdt, AAL=16, BAL=16)  # separate allocations: aligned offsets
        kdt = "*i16" if k16 else i32
        ab = {"a_ptr": at, "b_ptr": bt, "meta_ptr": i64}
        job(f"sample   {name}", "sample", {**ab, "keys_ptr": kdt},
            dict(SC=cfg.sample_chunk, CPP=cfg.chunks_per_program, K16=k16, **common, **src), 4)
        bits = 0 if k16 else 1  # the single-read path is for 32-bit keys
        job(f"bracket  {name}", "bracket",
            {**ab, "gs_ptr": i64, "gc_ptr": i64, "blk_gt_ptr": i32, "blk_cnt_ptr": i32, "blk_run_ptr": i32,
             "cand_ptr": kdt, "blk_nin_ptr": i32, "cpos_ptr": "*i16", "bits_ptr": i32},
            dict(BLOCK=cfg.block, K16=k16, BITS=bits, **common, **src), cfg.num_warps)
        job(f"fullhist {name}", "full_hist",
            {**ab, "gs_ptr": i64, "ts_ptr": i64, "hist_ptr": i32},
            dict(SHIFT=24, BLOCK=cfg.block, K16=k16, **common, **src), cfg.num_warps)
        job(f"write    {name}", "write",
            {**ab, "gs_ptr": i64, "blk_gt_ptr": i32, "blk_take_ptr": i32, "blk_off_ptr": i32, "out_ptr": i32,
             "blk_run_ptr": i32, "blk_nin_ptr": i32, "cand_ptr": kdt, "cpos_ptr": "*i16", "bits_ptr": i32},
            dict(BLOCK=cfg.block, K16=k16, BITS=bits, **common, **src),
            cfg.num_warps)
        if not k16:
            job(f"tiles    {name}", "tile", {**ab, "out_ptr": "*fp32"},
                dict(TT=cfg.tiles_per_program, BS=16, BP=16, **common, **src), 4)
    for k16 in (False, True):
        kdt = "*i16" if k16 else i32
        kn = "16-bit keys" if k16 else "32-bit keys"
        job(f"bufhist  {kn}", "buf_hist", {"keys_ptr": kdt, "seg_ptr": i64, "ts_ptr": i64, "hist_ptr": i32},
            dict(NT=2, SHIFT=24, CH=cfg.buf_chunk, K16=k16), 4)
        job(f"count    {kn}", "count",
            {"meta_ptr": i64, "gs_ptr": i64, "blk_gt_ptr": i32, "blk_cnt_ptr": i32, "blk_run_ptr": i32,
             "cand_ptr": kdt, "ltot_ptr": i64}, dict(RUNCH=cfg.run_chunk, K16=k16, **common), 4)
    for first, last in ((True, False), (False, True)):
        job(f"select   first={first} last={last}", "select", {"hist_ptr": i32, "ts_ptr": i64},
            dict(SHIFT=0 if last else 24, FIRST=first, LAST=last), 1)
    for glob in (False, True):
        job(f"scan     global={glob}", "scan",
            {"meta_ptr": i64, "gs_ptr": i64, "ltot_ptr": i64, "blk_gt_ptr": i32, "blk_cnt_ptr": i32,
             "blk_take_ptr": i32, "blk_off_ptr": i32, "lout_ptr": i64},
            dict(GLOBAL=glob, CH=cfg.scan_chunk, **common), 4)
    return sm90_compile_check(jobs)


# ----------------------------------------------------------------------------- inputs


def _make_inputs(torch, n_layers, d_out, d_in, dtype, device, seed=0):
    """Ŵ and G with per-row / per-column scales (as G = dYᵀX has), in ``dtype``; one layer at a time."""
    g = torch.Generator(device=device).manual_seed(seed)
    deltas, grads = [], []
    for _ in range(n_layers):
        w = torch.randn(d_out, d_in, device=device, generator=g).mul_(0.01)
        row = torch.rand(d_out, 1, device=device, generator=g).add_(0.1)
        col = torch.rand(1, d_in, device=device, generator=g).add_(0.1)
        gr = torch.randn(d_out, d_in, device=device, generator=g).mul_(row).mul_(col)
        deltas.append(w.to(dtype))
        grads.append(gr.to(dtype))
        del w, gr
    return deltas, grads


def _scores_from(torch, ref, deltas, grads, block):
    out = []
    for d, g in zip(deltas, grads):
        s = d.float() * g.float()
        out.append((ref.block_sum(s, block) if block else s).to(d.dtype))
    return out


# -------------------------------------------------------------------------- baselines


def _baseline(torch, ref, method, layers, ks, k_global, src, deltas, grads, block):
    """A PyTorch selection of the same kind: returns per-layer index tensors (ties not exact)."""
    if src in ("fused", "fused-block"):
        layers = [ref.delta_grad_score(d, g, "mcs", block) for d, g in zip(deltas, grads)]
    flat = [t.reshape(-1) for t in layers]
    if k_global is not None:
        cat = torch.cat(flat)
        sel = _select(torch, method, cat, k_global)
        out, start = [], 0
        for t in flat:
            out.append(sel[(sel >= start) & (sel < start + t.numel())] - start)
            start += t.numel()
        return out
    return [_select(torch, method, t, k) for t, k in zip(flat, ks)]


def _select(torch, method, x, k):
    if k == 0:
        return x.new_zeros(0, dtype=torch.int64)
    if method == "topk":
        return torch.topk(x, k, sorted=False).indices
    if method == "kthvalue":
        thr = torch.kthvalue(x.float() if x.dtype == torch.bfloat16 else x, x.numel() - k + 1).values
        return (x >= thr).nonzero().flatten()
    if method == "sort":
        thr = torch.sort(x, descending=True).values[k - 1]
        return (x >= thr).nonzero().flatten()
    raise ValueError(method)


# ------------------------------------------------------------------------------- main


def _copy_bandwidth(torch, triton):
    n = 1 << 29  # 2 GiB of fp32: far above L2
    a = torch.randn(n, device=DEVICE)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 4 / (ms * 1e-3)


def _peak_extra(torch, fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del res
    return peak


def _smoke(tk, ref, torch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    shapes = [(1, 1), (3, 7), (48, 16), (64, 64)]
    scores = [torch.randn(*s, device=device) for s in shapes]
    scores[3][::3] = 0.0
    ks = [1, 5, 77, 400]
    checks = [
        ("per-layer", tk.topk_per_layer(scores, ks), ref.topk_per_layer(scores, ks)),
        ("global", tk.topk_global(scores, 321), ref.topk_global(scores, 321)),
    ]
    d = [torch.randint(-3, 4, (32, 48), device=device).float() for _ in range(2)]
    g = [torch.randint(-3, 4, (32, 48), device=device).float() for _ in range(2)]
    checks.append(("fused element", tk.topk_from_delta_grad(d, g, "mcs", ks=[100, 7]),
                   ref.topk_from_delta_grad(d, g, "mcs", ks=[100, 7])))
    checks.append(("fused block", tk.topk_from_delta_grad(d, g, "snip", global_k=3, block_size=16),
                   ref.topk_from_delta_grad(d, g, "snip", global_k=3, block_size=16)))
    ok = True
    for name, got, want in checks:
        same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(got, want))
        ok &= same
        print(f"smoke {name:14s} {'ok' if same else 'MISMATCH'}")
    print("smoke: nothing measured or recorded" + ("" if device == "cuda" else " (CPU, Triton interpreter)"))
    return 0 if ok else 1


def run_cpu_reference(torch, args) -> int:
    """The CPU reference selection against plain PyTorch on one layer of G-like scores."""
    import time

    ref = _reference_only()  # no Triton kernels needed
    print(f"CPU reference top-k, {args.d_out}x{args.d_in} scores, {torch.get_num_threads()} threads, "
          f"min of {args.cpu_repeats} (methods interleaved)")
    print(f"{'dt':4s} {'keep':>5s} {'reference ms':>13s} {'topk ms':>9s} {'kthvalue ms':>12s} {'exact':>5s}")
    for dt_name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt_name]
        deltas, grads = _make_inputs(torch, 1, args.d_out, args.d_in, torch.float32, "cpu")
        x = (deltas[0] * grads[0]).to(dtype).reshape(-1)
        del deltas, grads
        for ratio in args.ratios:
            k = int(ratio * x.numel())
            fns = {"reference": lambda: ref.topk_flat_indices(x, k), "topk": lambda: _select(torch, "topk", x, k),
                   "kthvalue": lambda: _select(torch, "kthvalue", x, k)}
            best = dict.fromkeys(fns, float("inf"))
            for _ in range(args.cpu_repeats):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - start)
            # exact: k indices, nothing left out above the k-th value, nothing kept below it
            got = ref.topk_flat_indices(x, k).long()
            kth = torch.kthvalue(x.float(), x.numel() - k + 1).values.to(dtype)
            kept = x[got]
            exact = got.numel() == k and bool((kept >= kth).all()) and int((kept > kth).count_nonzero()) == int(
                (x > kth).count_nonzero())
            print(f"{dt_name:4s} {ratio:5.2f} {1e3 * best['reference']:13.1f} {1e3 * best['topk']:9.1f} "
                  f"{1e3 * best['kthvalue']:12.1f} {str(exact):>5s}", flush=True)
    print("nothing recorded (CPU reference timing)")
    return 0


def _reference_only():
    try:
        from sparse_engine.kernels import reference as ref
    except ImportError:
        sys.path.insert(0, ROOT)
        from kernels import reference as ref
    return ref


def main(argv=None) -> int:
    args = _parse(argv)
    if args.compile_check:
        return run_compile_check(args.layers)
    import torch

    if args.cpu_reference:
        return run_cpu_reference(torch, args)

    if not torch.cuda.is_available():
        if not args.smoke:
            print("bench_topk: no CUDA device here; kernel timings need a GPU, so nothing was measured or "
                  "recorded. Run it on the GPU machine, or pass --smoke for a small CPU correctness run.")
            return 0
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
    tk, ref = _import_kernels()
    if args.smoke:
        return _smoke(tk, ref, torch)

    import triton

    dev_name = torch.cuda.get_device_name()
    copy_bw = _copy_bandwidth(torch, triton)
    print(f"device {dev_name}; device-to-device copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    meta = run_metadata("topk", layers=args.layers, d_out=args.d_out, d_in=args.d_in, copy_gbps=round(copy_bw / 1e9, 1))
    rows = []
    block = 16
    for dt_name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt_name]
        deltas, grads = _make_inputs(torch, args.layers, args.d_out, args.d_in, dtype, DEVICE)
        for src in args.sources:
            if src == "scores":
                layers = _scores_from(torch, ref, deltas, grads, None)
            elif src == "tiles":
                layers = _scores_from(torch, ref, deltas, grads, block)
            else:
                layers = None
            units = [(args.d_out // block) * (args.d_in // block) if src in ("tiles", "fused-block")
                     else args.d_out * args.d_in] * args.layers
            in_bytes = (sum(t.numel() * t.element_size() for t in layers) if layers is not None else
                        sum(t.numel() * t.element_size() for t in deltas + grads))
            for mode in args.modes:
                for ratio in args.ratios:
                    ks = [int(ratio * n) for n in units]
                    kg = sum(ks) if mode == "global" else None
                    bs = block if src == "fused-block" else None

                    def ours(return_stats=False):
                        if layers is None:
                            if kg is None:
                                return tk.topk_from_delta_grad(deltas, grads, "mcs", ks=ks, block_size=bs,
                                                               return_stats=return_stats)
                            return tk.topk_from_delta_grad(deltas, grads, "mcs", global_k=kg, block_size=bs,
                                                           return_stats=return_stats)
                        if kg is not None:
                            return tk.topk_global(layers, kg, return_stats=return_stats)
                        return tk.topk_per_layer(layers, ks, return_stats=return_stats)

                    row = dict(meta, source=src, dtype=dt_name, mode=mode, keep_ratio=ratio,
                               input_bytes=in_bytes, kept=sum(ks))
                    if not args.no_check:
                        got, stats = ours(return_stats=True)
                        row["path"] = dataclasses.asdict(stats)
                        if src == "fused-block":  # compare on our tile sums (summation order differs)
                            tiles = tk.delta_grad_tile_scores(deltas, grads, "mcs", block)
                            want = ref.topk_global(tiles, kg) if kg is not None else ref.topk_per_layer(tiles, ks)
                        elif src == "fused":
                            want = ref.topk_from_delta_grad(deltas, grads, "mcs", ks=None if kg else ks,
                                                            global_k=kg)
                        else:
                            want = ref.topk_global(layers, kg) if kg is not None else ref.topk_per_layer(layers, ks)
                        row["exact"] = all(torch.equal(a, b) for a, b in zip(got, want))
                        del got, want
                        torch.cuda.empty_cache()
                    out_bytes = 4 * sum(ks)
                    for method in args.methods:
                        if method == "ours":
                            fn = ours
                        else:
                            def fn(method=method):
                                return _baseline(torch, ref, method, layers, ks, kg, src, deltas, grads, bs)
                        try:
                            ms = triton.testing.do_bench(fn, warmup=25, rep=args.rep_ms, return_mode="median")
                            extra = _peak_extra(torch, fn)
                        except torch.cuda.OutOfMemoryError:
                            row[f"{method}_error"] = "out of memory"
                            torch.cuda.empty_cache()
                            continue
                        row[f"{method}_ms"] = round(ms, 4)
                        row[f"{method}_extra_bytes"] = extra
                        torch.cuda.empty_cache()
                    if "ours_ms" in row:
                        gbps = (in_bytes + out_bytes) / (row["ours_ms"] * 1e-3) / 1e9
                        row["ours_gbps"] = round(gbps, 1)
                        row["ours_frac_copy_bw"] = round(gbps * 1e9 / copy_bw, 3)
                        # scratch only: the returned indices (4 bytes per kept entry) are the result
                        row["ours_scratch_bytes"] = row["ours_extra_bytes"] - out_bytes
                        row["ours_extra_frac"] = round(row["ours_scratch_bytes"] / in_bytes, 4)
                        path = row.get("path")
                        if path and src in ("scores", "fused"):
                            # the write pass reads the input again unless every sampled group went
                            # through the single-read path (bits: written once, read once, 1 bit/unit)
                            single = bool(path.get("single_read")) and path.get("single_read") == path.get(
                                "candidates") and not path.get("exact_bracket")
                            reads = (1 if single else 2) + (5 if path.get("fallback") else 1 if path.get("recount")
                                                            else 0)
                            traffic = reads * in_bytes + out_bytes + (2 * sum(units) // 8 if single else 0)
                            row["ours_traffic_gbps"] = round(traffic / (row["ours_ms"] * 1e-3) / 1e9, 1)
                        if "topk_ms" in row:
                            row["speedup_vs_topk"] = round(row["topk_ms"] / row["ours_ms"], 2)
                    rows.append(row)
                    _print_row(row, args.methods)
                    if not args.no_record:  # row by row: a run cut off by a time limit keeps what it measured
                        append_rows(args.out, [row], quiet=True)
            del layers
            torch.cuda.empty_cache()
        del deltas, grads
        torch.cuda.empty_cache()
    if not args.no_record:
        print(f"appended {len(rows)} rows to {args.out}")
    return 0


_HEADER_DONE = False


def _print_row(row, methods):
    global _HEADER_DONE
    if not _HEADER_DONE:
        cols = " ".join(f"{m + ' ms':>11s}" for m in methods)
        print(f"{'source':12s} {'dt':4s} {'mode':9s} {'keep':>5s} {cols} {'x topk':>7s} {'GB/s':>7s} "
              f"{'%copy':>6s} {'extra%':>7s} {'exact':>5s}")
        _HEADER_DONE = True
    cols = " ".join(f"{row.get(m + '_ms', float('nan')):11.3f}" for m in methods)
    print(f"{row['source']:12s} {row['dtype']:4s} {row['mode']:9s} {row['keep_ratio']:5.2f} {cols} "
          f"{row.get('speedup_vs_topk', float('nan')):7.2f} {row.get('ours_gbps', float('nan')):7.0f} "
          f"{100 * row.get('ours_frac_copy_bw', float('nan')):6.1f} {100 * row.get('ours_extra_frac', float('nan')):7.2f} "
          f"{str(row.get('exact', '-')):>5s}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
