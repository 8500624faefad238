"""Result files that several processes write: read-merge-write under a file lock.

Two ``sparse-engine train`` runs sharing one ``--out`` (or the ranks of one run under
torchrun, or the ranks filling ``reproduce``'s expert library) must never lose each other's
entries. Every writer therefore goes through :func:`update_json`: it takes an exclusive
``flock`` on a lock file next to the result file, reads what is there, merges its own entries
in, writes the result atomically (``evaluation.write_results_json``: temp file + rename, so a
reader never sees a partial file) and only then releases the lock.

The merge rule of ``train``'s ``results.json`` (:func:`merge_train_results`): experts are keyed
by (task, method); a newer entry for the same key replaces the older one in place, other
entries are kept, new ones are appended in the order given. ``results.md`` is regenerated from
the merged results (:func:`write_train_results`).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from sparse_engine import evaluation
from sparse_engine._files import atomic_write

LOCK_SUFFIX = ".lock"


def lock_path(path) -> Path:
    """The lock file of ``path``: a hidden file next to it. It is never deleted (deleting a
    lock file lets a waiting writer lock the old inode while a new one locks a new file)."""
    path = Path(path)
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


@contextmanager
def locked(path):
    """Hold an exclusive lock on ``path``'s lock file (blocks until the other writers are done).

    ``flock`` locks belong to the open file, so two threads of one process exclude each other
    too; on Linux NFS they are forwarded to the server as POSIX locks."""
    import fcntl  # POSIX only: imported here so that reading results needs no lock support

    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_json(path) -> dict | None:
    """The JSON object in ``path``, or None when there is no file."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); move it away (the new results are merged into it)") \
            from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; move it away")
    return value


def update_json(path, merge: Callable[[dict | None], dict]) -> dict:
    """Replace the JSON object in ``path`` by ``merge(current or None)``, under the lock; returns it.

    ``merge`` runs while the lock is held: it sees every entry written before and no other
    writer can write between the read and the write."""
    path = Path(path)
    with locked(path):
        value = merge(read_json(path))
        evaluation.write_results_json(path, value)
    return value


# ------------------------------------------------------------------- train's results.json


def expert_key(info: dict) -> tuple[str, str]:
    return info["task"], info["method"]


def _union(old, new) -> list:
    return list(old) + [x for x in new if x not in old]


def merge_train_results(old: dict | None, new: dict) -> dict:
    """``train``'s results: ``new`` (one run's payload) merged into ``old`` (the file's content).

    Experts by (task, method): a newer entry replaces the older in place, the others are kept;
    ``tasks``/``methods`` are the unions in order; ``scores`` merge per method and task (newer
    wins); ``settings``/``seconds`` are the newest run's, and ``runs`` keeps every run's
    settings with the experts it wrote."""
    run = {"settings": new.get("settings"), "seconds": new.get("seconds"), "world_size": new.get("world_size", 1),
           "experts": [list(expert_key(i)) for i in new["experts"]]}
    if old is None:
        return dict(new, runs=[run])
    merged = dict(old)
    merged.update({k: v for k, v in new.items() if k not in ("tasks", "methods", "experts", "scores")})
    merged["tasks"] = _union(old.get("tasks", []), new["tasks"])
    merged["methods"] = _union(old.get("methods", []), new["methods"])
    fresh = {expert_key(i): i for i in new["experts"]}
    experts = [fresh.pop(expert_key(i), i) for i in old.get("experts", [])]
    merged["experts"] = experts + [i for i in new["experts"] if expert_key(i) in fresh]
    scores = {m: dict(s) for m, s in old.get("scores", {}).items()}
    for method, by_task in new.get("scores", {}).items():
        scores.setdefault(method, {}).update(by_task)
    merged["scores"] = scores
    merged["runs"] = list(old.get("runs", [])) + [run]
    return merged


def train_rows(results: dict) -> list[dict]:
    """One row per expert for ``results.md`` (Rouge-L columns where the run evaluated)."""
    base = results.get("scores", {}).get("base", {})
    rows = []
    for info in results["experts"]:
        row = {"task": info["task"], "method": info["method"], "trainable params": info["trainable_params"],
               "steps": info["steps"], "final loss": info["final_loss"]}
        if "ranks" in info:
            row["ranks"] = ",".join(str(r) for r in info["ranks"])
        if info["task"] in base or "rouge_l" in info:
            row["base Rouge-L"] = _round(base.get(info["task"]))
            row["expert Rouge-L"] = _round(info.get("rouge_l"))
        if "adapter_file" in info:
            row["adapter"] = info["adapter_file"]
        rows.append(row)
    return rows


def _round(value):
    return None if value is None else round(value, 2)


def write_train_results(out_dir, results: dict) -> tuple[dict, str]:
    """Merge one ``train`` run into ``<out_dir>/results.json`` and rewrite ``results.md`` from
    the merged content; returns (merged results, markdown table).

    ``results.md`` is written while the lock is still held, so the last writer's table is the
    table of the final ``results.json``."""
    out = Path(out_dir)
    path = out / "results.json"
    with locked(path):
        merged = merge_train_results(read_json(path), results)
        rows = train_rows(merged)
        columns = list(dict.fromkeys(c for row in rows for c in row))
        table = evaluation.markdown_table(rows, columns)
        evaluation.write_results_json(path, merged)
        atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(table + "\n", encoding="utf-8"))
    return merged, table
