#!/usr/bin/env python
"""Benchmark of batched multi-adapter serving against the base model, a merged model, PEFT LoRA
mixed batches and a per-adapter loop.

Phi-3-mini layer sizes, random bf16 weights, 1 to 256 distinct adapters in batches of 1 to 256
rows, prefill and decode, at the op level (one qkv_proj) and the model level. Rows go to
``benchmarks/results/multi_adapter.jsonl`` from CUDA runs and from the ``--cpu`` table (the
reference path against PEFT on the CPU). ``--smoke``: every
implementation on a tiny Phi-3, checked for agreement, nothing recorded; ``--compile-check``:
compile every kernel config for sm_90 (no GPU needed). What is timed, the bytes counted and the
goals: docs/serving.md, section "Benchmark".
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    append_rows,
    mmap_threshold,
    reexec_with_fixed_mmap_threshold,
    run_metadata,
    run_with_fixed_mmap_threshold,
    sm90_compile_check,
)

IMPLS = ("base", "merged", "ours", "peft", "loop")
GOALS = (  # (level, phase, metric, impl, minimum) at 64 distinct block adapters, keep 0.1 (docs/serving.md)
    ("model", "prefill", "ratio_vs_base", "ours", 0.85),
    ("op", "decode", "frac_of_bandwidth", "ours", 0.70),
    ("model", "prefill", "speedup_vs_peft", "ours", 10.0),
    ("model", "decode", "speedup_vs_peft", "ours", 10.0),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark batched multi-adapter serving (ours vs base, merged, PEFT "
                                "mixed-batch LoRA, per-adapter loop).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--levels", nargs="+", choices=["op", "model"], default=["op", "model"])
    p.add_argument("--phases", nargs="+", choices=["prefill", "decode"], default=["prefill", "decode"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256], help="rows per batch")
    p.add_argument("--adapters", type=int, nargs="+", default=None,
                   help="distinct adapters in the batch (default 1 8 64 256; --cpu: 8 64)")
    p.add_argument("--popularity", nargs="+", choices=["uniform", "skewed"], default=["uniform", "skewed"])
    p.add_argument("--formats", nargs="+", choices=["block", "element"], default=None,
                   help="adapter formats (default block; --cpu: block element)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--keep", type=float, default=0.1, help="keep ratio of each adapter")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers of the model-level runs (default 8; --cpu: 2; Phi-3-mini: 32)")
    p.add_argument("--prompt", type=int, default=None, help="prefill tokens per row (default 128; --cpu: 8)")
    p.add_argument("--context", type=int, default=512, help="KV-cache length of the decode step")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--max-prefill-tokens", type=int, default=32768, help="skip prefill cases with more tokens")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "multi_adapter.jsonl"))
    p.add_argument("--no-record", action="store_true", help="print the table only, append nothing")
    p.add_argument("--smoke", action="store_true", help="tiny CPU/GPU run of every implementation; records nothing")
    p.add_argument("--compile-check", action="store_true", help="compile every kernel config for sm_90; no GPU needed")
    p.add_argument("--seed", type=int, default=0)
    cpu = p.add_argument_group("CPU table (--cpu): ours vs PEFT mixed-batch LoRA vs the base alone, model level")
    cpu.add_argument("--cpu", action="store_true", help="run the CPU table (reference path) instead of the GPU "
                     "benchmark; --adapters, --formats, --keep, --layers, --prompt apply; rows are recorded")
    cpu.add_argument("--hidden", type=int, nargs="+", default=[512, 3072], help="model widths (3072: Phi-3-mini)")
    cpu.add_argument("--new-tokens", type=int, default=4, help="tokens generated per row")
    cpu.add_argument("--repeats", type=int, default=3, help="alternated repeats (the minimum is kept; op level: >= 5)")
    cpu.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared CPU)")
    cpu.add_argument("--no-register", action="store_true", help="skip the register peak-memory rows (both formats)")
    cpu.add_argument("--no-ops", action="store_true", help="skip the op-level rows (the delta's candidates)")
    cpu.add_argument("--no-model", action="store_true", help="skip the model-level rows (forward, generate)")
    args = p.parse_args(argv)
    defaults = dict(adapters=[8, 64], formats=["block", "element"], layers=2, prompt=8) if args.cpu else \
        dict(adapters=[1, 8, 64, 256], formats=["block"], layers=8, prompt=128)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ------------------------------------------------------------------ shared pieces


def phi3_config(layers, smoke=False):
    from transformers import Phi3Config

    if smoke:
        return Phi3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      original_max_position_embeddings=4096, pad_token_id=32000, bos_token_id=1,
                      eos_token_id=32000, tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0,
                      attention_dropout=0.0)


def assignment(batch, n, popularity, rng):
    """``batch`` adapter indices using exactly ``n`` distinct adapters (n <= batch)."""
    if popularity == "uniform":
        rows = [i % n for i in range(batch)]
    else:
        weights = [1.0 / (i + 1) ** 1.1 for i in range(n)]
        rows = list(range(n)) + rng.choices(range(n), weights=weights, k=batch - n)
    rng.shuffle(rows)
    return rows


def random_delta(torch, shape, fmt, keep, gen, device, dtype):
    from sparse_engine.formats import BlockSparseDelta, SparseDelta

    d_out, d_in = shape
    if fmt == "block":
        n_units = (d_out // 16) * (d_in // 16)
        k = max(1, round(keep * n_units))
        ids = torch.sort(torch.randperm(n_units, generator=gen, device=device)[:k]).values.to(torch.int32)
        blocks = (torch.randn(k, 16, 16, generator=gen, device=device) * 0.01).to(dtype)
        return BlockSparseDelta(shape, blocks, ids)
    n_units = d_out * d_in
    k = max(1, round(keep * n_units))
    ids = torch.sort(torch.randperm(n_units, generator=gen, device=device)[:k]).values.to(torch.int32)
    return SparseDelta(shape, (torch.randn(k, generator=gen, device=device) * 0.01).to(dtype), ids)


def lora_rank(d_out, d_in, keep, fmt):
    """LoRA rank whose r·(d_in + d_out) is closest to the adapter's kept scalars (baselines.matched_lora_rank's rule)."""
    if fmt == "block":
        kept = max(1, round(keep * (d_out // 16) * (d_in // 16))) * 256
    else:
        kept = max(1, round(keep * d_out * d_in))
    return max(1, round(kept / (d_in + d_out)))


class Timer:
    """do_bench median on CUDA; a plain median of wall times elsewhere (smoke only)."""

    def __init__(self, torch, cuda, warmup, rep):
        self.torch, self.cuda, self.warmup, self.rep = torch, cuda, warmup, rep

    def __call__(self, fn):
        if self.cuda:
            import triton

            return float(triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep, return_mode="median"))
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[1]


def copy_bandwidth(torch, timer):
    """Measured device copy bandwidth (bytes read + written per second) of a 1 GiB copy."""
    n = (1 << 30) // 2
    bufs = [torch.randn(n, device="cuda", dtype=torch.bfloat16)]
    bufs.append(torch.empty_like(bufs[0]))
    ms = timer(lambda: bufs[1].copy_(bufs[0]))
    bufs.clear()
    return 2 * n * 2 / (ms * 1e-3)


# ------------------------------------------------------------------------ op level


class _QKV:
    """The op-level fixture: a qkv_proj holder, its library, the adapters and the baselines' data."""


