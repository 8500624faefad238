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
the merged results (:func:`write_train_results`). ``eval``'s ``results.json`` is merged the same
way, by (evaluated model, group, task) (:func:`write_eval_results`), and an entry measured with
other settings is replaced only with ``overwrite``.
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


# -------------------------------------------------------------------- eval's results.json
# ``eval`` adds its scores to ``results.json``: one entry per (evaluated model, group, task) with
# the settings it was measured with. The same entry measured again with the same settings (a
# rerun) replaces it in place; with other settings it is refused unless ``overwrite``.

EVAL_COLUMNS = ["evaluated", "group", "task", "Rouge-L"]


def eval_key(entry: dict) -> tuple[str, str, str]:
    return entry["evaluated"], entry["group"], entry["task"]


def check_kind(path, key: str, command: str, overwrite: bool = False) -> None:
    """Refuse a results file that another command wrote (it has no ``key``): merging into it would mix
    two formats, replacing it would lose it."""
    current = read_json(path)
    if current is not None and key not in current and not overwrite:
        raise ValueError(f"{path} holds results of another command, not `sparse-engine {command}`'s; choose another "
                         "--out (or pass --overwrite to replace the file)")


def eval_conflicts(old: dict | None, entries: list[dict]) -> list[str]:
    """The entries of ``old`` that ``entries`` would replace although measured with other settings."""
    if not old or "entries" not in old:
        return []
    recorded = {eval_key(e): e for e in old["entries"]}
    found = []
    for entry in entries:
        before = recorded.get(eval_key(entry))
        if before is not None and before.get("settings") != entry["settings"]:
            diff = [f"{k}: {before['settings'].get(k)!r}, now {entry['settings'].get(k)!r}"
                    for k in sorted(set(before["settings"]) | set(entry["settings"]))
                    if before["settings"].get(k) != entry["settings"].get(k)]
            found.append(f"{entry['evaluated']} on {entry['task']} ({'; '.join(diff[:3])})")
    return found


def check_eval_results(out_dir, entries: list[dict], overwrite: bool) -> None:
    """Before an evaluation: refuse, unless ``overwrite``, an ``--out`` whose ``results.json`` is
    another command's or holds one of ``entries`` (scores left out) measured with other settings."""
    path = Path(out_dir) / "results.json"
    check_kind(path, "entries", "eval", overwrite)
    if overwrite:
        return
    conflicts = eval_conflicts(read_json(path), entries)
    if conflicts:
        more = f" and {len(conflicts) - 2} more" if len(conflicts) > 2 else ""
        raise ValueError(f"{path} already holds the Rouge-L of {', '.join(conflicts[:2])}{more} measured with other "
                         "settings; pass --overwrite to replace it, or choose another --out")


def merge_eval_results(old: dict | None, entries: list[dict], run: dict, overwrite: bool = False) -> dict:
    """``eval``'s results: ``entries`` added to ``old`` (an entry of the same key replaces the
    older in place); ``means`` recomputed per (evaluated, group); ``runs`` lists every run."""
    conflicts = [] if overwrite else eval_conflicts(old, entries)
    if conflicts:  # written by another process since the check before the evaluation
        raise ValueError(f"results.json now holds the Rouge-L of {conflicts[0]} measured with other settings; "
                         "pass --overwrite to replace it, or choose another --out")
    kept = list(old["entries"]) if old and "entries" in old else []
    fresh = {eval_key(e): e for e in entries}
    merged = [fresh.pop(eval_key(e), e) for e in kept] + [e for e in entries if eval_key(e) in fresh]
    runs = list(old.get("runs", [])) if old and "entries" in old else []
    return {"entries": merged, "means": eval_means(merged), "runs": runs + [run]}


def eval_means(entries: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[float]] = {}
    for e in entries:
        groups.setdefault((e["evaluated"], e["group"]), []).append(e["Rouge-L"])
    return [{"evaluated": ev, "group": g, "task": "mean", "Rouge-L": evaluation.mean_score(dict(enumerate(v))),
             "tasks": len(v)} for (ev, g), v in groups.items()]


def eval_rows(results: dict) -> list[dict]:
    """``results.md``'s rows: every entry, then each (evaluated, group)'s mean."""
    rows = [{c: _round(e[c]) if c == "Rouge-L" else e[c] for c in EVAL_COLUMNS} for e in results["entries"]]
    return rows + [{c: _round(m[c]) if c == "Rouge-L" else m[c] for c in EVAL_COLUMNS} for m in results["means"]]


def write_eval_results(out_dir, entries: list[dict], run: dict, overwrite: bool = False) -> tuple[dict, str]:
    """Merge one ``eval`` run into ``<out_dir>/results.json`` (under its lock) and rewrite
    ``results.md``; returns (merged results, markdown table)."""
    out = Path(out_dir)
    path = out / "results.json"
    with locked(path):
        merged = merge_eval_results(read_json(path), entries, run, overwrite)
        table = evaluation.markdown_table(eval_rows(merged), EVAL_COLUMNS)
        evaluation.write_results_json(path, merged)
        atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(table + "\n", encoding="utf-8"))
    return merged, table


# ------------------------------------------------------------ reports replaced only by a rerun


def check_same_settings(path, settings: dict, recorded, overwrite: bool) -> None:
    """Before a command rewrites the report ``path`` (reproduce's tables, demo's results): refuse,
    unless ``overwrite``, when the report there was written with other ``settings``.
    ``recorded(report)`` picks the comparable settings out of the report on disk. A rerun with the
    same settings recomputes the same report, so it may replace it."""
    report = read_json(path)
    if report is None or overwrite:
        return
    theirs = recorded(report)
    diff = [f"{k}: {theirs.get(k)!r}, now {settings.get(k)!r}" for k in sorted(set(theirs) | set(settings))
            if _plain(theirs.get(k)) != _plain(settings.get(k))]
    if diff:
        raise ValueError(f"{path} was written with other settings ({'; '.join(diff[:3])}); pass --overwrite to "
                         "replace it, or choose another --out")


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value
