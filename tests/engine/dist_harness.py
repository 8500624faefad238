"""Run a scenario of ``dist_worker.py`` on N CPU ranks (gloo, 127.0.0.1, a free port), each rank
its own process, with a deadline: a rank that fails or hangs never hangs the test."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("dist_worker.py")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str, out_dir: Path, world: int = 2, timeout: float = 240, args: dict | None = None):
    """Start ``world`` ranks of ``scenario``; returns [(returncode, stderr)] by rank. Every rank
    is killed at the deadline (the test then fails on its return code, it does not hang)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(REPO))
        env.pop("CUDA_VISIBLE_DEVICES", None)
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(out_dir), json.dumps(args or {})],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ))
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            _, err = proc.communicate()
            results.append((-9, f"timed out after {timeout} s\n{err[-3000:]}"))
            continue
        results.append((proc.returncode, err[-3000:]))
    return results


def assert_all_ok(results) -> None:
    bad = [(rank, code, err) for rank, (code, err) in enumerate(results) if code != 0]
    assert not bad, "\n".join(f"rank {r} exited {c}:\n{e}" for r, c, e in bad)