def _holder(nn):
    class Holder(nn.Module):
        def forward(self, x):
            return self.qkv_proj(x)

    return Holder()


def build_op(torch, args, fmt, n_max, device, dtype, smoke):
    """One qkv_proj and a library of ``n_max`` adapters on it (+ what the baselines need)."""
    from torch import nn

    from sparse_engine.serving import AdapterLibrary

    d_out, d_in = (192, 64) if smoke else (9216, 3072)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    holder = _holder(nn)
    holder.qkv_proj = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        holder.qkv_proj.weight.normal_(0, 0.02, generator=gen)
    holder.requires_grad_(False)
    weight = holder.qkv_proj.weight
    lib = AdapterLibrary(holder, dtype=dtype)
    deltas = []
    for i in range(n_max):
        d = random_delta(torch, (d_out, d_in), fmt, args.keep, gen, device, dtype)
        lib.register(f"a{i}", {"qkv_proj": d})
        deltas.append(d)
    op = _QKV()
    op.holder, op.lib, op.weight, op.deltas, op.shape, op.fmt = holder, lib, weight, deltas, (d_out, d_in), fmt
    op.merged = (weight.float() + deltas[0].to_dense().to(weight.device)).to(dtype)
    op.peft = None
    op.slot_maps = None
    return op


def op_peft(torch, op, n, rank, device, dtype):
    """A PEFT LoRA model over the same qkv_proj with ``n`` adapters (random A and B)."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    holder = _holder(nn)
    holder.qkv_proj = nn.Linear(op.shape[1], op.shape[0], bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        holder.qkv_proj.weight.copy_(op.weight)
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv_proj"], init_lora_weights=False)
    model = get_peft_model(holder, cfg, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg)
    model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def op_impls(torch, F, op, names, rows_of, x, impls, backend_triton):
    """name -> zero-argument callable computing the qkv output of the mixed batch."""
    fns = {}
    w = op.weight
    if "base" in impls:
        fns["base"] = lambda: F.linear(x, w)
    if "merged" in impls:
        fns["merged"] = lambda: F.linear(x, op.merged)
    if "ours" in impls:
        layer = op.holder.qkv_proj

        def ours():
            return layer(x)

        fns["ours"] = ours
    if "peft" in impls and op.peft is not None:
        fns["peft"] = lambda: op.peft(x, adapter_names=names)
    if "loop" in impls:
        from sparse_engine.kernels import reference as ref

        if backend_triton:
            from sparse_engine.kernels import block_sparse as bsk
            from sparse_engine.kernels import masked_delta as mdk
        groups = [(int(a), torch.tensor(r, device=x.device)) for a, r in rows_of.items()]

        def loop():
            y = torch.empty(*x.shape[:-1], w.shape[0], device=x.device, dtype=x.dtype)
            for a, idx in groups:
                d = op.deltas[a]
                xs = x.index_select(0, idx)
                if op.fmt == "block":
                    if backend_triton:
                        ys = bsk.block_delta_linear(xs, w, d.blocks, d.block_indices, slot_map=op.slot_maps[a])
                    else:
                        ys = ref.block_delta_linear(xs, w, d.blocks, d.block_indices)
                else:
                    if backend_triton:
                        ys = mdk.compact_delta_linear(xs, w, d.values, d.indices, layout=op.slot_maps[a])
                    else:
                        ys = ref.compact_delta_linear(xs, w, d.values, d.indices)
                y.index_copy_(0, idx, ys)
            return y

        fns["loop"] = loop
    return fns


def run_op(torch, F, args, timer, meta, device, dtype, smoke, bandwidth):
    rows = []
    rng = random.Random(args.seed)
    n_max = max(args.adapters)
    for fmt in args.formats:
        op = build_op(torch, args, fmt, n_max, device, dtype, smoke)
        d_out, d_in = op.shape
        rank = lora_rank(d_out, d_in, args.keep, fmt)
        triton_path = device == "cuda"
        if "loop" in args.impls and triton_path:
            from sparse_engine.kernels import block_sparse as bsk
            from sparse_engine.kernels import masked_delta as mdk

            op.slot_maps = [bsk.build_block_slot_map(d.block_indices, d.shape, 16) if fmt == "block"
                            else mdk.build_compact_layout(d.indices, d.shape) for d in op.deltas]
        peft_n = 0
        for n in sorted(args.adapters):
            if "peft" in args.impls and n > peft_n:
                op.peft = None
                if device == "cuda":
                    torch.cuda.empty_cache()
                op.peft = op_peft(torch, op, n, rank, device, dtype)
                peft_n = n
            for batch in args.batch:
                if n > batch:
                    continue
                for pop in args.popularity:
                    if n == 1 and pop == "skewed":
                        continue
                    idx = assignment(batch, n, pop, rng)
                    names = [f"a{i}" for i in idx]
                    rows_of = {}
                    for r, a in enumerate(idx):
                        rows_of.setdefault(a, []).append(r)
                    most_rows = max(len(r) for r in rows_of.values())
                    for phase in args.phases:
                        tokens = 1 if phase == "decode" else args.prompt
                        if batch * tokens > args.max_prefill_tokens:
                            continue
                        gen = torch.Generator(device=device).manual_seed(args.seed + batch)
                        x = torch.randn(batch, tokens, d_in, generator=gen, device=device).to(dtype)
                        with torch.no_grad(), op.lib.use(names):
                            fns = op_impls(torch, F, op, names, rows_of, x, args.impls, triton_path)
                            check_agreement(torch, fns, op, names, x, fmt)
                            res = {k: timer(f) for k, f in fns.items()}
                        need = op.lib.step_bytes(names) if phase == "decode" else None
                        extra = {"d_out": d_out, "d_in": d_in, "peft_rank": rank, "max_rows_per_adapter": most_rows}
                        if need is not None:
                            extra["base_bytes"] = op.lib.step_bytes([])
                        rows += _recorded(args, smoke, emit(
                            meta, res, level="op", phase=phase, fmt=fmt, batch=batch, tokens=tokens,
                            n=n, pop=pop, keep=args.keep, need=need, bandwidth=bandwidth, extra=extra))
        del op
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def check_agreement(torch, fns, op, names, x, fmt, rows=6):
    """ours == loop == the dense fp32 reference on the batch's first rows (before any timing)."""
    w = op.weight.float()
    expect = []
    for r, n in enumerate(names[:rows]):
        dense = op.deltas[int(n[1:])].to_dense().to(w.device)
        expect.append(x[r].float() @ (w + dense).t())
    expect = torch.stack(expect)
    tol = 2e-2 if x.dtype == torch.bfloat16 else 1e-3
    for key in ("ours", "loop"):
        if key in fns:
            got = fns[key]()[: len(expect)].float()
            err = float((got - expect).norm() / expect.norm())
            if not err < tol:
                raise AssertionError(f"{key} disagrees with the dense reference: rel err {err:.3g} ({fmt})")


