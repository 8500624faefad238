"""Peak memory of loading an adapter into a Phi-3-mini-shaped model, against PEFT LoRA.

Each load runs in a fresh process whose peak resident memory is reset just before it
(``/proc/self/clear_refs``), so the row is what loading alone adds: ``load_adapter`` of an
element and a block adapter, ``AdapterLibrary.register`` of the same files, and PEFT's
``PeftModel.from_pretrained`` of a LoRA adapter at the matched rank. Host memory (RSS), on the
CPU. Rows go to ``benchmarks/results/loading.jsonl``; docs/benchmarks.md has the details.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "loading.jsonl")
PHI3_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, pad_token_id=32000)
SMOKE_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CASES = ("element-load", "block-load", "element-register", "block-register", "lora-from-pretrained")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the Phi-3-mini-shaped model")
    p.add_argument("--keep-ratio", type=float, default=0.1)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="print the table but append nothing")
    p.add_argument("--out", default=RESULTS, help="JSON-lines file to append to")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, every case once; records nothing")
    return p.parse_args(argv)


def build_model(shape: dict, layers: int, seed: int):
    """The same random Phi-3 in every process (same seed): adapter files fit its fingerprint."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    return Phi3ForCausalLM(Phi3Config(num_hidden_layers=layers, **shape)).eval()


def write_adapters(directory: str, shape: dict, args) -> dict[str, str]:
    """An element and a block adapter with random kept units and values, and a PEFT LoRA
    adapter at the matched rank with random weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    from sparse_engine import SparseAdapterConfig, attach, save_adapter
    from sparse_engine.baselines import matched_lora_rank
    from sparse_engine.model import adapter_layers

    paths = {}
    for kind, block_size in (("element", None), ("block", 16)):
        model = build_model(shape, args.layers, args.seed)
        config = SparseAdapterConfig(keep_ratio=args.keep_ratio, block_size=block_size)
        attach(model, config)
        g = torch.Generator().manual_seed(args.seed + 1)
        for layer in adapter_layers(model).values():
            rows, cols = layer.shape
            units = rows * cols if block_size is None else (rows // 16) * (cols // 16)
            kept = torch.randperm(units, generator=g)[: config.kept_count(rows, cols)]
            layer.keep_units(torch.sort(kept).values.to(torch.int32))
            layer.delta.data.normal_(generator=g)
            layer.freeze()
        paths[kind] = str(save_adapter(model, os.path.join(directory, f"{kind}.safetensors")))
        if kind == "element":
            rank = matched_lora_rank(build_model(shape, args.layers, args.seed), config)
        del model
    model = build_model(shape, args.layers, args.seed)
    lora = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["qkv_proj"],
                                            lora_dropout=0.0))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.01)
    lora.save_pretrained(os.path.join(directory, "lora"))
    paths["lora"] = os.path.join(directory, "lora")
    paths["lora_rank"] = rank
    return paths


def _file_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    return os.path.getsize(path)


# --------------------------------------------------------------------- the child process

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(case: str, path: str, shape: dict, layers: int, seed: int) -> dict:
    """Load once in this fresh process; the peak RSS it added, and the time."""
    import peft  # noqa: F401 - imports are not what is measured
    import torch  # noqa: F401

    from sparse_engine import load_adapter
    from sparse_engine.serving import AdapterLibrary

    model = build_model(shape, layers, seed)
    if case.endswith("-register"):
        library = AdapterLibrary(model)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak restarts from the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    if case.endswith("-load"):
        load_adapter(model, path)
    elif case.endswith("-register"):
        library.register("a", path)
    else:
        from peft import PeftModel

        PeftModel.from_pretrained(model, path)
    seconds = time.perf_counter() - start
    return {"added_peak_bytes": _status("VmHWM") - before, "added_rss_bytes": _status("VmRSS") - before,
            "seconds": round(seconds, 3)}


# ------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = _parse(argv)
    if not os.path.exists("/proc/self/clear_refs"):
        print("error: this benchmark needs Linux's /proc/self/clear_refs (peak RSS reset)", file=sys.stderr)
        return 2
    import common

    shape = SMOKE_SHAPE if args.smoke else PHI3_MINI
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = write_adapters(tmp, shape, args)
        print(f"adapters written in {time.perf_counter() - t0:.1f} s (LoRA rank {paths['lora_rank']})", flush=True)
        meta = common.run_metadata("loading", device="cpu")
        for case in args.cases:
            kind = case.split("-")[0]
            path = paths[kind]
            spec = json.dumps({"case": case, "path": path, "shape": shape, "layers": args.layers, "seed": args.seed})
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec], capture_output=True,
                                  text=True, timeout=1800)
            if done.returncode != 0:
                print(f"error: {case} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            got = json.loads(done.stdout.strip().splitlines()[-1])
            size = _file_bytes(path)
            rows.append(dict(meta, case=case, layers=args.layers, keep_ratio=args.keep_ratio,
                             lora_rank=paths["lora_rank"], file_bytes=size, **got,
                             peak_vs_file=round(got["added_peak_bytes"] / size, 3)))
    lora = next((r for r in rows if r["case"] == "lora-from-pretrained"), None)
    print(f"{'case':22s} {'file MiB':>9s} {'peak MiB':>9s} {'x file':>7s} {'x LoRA':>7s} {'s':>7s}")
    for r in rows:
        vs_lora = "-" if lora is None else f"{r['added_peak_bytes'] / max(1, lora['added_peak_bytes']):7.2f}"
        print(f"{r['case']:22s} {r['file_bytes'] / 2**20:9.1f} {r['added_peak_bytes'] / 2**20:9.1f} "
              f"{r['peak_vs_file']:7.2f} {vs_lora:>7s} {r['seconds']:7.2f}")
    if args.smoke or args.no_record:
        print("nothing recorded" + (" (smoke)" if args.smoke else ""))
        return 0
    common.append_rows(args.out, rows)
    print(f"{len(rows)} rows appended to {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        print(json.dumps(child(spec["case"], spec["path"], spec["shape"], spec["layers"], spec["seed"])))
        sys.exit(0)
    sys.exit(main())
