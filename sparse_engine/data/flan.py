"""FLAN-format datasets: rows of ``source``, ``target``, ``task_name`` and an optional ``split``, from
a hub name or local JSON / JSONL / Parquet files; and writing tasks back in that format."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence


from sparse_engine.data.records import REQUIRED_COLUMNS, SPLITS, Example, TaskData, task_rng

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}


# ===================================================================== FLAN loading
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Suffixes that mark a string as a file name rather than a hub id.
_FILE_LIKE = set(_BUILDERS) | {
    ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".bz2", ".xz", ".zst",
    ".xml", ".xlsx", ".xls", ".pkl", ".pickle", ".pt", ".npy", ".feather", ".yaml", ".yml",
}


def _resolve_files(source) -> list[Path] | None:
    """Local files behind ``source``, or ``None`` when it is a hub dataset name."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("load_flan: `source` is an empty list of files")
        items = [Path(os.path.expanduser(str(s))) for s in source]
    else:
        text = os.fspath(source)
        path = Path(os.path.expanduser(text))
        is_local = (
            isinstance(source, os.PathLike)
            or path.exists()
            or text.startswith((".", "/", "~"))
            or path.suffix.lower() in _FILE_LIKE
        )
        if not is_local:
            return None
        if path.is_dir():
            items = sorted(p for p in path.iterdir() if p.suffix.lower() in _BUILDERS)
            if not items:
                raise ValueError(
                    f"load_flan: directory {str(path)!r} holds no .json, .jsonl or .parquet file"
                )
        else:
            items = [path]
    for p in items:
        if p.suffix.lower() not in _BUILDERS:
            raise ValueError(
                f"load_flan: unsupported file extension {p.suffix or '(none)'!r} for {str(p)!r}; "
                f"use one of {sorted(_BUILDERS)}"
            )
    for p in items:
        if not p.is_file():
            raise FileNotFoundError(f"load_flan: data file not found: {str(p)!r}")
    builders = {_BUILDERS[p.suffix.lower()] for p in items}
    if len(builders) > 1:
        raise ValueError(
            f"load_flan: all files must share one format (JSON/JSONL or Parquet), got {sorted(builders)}"
        )
    for p in items:
        if p.stat().st_size == 0:
            raise ValueError(f"load_flan: data file is empty: {str(p)!r}")
    return items


