"""What every benchmark records next to its numbers, and how rows are appended.

Every row carries the same provenance fields: bench name, device, torch / triton / CUDA
versions, git commit (with a dirty flag) and UTC date. Only real GPU runs are recorded.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


def git_commit() -> tuple[str, bool]:
    """(HEAD sha or "uncommitted", whether tracked files differ from it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
        return head, dirty
    except Exception:  # noqa: BLE001 - no git, or no commit yet
        return "uncommitted", True


def run_metadata(bench: str, **extra) -> dict:
    """Provenance of a benchmark run on the current CUDA device."""
    import torch
    import triton

    head, dirty = git_commit()
    return dict(
        bench=bench,
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        commit=head,
        dirty=dirty,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    )


def append_rows(path: str, rows: list[dict]) -> None:
    """Append JSON lines to ``path`` (created with its folder if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"appended {len(rows)} rows to {path}")
