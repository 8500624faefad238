"""The ``sparse-engine`` command."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _add_training_args(p: argparse.ArgumentParser, epochs: int, batch_size: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs, help="training epochs (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=batch_size, help="examples per micro-batch (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: per method, tuned on the built-in suite: sparse/block/LoRA 1e-2, full 1e-3)")
    g.add_argument("--warmup-ratio", type=float, default=0.06, help="linear warmup fraction (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--seed", type=int, default=0, help="seed of data order and task generation (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_adapter_args(p: argparse.ArgumentParser, update_interval: int) -> None:
    g = p.add_argument_group("sparse adapter")
    g.add_argument("--keep-ratio", type=float, default=0.1, help="trainable fraction of each target weight (default: %(default)s)")
    g.add_argument("--score", default="mcs", choices=["mcs", "snip", "gm", "wm", "gd"], help="mask score (default: %(default)s)")
    g.add_argument("--update-interval", type=int, default=update_interval,
                   help="optimizer steps between mask updates in the mask epochs (default: %(default)s)")
    g.add_argument("--mask-epochs", type=int, default=1, help="epochs with mask updates (default: %(default)s)")
    g.add_argument("--layer-drop", action="store_true", help="one global threshold over all layers (Eq. 5-6)")
    g.add_argument("--target-modules", nargs="+", default=None,
                   help="nn.Linear names to adapt (default: qkv_proj; Llama-style: q_proj k_proj v_proj)")
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"], help="kernel backend (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-engine",
        description="Sparse adapters for LLMs (Arnob et al., 2025): train experts with Algorithm 1, save and evaluate them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="the whole single-task comparison on the built-in tiny Phi-3 (CPU, minutes)",
                          description="Pretrain (or load from cache) the built-in tiny Phi-3, train element-sparse, "
                                      "block-sparse, LoRA and full fine-tune experts on a few built-in tasks, and print "
                                      "a Rouge-L table. Writes results.json, results.md and adapter files to --out.")
    demo.add_argument("--tasks", nargs="+", default=None, help="built-in held-in tasks (default: 4 of them)")
    demo.add_argument("--n-train", type=int, default=800, help="training examples per task (default: %(default)s)")
    demo.add_argument("--n-test", type=int, default=100, help="test examples per task (default: %(default)s)")
    demo.add_argument("--methods", nargs="+", default=None, choices=["sparse", "block", "lora", "full"],
                      help="methods to train (default: all four)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    demo.add_argument("--cache-dir", default=None, help="base model cache (default: $SPARSE_ENGINE_CACHE or ~/.cache/sparse-engine)")
    demo.add_argument("--epochs", type=int, default=5, help="epochs per expert, as in the paper (default: %(default)s)")
    demo.add_argument("--update-interval", type=int, default=20,
                      help="mask update interval in steps (default: %(default)s, the paper's 100 scaled to the demo's epoch)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    train = sub.add_parser("train", help="train one expert per task (built-in suite, FLAN-format files, or a local Phi-3)",
                           description="Train one expert per task and save it. Data: built-in task names, or --data with "
                                       "FLAN-format files (columns source, target, task_name, optional split) or a hub "
                                       "dataset name. Model: the built-in tiny Phi-3, or --model with a local checkpoint.")
    train.add_argument("--tasks", nargs="+", required=True, help="task names (built-in, or task_name values in --data)")
    train.add_argument("--data", nargs="+", default=None, help="FLAN-format .json/.jsonl/.parquet files or a dataset name")
    train.add_argument("--model", default=None, help="local Hugging Face checkpoint (default: the built-in tiny Phi-3)")
    train.add_argument("--method", default="sparse", choices=["sparse", "block", "lora", "full"],
                       help="sparse (element), block (16x16), lora (matched rank) or full fine-tuning (default: %(default)s)")
    train.add_argument("--out", default="runs/train", help="output directory (default: %(default)s)")
    train.add_argument("--n-train", type=int, default=1000, help="built-in tasks: training examples (default: %(default)s)")
    train.add_argument("--n-test", type=int, default=100, help="built-in tasks: test examples (default: %(default)s)")
    train.add_argument("--max-examples-per-task", type=int, default=None, help="--data: sub-sample each task")
    train.add_argument("--max-length", type=int, default=None, help="tokens per example (default: 48 built-in, 1024 otherwise)")
    train.add_argument("--max-new-tokens", type=int, default=None, help="generation length for --eval (default: 16 / 128)")
    train.add_argument("--eval", action="store_true", help="evaluate base and expert on each task's test split (Rouge-L)")
    train.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    train.add_argument("--resume", action="store_true", help="resume each expert from its checkpoint in --out")
    train.add_argument("--cache-dir", default=None, help="built-in base model cache")
    _add_training_args(train, epochs=5, batch_size=16)
    _add_adapter_args(train, update_interval=100)

    tasks = sub.add_parser("tasks", help="list the built-in tasks", description="List the built-in tasks by group.")
    tasks.add_argument("--group", choices=["held_in", "held_out", "pretrain"], default=None)
    return parser


def _cmd_demo(args) -> int:
    from sparse_engine.experts import DEMO_TASKS, METHODS, run_demo

    results = run_demo(tasks=tuple(args.tasks or DEMO_TASKS), n_train=args.n_train, n_test=args.n_test,
                       epochs=args.epochs, update_interval=args.update_interval,
                       methods=tuple(args.methods or METHODS), out_dir=args.out, cache_dir=args.cache_dir,
                       seed=args.seed, progress=not args.no_progress)
    print()
    print(f"Single-task Rouge-L on the built-in suite ({len(results['tasks'])} tasks, {results['settings']['n_test']} "
          f"test examples each), {results['seconds']} s:")
    print(results["table"])
    print(f"\nresults: {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'}")
    return 0


def _load_model(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from sparse_engine.builtin import load_builtin_base

        return load_builtin_base(cache_dir=args.cache_dir, progress=not args.no_progress)
    path = Path(args.model)
    if not path.exists():
        raise SystemExit(f"error: --model {args.model}: no such directory (models are loaded from local paths only)")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if torch.cuda.is_available():
        model = model.cuda()
    return model, tokenizer


def _cmd_train(args) -> int:
    from sparse_engine import data, evaluation
    from sparse_engine.config import DEFAULT_TARGET_MODULES, SparseAdapterConfig
    from sparse_engine.experts import DEFAULT_LEARNING_RATES, ExpertSpec, run_experts
    from sparse_engine.training import TrainingConfig

    # Validate everything cheap before loading a model or data.
    adapter = SparseAdapterConfig(
        keep_ratio=args.keep_ratio, score=args.score, update_interval=args.update_interval,
        mask_epochs=args.mask_epochs, layer_drop=args.layer_drop, seed=args.seed, backend=args.backend,
        target_modules=tuple(args.target_modules or DEFAULT_TARGET_MODULES),
    )
    out = Path(args.out)
    training = TrainingConfig(
        epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        learning_rate=args.lr or DEFAULT_LEARNING_RATES[args.method], warmup_ratio=args.warmup_ratio,
        max_steps=args.max_steps, seed=args.seed, progress=not args.no_progress,
        checkpoint_dir=str(out / "checkpoints") if (args.checkpoint_every or args.resume) else None,
        checkpoint_every=args.checkpoint_every,
    )
    builtin = args.data is None
    if builtin:
        known = set(data.list_builtin_tasks())
        unknown = [t for t in args.tasks if t not in known]
        if unknown:
            raise ValueError(f"unknown built-in task(s) {unknown}; see `sparse-engine tasks` (or pass --data)")
        tasks = {t: data.builtin_task_data(t, n_train=args.n_train, n_validation=0, n_test=args.n_test, seed=args.seed)
                 for t in args.tasks}
    else:
        tasks = data.load_flan(args.data if len(args.data) > 1 else args.data[0], tasks=args.tasks,
                               max_examples_per_task=args.max_examples_per_task, seed=args.seed)
    max_length = args.max_length or (48 if builtin and args.model is None else 1024)
    max_new = args.max_new_tokens or (16 if builtin else 128)
    model, tokenizer = _load_model(args)
    spec = ExpertSpec(method=args.method, adapter=adapter, training=training, max_length=max_length)
    start = time.perf_counter()
    results = run_experts(model, tokenizer, tasks, [args.method], spec=spec,
                          learning_rates={args.method: training.learning_rate}, out_dir=out / "adapters",
                          evaluate=args.eval, max_new_tokens=max_new, progress=not args.no_progress)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["settings"] = {"adapter": adapter.to_dict(), "training": vars(args) | {"func": None}}
    out.mkdir(parents=True, exist_ok=True)
    evaluation.write_results_json(out / "results.json", results)
    rows = []
    for info in results["experts"]:
        row = {"task": info["task"], "method": info["method"], "trainable params": info["trainable_params"],
               "steps": info["steps"], "final loss": info["final_loss"]}
        if args.eval:
            row["base Rouge-L"] = round(results["scores"]["base"][info["task"]], 2)
            row["expert Rouge-L"] = round(info["rouge_l"], 2)
        if "adapter_file" in info:
            row["adapter"] = info["adapter_file"]
        rows.append(row)
    table = evaluation.markdown_table(rows, list(rows[0].keys()))
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\nresults: {out / 'results.json'}")
    return 0


def _cmd_tasks(args) -> int:
    from sparse_engine import data

    groups = [args.group] if args.group else ["held_in", "held_out", "pretrain"]
    for group in groups:
        names = data.list_builtin_tasks(group)
        print(f"{group} ({len(names)}):")
        for name in names:
            task = data.get_builtin_task(name)
            print(f"  {name:<20} {task.description}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"demo": _cmd_demo, "train": _cmd_train, "tasks": _cmd_tasks}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
