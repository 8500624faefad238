"""The ``sparse-engine`` command."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sparse_engine.config import BACKENDS, SCORES


def _positive(kind):
    """An argparse type for numbers > 0: a 0 must not fall back to a default silently."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _add_training_args(p: argparse.ArgumentParser, epochs: int, batch_size: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs, help="training epochs (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=batch_size, help="examples per micro-batch (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--lr", type=_positive(float), default=None,
                   help="learning rate (default: per method, tuned on the built-in suite: sparse/block/LoRA 1e-2, full 1e-3)")
    g.add_argument("--warmup-ratio", type=float, default=0.06, help="linear warmup fraction (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--seed", type=int, default=0, help="seed of data order and task generation (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_adapter_args(p: argparse.ArgumentParser, update_interval: int) -> None:
    g = p.add_argument_group("sparse adapter")
    g.add_argument("--keep-ratio", type=float, default=0.1, help="trainable fraction of each target weight (default: %(default)s)")
    g.add_argument("--score", default="mcs", choices=SCORES, help="mask score (default: %(default)s)")
    g.add_argument("--update-interval", type=int, default=update_interval,
                   help="optimizer steps between mask updates in the mask epochs (default: %(default)s)")
    g.add_argument("--mask-epochs", type=int, default=1, help="epochs with mask updates (default: %(default)s)")
    g.add_argument("--layer-drop", action="store_true", help="one global threshold over all layers (Eq. 5-6)")
    g.add_argument("--target-modules", nargs="+", default=None,
                   help="nn.Linear names to adapt (default: qkv_proj; Llama-style: q_proj k_proj v_proj)")
    g.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend (default: %(default)s)")


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
    demo.add_argument("--overwrite", action="store_true",
                      help="replace a demo --out holds from a run with other settings (default: refuse)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    train = sub.add_parser("train", help="train one expert per task (built-in suite, FLAN-format files, or a local Phi-3)",
                           description="Train one expert per task and save it. Data: built-in task names, or --data with "
                                       "FLAN-format files (columns source, target, task_name, optional split) or a hub "
                                       "dataset name. Model: the built-in tiny Phi-3, or --model with a local checkpoint. "
                                       "Under torchrun the experts are split across the ranks (or, with --data-parallel, "
                                       "each is trained by all of them). results.json is merged with what other runs "
                                       "wrote to --out; an expert whose adapter file or checkpoint is already there "
                                       "is refused unless --resume (continue it) or --overwrite (train it afresh).")
    train.add_argument("--tasks", nargs="+", required=True, help="task names (built-in, or task_name values in --data)")
    train.add_argument("--data", nargs="+", default=None, help="FLAN-format .json/.jsonl/.parquet files or a dataset name")
    train.add_argument("--model", default=None, help="local Hugging Face checkpoint (default: the built-in tiny Phi-3)")
    train.add_argument("--method", default="sparse", choices=["sparse", "block", "lora", "full"],
                       help="sparse (element), block (16x16), lora (matched rank) or full fine-tuning (default: %(default)s)")
    train.add_argument("--out", default="runs/train", help="output directory (default: %(default)s)")
    train.add_argument("--n-train", type=_positive(int), default=None,
                       help="training examples per task (default: 1000 built-in; with --data every train row, "
                            "else a sample of N of them)")
    train.add_argument("--n-test", type=_positive(int), default=None,
                       help="test examples per task (default: 100 built-in; with --data every test row, else a "
                            "sample of N)")
    train.add_argument("--max-examples-per-task", type=_positive(int), default=None,
                       help="--data: sub-sample each task's rows to N before the split into train/validation/test "
                            "(all splits shrink; --n-train / --n-test cap one split)")
    train.add_argument("--max-length", type=_positive(int), default=None, help="tokens per example (default: 48 built-in, 1024 otherwise)")
    train.add_argument("--max-new-tokens", type=_positive(int), default=None, help="generation length for --eval (default: 16 / 128)")
    train.add_argument("--eval", action="store_true", help="evaluate base and expert on each task's test split (Rouge-L)")
    train.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    train.add_argument("--resume", action="store_true",
                       help="continue each expert from its checkpoint under --out (same options as the "
                            "interrupted run); experts without one are trained from the start")
    train.add_argument("--overwrite", action="store_true",
                       help="train afresh experts whose adapter file or checkpoint an earlier run left in --out "
                            "(default: refuse)")
    train.add_argument("--cache-dir", default=None, help="built-in base model cache")
    train.add_argument("--data-parallel", action="store_true",
                       help="under torchrun: train each expert with all ranks together (default: split the experts "
                            "across the ranks, each rank training its own)")
    _add_training_args(train, epochs=5, batch_size=16)
    _add_adapter_args(train, update_interval=100)

    tasks = sub.add_parser("tasks", help="list the built-in tasks", description="List the built-in tasks by group.")
    tasks.add_argument("--group", choices=["held_in", "held_out", "pretrain"], default=None)

    _add_pretrain_parser(sub)
    _add_merge_parser(sub)
    _add_eval_parser(sub)
    _add_reproduce_parser(sub)
    return parser


# ----------------------------------------------------------------- pretrain / merge / eval / reproduce

def _add_pretrain_parser(sub) -> None:
    from sparse_engine.experiments.pretrain import DEFAULT_SPEC, DEFAULT_VOCAB_SIZE

    pre = sub.add_parser(
        "pretrain", help="a tiny Phi-3 base that knows your text (tokenizer and model trained on FLAN-format files)",
        description="Train a byte-level BPE tokenizer on the train rows of every task in --data, then a tiny Phi-3 "
                    "(the built-in base's shape) as a language model on the train rows of --tasks (default: all), and "
                    "write it to --out as a checkpoint for `train --model` / `eval --model`. Leave out the tasks you "
                    "will train experts on: a base pretrained on a task has already learnt it.")
    pre.add_argument("--data", nargs="+", required=True, help="FLAN-format .json/.jsonl/.parquet files")
    pre.add_argument("--out", required=True, help="output directory (refused if it holds files, unless --overwrite)")
    pre.add_argument("--tasks", nargs="+", default=None, help="tasks whose train rows the model learns (default: all)")
    pre.add_argument("--vocab-size", type=_positive(int), default=DEFAULT_VOCAB_SIZE,
                     help="BPE vocabulary size, at most (default: %(default)s)")
    pre.add_argument("--max-examples-per-task", type=_positive(int), default=None, help="sub-sample each task's rows")
    pre.add_argument("--epochs", type=_positive(int), default=DEFAULT_SPEC.pretrain_epochs,
                     help="epochs (default: %(default)s)")
    pre.add_argument("--batch-size", type=_positive(int), default=DEFAULT_SPEC.pretrain_batch_size,
                     help="examples per step (default: %(default)s)")
    pre.add_argument("--lr", type=_positive(float), default=DEFAULT_SPEC.pretrain_learning_rate,
                     help="learning rate (default: %(default)s)")
    pre.add_argument("--max-length", type=_positive(int), default=DEFAULT_SPEC.max_length,
                     help="tokens per example (default: %(default)s)")
    pre.add_argument("--hidden-size", type=_positive(int), default=DEFAULT_SPEC.hidden_size,
                     help="model width (default: %(default)s; the MLP is twice as wide)")
    pre.add_argument("--layers", type=_positive(int), default=DEFAULT_SPEC.num_hidden_layers,
                     help="decoder layers (default: %(default)s)")
    pre.add_argument("--seed", type=int, default=DEFAULT_SPEC.seed, help="(default: %(default)s)")
    pre.add_argument("--overwrite", action="store_true", help="replace the base already in --out")
    pre.add_argument("--no-progress", action="store_true", help="no progress bars")


def _cmd_pretrain(args) -> int:
    from sparse_engine.experiments.pretrain import check_out_dir, describe, pretrain_base, spec_with

    check_out_dir(args.out, args.overwrite)
    if args.hidden_size % 4:
        raise ValueError(f"--hidden-size must be a multiple of 4 (the 4 attention heads), got {args.hidden_size}")
    spec = spec_with(pretrain_epochs=args.epochs, pretrain_batch_size=args.batch_size,
                     pretrain_learning_rate=args.lr, max_length=args.max_length, hidden_size=args.hidden_size,
                     intermediate_size=2 * args.hidden_size, num_hidden_layers=args.layers, seed=args.seed)
    record = pretrain_base(args.data, args.out, tasks=args.tasks, vocab_size=args.vocab_size, spec=spec,
                           max_examples_per_task=args.max_examples_per_task, overwrite=args.overwrite,
                           progress=not args.no_progress)
    print(describe(record, args.out))
    return 0


# ----------------------------------------------------------------- merge / eval / reproduce

def _add_merge_parser(sub) -> None:
    from sparse_engine.merging import ALIASES, METHODS

    merge = sub.add_parser(
        "merge", help="merge expert files (sparse adapters, LoRA or full fine-tune experts) into one",
        description="Merge experts with the paper's Eq. 4 (overlap_average, for sparse adapters) or a baseline. "
                    "Inputs: adapter files (save_adapter / train) or expert files (LoRA factors, full fine-tune task "
                    "vectors, earlier dense merges). A merge of sparse experts is written as a sparse adapter file "
                    "(the union of the masks; load it with load_adapter or `eval --adapter`), any other as an "
                    "expert file. Hyper-parameters left out take the method's defaults (docs/merging.md).")
    merge.add_argument("experts", nargs="+", help="expert files (.safetensors)")
    merge.add_argument("--method", default="overlap_average", choices=[*METHODS, *ALIASES],
                       help="merge method (default: %(default)s = Eq. 4; aliases: "
                            + ", ".join(f"{a} = {m}" for a, m in ALIASES.items()) + ")")
    merge.add_argument("--out", required=True, help="output file (.safetensors)")
    merge.add_argument("--lam", type=float, default=None, help="λ: scale of the weighted methods (TA 0.3, TIES 1.0, ...)")
    merge.add_argument("--weights", type=float, nargs="+", default=None, help="per-expert weights (w_i = λ·weight_i)")
    merge.add_argument("--density", type=float, default=None, help="TIES / magnitude_prune: fraction kept, in [0, 1] (0.2)")
    merge.add_argument("--sign", choices=["total", "frequency"], default=None, help="TIES sign election (total)")
    merge.add_argument("--drop-rate", type=float, default=None, help="DARE: drop probability p, in [0, 1] (0.9)")
    merge.add_argument("--no-rescale", action="store_true", help="DARE: do not rescale survivors by 1/(1-p)")
    merge.add_argument("--beta", type=float, default=None, help="Breadcrumbs: fraction of smallest |values| dropped (0.85)")
    merge.add_argument("--gamma", type=float, default=None, help="Breadcrumbs: fraction of largest |values| dropped (0.01)")
    merge.add_argument("--basis", choices=["tensor", "stored"], default="tensor",
                       help="what density/beta/gamma count: the whole tensor (PEFT) or the stored entries (default: %(default)s)")
    merge.add_argument("--output", choices=["auto", "sparse", "dense"], default="auto",
                       help="sparse (union of masks), dense, or auto: sparse when every expert is (default: %(default)s)")
    merge.add_argument("--seed", type=int, default=0, help="DARE's random drops (default: %(default)s)")
    merge.add_argument("--no-safe-merge", action="store_true", help="merge even if an expert or the result holds NaN/Inf")
    merge.add_argument("--model-out", default=None,
                       help="also write the merged full model (base weights + merge) to this directory")
    merge.add_argument("--model", default=None, help="base checkpoint for --model-out (default: the built-in tiny Phi-3)")
    merge.add_argument("--no-check-base", action="store_true",
                       help="--model-out: apply the merge even if its experts were trained on another base model")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace an existing --out file / --model-out directory (default: refuse)")
    merge.add_argument("--cache-dir", default=None, help="built-in base model cache")
    merge.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser(
        "eval", help="held-in / held-out Rouge-L of the base model, an adapter, an expert or a merge",
        description="Greedy generation and Rouge-L F x100 (rouge-score, stemmer on, max over references, mean over "
                    "examples) on each task's test split. --adapter takes any adapter, expert or merged file; it is "
                    "added to the base weights. Adds its scores to results.json and results.md in --out "
                    "(a score of the same model and task measured otherwise is refused unless --overwrite).")
    ev.add_argument("--adapter", default=None, help="adapter / expert / merged file (default: evaluate the base model)")
    ev.add_argument("--routed", default=None, metavar="DIR",
                    help="routed experts instead of one model: each held-in request goes to its own expert "
                         "DIR/<task>-<method>.safetensors, all in mixed batches (built-in tasks, or --data's)")
    ev.add_argument("--routed-method", default="sparse", choices=["sparse", "block"],
                    help="which experts --routed serves (default: %(default)s)")
    ev.add_argument("--model", default=None, help="local base checkpoint (default: the built-in tiny Phi-3)")
    ev.add_argument("--held-in", nargs="*", default=None,
                    help="held-in tasks (default: the 20 built-in held-in tasks; with --data every task in it)")
    ev.add_argument("--held-out", nargs="*", default=None,
                    help="held-out tasks (default: the 10 built-in held-out tasks; with --data none)")
    ev.add_argument("--data", nargs="+", default=None, help="FLAN-format files or a dataset name (default: built-in tasks)")
    ev.add_argument("--n-test", type=_positive(int), default=None,
                    help="test examples per task (default: 100 built-in; with --data every test row, else a "
                         "sample of N)")
    ev.add_argument("--max-examples-per-task", type=_positive(int), default=None,
                    help="--data: sub-sample each task's rows to N before the split into train/validation/test")
    ev.add_argument("--no-check-base", action="store_true",
                    help="apply --adapter / --routed experts even if they were trained on another base model")
    ev.add_argument("--overwrite", action="store_true",
                    help="replace scores --out's results.json holds for the same model and task measured with other "
                         "settings (default: refuse)")
    ev.add_argument("--max-length", type=_positive(int), default=None, help="prompt tokens (default: 48 built-in, 1024 otherwise)")
    ev.add_argument("--max-new-tokens", type=_positive(int), default=None, help="generation length (default: 16 built-in, 128 otherwise)")
    ev.add_argument("--batch-size", type=int, default=100, help="generation batch size (default: %(default)s)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the built-in task generation (default: %(default)s)")
    ev.add_argument("--out", default="runs/eval", help="output directory (default: %(default)s)")
    ev.add_argument("--cache-dir", default=None, help="built-in base model cache")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_reproduce_parser(sub) -> None:
    rep = sub.add_parser(
        "reproduce", help="the paper's merging tables and figures on the built-in suite",
        description="Train (once, cached under --out) the experts the analysis needs and write its table or plot: "
                    "table1 (20 experts merged with every method, per expert kind, + multitask), fig6 (N merged "
                    "experts), fig5 (interference), table3 (layer drop), table4 (multitask training continued from "
                    "the merged sparse weights), or all. Writes <name>.json, <name>.md (and <name>.png) to --out. "
                    "Under torchrun the missing experts are trained split across the ranks, then rank 0 runs the "
                    "analyses (--out must be on a filesystem every rank sees).")
    rep.add_argument("what", choices=["table1", "fig6", "fig5", "table3", "table4", "all"])
    rep.add_argument("--out", default="runs/paper", help="output directory and expert cache (default: %(default)s)")
    rep.add_argument("--held-in", nargs="+", default=None, help="held-in tasks (default: the 20 built-in ones)")
    rep.add_argument("--held-out", nargs="*", default=None, help="held-out tasks (default: the 10 built-in ones)")
    rep.add_argument("--kinds", nargs="+", default=None, choices=["sparse", "block", "lora", "full"],
                     help="expert kinds (default: all four)")
    rep.add_argument("--n-train", type=int, default=800, help="training examples per task (default: %(default)s)")
    rep.add_argument("--n-test", type=int, default=100, help="test examples per task (default: %(default)s)")
    rep.add_argument("--epochs", type=int, default=5, help="epochs per expert (default: %(default)s)")
    rep.add_argument("--multitask-epochs", type=int, default=5, help="epochs of the multitask baseline (default: %(default)s)")
    rep.add_argument("--update-interval", type=int, default=20, help="mask update interval in steps (default: %(default)s)")
    rep.add_argument("--keep-ratio", type=float, default=0.1, help="sparse adapters' keep ratio (default: %(default)s)")
    rep.add_argument("--trials", type=int, default=10, help="fig6: random subsets per N (default: %(default)s)")
    rep.add_argument("--ns", type=int, nargs="+", default=[2, 5, 10, 20], help="fig6: numbers of merged experts")
    rep.add_argument("--table4-epochs", type=_positive(int), nargs="+", default=[1, 5],
                     help="table4: epochs of continued multitask training (default: 1 5)")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--cache-dir", default=None, help="built-in base model cache")
    rep.add_argument("--overwrite", action="store_true",
                     help="replace tables --out holds from a run with other settings (default: refuse; a rerun "
                          "with the same settings continues from the experts already trained)")
    rep.add_argument("--no-progress", action="store_true", help="no progress output")


def _cmd_merge(args) -> int:
    from sparse_engine.merging import ALIASES, apply_merged, load_expert, merge_experts, resolve_params, save_merged

    params = {"lam": args.lam, "density": args.density, "sign": args.sign, "drop_rate": args.drop_rate,
              "beta": args.beta, "gamma": args.gamma}
    if args.no_rescale:
        params["rescale"] = False
    method = ALIASES.get(args.method, args.method)
    params = {k: v for k, v in params.items() if v is not None}
    resolve_params(method, **params)  # bad hyper-parameters fail before any file is read
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must be a .safetensors file, got {out}")
    if not args.overwrite:
        if out.exists():
            raise ValueError(f"--out {out} exists (an earlier merge?); pass --overwrite to replace it, or another --out")
        if args.model_out and Path(args.model_out).is_dir() and any(Path(args.model_out).iterdir()):
            raise ValueError(f"--model-out {args.model_out} holds files; pass --overwrite to replace them, or another "
                             "--model-out")
    experts = [load_expert(p) for p in args.experts]
    start = time.perf_counter()
    merged = merge_experts(experts, method, weights=args.weights, basis=args.basis, output=args.output,
                           seed=args.seed, safe_merge=not args.no_safe_merge, **params)
    seconds = time.perf_counter() - start
    model = None
    if args.model_out:
        model, tokenizer = load_model(args)
        for expert in experts:  # the base check worded for the command line
            _check_same_base(expert, model, expert.meta.get("file", expert.name), args)
        apply_merged(model, merged, safe_merge=not args.no_safe_merge, check_base=not args.no_check_base)
    path = save_merged(merged, out)
    kind = merged.output_kind  # says why a merge of sparse experts is dense (they mixed kinds)
    print(f"merged {len(experts)} experts with {merged.method} {merged.params} in {seconds:.2f} s")
    if "union_density" in merged.stats:
        print(f"union of masks: {100 * merged.stats['union_density']:.2f}% of the adapted weights")
    print(f"wrote {path} ({kind})")
    if model is not None:
        model.save_pretrained(args.model_out)
        tokenizer.save_pretrained(args.model_out)
        print(f"wrote the merged full model to {args.model_out}")
    return 0


def _cmd_eval(args) -> int:
    from sparse_engine.experiments import results as result_files
    from sparse_engine.experiments.reports import evaluate_held
    from sparse_engine.merging import apply_merged, load_expert

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.routed is not None:
        return _routed_eval(args)
    tasks = _eval_tasks(args, args.held_in, args.held_out)
    builtin_in, builtin_out = _builtin_groups()
    held_out = list(args.held_out) if args.held_out is not None else ([] if args.data else list(builtin_out))
    if args.held_in is not None:
        held_in = list(args.held_in)
    else:  # --data: every task in it that is not held out
        held_in = list(builtin_in) if args.data is None else [t for t in tasks if t not in held_out]
    gen = _eval_generation(args)
    label = args.adapter or "base model"
    entries = [{"evaluated": label, "group": g, "task": t, "settings": _eval_settings(args, gen)}
               for g, names in (("held_in", held_in), ("held_out", held_out)) for t in names]
    result_files.check_eval_results(args.out, entries, args.overwrite)
    expert = load_expert(args.adapter) if args.adapter else None
    model, tokenizer = load_model(args)
    if expert is not None:
        _check_same_base(expert, model, args.adapter, args)
        apply_merged(model, expert, check_base=not args.no_check_base)
    start = time.perf_counter()
    result = evaluate_held(model, tokenizer, {t: tasks[t] for t in held_in}, {t: tasks[t] for t in held_out},
                           **gen, progress=not args.no_progress)
    for e in entries:
        e["Rouge-L"] = result[e["group"]][e["task"]]
    return _write_eval(args, entries, time.perf_counter() - start, f"Rouge-L of {label}")


def _builtin_groups():
    from sparse_engine import data

    return data.HELD_IN, data.HELD_OUT


def _eval_tasks(args, held_in, held_out) -> dict:
    """The test splits ``eval`` scores: the built-in tasks named (default: held-in and held-out),
    or with --data the tasks named (default: every task in it)."""
    from sparse_engine import data

    names = list(held_in if held_in is not None else ([] if args.data else data.HELD_IN))
    names += list(held_out if held_out is not None else ([] if args.data else data.HELD_OUT))
    if args.data is None:
        if not names:
            raise ValueError("no tasks to evaluate (--held-in and --held-out are both empty)")
        unknown = [t for t in names if t not in set(data.list_builtin_tasks())]
        if unknown:
            raise ValueError(f"unknown built-in task(s) {unknown}; see `sparse-engine tasks` (or pass --data)")
        return {t: data.builtin_task_data(t, n_train=0, n_validation=0, n_test=args.n_test or 100, seed=args.seed)
                for t in dict.fromkeys(names)}
    if held_in is not None and held_out is not None and not names:
        raise ValueError("no tasks to evaluate (--held-in and --held-out are both empty)")
    # no --held-in: every task of the data
    tasks = data.load_flan(args.data if len(args.data) > 1 else args.data[0], tasks=None if held_in is None else names,
                           max_examples_per_task=args.max_examples_per_task, n_test=args.n_test, seed=args.seed)
    unknown = [t for t in names if t not in tasks]
    if unknown:
        raise ValueError(f"task(s) {unknown} are not in --data; it holds {', '.join(sorted(tasks))}")
    return tasks


def _eval_generation(args) -> dict:
    builtin = args.data is None
    return {"max_new_tokens": args.max_new_tokens or (16 if builtin else 128),
            "max_length": args.max_length or (48 if builtin and args.model is None else 1024),
            "batch_size": args.batch_size}


def _eval_settings(args, gen: dict) -> dict:
    """What a score depends on besides the model: a score measured with other settings is another
    measurement (refused in place of an earlier one without --overwrite)."""
    return {"model": args.model or "built-in", "data": args.data, "n_test": args.n_test,
            "max_examples_per_task": args.max_examples_per_task, "seed": args.seed,
            "max_length": gen["max_length"], "max_new_tokens": gen["max_new_tokens"]}


def _check_same_base(expert, model, path, args) -> None:
    """apply_merged's base-model check, worded for the command line (its flag, not check_base=False)."""
    from sparse_engine.merging.expert import plain_base_fingerprint, targets_of

    if args.no_check_base or not expert.base_fingerprint:
        return
    try:
        mine = plain_base_fingerprint(model, targets_of(expert))
    except ValueError:  # the model lacks the expert's target layers: apply_merged names them
        return
    if mine != expert.base_fingerprint:
        raise ValueError(f"{path} was trained on another base model ({expert.base_model!r}) than "
                         f"{args.model or 'the built-in base'}; pass the --model it was trained on, or "
                         "--no-check-base to apply it anyway")


def _write_eval(args, entries, seconds: float, what: str) -> int:
    from sparse_engine import evaluation
    from sparse_engine.experiments import results as result_files

    run = {"evaluated": entries[0]["evaluated"], "seconds": round(seconds, 1),
           "settings": {k: v for k, v in vars(args).items() if k != "func"}}
    out = Path(args.out)
    result_files.write_eval_results(out, entries, run, args.overwrite)
    rows = [{"group": e["group"], "task": e["task"], "Rouge-L": round(e["Rouge-L"], 2)} for e in entries]
    print(f"{what}:")
    print(evaluation.markdown_table(rows, ["group", "task", "Rouge-L"]))
    print(f"\nresults (added to what --out held): {out / 'results.json'}, {out / 'results.md'}")
    return 0


def _routed_eval(args) -> int:
    from sparse_engine.experiments import results as result_files
    from sparse_engine.experiments.routed import run_routed_eval
    from sparse_engine.merging import load_expert

    if args.adapter is not None or args.held_out:
        raise ValueError("--routed serves held-in tasks' experts, each on its own task: it takes neither --adapter "
                         "nor --held-out")
    if not Path(args.routed).is_dir():
        raise FileNotFoundError(f"--routed {args.routed}: no such directory")
    suite = None if args.data is None else _eval_tasks(args, args.held_in, [])
    gen = _eval_generation(args)
    label = f"routed {args.routed_method} experts in {args.routed}"
    names = args.held_in or [t for t in (suite or _builtin_groups()[0])
                             if (Path(args.routed) / f"{t}-{args.routed_method}.safetensors").is_file()]
    entries = [{"evaluated": label, "group": "held_in", "task": t, "settings": _eval_settings(args, gen)}
               for t in names]
    result_files.check_eval_results(args.out, entries, args.overwrite)
    model, tokenizer = load_model(args)
    for t in names:  # the base check worded for the command line, before any expert is served
        path = Path(args.routed) / f"{t}-{args.routed_method}.safetensors"
        if path.is_file():
            _check_same_base(load_expert(path), model, path, args)
    start = time.perf_counter()
    result = run_routed_eval(args.routed, method=args.routed_method, tasks=names or None,
                             n_test=args.n_test or 100, seed=args.seed, model=model, tokenizer=tokenizer,
                             batch_size=args.batch_size, max_new_tokens=gen["max_new_tokens"],
                             max_length=gen["max_length"], progress=not args.no_progress, suite=suite,
                             check_base=not args.no_check_base)
    entries = [dict(e, **{"Rouge-L": result["scores"][e["task"]], "expert": result["adapters"][e["task"]]})
               for e in entries if e["task"] in result["scores"]]
    return _write_eval(args, entries, time.perf_counter() - start, label)


def _reproduce_settings(setup: dict, fig6: dict, name: str) -> dict:
    """What a reproduce table depends on: its setup (not where or how verbosely it ran), and fig6's N's."""
    settings = {k: v for k, v in setup.items() if k not in ("out_dir", "progress", "cache_dir")}
    if name == "fig6":
        settings.update(ns=fig6.get("ns"), trials=fig6.get("trials"))
    return settings


def _cmd_reproduce(args, ranks=None) -> int:
    from sparse_engine.experiments import analysis
    from sparse_engine.experiments import results as result_files
    from sparse_engine.experiments.ranks import Ranks

    ranks = ranks or Ranks()

    def prepare():
        kwargs = {"out_dir": args.out, "n_train": args.n_train, "n_test": args.n_test, "epochs": args.epochs,
                  "multitask_epochs": args.multitask_epochs, "update_interval": args.update_interval,
                  "keep_ratio": args.keep_ratio, "seed": args.seed, "cache_dir": args.cache_dir,
                  "progress": not args.no_progress}
        if args.held_in is not None:
            kwargs["held_in"] = tuple(args.held_in)
        if args.held_out is not None:
            kwargs["held_out"] = tuple(args.held_out)
        if args.kinds is not None:
            kwargs["kinds"] = tuple(args.kinds)
        if not 0.0 < args.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {args.keep_ratio}")
        if args.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {args.trials}")
        setup = analysis.PaperSetup(**kwargs)
        if args.what in ("fig6", "all") and not [n for n in args.ns if 1 <= n <= len(setup.held_in)]:
            raise ValueError(f"--ns: no value in [1, {len(setup.held_in)}]")
        for name in analysis.RUNNERS if args.what == "all" else [args.what]:
            settings = _reproduce_settings(setup.to_dict(), {"ns": args.ns, "trials": args.trials}, name)
            result_files.check_same_settings(Path(args.out) / f"{name}.json", settings,
                                             lambda report: _reproduce_settings(report.get("setup", {}), report, name),
                                             args.overwrite)
        return setup

    setup = ranks.run(prepare)
    ranks.check_same("the command line", vars(args))
    # under torchrun the ranks split the missing experts; rank 0 alone runs the analyses
    results = analysis.reproduce(args.what, setup, ranks=ranks, fig6={"ns": args.ns, "trials": args.trials},
                                 table4={"epochs": tuple(args.table4_epochs)})
    for name in results:
        print((Path(args.out) / f"{name}.md").read_text())
    return 0


def _cmd_demo(args) -> int:
    from sparse_engine.experiments import results as result_files
    from sparse_engine.experiments.experts import DEMO_TASKS, METHODS, run_demo

    tasks, methods = list(args.tasks or DEMO_TASKS), list(args.methods or METHODS)
    mine = {"tasks": tasks, "methods": methods, "n_train": args.n_train, "n_test": args.n_test, "epochs": args.epochs,
            "update_interval": args.update_interval, "seed": args.seed}
    result_files.check_kind(Path(args.out) / "results.json", "rows", "demo", args.overwrite)
    result_files.check_same_settings(
        Path(args.out) / "results.json", mine,
        lambda report: {"tasks": report.get("tasks"), "methods": report.get("methods"),
                        **{k: report.get("settings", {}).get(k) for k in mine if k not in ("tasks", "methods")}},
        args.overwrite)

    results = run_demo(tasks=tuple(tasks), n_train=args.n_train, n_test=args.n_test,
                       epochs=args.epochs, update_interval=args.update_interval,
                       methods=tuple(methods), out_dir=args.out, cache_dir=args.cache_dir,
                       seed=args.seed, progress=not args.no_progress)
    print()
    print(f"Single-task Rouge-L on the built-in suite ({len(results['tasks'])} tasks, {results['settings']['n_test']} "
          f"test examples each), {results['seconds']} s:")
    print(results["table"])
    print(f"\nresults: {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'}")
    return 0


def _within_positions(model, max_length: int, given: bool) -> int:
    """Training sequences no longer than the model's positions: a default is cut to fit (with a
    note), a --max-length beyond them is refused."""
    from sparse_engine.evaluation import model_positions

    positions = model_positions(model)
    if positions is None or max_length <= positions:
        return max_length
    if given:
        raise ValueError(f"--max-length {max_length} exceeds the model's {positions} positions "
                         f"(max_position_embeddings); use --max-length {positions} or less")
    print(f"note: training sequences cut to the model's {positions} positions (default max length {max_length})",
          file=sys.stderr)
    return positions


def load_model(args):
    """The base model and tokenizer a command names: `--model DIR`, or the built-in base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from sparse_engine.builtin import load_builtin_base

        return load_builtin_base(cache_dir=args.cache_dir, progress=not args.no_progress)
    path = Path(args.model)  # checked to be a directory by main() before any work
    if args.no_progress:  # transformers' own "Loading weights" bar too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if torch.cuda.is_available():
        model = model.cuda()
    return model, tokenizer


def _cmd_train(args, ranks=None) -> int:
    from sparse_engine import data
    from sparse_engine.experiments import results as result_files
    from sparse_engine.config import DEFAULT_TARGET_MODULES, SparseAdapterConfig
    from sparse_engine.experiments.experts import (DEFAULT_LEARNING_RATES, ExpertSpec, check_expert_outputs,
                                                   check_split, run_experts)
    from sparse_engine.experiments.ranks import Ranks
    from sparse_engine.training import TrainingConfig

    ranks = ranks or Ranks()
    out = Path(args.out)
    adapters_dir, checkpoints_dir = out / "adapters", out / "checkpoints"

    def prepare():
        """Everything cheap before loading a model: every rank checks it, and a failure on one
        (a file only one node lacks) stops them all."""
        adapter = SparseAdapterConfig(
            keep_ratio=args.keep_ratio, score=args.score, update_interval=args.update_interval,
            mask_epochs=args.mask_epochs, layer_drop=args.layer_drop, seed=args.seed, backend=args.backend,
            target_modules=tuple(args.target_modules or DEFAULT_TARGET_MODULES),
        )
        training = TrainingConfig(
            epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
            learning_rate=args.lr or DEFAULT_LEARNING_RATES[args.method], warmup_ratio=args.warmup_ratio,
            max_steps=args.max_steps, seed=args.seed, progress=not args.no_progress,
            checkpoint_dir=str(checkpoints_dir) if (args.checkpoint_every or args.resume) else None,
            checkpoint_every=args.checkpoint_every,
        )
        if args.data is None:
            known = set(data.list_builtin_tasks())
            unknown = [t for t in args.tasks if t not in known]
            if unknown:
                raise ValueError(f"unknown built-in task(s) {unknown}; see `sparse-engine tasks` (or pass --data)")
            tasks = {t: data.builtin_task_data(t, n_train=args.n_train or 1000, n_validation=0,
                                               n_test=args.n_test or 100, seed=args.seed) for t in args.tasks}
        else:
            tasks = data.load_flan(args.data if len(args.data) > 1 else args.data[0], tasks=args.tasks,
                                   max_examples_per_task=args.max_examples_per_task, n_train=args.n_train,
                                   n_test=args.n_test, seed=args.seed)
        check_split(len(tasks), ranks, args.data_parallel)
        result_files.check_kind(out / "results.json", "experts", "train")  # merged into, never replaced
        stale = check_expert_outputs(adapters_dir, checkpoints_dir, tasks, args.method, resume=args.resume,
                                     overwrite=args.overwrite)
        return adapter, training, tasks, stale

    adapter, training, tasks, stale = ranks.run(prepare)
    ranks.check_same("the command line", vars(args))
    if ranks.size > 1:
        ranks.check_same("the task data (sha256)", _fingerprint(tasks))
    builtin = args.data is None
    max_length = args.max_length or (48 if builtin and args.model is None else 1024)
    max_new = args.max_new_tokens or (16 if builtin else 128)
    # the built-in base: rank 0 builds a missing one (once), then the others read it from the cache
    load = ranks.main_first if args.model is None else ranks.run
    model, tokenizer = load(lambda: load_model(args))
    max_length = _within_positions(model, max_length, given=args.max_length is not None)
    # --overwrite: an earlier run's checkpoint must not be resumed later in place of this run's
    ranks.run(lambda: [p.unlink(missing_ok=True) for p in stale] if ranks.is_main else None)
    spec = ExpertSpec(method=args.method, adapter=adapter, training=training, max_length=max_length,
                      resume=args.resume)
    start = time.perf_counter()
    results = run_experts(model, tokenizer, tasks, [args.method], spec=spec,
                          learning_rates={args.method: training.learning_rate}, out_dir=adapters_dir,
                          evaluate=args.eval, max_new_tokens=max_new, progress=not args.no_progress,
                          ranks=ranks, data_parallel=args.data_parallel)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["world_size"] = ranks.size
    results["settings"] = {"adapter": adapter.to_dict(), "training": vars(args)}
    # one writer per run (rank 0), merged under a lock with what other runs wrote to --out
    table = ranks.run(lambda: result_files.write_train_results(out, results)[1] if ranks.is_main else None)
    if ranks.is_main:
        print(table)
        print(f"\nresults: {out / 'results.json'}")
    return 0


def _fingerprint(tasks) -> str:
    """A digest of every example of ``tasks``: ranks reading different files under the same names
    would otherwise train experts that do not belong together."""
    import hashlib

    digest = hashlib.sha256()
    for name, task in tasks.items():
        for split in ("train", "validation", "test"):
            for ex in getattr(task, split):
                digest.update(repr((name, split, ex.source, ex.target)).encode())
    return digest.hexdigest()


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


# The commands that split their work across ranks under torchrun; the others run in one process.
PARALLEL_COMMANDS = ("train", "reproduce")


def main(argv=None) -> int:
    from sparse_engine.experiments.ranks import RankFailed

    args = build_parser().parse_args(argv)
    started = time.time()
    handlers = {"demo": _cmd_demo, "train": _cmd_train, "tasks": _cmd_tasks, "merge": _cmd_merge, "eval": _cmd_eval,
                "reproduce": _cmd_reproduce, "pretrain": _cmd_pretrain}
    ranks, owns_group = None, False
    try:
        ranks, owns_group = _start_ranks(args)
        if ranks is None:
            _check_paths_and_backend(args)
            return handlers[args.command](args)
        ranks.run(lambda: _check_paths_and_backend(args))  # a path one node lacks stops every rank
        return handlers[args.command](args, ranks)
    except (ValueError, OSError, RankFailed) as exc:
        # one write, newline included: ranks share the launcher's stderr, and print's separate
        # write of the newline lets another rank's line land in between
        sys.stderr.write(f"error: {ranks.prefix() if ranks is not None else ''}{exc}\n")
        sys.stderr.flush()
        if ranks is not None:
            ranks.settle()  # every rank's error line is out before any rank exits
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: one line saying how to continue, no traceback (what was written is complete:
        # every file is written atomically)
        sys.stderr.write(f"{ranks.prefix() if ranks is not None else ''}{_interrupted(args, started)}\n")
        sys.stderr.flush()
        return 130
    finally:
        if ranks is not None:
            ranks.close()
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _interrupted(args, started: float) -> str:
    """The line a Ctrl-C ends with: for ``train``, the checkpoint ``--resume`` continues from."""
    if args.command == "reproduce":
        return (f"interrupted: the experts finished so far are kept under {args.out}; run the same command again to "
                "continue from them")
    if args.command != "train":
        return f"interrupted: `sparse-engine {args.command}` stopped before it finished"
    from sparse_engine.training import CHECKPOINT_NAME

    found = [(p.stat().st_mtime, p) for p in Path(args.out, "checkpoints").glob(f"*/{CHECKPOINT_NAME}")]
    # this run's checkpoints, or the ones it resumed from
    found = sorted(item for item in found if args.resume or item[0] >= started)
    if not found:
        hint = "" if args.checkpoint_every else " (--checkpoint-every N writes one every N steps)"
        return f"interrupted: no checkpoint was written{hint}, so there is nothing to resume; run again to start afresh"
    path = found[-1][1]
    return (f"interrupted: the last checkpoint is {path}{_checkpoint_step(path)}; run the same command with --resume "
            "to continue from it")


def _checkpoint_step(path) -> str:
    import torch

    try:  # mmap: only the loop state is read, not the weights
        return f" (step {torch.load(path, map_location='cpu', weights_only=False, mmap=True)['state']['step']})"
    except Exception:  # noqa: BLE001 - the step is a courtesy; the path is the answer
        return ""


def _start_ranks(args):
    """Under torchrun (several ranks): (this rank's place, whether this call made the process
    group); else (None, False)."""
    from sparse_engine import distributed

    if not distributed.launched_with_ranks():
        return None, False
    if args.command not in PARALLEL_COMMANDS:
        raise ValueError(f"`sparse-engine {args.command}` runs in one process: launch it without torchrun (only "
                         f"{' and '.join(PARALLEL_COMMANDS)} split their work across ranks)")
    import torch.distributed as dist

    from sparse_engine.experiments.ranks import Ranks

    owns_group = not dist.is_initialized()
    return Ranks(distributed.init_from_env()), owns_group


def _check_paths_and_backend(args) -> None:
    """Checks that need no model or data, before any work: a late failure would throw away
    a finished run."""
    out = getattr(args, "out", None)
    if out is not None and args.command != "merge" and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file; it must be a directory (it holds the results)")
    model = getattr(args, "model", None)
    if model is not None and not Path(model).is_dir():
        raise FileNotFoundError(f"--model {model}: no such directory (models are loaded from local paths only)")
    model_out = getattr(args, "model_out", None)
    if model_out is not None and Path(model_out).exists() and not Path(model_out).is_dir():
        raise ValueError(f"--model-out {model_out} is a file; the merged model is saved as a directory")
    if getattr(args, "backend", "auto") == "triton":
        import torch

        from sparse_engine.kernels import runtime

        if not runtime.triton_usable_for(torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu")):
            raise ValueError("--backend triton needs Triton and a CUDA device (or TRITON_INTERPRET=1 for the CPU "
                             "interpreter); use --backend auto or reference")


if __name__ == "__main__":
    sys.exit(main())