def _recorded(args, smoke, new_rows):
    """Append measured rows at once: a run cut off by a time limit keeps what it measured."""
    if not smoke and not args.no_record:
        append_rows(args.results, new_rows, quiet=True)
    return new_rows


def emit(meta, res, *, level, phase, fmt, batch, tokens, n, pop, keep, need, bandwidth, extra):
    rows = []
    base = res.get("base")
    for impl, ms in res.items():
        row = dict(meta, level=level, phase=phase, format=fmt, impl=impl, batch=batch, tokens_per_row=tokens,
                   n_adapters=n, popularity=pop, keep_ratio=keep, ms=ms,
                   tokens_per_s=batch * tokens / (ms * 1e-3), **extra)
        if base:
            row["ratio_vs_base"] = base / ms
        if "peft" in res and impl == "ours":
            row["speedup_vs_peft"] = res["peft"] / ms
        if need is not None and impl in ("ours", "base", "merged"):
            bytes_needed = need if impl == "ours" else need_base(need, extra)
            row["bytes_needed"] = bytes_needed
            row["achieved_GBps"] = bytes_needed / (ms * 1e-3) / 1e9
            if bandwidth:
                row["frac_of_bandwidth"] = bytes_needed / (ms * 1e-3) / bandwidth
        rows.append(row)
    return rows


def need_base(need, extra):
    return extra.get("base_bytes", need)


# --------------------------------------------------------------------- model level


