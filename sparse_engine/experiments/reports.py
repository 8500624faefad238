"""What the experiments report: held-in / held-out Rouge-L, and tables written as JSON + markdown."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from sparse_engine import evaluation


def evaluate_held(model, tokenizer, held_in: Mapping, held_out: Mapping | None = None, **gen_kwargs) -> dict:
    """Rouge-L per task and the means, held-in and held-out: the paper's two columns."""
    result = {"held_in": evaluation.evaluate_tasks(model, tokenizer, held_in, **gen_kwargs) if held_in else {}}
    result["held_out"] = evaluation.evaluate_tasks(model, tokenizer, held_out, **gen_kwargs) if held_out else {}
    for split in ("held_in", "held_out"):
        result[f"{split}_mean"] = evaluation.mean_score(result[split]) if result[split] else None
    return result


def write_report(out_dir, name: str, payload: dict, rows: Sequence[Mapping], columns: Sequence[str],
                 title: str | None = None, notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """``<name>.json`` (``payload`` with ``rows`` added) and ``<name>.md`` (a title, the table, notes)."""
    out = Path(out_dir)
    payload["rows"] = list(rows)  # the caller's payload gets the rows too
    js = evaluation.write_results_json(out / f"{name}.json", payload)
    lines = [f"## {title}", ""] if title else []
    lines.append(evaluation.markdown_table(rows, columns))
    if notes:
        lines.append("")
        lines.extend(notes)
    md = out / f"{name}.md"
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(md)
    return js, md
