"""One training step per method at Phi-3-mini shape: time and memory held, against LoRA.

Full fine-tuning of the targets, PEFT LoRA (matched rank), PEFT SHiRA (same count), element /
block sparse adapters in the search phase (dense until the first mask update, compact after it) and
the fixed phase, and one mask update, per ``qkv_proj``
layer and on a Phi-3-mini-shaped model (``--layers``: 32 on a GPU, 2 on the CPU), methods
alternated in one process. Rows go to ``benchmarks/results/training.jsonl``; ``--smoke`` runs
every method once at tiny shapes and records nothing. docs/benchmarks.md has the details.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "training.jsonl")

STEPS = ("full", "lora", "shira", "element-search", "element-search-compact", "element-fixed", "block-search",
         "block-search-compact", "block-fixed")
OPERATIONS = ("element-update", "block-update", "element-select")
METHODS = STEPS + OPERATIONS
PHI3_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, pad_token_id=32000)
SMOKE_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example (2-core CPU): python benchmarks/bench_training.py")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers of the model (default 32 on CUDA, 2 on CPU)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--tokens", type=int, default=None, help="tokens of the per-layer step (default batch × seq)")
    p.add_argument("--keep-ratio", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps per method, model scope (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--layer-repeats", type=int, default=None,
                   help="timed steps per method, layer scope (default 20 on CUDA, 9 on CPU)")
    p.add_argument("--scopes", nargs="+", default=["layer", "model"], choices=["layer", "model"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--backend", choices=["auto", "triton", "reference"], default="auto",
                   help="sparse adapters' kernels (auto: Triton on CUDA, the PyTorch reference on the CPU)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (every method)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="print the table but append nothing")
    p.add_argument("--out", default=RESULTS, help="JSON-lines file to append to")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, every method once with checks; records nothing")
    p.add_argument("--peaks-to", default=None, help=argparse.SUPPRESS)  # the CPU peak-memory child: JSON out
    args = p.parse_args(argv)
    for name in ("layers", "batch", "seq", "tokens", "repeats", "layer_repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 < args.keep_ratio <= 1:
        p.error(f"--keep-ratio must be in (0, 1], got {args.keep_ratio}")
    return args


# ------------------------------------------------------------------------------ models


@contextlib.contextmanager
def _default_dtype(torch, dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype: no fp32 copy of the model first
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _share_weights(torch, base):
    """A new model of ``base``'s class whose parameters and buffers are ``base``'s tensors
    (new Parameter objects on the same storage, so each model sets its own requires_grad)."""
    with torch.device("meta"):
        model = type(base)(copy.deepcopy(base.config))  # its own config: PEFT writes into it
    model.load_state_dict(base.state_dict(), assign=True)
    for name, buf in base.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in the state dict
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, buf)
    model.requires_grad_(False)
    return model


def _qkv_layer(torch, weight):
    """One linear named ``qkv_proj`` (every method finds it by that name) on the shared weight."""
    import torch.nn as nn

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            self.qkv_proj.weight = nn.Parameter(weight, requires_grad=False)

        def forward(self, x):
            return self.qkv_proj(x)

    return QKV()


class Scope:
    """The frozen base of one scope, its batch, and a fresh shared-weight module per method."""

    def __init__(self, torch, name, args, device, dtype):
        self.torch, self.name, self.device, self.dtype = torch, name, device, dtype
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        shape = SMOKE_SHAPE if args.smoke else PHI3_MINI
        if name == "model":
            from transformers import Phi3Config, Phi3ForCausalLM

            self.config = Phi3Config(num_hidden_layers=args.layers, **shape)
            torch.manual_seed(args.seed)
            with _default_dtype(torch, dtype), torch.device(device):
                self.base = Phi3ForCausalLM(self.config)
            self.base.requires_grad_(False)
            ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=g).to(device)
            self.batch = dict(input_ids=ids, labels=ids)
            self.tokens = args.batch * args.seq
        else:
            hidden = shape["hidden_size"]
            self.weight = (torch.randn(3 * hidden, hidden, generator=g) * 0.02).to(device=device, dtype=dtype)
            self.tokens = args.tokens or args.batch * args.seq
            self.x = torch.randn(self.tokens, hidden, generator=g).to(device=device, dtype=dtype)
            self.dy = (torch.randn(self.tokens, 3 * hidden, generator=g) / self.tokens).to(device)

    def fresh(self):
        if self.name == "model":
            return _share_weights(self.torch, self.base)
        return _qkv_layer(self.torch, self.weight)

    def loss_fn(self, module):
        if self.name == "model":
            return lambda: module(**self.batch).loss
        return lambda: (module(self.x).float() * self.dy).sum()  # a fixed upstream gradient dy

    def frozen_bytes(self):
        if self.name == "model":
            return sum(_nbytes(t) for t in self.base.state_dict().values())
        return _nbytes(self.weight)


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------- methods


class Method:
    """One method's module, optimizer and step, set up with one untimed step (which allocates
    the optimizer state and moves Ŵ off zero, so that MCS scores are not all tied)."""

    def __init__(self, torch, scope: Scope, name: str, args, config, lora_rank: int):
        from sparse_engine import attach
        from sparse_engine.baselines import attach_lora
        from sparse_engine.masking import freeze_masks, update_masks
        from sparse_engine.model import adapter_layers
        from sparse_engine.training import TrainingConfig, build_optimizer

        self.torch, self.scope, self.name, self.config = torch, scope, name, config
        module = scope.fresh()
        if name == "full":
            for lin in _targets(module):
                lin.weight = torch.nn.Parameter(lin.weight.detach().clone())  # trained: not the shared copy
        elif name == "lora":
            if scope.name == "model":
                module = attach_lora(module, lora_rank, ["qkv_proj"])
            else:  # a bare module: PEFT's plain PeftModel (attach_lora asks for a causal LM)
                from peft import LoraConfig, get_peft_model

                module = get_peft_model(module, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                                           target_modules=["qkv_proj"], lora_dropout=0.0))
        elif name == "shira":
            from peft import ShiraConfig, get_peft_model

            shira = ShiraConfig(r=lora_rank, target_modules=["qkv_proj"])
            shira.mask_fn = _random_mask_on_device(torch, args.seed)
            module = get_peft_model(module, shira)
        else:
            attach(module, config)
        self.module = module
        self.loss_fn = scope.loss_fn(module)
        self.optimizer = build_optimizer(module, TrainingConfig(learning_rate=args.lr, weight_decay=0.0,
                                                                progress=False))
        self.layers = adapter_layers(module)
        self.loss = self.run()
        if name.endswith(("-fixed", "-compact")):  # the optimizer state moves along: the next step is warm too
            update_masks(module, self.layers, self.loss_fn, config, self.optimizer)
        if name.endswith("-fixed"):
            freeze_masks(self.layers, self.optimizer)
        elif name.endswith("-compact"):  # the search phase after its first mask update
            self.loss = self.run()

    def run(self) -> float:
        """One optimizer step; returns the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def trainable(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def held_bytes(self) -> int:
        """Trainable parameters, their gradients, optimizer state, adapter masks / indices."""
        seen, total = set(), 0

        def add(t):
            nonlocal total
            if self.torch.is_tensor(t) and t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += _nbytes(t)

        for p in self.module.parameters():
            if p.requires_grad:
                add(p)
                add(p.grad)
        for state in self.optimizer.state.values():
            for value in state.values():
                add(value)
        for layer in self.layers.values():
            for buffer in layer.buffers(recurse=False):  # mask, indices, the dense Ŵ of compact search
                add(buffer)
        for m in self.module.modules():  # PEFT SHiRA keeps its indices in a plain dict, not a buffer
            indices = getattr(m, "shira_indices", None)
            if isinstance(indices, dict):
                for t in indices.values():
                    add(t)
        return total


class Operation:
    """A mask update (``update_masks``) or a selection alone (``select`` on scores taken once by
    ``compute_scores``) on a search-phase method's adapters; the update changes that method's
    masks, as Algorithm 1 does between its steps."""

    def __init__(self, name: str, search: Method):
        from sparse_engine.masking import compute_scores

        self.name, self.search = name, search
        self.scores = None
        self.loss = search.loss
        if name.endswith("-select"):
            self.scores = compute_scores(search.module, search.layers, search.loss_fn, search.config)

    def run(self):
        from sparse_engine.masking import select, update_masks

        s = self.search
        if self.scores is not None:
            return select(self.scores, s.layers, s.config)
        return update_masks(s.module, s.layers, s.loss_fn, s.config, s.optimizer)


def _random_mask_on_device(torch, seed: int):
    """SHiRA's random mask as PEFT's ``random_mask`` makes it (r·(d_in + d_out) entries drawn
    uniformly without replacement), drawn on the weight's device: PEFT's draws a CPU randperm
    per weight, seconds per Phi-3 layer, a minute of a GPU session's set-up at 32 layers."""
    calls = [0]

    def mask_fn(base_layer, r, **kwargs):
        w = base_layer.weight
        g = torch.Generator(device=w.device).manual_seed(seed + calls[0])  # another mask per layer
        calls[0] += 1
        count = r * (w.shape[0] + w.shape[1])
        mask = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
        mask[torch.randperm(w.numel(), generator=g, device=w.device)[:count]] = 1
        return mask.view(w.shape)

    return mask_fn


def _targets(module):
    from sparse_engine.model import find_target_linears

    return list(find_target_linears(module, ["qkv_proj"]).values())


# ------------------------------------------------------------------------------- runs


def run_scope(torch, scope_name, args, device, dtype, meta, common, peaks_from=None):
    """Rows of one scope; ``peaks_from``: {method: peak bytes} measured elsewhere (the CPU child)."""
    from sparse_engine import SparseAdapterConfig
    from sparse_engine.baselines import matched_lora_rank

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    scope = Scope(torch, scope_name, args, device, dtype)
    sparse_cfgs = {kind: SparseAdapterConfig(keep_ratio=args.keep_ratio, block_size=bs, backend=args.backend)
                   for kind, bs in (("element", None), ("block", 16))}
    lora_rank = matched_lora_rank(scope.fresh(), sparse_cfgs["element"])

    def config_of(name):
        return sparse_cfgs["block" if name.startswith("block") else "element"]

    t0 = time.perf_counter()
    methods = {}
    for name in args.methods:  # the steps first: an operation works on a search-phase method
        if name in STEPS:
            methods[name] = Method(torch, scope, name, args, config_of(name), lora_rank)
    for name in args.methods:
        if name in OPERATIONS:  # updates after the first one: on compact search storage
            search = _operand(name)
            if search not in methods:
                methods[search] = Method(torch, scope, search, args, config_of(name), lora_rank)
            methods[name] = Operation(name, methods[search])
    repeats = args.repeats if scope_name == "model" else args.layer_repeats
    print(f"{scope_name}: {len(methods)} methods set up in {time.perf_counter() - t0:.1f} s "
          f"({scope.tokens} tokens, LoRA / SHiRA rank {lora_rank}); {repeats} timed repetitions", flush=True)
    load_avg = _load_avg()
    times = {n: [] for n in methods}
    peaks = {n: [] for n in methods}
    for _ in range(repeats):
        for name, method in methods.items():  # alternated: drifts in load hit every method alike
            with common.PeakMemory(device) as mem:
                sync()
                start = time.perf_counter()
                method.run()
                sync()
                times[name].append(time.perf_counter() - start)
            peaks[name].append(mem.peak)
    rows = []
    for name, method in methods.items():
        is_step = name in STEPS
        held = method.held_bytes() if is_step else None
        if peaks_from is not None:
            peak = peaks_from.get(name)
        else:
            peak = None if any(p is None for p in peaks[name]) else max(peaks[name])
        rows.append(dict(
            meta, scope=scope_name, method=name, kind="step" if is_step else name.split("-")[1],
            layers=args.layers if scope_name == "model" else 1, tokens=scope.tokens,
            batch=args.batch if scope_name == "model" else None, seq=args.seq if scope_name == "model" else None,
            keep_ratio=args.keep_ratio, lora_rank=lora_rank,
            trainable_params=method.trainable() if is_step else None,
            held_bytes=held, held_mib=None if held is None else round(held / 2**20, 1),
            frozen_bytes=scope.frozen_bytes(), step_peak_bytes=peak,
            step_peak_mib=None if peak is None else round(peak / 2**20, 1),
            ms_min=round(1e3 * min(times[name]), 2), ms_median=round(1e3 * statistics.median(times[name]), 2),
            ms_all=[round(1e3 * t, 2) for t in times[name]], repeats=repeats, loss=method.loss,
            load_avg=load_avg))
    by_method = {r["method"]: r for r in rows}
    lora = by_method.get("lora")
    for row in rows:
        if lora is not None:
            row["ms_vs_lora"] = round(row["ms_min"] / lora["ms_min"], 3)
            if row["held_bytes"] is not None:
                row["held_vs_lora"] = round(row["held_bytes"] / lora["held_bytes"], 3)
        if row["kind"] != "step":  # an operation against one step of the method it works on
            search = by_method[_operand(row["method"])]
            row["ms_vs_search_step"] = round(row["ms_min"] / search["ms_min"], 3)
    del methods, scope
    return rows


def _operand(operation: str) -> str:
    """The search-phase method a mask update or selection works on."""
    return operation.split("-")[0] + "-search-compact"


def _load_avg():
    """1-minute load average at the start of the timed part (other processes share the CPU)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _print_rows(rows):
    print(f"{'scope':5s} {'method':22s} {'ms min':>9s} {'ms med':>9s} {'x LoRA':>7s} {'held MiB':>9s} "
          f"{'x LoRA':>7s} {'peak MiB':>9s} {'trainable':>11s}")
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"

        print(f"{r['scope']:5s} {r['method']:22s} {r['ms_min']:9.1f} {r['ms_median']:9.1f} "
              f"{f(r.get('ms_vs_lora'), '7.2f'):>7s} {f(r['held_mib'], '9.1f'):>9s} "
              f"{f(r.get('held_vs_lora'), '7.2f'):>7s} {f(r['step_peak_mib'], '9.1f'):>9s} "
              f"{f(r['trainable_params'], '11d'):>11s}", flush=True)


def _check_smoke(rows) -> list[str]:
    """What a smoke run must show: every method ran, losses finite, the fixed phase holds
    less than the search phase, LoRA and SHiRA train the same count."""
    import math

    by = {(r["scope"], r["method"]): r for r in rows}
    problems = []
    for (scope, method), r in by.items():
        if not math.isfinite(r["loss"]):
            problems.append(f"{scope}/{method}: loss {r['loss']}")
    for scope in {r["scope"] for r in rows}:
        for kind in ("element", "block"):
            s, f = by.get((scope, f"{kind}-search")), by.get((scope, f"{kind}-fixed"))
            if s and f and not f["held_bytes"] < s["held_bytes"]:
                problems.append(f"{scope}/{kind}: fixed holds {f['held_bytes']} B, search {s['held_bytes']} B")
            c, full = by.get((scope, f"{kind}-search-compact")), by.get((scope, "full"))
            if scope == "layer" and c and full and not c["held_bytes"] <= 0.4 * full["held_bytes"]:
                problems.append(f"{scope}/{kind}: the search phase after its first update holds "
                                f"{c['held_bytes'] / full['held_bytes']:.2f}× full fine-tuning, not <= 0.4×")
        lora, shira = by.get((scope, "lora")), by.get((scope, "shira"))
        if lora and shira and lora["trainable_params"] != shira["trainable_params"]:
            problems.append(f"{scope}: LoRA trains {lora['trainable_params']}, SHiRA {shira['trainable_params']}")
    return problems


PEAK_CHILD_STEPS = 2  # the first step allocates AdamW's moments; the second is a steady one


def _peaks_in_child(argv):
    """CPU: {scope: {method: peak bytes}} from a child process with glibc's mmap threshold fixed
    (peak RSS needs it, and it would slow every step of the timed run); None if it failed."""
    import json
    import tempfile

    import common

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peaks.json")
        rc = common.run_with_fixed_mmap_threshold(__file__, [*argv, "--peaks-to", out, "--no-record"])
        if rc or not os.path.exists(out):
            print(f"the peak-memory child failed (exit status {rc}); peaks not recorded", file=sys.stderr)
            return None
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def main(argv=None) -> int:
    args = _parse(argv)
    import common

    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    peaks = None
    if not cuda and not args.smoke and args.peaks_to is None and common.mmap_threshold() is None:
        peaks = _peaks_in_child(sys.argv[1:] if argv is None else list(argv))
    if args.smoke:
        args.layers, args.batch, args.seq, args.tokens, args.repeats, args.layer_repeats = 2, 2, 16, 32, 1, 1
    args.layers = args.layers or (32 if cuda else 2)
    args.repeats = args.repeats or (5 if cuda else 3)
    args.layer_repeats = args.layer_repeats or (20 if cuda else 9)
    if args.peaks_to:
        args.repeats = args.layer_repeats = PEAK_CHILD_STEPS
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    import peft
    import transformers

    if "shira" in args.methods and not hasattr(peft, "ShiraConfig"):  # an older PEFT (the GPU image's?)
        print(f"PEFT {peft.__version__} has no ShiraConfig: shira left out")
        args.methods = [m for m in args.methods if m != "shira"]

    peak_source = "CUDA allocator" if cuda else (
        f"peak RSS in a child process ({common.MMAP_THRESHOLD_ENV}={common.FIXED_MMAP_THRESHOLD}, "
        f"max of {PEAK_CHILD_STEPS} steps); times in glibc's default allocator" if peaks is not None
        else f"peak RSS, this process ({common.MMAP_THRESHOLD_ENV}={common.mmap_threshold()})")
    meta = common.run_metadata("training", device, transformers=transformers.__version__, peft=peft.__version__,
                               dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads(),
                               optimizer="AdamW", lr=args.lr, backend=args.backend,
                               shira_mask="uniform random, r*(d_in+d_out) entries, drawn on the weight's device",
                               malloc_mmap_threshold=common.mmap_threshold(), peak_source=peak_source)
    if args.peaks_to:
        print(f"peak memory, {PEAK_CHILD_STEPS} steps per method, {peak_source}", flush=True)
    else:
        print(f"training step benchmark on {meta['device']}, {meta['dtype']}, commit {meta['commit'][:10]}"
              f"{' (dirty)' if meta['dirty'] else ''}", flush=True)
    all_rows = []
    measured = {}
    for scope_name in args.scopes:
        scope_peaks = None if peaks is None else peaks.get(scope_name, {})
        rows = run_scope(torch, scope_name, args, device, dtype, meta, common, peaks_from=scope_peaks)
        measured[scope_name] = {r["method"]: r["step_peak_bytes"] for r in rows}
        if args.peaks_to:
            continue
        _print_rows(rows)
        all_rows += rows
        if not args.smoke and not args.no_record:  # scope by scope: a time-limited run keeps what it measured
            common.append_rows(args.out, rows)
    if args.peaks_to:
        import json

        with open(args.peaks_to, "w", encoding="utf-8") as f:
            json.dump(measured, f)
        return 0
    if args.smoke:
        problems = _check_smoke(all_rows)
        for problem in problems:
            print(f"smoke: {problem}")
        print(f"smoke: {'FAILED' if problems else 'ok'}; nothing recorded (smoke times are not measurements)")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