def build_model(torch, args, device, dtype, smoke):
    from transformers import Phi3ForCausalLM

    cfg = phi3_config(2 if smoke else args.layers, smoke)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Phi3ForCausalLM._from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def model_bytes_per_step(torch, model, batch, context):
    """Bytes a decode step reads besides the adapters: every weight except the embedding table
    (one row per token), plus the KV cache."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        total += p.numel() * p.element_size()
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * batch * context * cfg.num_key_value_heads * head_dim * 2
    return total + kv


def run_model(torch, args, timer, meta, device, dtype, smoke, bandwidth):
    from sparse_engine.serving import AdapterLibrary

    rows = []
    rng = random.Random(args.seed)
    fmt = args.formats[0]
    model = build_model(torch, args, device, dtype, smoke)
    layers = [n for n, m in model.named_modules() if n.endswith("qkv_proj")]
    d_out, d_in = model.get_submodule(layers[0]).weight.shape
    rank = lora_rank(d_out, d_in, args.keep, fmt)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    adapters = []  # per adapter: {layer: delta}
    lib = AdapterLibrary(model, dtype=dtype)
    peft_model, peft_n = None, 0
    for n in sorted(args.adapters):
        while len(adapters) < n:  # the library grows at run time
            d = {layer: random_delta(torch, (d_out, d_in), fmt, args.keep, gen, device, dtype) for layer in layers}
            lib.register(f"a{len(adapters)}", d)
            adapters.append(d)
        merged = merged_qkv(torch, model, lib, adapters[0])
        if "peft" in args.impls and n > peft_n:
            peft_model = None
            if device == "cuda":
                torch.cuda.empty_cache()
            peft_model = model_peft(torch, model, lib, n, rank, device, dtype)
            peft_n = n
        for batch in args.batch:
            if n > batch:
                continue
            for pop in args.popularity:
                if n == 1 and pop == "skewed":
                    continue
                idx = assignment(batch, n, pop, rng)
                names = [f"a{i}" for i in idx]
                for phase in args.phases:
                    tokens = 1 if phase == "decode" else args.prompt
                    if phase == "prefill" and batch * tokens > args.max_prefill_tokens:
                        continue
                    res = time_model(torch, args, timer, model, lib, merged, peft_model, names, phase, device)
                    need = None
                    extra = {"layers": model.config.num_hidden_layers, "peft_rank": rank, "d_out": int(d_out),
                             "d_in": int(d_in), "max_rows_per_adapter": max(names.count(a) for a in set(names))}
                    if phase == "decode":
                        base_bytes = model_bytes_per_step(torch, model, batch, args.context)
                        need = base_bytes + sum(lib.info(a).bytes for a in set(names))
                        extra.update(context=args.context, base_bytes=base_bytes)
                    rows += _recorded(args, smoke, emit(
                        meta, res, level="model", phase=phase, fmt=fmt, batch=batch, tokens=tokens, n=n,
                        pop=pop, keep=args.keep, need=need, bandwidth=bandwidth, extra=extra))
        del merged
    lib.uninstall()
    return rows


def merged_qkv(torch, model, lib, deltas):
    """qkv weights with adapter 0 merged (swapped in for the 'merged' timing)."""
    out = {}
    for layer, d in deltas.items():
        w = lib._wrapped[layer].base.weight
        out[layer] = (w.float() + d.to_dense().to(w.device)).to(w.dtype)
    return out


def model_peft(torch, model, lib, n, rank, device, dtype):
    """A PEFT copy of the base model (same weights) with ``n`` LoRA adapters on qkv_proj."""
    peft_model = peft_over(model, lib, n, rank, share_weights=False)
    peft_model.to(device=device, dtype=dtype)
    return peft_model


def peft_over(model, lib, n, rank, share_weights: bool):
    """PEFT LoRA (``n`` adapters of rank ``rank`` on qkv_proj, random A and B) over a copy of
    ``model`` with its served layers back to plain linears; ``share_weights``: the copy shares
    every weight with ``model`` (no second copy of the base)."""
    from peft import LoraConfig, get_peft_model

    from sparse_engine.model import replace_module

    memo = {id(lib): lib}  # share (do not copy) the library the wrappers point to
    if share_weights:
        memo.update({id(p): p for p in model.parameters()})
    plain = copy.deepcopy(model, memo=memo)
    for layer in lib.layers:  # the copy holds our wrappers: put the plain linears back
        replace_module(plain, layer, plain.get_submodule(layer).base)
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv_proj"], init_lora_weights=False)
    peft_model = get_peft_model(plain, cfg, adapter_name="a0")
    for i in range(1, n):
        peft_model.add_adapter(f"a{i}", cfg)
    peft_model.eval().requires_grad_(False)
    return peft_model


def time_model(torch, args, timer, model, lib, merged, peft_model, names, phase, device):
    from transformers import DynamicCache

    batch = len(names)
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(args.seed + batch)
    res = {}

    def swap(weights):
        old = {}
        for layer, w in weights.items():
            lin = lib._wrapped[layer].base
            old[layer] = lin.weight
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
        return old

    if phase == "prefill":
        ids = torch.randint(3, vocab, (batch, args.prompt), generator=gen, device=device)
        calls = {
            "base": lambda: model(input_ids=ids, use_cache=False),
            "merged": lambda: model(input_ids=ids, use_cache=False),
            "ours": lambda: lib.forward(names, input_ids=ids, use_cache=False),
            "peft": lambda: peft_model(input_ids=ids, use_cache=False, adapter_names=names),
            "loop": lambda: [lib.forward([a] * len(r), input_ids=ids[r], use_cache=False)
                             for a, r in _groups(torch, names, device).items()],
        }
        for impl in args.impls:
            if impl == "peft" and peft_model is None:
                continue
            old = swap(merged) if impl == "merged" else None
            with torch.no_grad():
                res[impl] = timer(calls[impl])
            if old is not None:
                swap(old)
        return res

    ctx = args.context
    prompt = torch.randint(3, vocab, (batch, ctx), generator=gen, device=device)
    tok = torch.randint(3, vocab, (batch, 1), generator=gen, device=device)
    mask = torch.ones(batch, ctx + 1, dtype=torch.long, device=device)
    pos = torch.tensor([ctx], device=device)

    def prefilled(run_model, **kw):
        cache = DynamicCache()
        with torch.no_grad():
            run_model(input_ids=prompt, past_key_values=cache, use_cache=True, **kw)
        return cache

    for impl in args.impls:
        if impl == "peft" and peft_model is None:
            continue
        old = swap(merged) if impl == "merged" else None
        if impl in ("base", "merged"):
            cache = prefilled(model)

            def step(cache=cache):
                model(input_ids=tok, past_key_values=cache, attention_mask=mask, cache_position=pos, use_cache=True)
                cache.crop(-1)
        elif impl == "ours":
            with lib.use(names):
                cache = prefilled(model)

            def step(cache=cache):  # timed inside one lib.use(): a decode loop keeps its batch's plan
                model(input_ids=tok, past_key_values=cache, attention_mask=mask, cache_position=pos, use_cache=True)
                cache.crop(-1)
        elif impl == "peft":
            cache = prefilled(peft_model, adapter_names=names)

            def step(cache=cache):
                peft_model(input_ids=tok, past_key_values=cache, attention_mask=mask, cache_position=pos,
                           use_cache=True, adapter_names=names)
                cache.crop(-1)
        else:  # loop: one decode step of the model per distinct adapter on its rows
            groups = _groups(torch, names, device)
            caches = {}
            for a, r in groups.items():
                with lib.use([a] * len(r)):
                    cache = DynamicCache()
                    with torch.no_grad():
                        model(input_ids=prompt[r], past_key_values=cache, use_cache=True)
                    caches[a] = cache

            def step(groups=groups, caches=caches):
                for a, r in groups.items():
                    with lib.use([a] * len(r)):
                        model(input_ids=tok[r], past_key_values=caches[a], attention_mask=mask[r],
                              cache_position=pos, use_cache=True)
                    caches[a].crop(-1)
        with torch.no_grad(), (lib.use(names) if impl == "ours" else _nullcontext()):
            res[impl] = timer(step)
        if old is not None:
            swap(old)
    return res


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def _groups(torch, names, device):
    out = {}
    for r, a in enumerate(names):
        out.setdefault(a, []).append(r)
    return {a: torch.tensor(r, device=device) for a, r in out.items()}


# -------------------------------------------------------------------------- output


def print_table(rows):
    cols = ("level", "phase", "format", "batch", "n_adapters", "popularity", "impl", "ms", "tokens_per_s",
            "ratio_vs_base", "speedup_vs_peft", "frac_of_bandwidth")
    print(" ".join(f"{c[:12]:>12s}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:12.4g}" if isinstance(v, float) else f"{v!s:>12s}")
        print(" ".join(cells))


def print_goals(rows):
    print("\ngoals (64 distinct block adapters, keep 0.1; worst case over batch/popularity):")
    for level, phase, metric, impl, minimum in GOALS:
        vals = [r[metric] for r in rows if r["level"] == level and r["phase"] == phase and r["impl"] == impl
                and r["n_adapters"] == 64 and r["format"] == "block" and metric in r]
        if not vals:
            print(f"  {level:5s} {phase:7s} {metric:18s} >= {minimum:<5g}: not measured in this run")
            continue
        worst = min(vals)
        print(f"  {level:5s} {phase:7s} {metric:18s} >= {minimum:<5g}: worst {worst:.3g}, best {max(vals):.3g} "
              f"[{'met' if worst >= minimum else 'NOT met'}]")


# ----------------------------------------------------------------------- CPU table
# The reference (CPU) serving path against PEFT mixed-batch LoRA and the base model alone, at the
# model level, forward and generate, every row of the batch a different expert. Methods are
# alternated in one process; the minimum of --repeats is kept, of the process's CPU time (one
# thread: what the method computes, whatever the other users of a shared CPU do) and of wall time.


def cpu_config(hidden, layers):
    """A Phi-3-mini-shaped config of width ``hidden`` (3072: Phi-3-mini; MLP and heads scaled)."""
    from transformers import Phi3Config

    heads = hidden // (96 if hidden % 96 == 0 else 64)  # Phi-3's head size 96 where it divides the width
    inter = 16 * round(hidden * 8 / 3 / 16)
    return Phi3Config(vocab_size=32064, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      original_max_position_embeddings=4096, pad_token_id=32000, bos_token_id=1,
                      eos_token_id=32000, tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0,
                      attention_dropout=0.0)


def cpu_delta(torch, shape, fmt, keep, gen):
    """A random adapter layer with about ``keep`` of its units kept (Bernoulli: fast at Phi-3 width)."""
    from sparse_engine.formats import BlockSparseDelta, SparseDelta

    d_out, d_in = shape
    units = (d_out // 16) * (d_in // 16) if fmt == "block" else d_out * d_in
    ids = (torch.rand(units, generator=gen) < keep).nonzero().flatten().to(torch.int32)
    if fmt == "block":
        return BlockSparseDelta(shape, torch.randn(len(ids), 16, 16, generator=gen) * 0.01, ids)
    return SparseDelta(shape, torch.randn(len(ids), generator=gen) * 0.01, ids)


def cpu_calls(torch, model, lib, peft_model, names, ids, new_tokens):
    """(phase, impl) -> a zero-argument call: the mixed batch through each method."""
    mask = torch.ones_like(ids)
    gen_kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=32000)
    return {
        ("forward", "base"): lambda: model(input_ids=ids, attention_mask=mask, use_cache=False),
        ("forward", "ours"): lambda: lib.forward(names, input_ids=ids, attention_mask=mask, use_cache=False),
        ("forward", "peft"): lambda: peft_model(input_ids=ids, attention_mask=mask, use_cache=False,
                                                adapter_names=names),
        ("generate", "base"): lambda: model.generate(input_ids=ids, **gen_kw),
        ("generate", "ours"): lambda: lib.generate(ids, names, **gen_kw),
        ("generate", "peft"): lambda: peft_model.generate(input_ids=ids, adapter_names=names, **gen_kw),
    }


def cpu_check(torch, lib, names, ids):
    """Mixed-batch logits of two rows == each row's expert alone (before any timing)."""
    mixed = lib.forward(names, input_ids=ids, use_cache=False).logits
    for r in (0, len(names) - 1):
        alone = lib.forward([names[r]], input_ids=ids[r: r + 1], use_cache=False).logits[0]
        err = float((mixed[r] - alone).norm() / alone.norm())
        if not err < 1e-4:
            raise AssertionError(f"row {r} of the mixed batch differs from its expert alone: rel err {err:.3g}")


