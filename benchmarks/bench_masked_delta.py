"""Benchmark of the fused masked-delta kernels against the dense PyTorch reference, a
materialise-then-cuBLAS variant, PEFT's SHiRA layer and plain F.linear on W alone, in one run.

Phi-3-mini qkv_proj shape, bf16; forward, backward and forward+backward of the search and fixed
phases, and the mask-score pass. Rows go to ``benchmarks/results/masked_delta.jsonl``, only from
CUDA runs. ``--smoke``: a tiny correctness pass, no timing, nothing recorded; ``--compile-report``
(alias ``--compile-check``): compile every kernel config for sm_90 (no GPU needed). Variants,
what is timed and the goals: docs/kernels.md, section "Masked-delta kernels".
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from common import append_rows, run_metadata  # benchmarks/common.py (the script's folder)

import torch

HAS_CUDA = torch.cuda.is_available()
COMPILE_REPORT = "--compile-report" in sys.argv or "--compile-check" in sys.argv
if not HAS_CUDA and not COMPILE_REPORT:  # interpreter: must be chosen before any @triton.jit is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    from sparse_engine.kernels import masked_delta as md  # noqa: E402
    from sparse_engine.kernels import reference as ref  # noqa: E402
except ImportError:
    sys.path.insert(0, ROOT)
    from kernels import masked_delta as md  # noqa: E402
    from kernels import reference as ref  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "masked_delta.jsonl")


# ----------------------------------------------------------------------------- inputs


def shira_nnz(d_out: int, d_in: int, keep: float) -> tuple[int, int]:
    """SHiRA sizes its adapter as r (d_in + d_out) entries; pick r closest to ``keep``."""
    r = max(1, round(keep * d_out * d_in / (d_out + d_in)))
    return r, r * (d_out + d_in)


def make_inputs(tokens, d_in, d_out, keep, dtype, device, n_sets, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r, nnz = shira_nnz(d_out, d_in, keep)
    perm = torch.randperm(d_out * d_in, generator=g)[:nnz]
    indices = torch.sort(perm).values.to(torch.int32).to(device)
    mask = torch.zeros(d_out * d_in, dtype=torch.bool, device=device)
    mask[indices.long()] = True
    mask = mask.view(d_out, d_in)
    w = (torch.randn(d_out, d_in, generator=g) * 0.02).to(dtype).to(device)
    delta = (torch.randn(d_out, d_in, generator=g) * 0.01).to(device)
    values = delta.flatten()[indices.long()].contiguous()
    bias = None
    acts = []  # rotated activation sets (weights are already far larger than L2)
    for _ in range(n_sets):
        x = torch.randn(tokens, d_in, generator=g).to(dtype).to(device)
        dy = (torch.randn(tokens, d_out, generator=g) * 0.1).to(dtype).to(device)
        acts.append((x, dy))
    return dict(w=w, delta=delta, mask=mask, indices=indices, values=values, bias=bias, acts=acts, r=r, nnz=nnz)


class _Rot:
    """Cycles through the activation sets on every call."""

    def __init__(self, acts):
        self.acts, self.i = acts, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.acts)
        return self.acts[self.i]


# ----------------------------------------------------------------------------- variants


def ops_ours(inp, phase):
    w, delta, mask, idx, values = inp["w"], inp["delta"], inp["mask"], inp["indices"], inp["values"]
    rot = _Rot(inp["acts"])
    if phase == "search":
        def fwd():
            x, _ = rot()
            return md.masked_delta_linear(x, w, delta, mask)

        def bwd():
            x, dy = rot()
            return md.masked_delta_grad_input(dy, w, delta, mask), md.masked_delta_grad_delta(dy, x, mask)
    else:
        layout = md.build_compact_layout(idx, tuple(w.shape))
        inp["layout"] = layout

        def fwd():
            x, _ = rot()
            return md.compact_delta_linear(x, w, values, idx, None, layout)

        def bwd():
            x, dy = rot()
            return md.compact_grad_input(dy, w, values, idx, layout), md.compact_grad_values(dy, x, idx, layout)

    def both():
        fwd()
        return bwd()

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def ops_materialize(inp):
    """Search phase the other way round: W + Ŵ⊙M formed in one fused elementwise pass
    (torch.compile) into a weight-sized buffer of the activations' dtype, then cuBLAS for the
    forward and dX; dŴ from our masked G kernel. What the fused-operand GEMMs must beat (they
    re-form the operand from 7 bytes per weight element for every token tile)."""
    w, delta, mask = inp["w"], inp["delta"], inp["mask"]
    rot = _Rot(inp["acts"])
    form = torch.compile(lambda w, d, m: (w.float() + torch.where(m, d, 0.0)).to(w.dtype), dynamic=False)

    def fwd():
        x, _ = rot()
        return F.linear(x, form(w, delta, mask))

    def bwd(w_eff=None):
        x, dy = rot()
        w_eff = form(w, delta, mask) if w_eff is None else w_eff
        return dy @ w_eff, md.masked_delta_grad_delta(dy, x, mask)

    def both():
        x, _ = rot()
        w_eff = form(w, delta, mask)  # kept for the backward, as an autograd Function would
        F.linear(x, w_eff)
        return bwd(w_eff)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def _autograd_ops(inp, forward, params):
    """fwd (grad enabled, graph kept), bwd (retain_graph replay), fwd+bwd for an autograd forward."""
    rot = _Rot([(x.detach().requires_grad_(True), dy) for x, dy in inp["acts"]])
    state = {}

    def fwd():
        x, _ = rot()
        return forward(x)

    def prep_bwd():
        x, dy = rot()
        state["y"], state["dy"], state["x"] = forward(x), dy, x

    def bwd():
        state["y"].backward(state["dy"], retain_graph=True)

    def both():
        x, dy = rot()
        forward(x).backward(dy)

    grads = [p for p in params] + [x for x, _ in rot.acts]
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}, prep_bwd, grads


def ops_reference(inp, phase):
    w, mask, idx = inp["w"], inp["mask"], inp["indices"]
    if phase == "search":
        delta = inp["delta"].clone().requires_grad_(True)
        return _autograd_ops(inp, lambda x: ref.masked_delta_linear(x, w, delta, mask), [delta])
    values = inp["values"].clone().requires_grad_(True)
    return _autograd_ops(inp, lambda x: ref.compact_delta_linear(x, w, values, idx), [values])


def build_shira(inp):
    """peft.tuners.shira.Linear around nn.Linear(W) with our mask; returns (module, error)."""
    try:
        import peft
        from peft import ShiraConfig, get_peft_model
    except Exception as exc:  # pragma: no cover - depends on the environment
        return None, f"peft.ShiraConfig unavailable: {exc!r}"
    w, mask = inp["w"], inp["mask"]

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_proj = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                self.qkv_proj.weight.copy_(w)

        def forward(self, x):
            return self.qkv_proj(x)

    try:
        cfg = ShiraConfig(r=inp["r"], target_modules=["qkv_proj"])
        cfg.mask_fn = lambda base_layer, r, **kw: mask.to(base_layer.weight.dtype)
        model = get_peft_model(Wrap(), cfg)
        layer = model.base_model.model.qkv_proj
        with torch.no_grad():
            layer.shira_weight["default"].copy_(inp["values"].to(layer.shira_weight["default"].dtype))
        return model, f"peft {peft.__version__}, shira_weight dtype {layer.shira_weight['default'].dtype}"
    except Exception as exc:
        return None, f"SHiRA layer could not be built: {exc!r}"


def ops_shira(inp, model):
    params = [p for p in model.parameters() if p.requires_grad]
    return _autograd_ops(inp, model, params)


def ops_floor(inp, trainable):
    w = inp["w"].clone().requires_grad_(trainable)
    return _autograd_ops(inp, lambda x: F.linear(x, w), [w] if trainable else [])


# ----------------------------------------------------------------------------- score pass


def score_ops(inp, k):
    rot = _Rot(inp["acts"])
    delta = inp["delta"]

    def r():
        x, dy = rot()
        return dy, x

    return {
        "ours elem fp32": lambda: md.delta_score(*r(), delta, "mcs"),
        "ours elem bf16": lambda: md.delta_score(*r(), delta, "mcs", out_dtype=torch.bfloat16),
        "ours block16": lambda: md.delta_score(*r(), delta, "mcs", block_size=16),
        "ours topk (3 passes, no dense score)": lambda: md.delta_score_topk(*r(), delta, k, "mcs"),
        "reference fp32 (upcast mm)": lambda: ref.delta_score(*r(), delta, "mcs"),
        "torch bf16 mm + mul": lambda: (lambda dy, x: (dy.t() @ x).float() * delta)(*r()),
        "reference topk (fp32 score + torch.topk)": lambda: ref.topk_flat_indices(ref.delta_score(*r(), delta, "mcs"), k),
    }


def score_bytes(name, d_out, d_in):
    """Bytes the op writes by its output formats (scores, bit masks, histograms); the rows
    also carry the measured peak of extra memory next to it."""
    n = d_out * d_in
    return {
        "ours elem fp32": 4 * n,
        "ours elem bf16": 2 * n,
        "ours block16": 4 * n // 256,
        "ours topk (3 passes, no dense score)": 2 * 4 * ((d_in + 31) // 32) * d_out + 2 * 4 * 65536,
        "reference fp32 (upcast mm)": 4 * n,
        "torch bf16 mm + mul": 2 * n + 4 * n,
        "reference topk (fp32 score + torch.topk)": 4 * n,
    }[name]


# ----------------------------------------------------------------------------- measuring


def bench(fn, warmup, rep, grad_to_none=None, prep=None):
    import triton.testing

    if prep is not None:
        prep()
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def peak_extra_mb(fn, prep=None):
    """Peak bytes allocated during one call, over what was allocated before it (MiB)."""
    if prep is not None:
        prep()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def ceilings():
    """Measured bf16 matmul TFLOP/s and device copy GB/s (read + write)."""
    import triton.testing

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    tc = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * 8192**3 / t / 1e9, 2 * src.numel() * 4 / tc / 1e6


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_correct(inp, phase):
    """Ours vs the reference on the benchmark's own inputs (relative Frobenius error)."""
    x, dy = inp["acts"][0]
    w, delta, mask, idx, values = inp["w"], inp["delta"], inp["mask"], inp["indices"], inp["values"]
    if phase == "search":
        e = [rel_err(md.masked_delta_linear(x, w, delta, mask), ref.masked_delta_linear(x, w.double(), delta.double(), mask)),
             rel_err(md.masked_delta_grad_input(dy, w, delta, mask), ref.masked_delta_grad_input(dy.double(), w.double(), delta.double(), mask)),
             rel_err(md.masked_delta_grad_delta(dy, x, mask), ref.masked_delta_grad_delta(dy, x, mask))]
    else:
        lay = md.build_compact_layout(idx, tuple(w.shape))
        e = [rel_err(md.compact_delta_linear(x, w, values, idx, None, lay), ref.compact_delta_linear(x.double(), w.double(), values.double(), idx)),
             rel_err(md.compact_grad_input(dy, w, values, idx, lay), ref.compact_grad_input(dy.double(), w.double(), values.double(), idx)),
             rel_err(md.compact_grad_values(dy, x, idx, lay), ref.compact_grad_values(dy, x, idx))]
    return max(e)


