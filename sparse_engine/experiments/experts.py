"""Training task experts by method, and the demo pipeline built on it.

Methods (the paper's Section 4.1 comparison):

* ``sparse``: element-sparse adapter (Algorithm 1, MCS, keep ratio 0.1 by default);
* ``block``: block-sparse adapter (16×16 tiles);
* ``lora``: LoRA through PEFT on the same target modules, rank matched to the sparse
  adapter's trainable-parameter count;
* ``full``: full fine-tuning of every parameter.
"""
from __future__ import annotations

import copy
import time
import zlib
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparse_engine import data, distributed, evaluation
from sparse_engine.baselines import attach_lora, matched_lora_rank, prepare_full_finetune
from sparse_engine.config import SparseAdapterConfig
from sparse_engine.io import save_adapter
from sparse_engine.experiments.labels import MERGE_LABELS, METHOD_LABELS
from sparse_engine.experiments.ranks import Ranks
from sparse_engine.training import CHECKPOINT_NAME, TrainingConfig, train_expert

METHODS = ("sparse", "block", "lora", "full")
# Learning rates found on the built-in suite's tiny Phi-3 (the paper tunes per method too).
DEFAULT_LEARNING_RATES = {"sparse": 1e-2, "block": 1e-2, "lora": 1e-2, "full": 1e-3}
DEMO_TASKS = ("reverse_words", "colour_to_fruit", "keep_animals", "odd_or_even")