def cpu_case(torch, args, meta, hidden, fmt, n):
    """One (hidden, format, experts) case: rows for forward and generate of base / ours / peft."""
    from sparse_engine.serving import AdapterLibrary

    from transformers import Phi3ForCausalLM

    torch.manual_seed(args.seed)
    model = Phi3ForCausalLM._from_config(cpu_config(hidden, args.layers), dtype=torch.float32)
    model.eval().requires_grad_(False)
    layers = [name for name, _ in model.named_modules() if name.endswith("qkv_proj")]
    d_out, d_in = model.get_submodule(layers[0]).weight.shape
    gen = torch.Generator().manual_seed(args.seed)
    lib = AdapterLibrary(model)
    for i in range(n):
        lib.register(f"a{i}", {layer: cpu_delta(torch, (d_out, d_in), fmt, args.keep, gen) for layer in layers})
    rank = lora_rank(d_out, d_in, args.keep, fmt)
    peft_model = peft_over(model, lib, n, rank, share_weights=True)
    names = [f"a{i}" for i in range(n)]  # every row a different expert
    ids = torch.randint(3, 32000, (n, args.prompt), generator=gen)
    with torch.no_grad():
        cpu_check(torch, lib, names, ids)
        calls = cpu_calls(torch, model, lib, peft_model, names, ids, args.new_tokens)
        cpu = {key: [] for key in calls}
        wall = {key: [] for key in calls}
        for _ in range(args.repeats):  # alternate the methods in every repeat (the first warms up)
            for key, fn in calls.items():
                c, t = time.process_time(), time.perf_counter()
                fn()
                cpu[key].append((time.process_time() - c) * 1e3)
                wall[key].append((time.perf_counter() - t) * 1e3)
    load = os.getloadavg()[0]
    rows = []
    for phase in ("forward", "generate"):
        ms = {impl: min(cpu[(phase, impl)]) for impl in ("base", "ours", "peft")}
        for impl in ("base", "ours", "peft"):
            key = (phase, impl)
            row = dict(meta, level="model", phase=phase, format=fmt, impl=impl, hidden=hidden, layers=args.layers,
                       batch=n, n_adapters=n, prompt=args.prompt, keep_ratio=args.keep, peft_rank=rank,
                       d_out=int(d_out), d_in=int(d_in), ms=ms[impl], ms_cpu_all=[round(t, 2) for t in cpu[key]],
                       wall_ms=min(wall[key]), wall_ms_all=[round(t, 2) for t in wall[key]],
                       repeats=args.repeats, load_avg=load, adapter_bytes=lib.memory()["adapter_bytes"])
            if phase == "generate":
                row["new_tokens"] = args.new_tokens
            row["vs_base"] = ms[impl] / ms["base"]  # CPU-time ratio: 1.3 = 30 % more than the base alone
            row["vs_peft"] = ms[impl] / ms["peft"]
            rows.append(row)
    lib.uninstall()
    return rows


