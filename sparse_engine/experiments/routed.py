"""Routed-experts evaluation of adapter files on the built-in held-in tasks (``eval --routed``)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from sparse_engine import data
from sparse_engine.serving import AdapterLibrary, evaluate_routed


def run_routed_eval(adapter_dir, *, method: str = "sparse", tasks: Sequence[str] | None = None, n_test: int = 100,
                    seed: int = 0, model=None, tokenizer=None, base_spec=None, cache_dir=None,
                    batch_size: int = 32, max_new_tokens: int = 16, max_length: int = 48, backend: str = "auto",
                    progress: bool = False, suite: Mapping[str, data.TaskData] | None = None,
                    check_base: bool = True) -> dict:
    """Routed-experts evaluation of adapter files ``<task>-<method>.safetensors`` in ``adapter_dir``
    (what ``run_demo`` / ``sparse-engine train`` write) on the built-in held-in tasks, or on the
    test splits of ``suite`` (``{task: TaskData}``, e.g. from ``load_flan``).

    ``tasks`` default: every held-in task (every task of ``suite``) that has a file. ``model``/``tokenizer`` default to the
    built-in base (``base_spec``, ``cache_dir``). Returns ``{"scores": {task: Rouge-L},
    "mean": ..., "adapters": {task: file}, "settings": {...}}``; the model is left unchanged.
    """
    from sparse_engine import evaluation

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {adapter_dir}")
    if tasks is None:
        names = data.HELD_IN if suite is None else list(suite)
        tasks = [t for t in names if (adapter_dir / f"{t}-{method}.safetensors").is_file()]
        if not tasks:
            raise FileNotFoundError(f"no adapter files '<task>-{method}.safetensors' of the "
                                    f"{'held-in' if suite is None else 'data'}'s tasks in {adapter_dir}")
    tasks = list(tasks)
    files = {t: adapter_dir / f"{t}-{method}.safetensors" for t in tasks}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"adapter files not found: {missing[:3]}")
    if model is None:
        from sparse_engine.builtin import load_builtin_base

        model, tokenizer = load_builtin_base(base_spec, cache_dir=cache_dir, progress=progress)
    elif tokenizer is None:
        raise ValueError("give the tokenizer with the model")
    if suite is None:
        suite = {t: data.builtin_task_data(t, n_train=0, n_validation=0, n_test=n_test, seed=seed) for t in tasks}
    else:
        unknown = [t for t in tasks if t not in suite]
        if unknown:
            raise ValueError(f"task(s) {unknown} are not in the data given")
        suite = {t: suite[t] for t in tasks}
    library = AdapterLibrary(model, backend=backend, check_base=check_base)
    try:
        for t, path in files.items():
            library.register(t, path)
        scores = evaluate_routed(library, tokenizer, suite, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 max_length=max_length, progress=progress)
    finally:
        library.uninstall()
    return {
        "scores": scores,
        "mean": evaluation.mean_score(scores),
        "adapters": {t: str(p) for t, p in files.items()},
        "settings": {"method": method, "n_test": n_test, "seed": seed, "batch_size": batch_size,
                     "max_new_tokens": max_new_tokens, "max_length": max_length},
    }