@dataclass
class ExpertSpec:
    method: str = "sparse"
    adapter: SparseAdapterConfig = field(default_factory=SparseAdapterConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    max_length: int = 128
    resume: bool = False  # continue from the expert's checkpoint under training.checkpoint_dir, if there is one

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")


def expert_name(task: str, method: str) -> str:
    """The stem of an expert's file and of its checkpoint folder: ``<task>-<method>``."""
    return f"{task}-{method}"


def train_task_expert(base_model, tokenizer, task: data.TaskData, spec: ExpertSpec, out_dir: Path | None = None, *,
                      process_group=distributed.AUTO):
    """Train one expert on ``task.train`` from a copy of ``base_model``; returns (model, info).

    ``process_group`` goes to :func:`~sparse_engine.training.train_expert`: ``"auto"`` trains
    data-parallel over every rank under torchrun (one process otherwise), ``None`` trains in
    this process alone (expert parallelism: each rank its own experts), or a group. With
    several ranks every rank ends with the same expert and only the group's rank 0 writes the
    expert file (``info`` then has no file on the other ranks)."""
    if not task.train:
        raise ValueError(f"task {task.name!r} has no training examples")
    group = distributed.resolve_group(process_group)
    if not distributed.is_main(group):
        out_dir = None
    model = copy.deepcopy(base_model)
    dataset = data.TokenizedDataset(task.train, tokenizer, spec.max_length)
    collate = lambda b: data.collate_causal_lm(b, tokenizer.pad_token_id)  # noqa: E731
    training = replace(spec.training, desc=f"{task.name} [{spec.method}]")
    if training.checkpoint_dir:
        training = replace(training, checkpoint_dir=str(Path(training.checkpoint_dir) / expert_name(task.name, spec.method)))
    info = {"task": task.name, "method": spec.method}
    if spec.method in ("sparse", "block"):
        adapter = replace(spec.adapter, block_size=None if spec.method == "sparse" else (spec.adapter.block_size or 16))
        result = train_expert(model, dataset, training, adapter=adapter, collate_fn=collate, resume=spec.resume,
                              process_group=group)
        info["keep_ratio"] = adapter.keep_ratio
        if out_dir is not None:
            path = save_adapter(model, Path(out_dir) / f"{expert_name(task.name, spec.method)}.safetensors",
                                extra_metadata={"task": task.name, "method": spec.method})
            info["adapter_file"] = info["expert_file"] = str(path)
    elif spec.method == "lora":
        rank = matched_lora_rank(model, spec.adapter)
        # PEFT draws lora_A from the global RNG: seed it (per task, from the training seed) so
        # an expert does not depend on what ran before it in the process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.training.seed * 1_000_003 + zlib.crc32(task.name.encode()))
            model = attach_lora(model, rank, spec.adapter.target_modules)
        result = train_expert(model, dataset, training, collate_fn=collate, resume=spec.resume, process_group=group)
        info["lora_rank"] = rank
    else:
        prepare_full_finetune(model)
        result = train_expert(model, dataset, training, collate_fn=collate, resume=spec.resume, process_group=group)
    if spec.method in ("lora", "full") and out_dir is not None:
        # Keep the expert's task vector for merging: LoRA factors (ΔW = scale·B·A per target
        # layer) or the full fine-tune's τ = W_ft − W of every parameter.
        from sparse_engine.merging import expert_from_full_model, expert_from_lora_model, save_expert

        if spec.method == "lora":
            expert = expert_from_lora_model(model, task.name, base_model=base_model)
        else:
            expert = expert_from_full_model(model, base_model, task.name, target_modules=spec.adapter.target_modules)
        path = save_expert(expert, Path(out_dir) / f"{expert_name(task.name, spec.method)}.safetensors",
                           extra={"task": task.name, "method": spec.method})
        info["expert_file"] = str(path)
    info.update(result.to_dict())
    info["final_loss"] = result.losses[-1] if result.losses else None
    del info["losses"]
    return model, info


def check_split(n_jobs: int, ranks: Ranks, data_parallel: bool = False) -> None:
    """Expert parallelism gives each rank whole experts: a rank without one is a launch mistake."""
    if not data_parallel and ranks.size > n_jobs:
        raise ValueError(
            f"{n_jobs} expert(s) to train on {ranks.size} ranks: rank(s) {n_jobs}..{ranks.size - 1} would have "
            f"nothing to train; launch at most {n_jobs} rank(s) (torchrun --nproc_per_node), or train each expert "
            "with all ranks together (--data-parallel)")


def check_expert_outputs(adapter_dir, checkpoint_dir, tasks, method: str, *, resume: bool,
                         overwrite: bool) -> list[Path]:
    """What training the ``method`` experts of ``tasks`` may write, checked before any work;
    returns the stale checkpoints to delete before training (experts trained afresh over an
    earlier run's with ``overwrite``: a later ``resume`` must not continue the old run).

    An expert file or checkpoint of an earlier run is never replaced silently: ``resume``
    continues an expert from its checkpoint, ``overwrite`` trains it afresh, neither is an
    error naming the files. ``resume`` when no expert has a checkpoint is an error too."""
    names = [expert_name(t, method) for t in tasks]
    files = {n: Path(adapter_dir) / f"{n}.safetensors" for n in names}
    checkpoints = {n: Path(checkpoint_dir) / n / CHECKPOINT_NAME for n in names}
    if resume and not any(p.is_file() for p in checkpoints.values()):
        raise ValueError(f"--resume: no checkpoint to resume under {checkpoint_dir} for {', '.join(names)} "
                         "(checkpoints are written only with --checkpoint-every N, or --resume); run again without "
                         "--resume to start afresh")
    taken = [n for n in names if (files[n].exists() or checkpoints[n].exists())
             and not (resume and checkpoints[n].is_file())]
    if taken and not overwrite:
        found = [str(files[n]) if files[n].exists() else str(checkpoints[n]) for n in taken]
        more = f" and {len(found) - 2} more" if len(found) > 2 else ""
        hint = "pass --overwrite to train afresh"
        hint += ", --resume to continue from the checkpoint" if not resume and any(
            checkpoints[n].is_file() for n in taken) else ""
        raise ValueError(f"an earlier run wrote {', '.join(found[:2])}{more}; {hint}, or choose another --out")
    return [checkpoints[n] for n in taken if checkpoints[n].exists()]


def run_experts(base_model, tokenizer, tasks: dict[str, data.TaskData], methods, *, spec: ExpertSpec,
                learning_rates: dict | None = None, out_dir=None, evaluate: bool = True,
                max_new_tokens: int = 16, progress: bool = True, ranks: Ranks | None = None,
                data_parallel: bool = False) -> dict:
    """Train every (task, method) expert, evaluate base and experts on each task's test split.

    ``ranks``: the ranks of a multi-process run (torchrun); without it this process works
    alone, even under torchrun. By default the experts are split across the ranks, round-robin
    over the (task, method) jobs in order, and each rank trains its own alone and writes their
    files. ``data_parallel``: every expert is trained by all ranks together, rank 0 writes its
    file and scores it. The base evaluation is split across the ranks either way. Every rank
    returns the complete results, experts in job order; each expert's ``ranks`` lists the
    rank(s) that trained it.
    """
    ranks = ranks or Ranks()
    rates = dict(DEFAULT_LEARNING_RATES, **(learning_rates or {}))
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
    jobs = [(t, m) for t in tasks for m in methods]
    check_split(len(jobs), ranks, data_parallel)
    gen = {"max_new_tokens": max_new_tokens, "max_length": spec.max_length}
    results = {"tasks": list(tasks), "methods": list(methods), "experts": [], "scores": {}}
    if evaluate:
        names = ranks.mine(tasks)
        shares = ranks.gather(lambda: evaluation.evaluate_tasks(base_model, tokenizer, {t: tasks[t] for t in names},
                                                                **gen))
        base = {t: score for share in shares for t, score in share.items()}
        results["scores"]["base"] = {t: base[t] for t in tasks}
    # data-parallel: the default group (every rank, one expert at a time); else each rank alone
    group, trained_by = (ranks.group, list(range(ranks.size))) if data_parallel else (None, [ranks.rank])

    def train(job):
        task_name, method = job
        job_spec = replace(spec, method=method, training=replace(spec.training, learning_rate=rates[method]))
        model, info = train_task_expert(base_model, tokenizer, tasks[task_name], job_spec, out_dir,
                                        process_group=group)
        info["ranks"] = trained_by
        if evaluate and (ranks.is_main or not data_parallel):  # data-parallel: the same expert on every rank
            info["rouge_l"] = evaluation.evaluate_tasks(model, tokenizer, {task_name: tasks[task_name]},
                                                        **gen)[task_name]
        del model
        return info

    desc = "experts" if ranks.size == 1 else f"experts [rank {ranks.rank}]"
    if data_parallel:
        # one agreement per expert: rank 0's record (it holds the file and the score)
        bar = tqdm(jobs, desc=desc, disable=not progress, dynamic_ncols=True)
        infos = [ranks.gather(partial(train, job))[0] for job in bar]
    else:
        mine = ranks.mine(range(len(jobs)))
        bar = tqdm(mine, desc=desc, disable=not progress, dynamic_ncols=True)
        shares = ranks.gather(lambda: [(i, train(jobs[i])) for i in bar])
        infos = [info for _, info in sorted((pair for share in shares for pair in share), key=lambda p: p[0])]
    for info in infos:
        if "rouge_l" in info:
            results["scores"].setdefault(info["method"], {})[info["task"]] = info["rouge_l"]
    results["experts"] = infos
    return results


def summary_rows(results: dict, total_params: int | None = None) -> list[dict]:
    """One row per method: trainable parameters and mean Rouge-L over the trained tasks."""
    rows = []
    params: dict[str, list[int]] = {}
    for info in results["experts"]:
        params.setdefault(info["method"], []).append(info["trainable_params"])
    for method in ["base", *results["methods"]]:
        scores = results["scores"].get(method)
        if not scores:
            continue
        row = {"method": METHOD_LABELS.get(method, method)}
        count = round(sum(params[method]) / len(params[method])) if method in params else 0
        row["trainable params"] = count
        if total_params:
            row["% of model"] = round(100.0 * count / total_params, 2)
        row["mean Rouge-L"] = round(evaluation.mean_score(scores), 2)
        for task in results["tasks"]:
            row[task] = round(scores[task], 1)
        rows.append(row)
    return rows


DEMO_HELD_OUT = ("sort_descending", "count_animals", "fruit_to_colour")
# The demo's merged section (Table-1-like): Eq. 4 for sparse experts, plain averaging for
# the dense ones, and two baselines for every kind (default hyper-parameters).
DEMO_MERGES = {"sparse": ("overlap_average", "task_arithmetic", "ties"),
               "block": ("overlap_average", "task_arithmetic", "ties"),
               "lora": ("average", "task_arithmetic", "ties"),
               "full": ("average", "task_arithmetic", "ties")}


def merged_section(base_model, tokenizer, held_in: dict, held_out: dict, experts_dir, methods, *,
                   merges=None, max_new_tokens: int = 16, max_length: int = 48, progress: bool = False) -> dict:
    """Merge each method's experts in ``experts_dir`` and score held-in / held-out Rouge-L.

    ``held_in``: the tasks the experts were trained on; ``held_out``: unseen tasks.
    Returns ``{"rows": [...], "table": markdown, "scores": {...}}``.
    """
    from sparse_engine.experiments.reports import evaluate_held
    from sparse_engine.merging import apply_merged, load_expert, merge_experts

    gen = {"max_new_tokens": max_new_tokens, "max_length": max_length, "batch_size": 100}
    base = evaluate_held(base_model, tokenizer, held_in, held_out, **gen)
    rows = [{"experts": METHOD_LABELS["base"], "merging": "-", "held-in": round(base["held_in_mean"], 2),
             "held-out": round(base["held_out_mean"], 2) if held_out else None}]
    scores = {"base": base}
    for method in methods:
        experts = [load_expert(Path(experts_dir) / f"{t}-{method}.safetensors", name=t) for t in held_in]
        for merge in (merges or DEMO_MERGES)[method]:
            merged = merge_experts(experts, merge)
            model = copy.deepcopy(base_model)
            apply_merged(model, merged)
            res = evaluate_held(model, tokenizer, held_in, held_out, **gen)
            del model
            scores[f"{method}/{merge}"] = res
            rows.append({"experts": METHOD_LABELS.get(method, method), "merging": MERGE_LABELS.get(merge, merge),
                         "held-in": round(res["held_in_mean"], 2),
                         "held-out": round(res["held_out_mean"], 2) if held_out else None})
    return {"rows": rows, "table": evaluation.markdown_table(rows, list(rows[0].keys())), "scores": scores}


def run_demo(*, tasks=DEMO_TASKS, n_train: int = 800, n_test: int = 100, epochs: int = 5,
             batch_size: int = 16, update_interval: int = 20, methods=METHODS, out_dir="runs/demo",
             cache_dir=None, seed: int = 0, progress: bool = True, base_spec=None,
             held_out=DEMO_HELD_OUT, merge: bool = True) -> dict:
    """The paper's single-task comparison on the built-in suite, end to end on a CPU.

    Base model (built and cached on first use), then one expert per (task, method),
    then a Rouge-L table. ``update_interval`` is Algorithm 1's 100 steps scaled to the
    demo's ~50 steps per epoch, so the mask is re-selected twice in epoch 1.

    ``merge``: then a Table-1-like section: each method's experts merged (Eq. 4 /
    averaging, task arithmetic, TIES) and scored on the demo's tasks (held-in) and on
    ``held_out`` built-in tasks no expert saw.
    """
    from sparse_engine.builtin import load_builtin_base

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_model, tokenizer = load_builtin_base(base_spec, cache_dir=cache_dir, progress=progress)
    suite = {t: data.builtin_task_data(t, n_train=n_train, n_validation=0, n_test=n_test, seed=seed) for t in tasks}
    spec = ExpertSpec(
        adapter=SparseAdapterConfig(keep_ratio=0.1, update_interval=update_interval, seed=seed),
        training=TrainingConfig(epochs=epochs, batch_size=batch_size, seed=seed, progress=progress),
        max_length=48,
    )
    results = run_experts(base_model, tokenizer, suite, methods, spec=spec, out_dir=out / "adapters",
                          progress=progress)
    total = sum(p.numel() for p in base_model.parameters())
    rows = summary_rows(results, total)
    columns = list(rows[0].keys())
    table = evaluation.markdown_table(rows, columns)
    if merge:
        held_out_suite = {t: data.builtin_task_data(t, n_train=0, n_validation=0, n_test=n_test, seed=seed)
                          for t in held_out}
        merged_start = time.perf_counter()
        section = merged_section(base_model, tokenizer, suite, held_out_suite, out / "adapters", methods,
                                 max_new_tokens=16, max_length=48)
        results["merged_rows"] = section["rows"]
        results["merged_scores"] = section["scores"]
        results["merged_seconds"] = round(time.perf_counter() - merged_start, 1)
        table += (f"\n\nMerged experts ({len(suite)} held-in tasks above, {len(held_out)} held-out: "
                  f"{', '.join(held_out)}), mean Rouge-L:\n\n" + section["table"])
    results.update({
        "rows": rows,
        "table": table,
        "settings": {"n_train": n_train, "n_test": n_test, "epochs": epochs, "batch_size": batch_size,
                     "update_interval": update_interval, "seed": seed, "base_params": total,
                     "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - start, 1),
    })
    evaluation.write_results_json(out / "results.json", results)
    (out / "results.md").write_text(table + "\n")
    return results
