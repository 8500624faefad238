"""Benchmark of sparse-native merging (Eq. 4) against densify-and-stack: time and peak memory.

N random element-sparse experts over L Phi-3-mini qkv layers (default 20 × 32, keep 0.1),
merged by ``sparse_engine.merging`` (dense and sparse-union output) and by the reference that
densifies and stacks every expert, on the same experts with the same output. Rows go to
``benchmarks/results/merge.jsonl`` (a CPU row is a real CPU measurement). The methods, how
memory is measured, the goals, the memory the full size needs and the measured results:
docs/merging.md, section "Benchmark".
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "merge.jsonl")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example (2-core CPU): python benchmarks/bench_merge.py --layers 4")
    p.add_argument("--experts", type=int, default=20, help="number of merged experts (default 20)")
    p.add_argument("--layers", type=int, default=32, help="number of qkv layers (default 32)")
    p.add_argument("--d-out", type=int, default=9216)
    p.add_argument("--d-in", type=int, default=3072)
    p.add_argument("--keep-ratio", type=float, default=0.1)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cuda or cpu (default: cuda if present)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per method; the median is reported")
    p.add_argument("--methods", nargs="+", default=["ours", "ours-sparse", "densify-stack"],
                   choices=["ours", "ours-sparse", "densify-stack"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="print the table but append nothing")
    p.add_argument("--out", default=RESULTS, help="JSON-lines file to append to")
    return p.parse_args(argv)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# -------------------------------------------------------------------------- setup
def make_experts(n, layers, shape, kr, device, seed):
    import torch

    from sparse_engine.formats import SparseDelta
    from sparse_engine.merging import Expert

    g = torch.Generator(device=device).manual_seed(seed)
    experts = []
    for i in range(n):
        deltas = {}
        for layer in range(layers):
            keep = torch.rand(shape[0] * shape[1], generator=g, device=device) < kr
            idx = keep.nonzero().flatten().to(torch.int32)
            del keep
            vals = torch.randn(idx.numel(), generator=g, device=device)
            deltas[f"model.layers.{layer}.self_attn.qkv_proj.weight"] = SparseDelta(shape, vals, idx)
        experts.append(Expert(f"expert{i}", "sparse", deltas, base_model="bench", base_fingerprint="bench"))
    return experts


def run_ours(experts, device, output):
    from sparse_engine.merging import iter_merged_layers

    sums = []
    for _, merged in iter_merged_layers(experts, "overlap_average", output=output, device=device):
        values = merged if output == "dense" else merged.values
        sums.append(float(values.sum()))
        del merged, values
    return sums


def densify_stack_layer(experts, name, device):
    import torch

    deltas = [e.layers[name] for e in experts]
    dense = torch.stack([d.to_dense() for d in deltas])
    masks = torch.stack([d.mask() for d in deltas])
    return dense.sum(0) / masks.sum(0).clamp(min=1)


def run_reference(experts, device):
    sums = []
    for name in experts[0].layers:
        merged = densify_stack_layer(experts, name, device)
        sums.append(float(merged.sum()))
        del merged
    return sums


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    args = _parse(argv)
    from common import PeakMemory, append_rows, device_name, git_commit, reexec_with_fixed_mmap_threshold

    if args.device == "cpu" and argv is None:
        reexec_with_fixed_mmap_threshold(__file__)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if not 0 < args.keep_ratio <= 1 or args.experts < 1 or args.layers < 1 or args.repeats < 1:
        print("error: --keep-ratio must be in (0, 1]; --experts, --layers, --repeats >= 1", file=sys.stderr)
        return 2
    shape = (args.d_out, args.d_in)
    t0 = time.perf_counter()
    experts = make_experts(args.experts, args.layers, shape, args.keep_ratio, device, args.seed)
    nnz = sum(d.nnz for e in experts for d in e.layers.values())
    data_bytes = nnz * 8
    print(f"{args.experts} experts x {args.layers} layers of {shape[0]}x{shape[1]}, kr {args.keep_ratio}: "
          f"{nnz / 1e6:.1f}M stored entries, {data_bytes / 2**30:.2f} GiB of expert data "
          f"(made in {time.perf_counter() - t0:.1f} s) on {device_name(device)}")

    # correctness first: layer 0, ours vs the reference, element by element
    from sparse_engine.merging import iter_merged_layers

    first = next(iter(experts[0].layers))
    ours0 = next(iter_merged_layers(experts, "overlap_average", output="dense", device=device, layers=[first]))[1]
    ref0 = densify_stack_layer(experts, first, device)
    max_err = float((ours0 - ref0).abs().max())
    del ours0, ref0
    print(f"layer 0: max |ours - reference| = {max_err:.3g}")
    if max_err > 1e-5:
        print("error: ours and the reference disagree", file=sys.stderr)
        return 1

    runners = {"ours": lambda: run_ours(experts, device, "dense"),
               "ours-sparse": lambda: run_ours(experts, device, "sparse"),
               "densify-stack": lambda: run_reference(experts, device)}
    results = {}
    for method in args.methods:
        times, peaks, sums = [], [], None
        for _ in range(args.repeats):
            with PeakMemory(device) as mem:
                _sync(device)
                start = time.perf_counter()
                sums = runners[method]()
                _sync(device)
                times.append(time.perf_counter() - start)
            peaks.append(mem.peak)
        results[method] = {"seconds": statistics.median(times), "peak_extra_bytes": max(peaks), "checksums": sums,
                           "all_seconds": [round(t, 3) for t in times]}
        print(f"{method:>14}: {results[method]['seconds']:8.2f} s   peak extra memory "
              f"{results[method]['peak_extra_bytes'] / 2**20:9.1f} MiB")
    if "ours" in results and "densify-stack" in results:
        a, b = results["ours"]["checksums"], results["densify-stack"]["checksums"]
        worst = max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(a, b))
        print(f"checksums of all layers agree to {worst:.2g} (relative)")

    head, dirty = git_commit()
    import datetime

    meta = {"bench": "merge", "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "commit": head, "dirty": dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "experts": args.experts, "layers": args.layers, "shape": list(shape), "keep_ratio": args.keep_ratio,
            "expert_data_bytes": data_bytes, "method_merged": "overlap_average (Eq. 4)", "repeats": args.repeats,
            "full_size": args.experts == 20 and args.layers == 32 and shape == (9216, 3072)}
    ref = results.get("densify-stack")
    rows = []
    for method, res in results.items():
        row = dict(meta, method=method, seconds=round(res["seconds"], 3), all_seconds=res["all_seconds"],
                   peak_extra_mib=round(res["peak_extra_bytes"] / 2**20, 1))
        if ref is not None and method != "densify-stack":
            row["speedup_vs_reference"] = round(ref["seconds"] / res["seconds"], 2)
            row["memory_fraction_of_reference"] = round(res["peak_extra_bytes"] / max(ref["peak_extra_bytes"], 1), 4)
            row["goal_5x_faster"] = row["speedup_vs_reference"] >= 5
            row["goal_one_fifth_memory"] = row["memory_fraction_of_reference"] <= 0.2
            print(f"{method}: {row['speedup_vs_reference']}x faster, "
                  f"{100 * row['memory_fraction_of_reference']:.1f}% of the reference's peak memory")
        rows.append(row)
    if not args.no_record:
        append_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