# ----------------------------------------------------------------------------- smoke


def smoke() -> int:
    """Tiny correctness pass (interpreter on CPU); no timing, nothing recorded."""
    dev = "cuda" if HAS_CUDA else "cpu"
    dtype = torch.bfloat16 if HAS_CUDA else torch.float16
    worst = 0.0
    for phase in ("search", "fixed"):
        inp = make_inputs(37, 96, 48, 0.1, dtype, dev, 1)
        err = check_correct(inp, phase)
        worst = max(worst, err)
        print(f"smoke {phase:6s}: max relative error vs reference (fp64) = {err:.2e}")
    inp = make_inputs(37, 96, 48, 0.1, dtype, dev, 1)
    k = inp["nnz"]
    x, dy = inp["acts"][0]
    got = md.delta_score_topk(dy, x, inp["delta"], k)
    same = torch.equal(got, ref.topk_flat_indices(md.delta_score(dy, x, inp["delta"]), k))
    print(f"smoke score : 3-pass top-{k} equals top-k of the fp32 element score: {same}")
    model, note = build_shira(inp)
    if model is not None:
        y = model(x)
        print(f"smoke shira : built ({note}); rel error vs ours {rel_err(y, md.compact_delta_linear(x, inp['w'], inp['values'], inp['indices'])):.2e}")
    else:
        print(f"smoke shira : {note}")
    ok = worst < 2e-2 and same
    print("smoke", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


# ----------------------------------------------------------------------------- compile report


def compile_report(arch: int = 90, d_in: int = 3072, d_out: int = 9216, tokens: int = 2048) -> int:
    """Compile every kernel/config for sm_<arch> without a GPU, specialised as the JIT would on
    the Phi-3 qkv shape, and print registers, stack (spill) bytes, shared memory and the
    matrix instructions in the SASS (HGMMA = Hopper wgmma). No timing, nothing recorded."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("--compile-report needs TRITON_INTERPRET unset")
        return 1
    bind = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    tgt = GPUTarget("cuda", arch, 128 if arch >= 90 else 32)
    M, N, K = tokens, d_out, d_in
    smem_limit = 232448 if arch == 90 else None
    flags = dict(UPCAST=False, DOT_FP32=False, PREC="ieee", LT=md.LAYOUT_TILE)

    def comp(fn, ptrs, ints, consts, cfg, label):
        consts = dict(consts, **cfg.kwargs)
        sig, cexp, attrs = {}, {}, {}
        for i, n in enumerate(fn.arg_names):
            if n in consts:
                sig[n], cexp[(i,)] = "constexpr", consts[n]
            elif n in ptrs:
                sig[n], attrs[(i,)] = ptrs[n], [["tt.divisibility", 16]]
            elif ints[n] == 1:  # the JIT specialises ints equal to 1 ...
                sig[n], cexp[(i,)] = "constexpr", 1
            else:  # ... and marks multiples of 16
                sig[n] = "i32"
                if ints[n] % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cexp, attrs=attrs), target=tgt,
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([os.path.join(bind, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
        ru = subprocess.run([os.path.join(bind, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        regs = re.findall(r"REG:(\d+)", ru)[0]
        stack = re.findall(r"STACK:(\d+)", ru)[0]
        smem = k.metadata.shared
        kw = cfg.kwargs
        warn = " OVER SMEM LIMIT" if smem_limit and smem > smem_limit else ""
        warn += " SPILLS" if int(stack) else ""
        print(f"{label:12s} BM={kw['BLOCK_M']:3d} BN={kw['BLOCK_N']:3d} BK={kw['BLOCK_K']:3d} w{cfg.num_warps} s{cfg.num_stages}"
              f"  regs={regs:>3s} stack={stack:>4s} smem={smem:6d} HGMMA={sass.count('HGMMA')} HMMA={sass.count('HMMA')}{warn}",
              flush=True)

    kern = md.jit_kernels()
    x = "*bf16"
    for mode in (1, 2):
        m = "*u8" if mode == 1 else "*i8"
        sd = (K, 1) if mode == 1 else (0, 0)
        for cfg in md.GPU_FWD_CONFIGS:
            comp(kern["fwd"], dict(x_ptr=x, w_ptr=x, d_ptr="*fp32", m_ptr=m, off_ptr="*i32", b_ptr=x, y_ptr=x),
                 dict(M=M, N=N, K=K, n_tiles=K // 64, M_KEY=M, s_xm=K, s_xk=1, s_wn=K, s_wk=1, s_dn=sd[0], s_dk=sd[1],
                      s_mn=K, s_mk=1, s_ym=N, s_yn=1), dict(MODE=mode, HAS_BIAS=True, **flags), cfg, f"fwd mode{mode}")
        for cfg in md.GPU_DX_CONFIGS:
            comp(kern["dx"], dict(dy_ptr=x, w_ptr=x, d_ptr="*fp32", m_ptr=m, off_ptr="*i32", dx_ptr=x),
                 dict(M=M, N=N, K=K, n_tiles=K // 64, M_KEY=M, s_gm=N, s_gn=1, s_wn=K, s_wk=1, s_dn=sd[0], s_dk=sd[1],
                      s_mn=K, s_mk=1, s_xm=K, s_xk=1), dict(MODE=mode, **flags), cfg, f"dx mode{mode}")
    st = md.GPU_SCORE_TILE
    score_cfg = triton.Config({"BLOCK_M": st["BLOCK_M"], "BLOCK_N": st["BLOCK_N"], "BLOCK_K": st["BLOCK_K"], "GROUP": 8},
                              num_warps=st["num_warps"], num_stages=st["num_stages"])
    for epi in range(6):
        for cfg in (md.GPU_GT_CONFIGS if epi < 2 else [score_cfg]):
            comp(kern["gt"],
                 dict(dy_ptr=x, x_ptr=x, d_ptr="*fp32", m_ptr="*i8" if epi == 1 else "*u8", off_ptr="*i32",
                      out_ptr="*i32" if epi >= 4 else "*fp32", out2_ptr="*i32"),
                 dict(M=M, N=N, K=K, n_tiles=K // 64, n_words=K // 32, thresh=5, prefix=3, M_KEY=M, s_gm=N, s_gn=1,
                      s_xm=K, s_xk=1, s_dn=K, s_dk=1, s_mn=K, s_mk=1, s_on=K, s_ok=1),
                 dict(EPI=epi, HAS_MASK=True, SCORE=0, BS=16, DIGIT=1, **flags), cfg, f"G epi{epi}")
    return 0


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 16384])
    p.add_argument("--keep", type=float, nargs="+", default=[0.01, 0.1, 0.5])
    p.add_argument("--d-in", type=int, default=3072)
    p.add_argument("--d-out", type=int, default=9216)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--phases", nargs="+", choices=["search", "fixed", "score"], default=["search", "fixed", "score"])
    p.add_argument("--variants", nargs="+", choices=["ours", "reference", "materialize", "shira", "floor"],
                   default=["ours", "reference", "materialize", "shira", "floor"])
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--sets", type=int, default=2, help="rotated activation sets")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--no-record", action="store_true", help="print only; append nothing to the results file")
    p.add_argument("--out", default=RESULTS, help="JSON-lines results file")
    p.add_argument("--smoke", action="store_true", help="tiny correctness pass, no timing (works without CUDA)")
    p.add_argument("--compile-report", "--compile-check", action="store_true",
                   help="compile every config for sm_90 (no GPU needed): registers, spills, shared memory, HGMMA")
    args = p.parse_args(argv)

    if args.compile_report:
        return compile_report(d_in=args.d_in, d_out=args.d_out, tokens=args.tokens[0])
    if args.smoke:
        return smoke()
    if not HAS_CUDA:
        print("bench_masked_delta: no CUDA device; nothing timed and nothing recorded "
              "(CPU figures are not kernel performance). Use --smoke for a correctness pass.")
        return 0


    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    d_in, d_out = args.d_in, args.d_out
    tflops_peak, gbps_peak = ceilings()
    meta = run_metadata("masked_delta", d_in=d_in, d_out=d_out, dtype=args.dtype,
                ceiling_bf16_tflops=round(tflops_peak, 1), ceiling_copy_gbps=round(gbps_peak, 1))
    print(f"# {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}{' (dirty)' if meta['dirty'] else ''}")
    print(f"# measured ceilings: bf16 mm {tflops_peak:.0f} TFLOP/s, copy {gbps_peak:.0f} GB/s")
    rows = []

    def record(**kw):
        row = dict(meta, **kw)
        rows.append(row)
        if not args.no_record:  # row by row: a run cut off by a time limit keeps what it measured
            append_rows(args.out, [row], quiet=True)
        ms = row.get("ms")
        print(f"{row['phase']:6s} {row['op']:8s} T={row['tokens']:<6d} keep={row['keep']:<5} {row['variant']:42s} "
              f"{ms if ms is None else round(ms, 3)!s:>9} ms  {row.get('tflops') or '':>7} TF/s  "
              f"peak+{row.get('peak_extra_mib') or '':>8} MiB  {row.get('note', '')}")

    flops = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}
    for tokens in args.tokens:
        for keep in args.keep:
            inp = make_inputs(tokens, d_in, d_out, keep, dtype, "cuda", args.sets)
            common = dict(tokens=tokens, keep=keep, nnz=inp["nnz"], keep_actual=inp["nnz"] / (d_in * d_out))
            for phase in [ph for ph in ("search", "fixed") if ph in args.phases]:
                err = check_correct(inp, phase)
                if err > 2e-2:
                    print(f"!! {phase}: ours differs from the reference (rel err {err:.2e}); not timing")
                    continue
                variants = {}
                if "ours" in args.variants:
                    variants["ours"] = (ops_ours(inp, phase), None, None)
                if "reference" in args.variants:
                    variants["reference"] = ops_reference(inp, phase)
                if phase == "search" and "materialize" in args.variants:
                    variants["materialize+cuBLAS"] = (ops_materialize(inp), None, None)
                if phase == "fixed" and "shira" in args.variants:
                    model, note = build_shira(inp)
                    if model is None:
                        record(phase=phase, op="all", variant="shira", ms=None, note=note, **common)
                    else:
                        variants["shira"] = ops_shira(inp, model)
                if "floor" in args.variants and keep == args.keep[0]:
                    variants["floor W frozen"] = ops_floor(inp, False)
                    variants["floor W trainable"] = ops_floor(inp, True)
                for name, (ops, prep, grads) in variants.items():
                    for op, fn in ops.items():
                        fl = flops[op] * tokens * d_in * d_out
                        if name == "floor W frozen" and op != "fwd":
                            fl = fl * 2 // 3 if op == "fwd+bwd" else fl // 2
                        pre = prep if op == "bwd" else None
                        try:
                            ms = bench(fn, args.warmup, args.rep, grad_to_none=grads, prep=pre)
                            peak = None if args.no_memory else round(peak_extra_mb(fn, pre), 1)
                            note = f"rel err {err:.1e}" if name == "ours" else ""
                        except Exception as exc:  # report, do not hide
                            ms, peak, note = None, None, f"failed: {exc!r}"[:200]
                        record(phase=phase, op=op, variant=name, ms=ms, peak_extra_mib=peak,
                               tflops=None if ms is None else round(fl / ms / 1e9, 1), note=note, **common)
                    del ops
                torch.cuda.empty_cache()
            if "score" in args.phases:
                k = inp["nnz"]
                for name, fn in score_ops(inp, k).items():
                    try:
                        ms = bench(fn, args.warmup, args.rep)
                        peak = None if args.no_memory else round(peak_extra_mb(fn), 1)
                        note = ""
                    except Exception as exc:
                        ms, peak, note = None, None, f"failed: {exc!r}"[:200]
                    nb = score_bytes(name, d_out, d_in)
                    record(phase="score", op="score", variant=name, ms=ms, peak_extra_mib=peak,
                           bytes_written=nb, bytes_vs_dense_fp32=round(nb / (4 * d_in * d_out), 4),
                           peak_extra_vs_dense_fp32=None if peak is None else round(peak * 2**20 / (4 * d_in * d_out), 4),
                           tflops=None if ms is None else round(2 * tokens * d_in * d_out / ms / 1e9, 1), note=note, **common)
            if "layout" in inp:
                lay = inp["layout"]
                record(phase="fixed", op="state", variant="ours layout bytes", ms=None,
                       note=f"layout {lay.nbytes() / 2**20:.1f} MiB + values/indices {8 * inp['nnz'] / 2**20:.1f} MiB "
                            f"(dense fp32 Ŵ would be {4 * d_in * d_out / 2**20:.1f} MiB)", **common)
            del inp
            torch.cuda.empty_cache()

    _summary(rows)
    print("(--no-record: nothing appended)" if args.no_record else f"appended {len(rows)} rows to {args.out}")
    return 0


def _summary(rows):
    """Ratios against the goals (docs/kernels.md, "Masked-delta kernels")."""
    def t(phase, op, variant, tokens, keep=None):
        for r in rows:
            if (r["phase"], r["op"], r["variant"], r["tokens"]) == (phase, op, variant, tokens) and r.get("ms") \
                    and (keep is None or r["keep"] == keep):
                return r["ms"]
        return None

    print("\n# goals (ratio = other / ours; >1 means ours is faster)")
    for r in rows:
        if r["variant"] != "ours" or r["op"] != "fwd+bwd" or not r.get("ms"):
            continue
        T, keep, ms = r["tokens"], r["keep"], r["ms"]
        parts = []
        if r["phase"] == "fixed":
            for fl in ("floor W frozen", "floor W trainable"):
                f = t("fixed", "fwd+bwd", fl, T)
                if f:
                    parts.append(f"ours/{fl} = {ms / f:.2f} (goal <= 1.15)")
            s = t("fixed", "fwd+bwd", "shira", T, keep)
            if s:
                parts.append(f"shira/ours = {s / ms:.2f} (goal >= 1.5)")
        else:
            ref_ms = t("search", "fwd+bwd", "reference", T, keep)
            if ref_ms:
                parts.append(f"reference/ours = {ref_ms / ms:.2f} (goal >= 1.3)")
        print(f"{r['phase']:6s} T={T:<6d} keep={keep:<5} " + "; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