def register_peak(torch, args, meta, fmt, tmpdir):
    """Peak extra memory (RSS) of ``AdapterLibrary.register`` of a one-layer Phi-3-mini qkv_proj
    adapter file (9216×3072, keep ``args.keep``) into an empty library, over the file's bytes."""
    from torch import nn

    from common import PeakMemory
    from sparse_engine.io import write_adapter
    from sparse_engine.serving import AdapterLibrary

    shape = (9216, 3072)
    gen = torch.Generator().manual_seed(args.seed)
    delta = cpu_delta(torch, shape, fmt, args.keep, gen)
    path = os.path.join(tmpdir, f"qkv-{fmt}.safetensors")
    write_adapter(path, {"qkv_proj": delta}, config={}, base_model=None, base_fingerprint=None)
    file_bytes = os.path.getsize(path)
    del delta
    def library(d_out, d_in):
        holder = _holder(nn)
        holder.qkv_proj = nn.Linear(d_in, d_out, bias=False)
        holder.requires_grad_(False)
        return AdapterLibrary(holder)

    # warm-up on a small file: the code the first registration runs is paged in outside the measurement
    small = os.path.join(tmpdir, f"small-{fmt}.safetensors")
    write_adapter(small, {"qkv_proj": cpu_delta(torch, (64, 32), fmt, 0.5, gen)}, config={}, base_model=None,
                  base_fingerprint=None)
    library(64, 32).register("warm-up", small)
    lib = library(*shape)
    with PeakMemory("cpu") as mem:
        info = lib.register("a", path)
    row = dict(meta, level="register", format=fmt, d_out=shape[0], d_in=shape[1], keep_ratio=args.keep,
               file_bytes=file_bytes, adapter_bytes=info.bytes, peak_bytes=mem.peak,
               peak_vs_file=None if mem.peak is None else mem.peak / file_bytes, load_avg=os.getloadavg()[0])
    lib.uninstall()
    return row


