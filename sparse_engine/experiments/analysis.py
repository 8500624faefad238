"""The paper's merging experiments on the built-in suite: Table 1, Fig. 6, Fig. 5, Table 3, Table 4.

Everything runs from one :class:`PaperSetup` (sizes, seeds, output folder) through a
:class:`Workspace`, which

* loads the built-in tiny Phi-3 (or builds and caches it),
* trains each (task, kind) expert once and keeps it in an expert library under
  ``<out>/experts-<hash of the training settings>/`` (adapter files for sparse / block
  experts, expert files with LoRA factors or full fine-tune task vectors for the others,
  and ``index.json`` with each expert's training record and its own-task Rouge-L), so
  every analysis reuses the same experts and a stopped run resumes where it stopped,
* trains the multitask baseline (full fine-tuning on all held-in tasks together), and
* evaluates a merge by adding it to a copy of the base weights and scoring held-in and
  held-out tasks with Rouge-L (``sparse_engine.evaluation``).

Each ``run_*`` function writes ``<name>.json`` and ``<name>.md`` (and ``<name>.png``
for the figures) under ``<out>`` and returns its payload. ``sparse-engine reproduce``
is the command line for them. The paper's own numbers are kept here
(``PAPER_TABLE1`` …) so every table prints them beside ours.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from sparse_engine import data, evaluation
from sparse_engine.experiments import results
from sparse_engine.experiments.reports import evaluate_held, write_report
from sparse_engine.merging import (
    Expert,
    MergeResult,
    apply_merged,
    load_expert,
    mask_result,
    merge_experts,
)
from sparse_engine.experiments.experts import METHODS
from sparse_engine.experiments.labels import MERGE_LABELS, METHOD_LABELS
from sparse_engine.experiments.ranks import Ranks

KINDS = METHODS  # the expert kinds are the training methods
# The merges of Table 1, per expert kind: (method, hyper-parameters). Sparse experts are
# averaged with Eq. 4 (the paper's choice); plain uniform averaging is reported too.
TABLE1_METHODS = {
    "sparse": [("overlap_average", {}), ("average", {}), ("task_arithmetic", {}), ("ties", {}),
               ("dare_ties", {}), ("breadcrumbs", {})],
    "block": [("overlap_average", {}), ("average", {}), ("task_arithmetic", {}), ("ties", {}),
              ("dare_ties", {}), ("breadcrumbs", {})],
    "lora": [("average", {}), ("task_arithmetic", {}), ("ties", {}), ("dare_ties", {}), ("breadcrumbs", {})],
    "full": [("average", {}), ("task_arithmetic", {}), ("ties", {}), ("dare_ties", {}), ("breadcrumbs", {})],
}
FIG5_KINDS = ("sparse",)
FIG6_PAIRS = (("sparse", "overlap_average"), ("block", "overlap_average"), ("lora", "average"),
              ("full", "average"), ("full", "task_arithmetic"), ("full", "ties"), ("full", "breadcrumbs"))

# The paper's numbers (Phi-3-mini, 20 FLAN held-in / 10 held-out tasks), for comparison.
PAPER_TABLE1 = {
    ("full", "average"): (45.33, 38.98),
    ("full", "task_arithmetic"): (39.40, 25.31),
    ("full", "ties"): (50.21, 46.16),
    ("full", "breadcrumbs"): (39.44, 25.33),
    ("lora", "average"): (45.96, 44.01),
    ("sparse", "overlap_average"): (51.44, 43.09),
    ("block", "overlap_average"): (50.37, 43.61),
    ("multitask", None): (77.15, 54.00),
}
PAPER_TRAINABLE = {"full": "100%", "lora": "1.54%", "sparse": "2.37%", "block": "2.37%", "multitask": "100%"}
PAPER_TABLE3 = {"sparse": (51.44, 43.03, "32"), "sparse_ld": (48.45, 41.29, "20.02 ± 2.08")}
PAPER_TABLE4 = {("st", 1): (69.70, 50.96), ("st", 5): (76.45, None), ("fft", 1): (73.90, 43.04),
                ("fft", 5): (76.72, None), ("multitask", None): (77.15, 54.00)}
PAPER_FIG5 = {"masked_drop_pct": 20.61, "additional_drop_pct": 13.05}


# ============================================================================ evaluation
# ================================================================================ setup
@dataclass
class PaperSetup:
    """Sizes and seeds of the paper's experiments on the built-in suite.

    Defaults are the full Table-1 run (20 held-in and 10 held-out tasks, 800 training
    and 100 test examples per task, 5 epochs, keep ratio 0.1, mask updates every 20 steps
    — the paper's 100 scaled to ~50 steps per epoch).
    """

    out_dir: str = "runs/paper"
    held_in: tuple[str, ...] = data.HELD_IN
    held_out: tuple[str, ...] = data.HELD_OUT
    kinds: tuple[str, ...] = KINDS
    n_train: int = 800
    n_test: int = 100
    epochs: int = 5
    batch_size: int = 16
    update_interval: int = 20
    keep_ratio: float = 0.1
    max_length: int = 48
    max_new_tokens: int = 16
    eval_batch_size: int = 100
    multitask_epochs: int = 5
    seed: int = 0
    learning_rates: dict = field(default_factory=dict)
    cache_dir: str | None = None
    base_spec: object = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.held_in, self.held_out, self.kinds = tuple(self.held_in), tuple(self.held_out), tuple(self.kinds)
        known = set(data.list_builtin_tasks())
        for group, names in (("held_in", self.held_in), ("held_out", self.held_out)):
            bad = [t for t in names if t not in known]
            if bad:
                raise ValueError(f"{group}: unknown built-in task(s) {bad}; see `sparse-engine tasks`")
        if not self.held_in:
            raise ValueError("held_in: at least one task is needed")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ValueError(f"kinds: unknown expert kind(s) {bad}; choose from {KINDS}")
        for name in ("n_train", "n_test", "epochs", "batch_size", "update_interval", "max_length",
                     "max_new_tokens", "eval_batch_size", "multitask_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def library_key(self) -> str:
        """Hash of everything that determines the trained experts (not the evaluation)."""
        from sparse_engine.experiments.experts import DEFAULT_LEARNING_RATES

        base = self.base_spec.key() if self.base_spec is not None else "default"
        blob = {"n_train": self.n_train, "n_test": self.n_test, "epochs": self.epochs, "batch_size": self.batch_size,
                "update_interval": self.update_interval, "keep_ratio": self.keep_ratio,
                "max_length": self.max_length, "seed": self.seed, "base": base,
                "lr": dict(DEFAULT_LEARNING_RATES, **self.learning_rates), "multitask_epochs": self.multitask_epochs}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]

    def to_dict(self) -> dict:
        return asdict(self)


class Workspace:
    """Base model, task data, expert library and evaluation for the paper's analyses.

    Its methods work in this process alone (they train with ``process_group=None``, even under
    torchrun), except :meth:`train_in_parallel`, which splits experts across ranks. Every
    change to ``index.json`` is merged into the file under its lock
    (:func:`sparse_engine.experiments.results.update_json`), so processes filling one library at the same
    time never lose each other's entries.

    ``ranks``: under torchrun, rank 0 builds a missing built-in base first, then the others
    load it.
    """

    def __init__(self, setup: PaperSetup, ranks: Ranks | None = None):
        from sparse_engine.builtin import load_builtin_base

        ranks = ranks or Ranks()
        self.setup = setup
        self.out = Path(setup.out_dir)
        self.library = self.out / f"experts-{setup.library_key()}"
        self.library.mkdir(parents=True, exist_ok=True)
        self._t0 = time.perf_counter()
        self._prefix = ranks.prefix()
        self.base, self.tokenizer = ranks.main_first(
            lambda: load_builtin_base(setup.base_spec, cache_dir=setup.cache_dir, progress=setup.progress))
        self.base.eval()
        self.total_params = sum(p.numel() for p in self.base.parameters())
        self._tasks: dict[str, data.TaskData] = {}
        self._index_path = self.library / "index.json"
        self._reload_index()

    # ------------------------------------------------------------------ helpers
    def log(self, message: str) -> None:
        if self.setup.progress:
            print(f"{self._prefix}[{time.perf_counter() - self._t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    def _reload_index(self) -> None:
        """Read ``index.json`` again: it holds what other processes recorded since."""
        self.index = results.read_json(self._index_path) or {}
        self.index.setdefault("settings", self.setup.to_dict() | {"out_dir": None})
        self.index.setdefault("experts", {})
        self.index.setdefault("scores", {})

    def _record(self, section: str, key: str, value) -> None:
        """Set ``index[section][key]``, merged into the file under its lock (a newer entry for the
        same key replaces the older; every other entry, whoever wrote it, is kept)."""
        settings = self.index["settings"]

        def merge(old):
            index = old or {"settings": settings}
            index.setdefault(section, {})[key] = value
            return index

        self.index = results.update_json(self._index_path, merge)
        for name in ("experts", "scores"):
            self.index.setdefault(name, {})

    def task(self, name: str) -> data.TaskData:
        if name not in self._tasks:
            self._tasks[name] = data.builtin_task_data(name, n_train=self.setup.n_train, n_validation=0,
                                                       n_test=self.setup.n_test, seed=self.setup.seed)
        return self._tasks[name]

    def tasks(self, names) -> dict[str, data.TaskData]:
        return {n: self.task(n) for n in names}

    @property
    def gen_kwargs(self) -> dict:
        return {"max_new_tokens": self.setup.max_new_tokens, "max_length": self.setup.max_length,
                "batch_size": self.setup.eval_batch_size}

    def _spec(self, method: str, *, layer_drop: bool = False, epochs: int | None = None):
        from sparse_engine.config import SparseAdapterConfig
        from sparse_engine.experiments.experts import DEFAULT_LEARNING_RATES, ExpertSpec
        from sparse_engine.training import TrainingConfig

        rates = dict(DEFAULT_LEARNING_RATES, **self.setup.learning_rates)
        return ExpertSpec(
            method=method,
            adapter=SparseAdapterConfig(keep_ratio=self.setup.keep_ratio, update_interval=self.setup.update_interval,
                                        layer_drop=layer_drop, seed=self.setup.seed),
            training=TrainingConfig(epochs=epochs or self.setup.epochs, batch_size=self.setup.batch_size,
                                    learning_rate=rates[method], seed=self.setup.seed, progress=False),
            max_length=self.setup.max_length,
        )

    # ------------------------------------------------------------------ experts
    def expert_key(self, kind: str, task: str) -> str:
        return f"{task}-{kind}"

    def _has(self, key: str, *, scored: bool = False) -> bool:
        info = self.index["experts"].get(key)
        return info is not None and (self.library / info["file"]).exists() and (not scored or "scores" in info)

    def _train_expert(self, kind: str, name: str, rank: int = 0) -> dict:
        """Train, score on its own task and record the ``kind`` expert of task ``name``."""
        from sparse_engine.experiments.experts import train_task_expert

        method = "sparse" if kind == "sparse_ld" else kind
        folder = self.library / ("layer_drop" if kind == "sparse_ld" else "")
        self.log(f"training {kind} expert on {name}")
        spec = self._spec(method, layer_drop=kind == "sparse_ld")
        model, info = train_task_expert(self.base, self.tokenizer, self.task(name), spec, folder,
                                        process_group=None)
        info["rouge_l"] = evaluation.evaluate_tasks(model, self.tokenizer, {name: self.task(name)},
                                                    **self.gen_kwargs)[name]
        info["kind"] = kind
        info["file"] = os.path.relpath(info["expert_file"], self.library)
        info["ranks"] = [rank]
        del model
        self._record("experts", self.expert_key(kind, name), info)
        return info

    def ensure_experts(self, kind: str, tasks: Sequence[str]) -> dict[str, Expert]:
        """The ``kind`` expert of every task (trained now, in this process, if not in the library yet).

        ``kind``: sparse, block, lora, full, or ``sparse_ld`` (element-sparse with layer drop).
        """
        experts = {}
        for name in tasks:
            key = self.expert_key(kind, name)
            if not self._has(key):
                self._train_expert(kind, name)
            experts[name] = load_expert(self.library / self.index["experts"][key]["file"], name=name)
        return experts

    def train_in_parallel(self, jobs: Sequence[tuple[str, str | None]], ranks: Ranks) -> None:
        """Train the missing experts of ``jobs`` split across ``ranks`` (round-robin), each rank
        alone; when it returns, every rank's index holds all of them.

        ``jobs``: (kind, task) pairs, and (``MULTITASK``, None) for the multitask baseline. Every
        rank must call it with the same jobs; ``--out`` must be on a filesystem every rank sees."""
        def missing():
            self._reload_index()
            return [job for job in jobs if not self._has(self._job_key(job), scored=job[0] == MULTITASK)]

        todo = ranks.gather(missing)[0]  # rank 0's view, so that every rank splits the same list

        def train_mine():
            for kind, name in ranks.mine(todo):
                if kind == MULTITASK:
                    self._train_multitask(ranks.rank)
                else:
                    self._train_expert(kind, name, ranks.rank)

        ranks.run(train_mine)

        def check():
            self._reload_index()
            lost = [self._job_key(job) for job in todo if not self._has(self._job_key(job))]
            if lost:
                raise OSError(f"expert(s) {lost} trained by another rank are not in {self._index_path} or their "
                              "files are missing: under torchrun on several machines --out must be on a "
                              "filesystem every rank sees")

        ranks.run(check)

    def _job_key(self, job: tuple[str, str | None]) -> str:
        kind, name = job
        return self._multitask_key() if kind == MULTITASK else self.expert_key(kind, name)

    def expert_info(self, kind: str, task: str) -> dict:
        return self.index["experts"][self.expert_key(kind, task)]

    def trainable_pct(self, kind: str, tasks: Sequence[str]) -> float:
        counts = [self.expert_info(kind, t)["trainable_params"] for t in tasks]
        return 100.0 * (sum(counts) / len(counts)) / self.total_params

    def _multitask_key(self) -> str:
        key = f"multitask-{'+'.join(self.setup.held_in)}"
        return "multitask-" + hashlib.sha256(key.encode()).hexdigest()[:8]

    def _train_multitask(self, rank: int = 0) -> dict:
        from sparse_engine.experiments.experts import train_task_expert

        key = self._multitask_key()
        self.log(f"training the multitask baseline on {len(self.setup.held_in)} tasks")
        examples = [ex for t in self.setup.held_in for ex in self.task(t).train]
        task = data.TaskData(key, train=examples)
        model, info = train_task_expert(self.base, self.tokenizer, task, self._spec(
            "full", epochs=self.setup.multitask_epochs), self.library, process_group=None)
        self.log("evaluating the multitask baseline")
        info["scores"] = evaluate_held(model, self.tokenizer, self.tasks(self.setup.held_in),
                                       self.tasks(self.setup.held_out), **self.gen_kwargs)
        info["file"] = os.path.relpath(info["expert_file"], self.library)
        info["ranks"] = [rank]
        del model
        self._record("experts", key, info)
        return info

    def ensure_multitask(self) -> dict:
        """The multitask baseline (full fine-tuning on all held-in tasks at once): its scores."""
        key = self._multitask_key()
        if not self._has(key, scored=True):
            self._train_multitask()
        return self.index["experts"][key]

    # ----------------------------------------------------------------- evaluate
    def model_with(self, merged: MergeResult | Expert | None):
        model = copy.deepcopy(self.base)
        if merged is not None:
            apply_merged(model, merged)
        return model

    def evaluate(self, merged: MergeResult | Expert | None, held_in: Sequence[str] | None = None,
                 held_out: Sequence[str] | None = None) -> dict:
        """Held-in / held-out Rouge-L of base + ``merged`` (the base alone for ``None``)."""
        held_in = self.setup.held_in if held_in is None else held_in
        held_out = self.setup.held_out if held_out is None else held_out
        model = self.model_with(merged)
        return evaluate_held(model, self.tokenizer, self.tasks(held_in), self.tasks(held_out), **self.gen_kwargs)

    def routed_scores(self, experts: Mapping[str, Expert], held_in: Sequence[str] | None = None) -> dict:
        """Held-in Rouge-L with every request served by its own task's expert (no merging):
        the experts registered in one :class:`~sparse_engine.serving.AdapterLibrary` on a copy
        of the base, mixed batches. Held-out tasks have no expert, so there is no held-out score."""
        from sparse_engine.serving import AdapterLibrary, evaluate_routed

        held_in = self.setup.held_in if held_in is None else held_in
        library = AdapterLibrary(copy.deepcopy(self.base))
        try:
            for task in held_in:
                layers = {name.removesuffix(".weight"): d for name, d in experts[task].layers.items()}
                library.register(task, layers, check_base=False)
            scores = evaluate_routed(library, self.tokenizer, self.tasks(held_in), **self.gen_kwargs)
        finally:
            library.uninstall()
        return {"held_in": scores, "held_in_mean": evaluation.mean_score(scores)}

    def base_scores(self) -> dict:
        key = "base:" + hashlib.sha256(json.dumps([self.setup.held_in, self.setup.held_out, self.setup.n_test,
                                                   self.gen_kwargs]).encode()).hexdigest()[:8]
        if key not in self.index["scores"]:
            self.log("evaluating the base model")
            self._record("scores", key, self.evaluate(None))
        return self.index["scores"][key]


def _r(x):
    return None if x is None else round(float(x), 2)


def _settings_note(ws: Workspace, seconds: float) -> str:
    s = ws.setup
    return (f"Built-in suite: {len(s.held_in)} held-in, {len(s.held_out)} held-out tasks; {s.n_train} training and "
            f"{s.n_test} test examples per task; {s.epochs} epochs per expert; keep ratio {s.keep_ratio}; "
            f"tiny Phi-3 base ({ws.total_params:,} parameters); seed {s.seed}; {seconds:.0f} s "
            f"on {torch.get_num_threads()} CPU threads.")


# ============================================================================== Table 1
ROUTABLE_KINDS = ("sparse", "block")  # what sparse_engine.serving.AdapterLibrary serves

def run_table1(setup: PaperSetup, workspace: Workspace | None = None, methods: dict | None = None) -> dict:
    """Table 1: the held-in experts merged with every method, per expert kind, + multitask."""
    start = time.perf_counter()
    ws = workspace or Workspace(setup)
    methods = methods or TABLE1_METHODS
    base = ws.base_scores()
    rows = [{"method": "Base model", "merging": "-", "% trainable": "-", "held-in": _r(base["held_in_mean"]),
             "held-out": _r(base["held_out_mean"]), "paper held-in": None, "paper held-out": None}]
    details = {"base": base, "merges": {}, "individual": {}}
    for kind in setup.kinds:
        experts = ws.ensure_experts(kind, setup.held_in)
        individual = {t: ws.expert_info(kind, t)["rouge_l"] for t in setup.held_in}
        details["individual"][kind] = individual
        pct = ws.trainable_pct(kind, setup.held_in)
        for method, params in methods.get(kind, []):
            ws.log(f"table1: merging {len(experts)} {kind} experts with {method}")
            merged = merge_experts(list(experts.values()), method, **params)
            scores = ws.evaluate(merged)
            details["merges"][f"{kind}/{method}"] = {"params": merged.params, "stats": merged.stats, **scores}
            paper = PAPER_TABLE1.get((kind, method), (None, None))
            rows.append({"method": METHOD_LABELS[kind], "merging": MERGE_LABELS[method], "% trainable": f"{pct:.2f}%",
                         "held-in": _r(scores["held_in_mean"]), "held-out": _r(scores["held_out_mean"]),
                         "paper held-in": paper[0], "paper held-out": paper[1]})
        if kind in ROUTABLE_KINDS:  # the alternative to merging: each request to its own expert
            ws.log(f"table1: routed evaluation of the {len(experts)} {kind} experts (no merge)")
            routed = ws.routed_scores(experts)
            details["routed"] = {**details.get("routed", {}), kind: routed}
            rows.append({"method": METHOD_LABELS[kind], "merging": "routed, no merge", "% trainable": f"{pct:.2f}%",
                         "held-in": _r(routed["held_in_mean"]), "held-out": None,
                         "paper held-in": None, "paper held-out": None})
    mt = ws.ensure_multitask()
    details["multitask"] = mt["scores"]
    paper = PAPER_TABLE1[("multitask", None)]
    rows.append({"method": "Multitask", "merging": "-", "% trainable": "100%",
                 "held-in": _r(mt["scores"]["held_in_mean"]), "held-out": _r(mt["scores"]["held_out_mean"]),
                 "paper held-in": paper[0], "paper held-out": paper[1]})
    individual_rows = [{"experts": METHOD_LABELS[k], "mean own-task Rouge-L": _r(evaluation.mean_score(v))}
                       for k, v in details["individual"].items()]
    seconds = time.perf_counter() - start
    payload = {"table": "table1", "setup": setup.to_dict(), "details": details, "individual_rows": individual_rows,
               "seconds": round(seconds, 1)}
    notes = [_settings_note(ws, seconds), "",
             "Individual experts (each on its own task, no merging): " + ", ".join(
                 f"{r['experts']} {r['mean own-task Rouge-L']:.2f}" for r in individual_rows),
             "", "Hyper-parameters: " + "; ".join(
                 f"{k}: {v['params']}" for k, v in details["merges"].items() if v["params"])]
    write_report(setup.out_dir, "table1", payload, rows, list(rows[0].keys()),
                 title=f"Table 1: merging {len(setup.held_in)} experts (mean Rouge-L)", notes=notes)
    ws.log(f"table1 done in {seconds:.0f} s -> {Path(setup.out_dir) / 'table1.md'}")
    return payload


# ================================================================================ Fig. 6
def run_fig6(setup: PaperSetup, workspace: Workspace | None = None, ns: Sequence[int] = (2, 5, 10, 20),
             trials: int = 10, pairs: Sequence[tuple[str, str]] = FIG6_PAIRS) -> dict:
    """Fig. 6: merge N random held-in experts (same subsets for every method), score their tasks."""
    start = time.perf_counter()
    ws = workspace or Workspace(setup)
    ns = sorted({int(n) for n in ns if 1 <= int(n) <= len(setup.held_in)})
    if not ns:
        raise ValueError(f"fig6: no N in [1, {len(setup.held_in)}] (the number of held-in tasks)")
    if trials < 1:
        raise ValueError(f"fig6: trials must be >= 1, got {trials}")
    pairs = [p for p in pairs if p[0] in setup.kinds]
    rng = random.Random(setup.seed)
    subsets = {n: [tuple(sorted(rng.sample(list(setup.held_in), n))) for _ in range(trials)] for n in ns}
    results: dict[str, dict[int, list[float]]] = {}
    cache: dict[tuple, float] = {}
    for kind, method in pairs:
        experts = ws.ensure_experts(kind, setup.held_in)
        label = f"{METHOD_LABELS[kind]} / {MERGE_LABELS[method]}"
        results[label] = {}
        for n in ns:
            ws.log(f"fig6: {label}, N={n}")
            scores = []
            for subset in subsets[n]:
                key = (kind, method, subset)
                if key not in cache:
                    merged = merge_experts([experts[t] for t in subset], method)
                    cache[key] = ws.evaluate(merged, held_in=subset, held_out=())["held_in_mean"]
                scores.append(cache[key])
            results[label][n] = scores
    rows = []
    for label, by_n in results.items():
        row = {"experts / merging": label}
        for n in ns:
            vals = by_n[n]
            sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            row[f"N={n}"] = f"{statistics.fmean(vals):.2f} ± {sd:.2f}"
        rows.append(row)
    png = Path(setup.out_dir) / "fig6.png"
    _plot_fig6(results, ns, png)
    seconds = time.perf_counter() - start
    payload = {"figure": "fig6", "setup": setup.to_dict(), "ns": ns, "trials": trials,
               "subsets": {str(n): [list(s) for s in subsets[n]] for n in ns},
               "scores": {label: {str(n): v for n, v in by_n.items()} for label, by_n in results.items()},
               "png": str(png), "seconds": round(seconds, 1)}
    write_report(setup.out_dir, "fig6", payload, rows, list(rows[0].keys()),
                 title="Fig. 6: held-in Rouge-L of N merged experts (mean ± std over trials)",
                 notes=[_settings_note(ws, seconds), f"{trials} trials per N; the same random subsets for every "
                        "method; a subset drawn twice is evaluated once."])
    return payload


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_fig6(results, ns, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, by_n in results.items():
        means = [statistics.fmean(by_n[n]) for n in ns]
        sds = [statistics.pstdev(by_n[n]) if len(by_n[n]) > 1 else 0.0 for n in ns]
        line, = ax.plot(ns, means, marker="o", label=label)
        ax.fill_between(ns, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)],
                        color=line.get_color(), alpha=0.12)
        for n in ns:
            ax.scatter([n] * len(by_n[n]), by_n[n], color=line.get_color(), s=6, alpha=0.4)
    ax.set_xlabel("number of merged experts N")
    ax.set_ylabel("mean Rouge-L on the merged tasks")
    ax.set_xticks(ns)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ================================================================================ Fig. 5
def run_fig5(setup: PaperSetup, workspace: Workspace | None = None, kinds: Sequence[str] = FIG5_KINDS) -> dict:
    """Fig. 5: interference — single-task vs masked-only merged (M_i ⊙ ΔW_m) vs fully merged."""
    start = time.perf_counter()
    ws = workspace or Workspace(setup)
    rows, details = [], {}
    bars = {}
    for kind in kinds:
        experts = ws.ensure_experts(kind, setup.held_in)
        merged = merge_experts(list(experts.values()), "overlap_average")
        ws.log(f"fig5: {kind}: fully merged")
        full = ws.evaluate(merged, held_out=())["held_in"]
        single, masked = {}, {}
        for t in setup.held_in:
            single[t] = ws.expert_info(kind, t)["rouge_l"]
            masked[t] = ws.evaluate(mask_result(merged, experts[t]), held_in=[t], held_out=())["held_in"][t]
        s, m, f = (evaluation.mean_score(x) for x in (single, masked, full))
        details[kind] = {"single": single, "masked": masked, "merged": full}
        bars[METHOD_LABELS[kind]] = (s, m, f)
        rows.append({"experts": METHOD_LABELS[kind], "single task": _r(s), "merged, masked only": _r(m),
                     "merged": _r(f), "masked drop %": _r(100 * (s - m) / s if s else None),
                     "additional drop %": _r(100 * (m - f) / s if s else None),
                     "paper masked drop %": PAPER_FIG5["masked_drop_pct"] if kind == "sparse" else None,
                     "paper additional drop %": PAPER_FIG5["additional_drop_pct"] if kind == "sparse" else None})
    png = Path(setup.out_dir) / "fig5.png"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(bars))
    names = ["single task", "masked only\n(M_i ⊙ ΔW_m)", "merged\n(ΔW_m)"]
    for j, (label, vals) in enumerate(bars.items()):
        xs = [i + j * width for i in range(3)]
        ax.bar(xs, vals, width=width, label=label)
        for x, v in zip(xs, vals):
            ax.text(x, v + 0.5, f"{v:.1f}", ha="center", fontsize=7)
    top = max([v for vals in bars.values() for v in vals] + [1.0])
    ax.set_ylim(0, top * 1.15 + 1)
    ax.set_xticks([i + width * (len(bars) - 1) / 2 for i in range(3)])
    ax.set_xticklabels(names)
    ax.set_ylabel(f"mean Rouge-L, {len(setup.held_in)} held-in tasks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    seconds = time.perf_counter() - start
    payload = {"figure": "fig5", "setup": setup.to_dict(), "details": details, "png": str(png),
               "seconds": round(seconds, 1)}
    write_report(setup.out_dir, "fig5", payload, rows, list(rows[0].keys()),
                 title="Fig. 5: weight interference when merging sparse adapters (Eq. 4)",
                 notes=[_settings_note(ws, seconds), "Drops are relative to the single-task score "
                        "(the paper: 20.61% from masked interference, 13.05% more outside the masks)."])
    return payload


# ============================================================================== Table 3
def run_table3(setup: PaperSetup, workspace: Workspace | None = None) -> dict:
    """Table 3: sparse adapters with and without layer drop (Eq. 5-6), merged with Eq. 4."""
    start = time.perf_counter()
    ws = workspace or Workspace(setup)
    n_layers = len([n for n, _ in ws.base.named_modules() if n.endswith("qkv_proj")])
    rows, details = [], {}
    for kind in ("sparse", "sparse_ld"):
        experts = ws.ensure_experts(kind, setup.held_in)
        ws.log(f"table3: merging {kind} experts")
        scores = ws.evaluate(merge_experts(list(experts.values()), "overlap_average"))
        active = [ws.expert_info(kind, t).get("active_layers") or n_layers for t in setup.held_in]
        sd = statistics.pstdev(active) if len(active) > 1 else 0.0
        details[kind] = {**scores, "active_layers": active}
        paper = PAPER_TABLE3[kind]
        rows.append({"method": METHOD_LABELS[kind], "held-in": _r(scores["held_in_mean"]),
                     "held-out": _r(scores["held_out_mean"]),
                     "active layers": f"{statistics.fmean(active):.2f} ± {sd:.2f} of {n_layers}",
                     "individual": _r(evaluation.mean_score({t: ws.expert_info(kind, t)["rouge_l"]
                                                             for t in setup.held_in})),
                     "paper held-in": paper[0], "paper held-out": paper[1], "paper active layers": f"{paper[2]} of 32"})
    seconds = time.perf_counter() - start
    payload = {"table": "table3", "setup": setup.to_dict(), "details": details, "seconds": round(seconds, 1)}
    write_report(setup.out_dir, "table3", payload, rows, list(rows[0].keys()),
                 title="Table 3: sparse adapters with active-layer drop (merged with Eq. 4)",
                 notes=[_settings_note(ws, seconds)])
    return payload


# ============================================================================== Table 4
def run_table4(setup: PaperSetup, workspace: Workspace | None = None, epochs: Sequence[int] = (1, 5)) -> dict:
    """Table 4: continued multitask training of the merged sparse weights.

    ST: only the merged sparse entries ΔW_m (the union of the masks) train; FFT: the whole
    model W + ΔW_m trains. Both on all held-in tasks together, from the Eq. 4 merge.
    """
    from sparse_engine.config import SparseAdapterConfig
    from sparse_engine.experiments.experts import DEFAULT_LEARNING_RATES
    from sparse_engine.model import adapter_layers, attach
    from sparse_engine.training import TrainingConfig, train_expert

    start = time.perf_counter()
    ws = workspace or Workspace(setup)
    experts = ws.ensure_experts("sparse", setup.held_in)
    merged = merge_experts(list(experts.values()), "overlap_average")
    rates = dict(DEFAULT_LEARNING_RATES, **setup.learning_rates)
    examples = [ex for t in setup.held_in for ex in ws.task(t).train]
    dataset = data.TokenizedDataset(examples, ws.tokenizer, setup.max_length)
    collate = lambda b: data.collate_causal_lm(b, ws.tokenizer.pad_token_id)  # noqa: E731
    rows, details = [], {}
    merged_scores = ws.evaluate(merged)
    rows.append({"training": "Sparse-Merge (no further training)", "held-in": _r(merged_scores["held_in_mean"]),
                 "held-out": _r(merged_scores["held_out_mean"]), "paper held-in": None, "paper held-out": None})
    for variant in ("st", "fft"):
        for n_epochs in epochs:
            ws.log(f"table4: {variant}, {n_epochs} epoch(s) of multitask training")
            model = copy.deepcopy(ws.base)
            if variant == "st":
                cfg = SparseAdapterConfig.from_dict(merged.config)
                attach(model, cfg)
                layers = adapter_layers(model)
                for pname, delta in merged.layers.items():
                    # a copy: load_sparse keeps the tensors it is given, and training updates them
                    layers[pname[: -len(".weight")]].load_sparse(delta.clone())
                lr = rates["sparse"]
            else:
                apply_merged(model, merged)
                for p in model.parameters():
                    p.requires_grad_(True)
                lr = rates["full"]
            config = TrainingConfig(epochs=n_epochs, batch_size=setup.batch_size, learning_rate=lr, seed=setup.seed,
                                    progress=False)
            result = train_expert(model, dataset, config, collate_fn=collate, process_group=None)
            scores = evaluate_held(model, ws.tokenizer, ws.tasks(setup.held_in), ws.tasks(setup.held_out),
                                   **ws.gen_kwargs)
            details[f"{variant}-{n_epochs}"] = {**scores, "steps": result.steps, "seconds": result.seconds,
                                                "trainable_params": result.trainable_params}
            paper = PAPER_TABLE4.get((variant, n_epochs), (None, None))
            label = "ST" if variant == "st" else "FFT"
            rows.append({"training": f"Sparse-Merge + {label} ({n_epochs} epoch{'s' if n_epochs > 1 else ''})",
                         "held-in": _r(scores["held_in_mean"]), "held-out": _r(scores["held_out_mean"]),
                         "paper held-in": paper[0], "paper held-out": paper[1]})
            del model
    mt = ws.ensure_multitask()
    paper = PAPER_TABLE4[("multitask", None)]
    rows.append({"training": f"Multitask ({setup.multitask_epochs} epochs)", "held-in": _r(mt["scores"]["held_in_mean"]),
                 "held-out": _r(mt["scores"]["held_out_mean"]), "paper held-in": paper[0], "paper held-out": paper[1]})
    seconds = time.perf_counter() - start
    payload = {"table": "table4", "setup": setup.to_dict(), "details": details, "merged": merged_scores,
               "seconds": round(seconds, 1)}
    write_report(setup.out_dir, "table4", payload, rows, list(rows[0].keys()),
                 title="Table 4: multitask training continued from the merged sparse weights",
                 notes=[_settings_note(ws, seconds), f"Experts trained {setup.epochs} epochs each (the paper: 4), "
                        "then multitask training on all held-in tasks: ST trains only the merged entries "
                        "(union of masks), FFT the whole model."])
    return payload


RUNNERS = {"table1": run_table1, "fig6": run_fig6, "fig5": run_fig5, "table3": run_table3, "table4": run_table4}
MULTITASK = "multitask"  # the job name of the multitask baseline in train_in_parallel


def experts_needed(names: Sequence[str], setup: PaperSetup, options: Mapping | None = None) -> list[tuple]:
    """The experts the analyses ``names`` use, as :meth:`Workspace.train_in_parallel` jobs:
    (MULTITASK, None) first (the longest job), then (kind, task) pairs. ``options``: the
    runners' keyword arguments, as given to :func:`reproduce`. An expert missed here is not
    an error: the analysis trains it when it asks for it, on rank 0 alone."""
    options = options or {}
    kinds, multitask = [], False
    for name in names:
        if name == "table1":
            kinds += setup.kinds
            multitask = True
        elif name == "fig6":
            kinds += [k for k, _ in (options.get("fig6") or {}).get("pairs", FIG6_PAIRS) if k in setup.kinds]
        elif name == "fig5":
            kinds += (options.get("fig5") or {}).get("kinds", FIG5_KINDS)
        elif name == "table3":
            kinds += ["sparse", "sparse_ld"]
        elif name == "table4":
            kinds.append("sparse")
            multitask = True
    jobs = [(MULTITASK, None)] if multitask else []
    return jobs + [(k, t) for k in dict.fromkeys(kinds) for t in setup.held_in]


def reproduce(what: str, setup: PaperSetup, *, ranks: Ranks | None = None, **kwargs) -> dict:
    """Run one analysis (or ``all``) with a shared workspace; returns {name: payload}.

    ``ranks`` (torchrun, see :mod:`sparse_engine.experiments.ranks`): the experts the analyses need are
    first trained split across the ranks, then rank 0 alone runs the analyses and writes their
    outputs (every expert is in the library by then); the other ranks wait for it, so a failure
    is reported on every rank, and return ``{}``."""
    names = list(RUNNERS) if what == "all" else [what]
    for n in names:
        if n not in RUNNERS:
            raise ValueError(f"unknown analysis {what!r}; choose from {list(RUNNERS) + ['all']}")
    ranks = ranks or Ranks()
    ws = Workspace(setup, ranks)
    if ranks.size > 1:
        ws.train_in_parallel(experts_needed(names, setup, kwargs), ranks)
    return ranks.run(lambda: {n: RUNNERS[n](setup, ws, **(kwargs.get(n) or {})) for n in names}
                     if ranks.is_main else {})
