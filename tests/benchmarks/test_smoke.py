"""Each kernel benchmark's ``--smoke`` mode runs (tiny correctness pass through the kernels,
no timing) and records nothing, and so do the training-step and loading benchmarks' (every
method or case once on a tiny Phi-3): the scripts cannot rot unnoticed between GPU sessions."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["bench_masked_delta.py", "bench_block_sparse.py", "bench_topk.py", "bench_multi_adapter.py",
           "bench_training.py", "bench_loading.py"]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA --smoke is not a smoke run: run the benchmarks")


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke_mode(script, tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = {p.name: p.stat().st_size for p in results.glob("*")} if results.exists() else {}
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    after = {p.name: p.stat().st_size for p in results.glob("*")} if results.exists() else {}
    assert after == before, "a smoke run must not record results"