def cpu_ops(torch, args, meta):
    """Op level, one qkv_proj of each width: the CPU path's delta (element: a torch CSR matrix over
    the pool; block: chunked gather + batched 16×16 matmul) against the candidates it was picked
    from (torch's BSR matrix over the pool, block only; gather + index_add unchunked; rebuilding
    a dense ΔW, the first twin) and, for scale, the base matmul and a LoRA of matched rank.
    CPU-time rows."""
    from torch import nn

    from sparse_engine.kernels import reference as ref
    from sparse_engine.serving import AdapterLibrary

    rows = []
    for hidden in args.hidden:
        d_out, d_in = 3 * hidden, hidden
        gen = torch.Generator().manual_seed(args.seed)
        weight = torch.randn(d_out, d_in, generator=gen) * 0.02
        for fmt in args.formats:
            holder = _holder(nn)
            holder.qkv_proj = nn.Linear(d_in, d_out, bias=False)
            holder.requires_grad_(False)
            lib = AdapterLibrary(holder)
            delta = cpu_delta(torch, (d_out, d_in), fmt, args.keep, gen)
            lib.register("a", {"qkv_proj": delta})
            pool = lib.pools["qkv_proj"]
            rank = lora_rank(d_out, d_in, args.keep, fmt)
            lora_a, lora_b = torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen)
            if fmt == "block":
                ids = delta.block_indices.long()
                rows_, cols_ = ids // (d_in // 16), ids % (d_in // 16)
            else:
                ids = delta.indices.long()
                rows_, cols_ = ids // d_in, ids % d_in
            for m in (1, 8, 64):
                x = torch.randn(m, d_in, generator=gen)
                toks = torch.arange(m, dtype=torch.int32)
                plan = (toks, torch.zeros(1, dtype=torch.int32), torch.tensor([0, m], dtype=torch.int32))

                def path(x=x, plan=plan):
                    out = torch.zeros(x.shape[0], d_out)
                    if fmt == "block":
                        return ref.multi_block_delta(x, out, *plan, pool.blk_ptr, pool.block_cols, pool.blocks)
                    return ref.multi_element_delta(x, out, *plan, pool.el_ptr, pool.cols, pool.values)

                def gather(x=x):
                    if fmt == "block":  # each block times its 16-wide slice of x, summed per block row
                        xg = x.t().reshape(d_in // 16, 16, x.shape[0]).index_select(0, cols_)
                        y = torch.zeros(d_out // 16, 16, x.shape[0]).index_add_(0, rows_, torch.bmm(delta.blocks, xg))
                        return y.view(d_out, -1).t()
                    prod = x.index_select(1, cols_) * delta.values
                    return torch.zeros(x.shape[0], d_out).index_add_(1, rows_, prod)

                def bsr(x=x):
                    start, end = int(pool.blk_ptr[0, 0]), int(pool.blk_ptr[0, -1])
                    with warnings.catch_warnings():  # torch's once-per-process "beta" notice
                        warnings.simplefilter("ignore", UserWarning)
                        mat = torch.sparse_bsr_tensor(pool.blk_ptr[0] - start, pool.block_cols[start:end],
                                                      pool.blocks[start:end], (d_out, d_in), check_invariants=False)
                    return (mat @ x.t()).t()

                calls = {"path": path, "gather": gather, "dense": lambda x=x: x @ delta.to_dense().t(),
                         "base": lambda x=x: x @ weight.t(), "lora": lambda x=x: (x @ lora_a.t()) @ lora_b.t()}
                if fmt == "block":
                    calls["bsr"] = bsr
                if fmt == "element" and m * delta.nnz > 50_000_000:
                    del calls["gather"]  # an [m, nnz] product: too much memory to time
                expect = calls["dense"]()
                for name in ("path", "gather", "bsr"):
                    if name in calls:
                        err = float((calls[name]() - expect).norm() / expect.norm())
                        if not err < 1e-4:
                            raise AssertionError(f"{name} ({fmt}, m={m}) disagrees with the dense product: {err:.3g}")
                times = {k: [] for k in calls}
                with torch.no_grad():
                    for _ in range(max(5, args.repeats)):
                        for k, fn in calls.items():
                            c = time.process_time()
                            fn()
                            times[k].append((time.process_time() - c) * 1e3)
                ms = {k: min(v) for k, v in times.items()}
                for k in calls:
                    rows.append(dict(meta, level="op-cpu", format=fmt, impl=k, hidden=hidden, d_out=d_out, d_in=d_in,
                                     tokens=m, keep_ratio=args.keep, peft_rank=rank, ms=ms[k],
                                     vs_base=ms[k] / ms["base"], load_avg=os.getloadavg()[0]))
            lib.uninstall()
    return rows


def print_cpu_ops(rows):
    impls = ("base", "path", "bsr", "gather", "dense", "lora")
    print("op level, one qkv_proj, CPU time ms (1 thread); path = the serving path's delta alone")
    print(f"{'hidden':>6s} {'format':>7s} {'tokens':>6s} " + " ".join(f"{k:>8s}" for k in impls))
    cases = {}
    for r in rows:
        if r["level"] == "op-cpu":
            cases.setdefault((r["hidden"], r["format"], r["tokens"]), {})[r["impl"]] = r["ms"]
    for (hidden, fmt, m), ms in cases.items():
        print(f"{hidden:6d} {fmt:>7s} {m:6d} " + " ".join(f"{ms[k]:8.3f}" if k in ms else f"{'-':>8s}" for k in impls))


def print_cpu_table(rows):
    print(f"CPU time (ms, 1 thread):\n{'hidden':>6s} {'format':>7s} {'experts':>7s} {'phase':>8s} {'base ms':>9s} {'ours ms':>9s} "
          f"{'peft ms':>9s} {'ours/base':>9s} {'ours/peft':>9s}")
    cases = {}
    for r in rows:
        if r["level"] == "model":
            cases.setdefault((r["hidden"], r["format"], r["n_adapters"], r["phase"]), {})[r["impl"]] = r["ms"]
    for (hidden, fmt, n, phase), ms in cases.items():
        print(f"{hidden:6d} {fmt:>7s} {n:7d} {phase:>8s} {ms['base']:9.1f} {ms['ours']:9.1f} {ms['peft']:9.1f} "
              f"{ms['ours'] / ms['base']:9.2f} {ms['ours'] / ms['peft']:9.2f}")
    for r in rows:
        if r["level"] == "register":
            peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f} MiB ({r['peak_vs_file']:.2f}x)"
            print(f"register {r['format']} {r['d_out']}x{r['d_in']} keep {r['keep_ratio']}: file "
                  f"{r['file_bytes'] / 2**20:.1f} MiB, peak {peak}")


def run_cpu(args):
    """The CPU table: forward and generate of ours vs PEFT mixed-batch LoRA vs the base alone."""
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    meta = run_metadata("multi_adapter", device="cpu", threads=args.threads, backend="reference",
                        transformers=_version("transformers"), peft=_version("peft"),
                        malloc_mmap_threshold=mmap_threshold())
    rows = []
    if not args.no_ops:
        rows += _recorded(args, False, cpu_ops(torch, args, meta))
        print_cpu_ops(rows)
    if not args.no_register:
        with tempfile.TemporaryDirectory() as tmp:
            for fmt in ("element", "block"):
                rows += _recorded(args, False, [register_peak(torch, args, meta, fmt, tmp)])
    for hidden in args.hidden if not args.no_model else ():
        for n in sorted(args.adapters):
            for fmt in args.formats:
                rows += _recorded(args, False, cpu_case(torch, args, meta, hidden, fmt, n))
                print_cpu_table([r for r in rows if r["level"] == "model"][-6:])
    print(f"\ndevice {meta['device']}, {args.threads} thread(s), load average now {os.getloadavg()[0]:.2f}; "
          f"process CPU time, min of {args.repeats} alternated repeats; every row of a batch a different expert")
    print_cpu_ops(rows)
    print_cpu_table(rows)
    if not args.no_record:
        print(f"appended {len(rows)} rows to {args.results}")
    return 0


def _version(module):
    import importlib.metadata

    return importlib.metadata.version(module)


# ------------------------------------------------------------------- smoke / compile


def run_smoke(args):
    """Every implementation once on a tiny Phi-3 (reference backend on CPU), agreement checked."""
    import torch
    import torch.nn.functional as F

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    args.batch, args.adapters, args.prompt, args.context = [4, 8], [1, 4], 8, 16
    args.popularity = ["uniform", "skewed"]
    args.formats = ["block", "element"]
    timer = Timer(torch, False, 0, 0)
    rows = run_op(torch, F, args, timer, {}, device, dtype, smoke=True, bandwidth=None)
    args.formats = ["block"]
    rows += run_model(torch, args, timer, {}, device, dtype, smoke=True, bandwidth=None)
    check_model_agreement(torch, args, device, dtype)
    print_table(rows)
    print(f"smoke: {len(rows)} timings on {device} (not performance numbers); nothing recorded")
    return 0


def check_model_agreement(torch, args, device, dtype):
    """Mixed batch of the library == each row through the PEFT-free single-adapter path (tiny model)."""
    from sparse_engine.serving import AdapterLibrary

    model = build_model(torch, args, device, dtype, smoke=True)
    layers = [n for n, m in model.named_modules() if n.endswith("qkv_proj")]
    gen = torch.Generator(device=device).manual_seed(1)
    lib = AdapterLibrary(model, dtype=dtype)
    for i in range(3):
        lib.register(f"a{i}", {layer: random_delta(torch, (192, 64), "block", 0.3, gen, device, dtype) for layer in layers})
    names = ["a0", None, "a2", "a1", "a0"]
    ids = torch.randint(3, 96, (5, 6), generator=gen, device=device)
    mixed = lib.forward(names, input_ids=ids).logits
    for r, n in enumerate(names):
        alone = lib.forward([n], input_ids=ids[r: r + 1]).logits[0]
        err = float((mixed[r] - alone).float().norm() / alone.float().norm())
        assert err < 1e-3, f"row {r}: mixed batch differs from the row alone ({err:.3g})"
    lib.uninstall()


def run_compile_check(args):
    """Compile every config of the multi-adapter kernels for sm_90 with the installed Triton."""
    os.environ.pop("TRITON_INTERPRET", None)
    from sparse_engine.kernels import runtime
    from sparse_engine.kernels import multi_adapter as ma

    if runtime.INTERPRET:
        print("compile-check: kernels were defined in interpreter mode; unset TRITON_INTERPRET")
        return 1
    jobs = []
    kern, configs = ma.jit_kernels(), ma.autotune_configs()
    for bm in (16, 32, 64, 128):
        for cfg in configs["block"]:
            jobs.append((f"block BM{bm} KG{cfg.kwargs['KG']} R{cfg.kwargs['ROWS']}", kern["block"],
                         {"x_ptr": "*bf16", "out_ptr": "*bf16", "tok_ptr": "*i32", "tile_ptr": "*i32",
                          "row_ptr_ptr": "*i32", "cols_ptr": "*i32", "blk_ptr": "*bf16"},
                         dict(B=16, BLOCK_M=bm, IEEE=False, UPCAST=False, stride_xk=1, stride_on=1, stride_bc=1), cfg))
        for cfg in configs["element"]:
            if not ma.element_config_fits(bm, cfg):  # pruned at run time as well
                continue
            jobs.append((f"element BM{bm} BN{cfg.kwargs['BLOCK_N']}", kern["element"],
                         {"x_ptr": "*bf16", "out_ptr": "*bf16", "tok_ptr": "*i32", "tile_ptr": "*i32",
                          "row_ptr_ptr": "*i32", "cols_ptr": "*i16", "val_ptr": "*bf16"},
                         dict(BLOCK_M=bm, UPCAST=False, stride_xk=1, stride_on=1), cfg))
    return sm90_compile_check(jobs)


# --------------------------------------------------------------------------- main


def run_bench(args):
    import torch
    import torch.nn.functional as F

    dtype = torch.bfloat16
    timer = Timer(torch, True, args.warmup, args.rep)
    bandwidth = copy_bandwidth(torch, timer)
    meta = run_metadata("multi_adapter", copy_bandwidth_GBps=bandwidth / 1e9)
    print(f"device {meta['device']}: measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows = []
    if "op" in args.levels:
        rows += run_op(torch, F, args, timer, meta, "cuda", dtype, smoke=False, bandwidth=bandwidth)
    if "model" in args.levels:
        rows += run_model(torch, args, timer, meta, "cuda", dtype, smoke=False, bandwidth=bandwidth)
    print_table(rows)
    print_goals(rows)
    if not args.no_record:
        print(f"appended {len(rows)} rows to {args.results}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    for name in ("batch", "adapters"):
        if any(v < 1 for v in getattr(args, name)):
            print(f"error: --{name} values must be >= 1", file=sys.stderr)
            return 2
    if not 0 < args.keep <= 1:
        print("error: --keep must be in (0, 1]", file=sys.stderr)
        return 2
    if args.compile_check:
        return run_compile_check(args)
    if args.smoke:
        return run_smoke(args)
    if args.cpu:
        if args.no_register:
            return run_cpu(args)
        if args.no_ops and args.no_model:
            reexec_with_fixed_mmap_threshold(__file__)  # before torch: CPU peak RSS needs it
            return run_cpu(args)
        # peak RSS needs a fixed mmap threshold, which would distort the timings: register rows in a child
        rc = run_with_fixed_mmap_threshold(__file__, [*(sys.argv[1:] if argv is None else argv), "--no-ops",
                                                      "--no-model"])
        if rc:
            return rc
        args.no_register = True
        return run_cpu(args)
    import torch

    if not torch.cuda.is_available():
        print("bench_multi_adapter: no CUDA device; refusing to record CPU timings (they are not kernel performance "
              "figures). Run on a GPU, or use --smoke for a tiny correctness run that writes nothing.")
        return 0
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