def _load_dataset(source, cache_dir):
    if hasattr(source, "column_names") and hasattr(source, "select"):
        return source  # an already loaded datasets.Dataset
    import datasets

    files = _resolve_files(source)
    if files is None:
        try:
            return datasets.load_dataset(str(source), split="train", cache_dir=cache_dir)
        except Exception as exc:  # offline, unknown name, no train split: all look alike to a user
            raise ValueError(
                f"load_flan: {str(source)!r} is neither a local data file/folder nor a loadable dataset "
                f"({type(exc).__name__}: {str(exc)[:200]})"
            ) from exc
    builder = _BUILDERS[files[0].suffix.lower()]
    if builder == "json":
        return _read_json_files(files)
    try:
        return datasets.load_dataset(
            builder, data_files=[str(p) for p in files], split="train", cache_dir=cache_dir
        )
    except Exception as exc:  # datasets raises many kinds on malformed / empty content
        raise ValueError(
            f"load_flan: could not read {[str(p) for p in files]} as {builder}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _json_rows(path: Path):
    """(line number, value) of each row of a JSON-lines file, or of a file holding one JSON list."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"load_flan: {path} line {exc.lineno} is not valid JSON: {exc.msg} "
                             f"(column {exc.colno})") from None
        # a list gives no line per row: its position (1-based) names it instead
        return [(f"row {i}", row) for i, row in enumerate(items, 1)] if isinstance(items, list) else \
            [("line 1", items)]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"load_flan: {path} line {number} is not valid JSON: {exc.msg} (column {exc.colno}): "
                             f"{line.strip()[:80]!r}") from None
    return rows


def _read_json_files(files: list[Path]):
    """Local JSON / JSONL files read here rather than by ``datasets``: its reader turns lists,
    numbers and objects into text without a word, and names no line of a malformed row. Every
    ``source`` / ``target`` / ``task_name`` must be a string; a bad row is named by file and line."""
    import datasets

    rows, where = [], []
    for path in files:
        for place, row in _json_rows(path):
            if not isinstance(row, dict):
                raise ValueError(f"load_flan: {path} {place} is a JSON {type(row).__name__}, not an object with "
                                 f"columns {list(REQUIRED_COLUMNS)}")
            rows.append(row)
            where.append(f"{path} {place}")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"load_flan: dataset is missing required column(s) {missing}; found columns {columns}")
    for row, place in zip(rows, where):
        for column in REQUIRED_COLUMNS:
            _check_text(row.get(column), column, place)
    keep = list(REQUIRED_COLUMNS) + (["split"] if "split" in columns else [])
    table = {c: [row.get(c) for row in rows] for c in keep}
    if "split" in table:  # a number would make the column mixed; its value is checked later, by name
        table["split"] = [None if v is None else str(v) for v in table["split"]]
    return datasets.Dataset.from_dict(table)


def _check_text(value, column: str, where: str) -> str:
    if value is None:
        raise ValueError(f"load_flan: {where} has no value in column {column!r}")
    if not isinstance(value, str):
        shown = json.dumps(value, ensure_ascii=False, default=str)
        raise ValueError(f"load_flan: {where}, column {column!r}: a {_json_kind(value)} ({shown[:60]}), not a "
                         "string; convert it to the text the model should read or write (e.g. join a list)")
    return value


def _json_kind(value) -> str:
    return {dict: "JSON object", list: "JSON list", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__)


def _check_columns(ds) -> None:
    """Every ``source`` / ``target`` / ``task_name`` of a Parquet file, hub dataset or Dataset
    is a string; the first bad one is named by its row (1-based, files in order)."""
    for column in REQUIRED_COLUMNS:
        dtype = getattr(ds.features[column], "dtype", None)
        if dtype in ("string", "large_string") and ds.data.column(column).null_count == 0:
            continue
        for i, value in enumerate(ds[column]):
            _check_text(value, column, f"row {i + 1}")


def load_flan(
    source,
    tasks: Sequence[str] | None = None,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_examples_per_task: int | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
) -> dict[str, TaskData]:
    """Load a FLAN-format dataset into ``{task_name: TaskData}``.

    ``source``: a hub dataset name (``datasets.load_dataset(name, split="train")``), a
    local ``.json`` / ``.jsonl`` / ``.parquet`` file, a directory of such files, a list of
    files, or an already loaded ``datasets.Dataset``.

    Columns ``source``, ``target``, ``task_name`` are required. When a ``split`` column is
    present its values (train / validation / test; aliases val, valid, dev accepted) decide
    the splits and the fractions are ignored; otherwise every task is split on its own,
    deterministically from ``seed``: ``round(n*test_fraction)`` test rows,
    ``round(n*val_fraction)`` validation rows, the rest train.

    ``max_examples_per_task`` sub-samples each task (deterministically) before splitting,
    like the paper's 10k-per-task sub-sampling: every split shrinks with it. ``n_train`` /
    ``n_test`` then keep at most that many train / test examples of each task (a deterministic
    sample), the other splits untouched. Tasks come back in the order requested, or sorted by
    name when ``tasks`` is None; every split keeps file order.

    Every ``source``, ``target`` and ``task_name`` must be a string: a list, number or object
    is refused, naming its file and line (JSON lines) or row, never turned into its repr.
    """
    for nm, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (0.0 <= float(f) < 1.0):
            raise ValueError(f"load_flan: {nm} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"load_flan: val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}"
        )
    for nm, cap in (("max_examples_per_task", max_examples_per_task), ("n_train", n_train), ("n_test", n_test)):
        if cap is not None and int(cap) < 1:
            raise ValueError(f"load_flan: {nm} must be >= 1, got {cap}")
    if isinstance(tasks, str):
        tasks = [tasks]

    ds = _load_dataset(source, cache_dir)
    columns = list(ds.column_names)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"load_flan: dataset is missing required column(s) {missing}; found columns {columns}"
        )
    if len(ds) == 0:
        raise ValueError(f"load_flan: dataset {source!r} has no rows")

    _check_columns(ds)
    task_col = list(ds["task_name"])
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(task_col):
        by_task.setdefault(t, []).append(i)
    if tasks is None:
        wanted = sorted(by_task)
    else:
        wanted = list(dict.fromkeys(tasks))
        unknown = [t for t in wanted if t not in by_task]
        if unknown:
            avail = sorted(by_task)
            shown = ", ".join(avail[:10]) + (f", ... ({len(avail)} in all)" if len(avail) > 10 else "")
            raise ValueError(f"load_flan: unknown task name(s) {unknown}; available: {shown}")
        if not wanted:
            raise ValueError("load_flan: `tasks` is an empty list")

    has_split = "split" in columns
    keep_cols = list(REQUIRED_COLUMNS) + (["split"] if has_split else [])
    index_of: dict[str, list[int]] = {}
    for t in wanted:
        rows = by_task[t]
        if max_examples_per_task is not None and len(rows) > max_examples_per_task:
            rng = task_rng(seed, "subsample:" + t)
            rows = sorted(rng.sample(rows, int(max_examples_per_task)))
        index_of[t] = rows
    flat = [i for t in wanted for i in index_of[t]]
    sub = ds.select(flat).select_columns(keep_cols).to_dict()

    caps = {"train": n_train, "test": n_test}  # taken now: the split below reuses the name n_test
    out: dict[str, TaskData] = {}
    pos = 0
    for t in wanted:
        n = len(index_of[t])
        srcs = sub["source"][pos: pos + n]
        tgts = sub["target"][pos: pos + n]
        splits = sub["split"][pos: pos + n] if has_split else None
        pos += n
        examples = [Example(s, g, t) for s, g in zip(srcs, tgts)]
        td = TaskData(t)
        if has_split:
            for ex, sp in zip(examples, splits):
                key = _SPLIT_ALIASES.get(str(sp).strip().lower()) if sp is not None else None
                if key is None:
                    raise ValueError(
                        f"load_flan: task {t!r} has split value {sp!r}; expected one of "
                        f"{sorted(_SPLIT_ALIASES)}"
                    )
                getattr(td, key).append(ex)
        else:
            n_test = int(round(n * test_fraction))
            n_val = int(round(n * val_fraction))
            while n > 0 and n_test + n_val >= n and (n_val or n_test):
                if n_val:
                    n_val -= 1
                else:
                    n_test -= 1
            order = list(range(n))
            task_rng(seed, "split:" + t).shuffle(order)
            test_ids = set(order[:n_test])
            val_ids = set(order[n_test: n_test + n_val])
            for i, ex in enumerate(examples):
                (td.test if i in test_ids else td.validation if i in val_ids else td.train).append(ex)
        for split, cap in caps.items():
            rows = getattr(td, split)
            if cap is not None and len(rows) > cap:
                keep = sorted(task_rng(seed, f"{split}-cap:{t}").sample(range(len(rows)), int(cap)))
                setattr(td, split, [rows[i] for i in keep])
        out[t] = td
    return out


def write_flan_jsonl(tasks: dict[str, TaskData], path) -> Path:
    """Write tasks as FLAN-format JSON lines (``source``, ``target``, ``task_name``,
    ``split``), readable by :func:`load_flan`. Written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for name, td in tasks.items():
                for split in SPLITS:
                    for ex in getattr(td, split):
                        row = {"source": ex.source, "target": ex.target,
                               "task_name": ex.task_name or name, "split": split}
                        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ===================================================================== tokenizer
