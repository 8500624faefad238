"""CPU benchmarks that time and measure peak memory: the timings come from a process in glibc's
default allocator, the peaks from a child with the mmap threshold fixed (which peak RSS needs,
and which makes every mid-size temporary a fresh mapping: timings taken there are not a
user's). A regression here silently changed every CPU ratio in README and docs/serving.md."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
THRESHOLD = "MALLOC_MMAP_THRESHOLD_"

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU rows"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mmap threshold"),
]


def _run(script, args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != THRESHOLD}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_serving_table_times_in_the_default_allocator(tmp_path):
    out = tmp_path / "rows.jsonl"
    _run("bench_multi_adapter.py", ["--cpu", "--no-model", "--hidden", "64", "--formats", "block",
                                    "--repeats", "1", "--results", str(out)], tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    register = [r for r in rows if r["level"] == "register"]
    timed = [r for r in rows if r["level"] == "op-cpu"]
    assert register and timed
    assert all(r["malloc_mmap_threshold"] == "131072" and r["peak_bytes"] > 0 for r in register)
    assert all(r["malloc_mmap_threshold"] is None and r["ms"] > 0 for r in timed)


def test_training_steps_time_in_the_default_allocator(tmp_path):
    out = tmp_path / "rows.jsonl"
    _run("bench_training.py", ["--device", "cpu", "--scopes", "layer", "--methods", "lora", "element-fixed",
                               "--tokens", "8", "--layer-repeats", "1", "--out", str(out)], tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["method"] for r in rows} == {"lora", "element-fixed"}
    for r in rows:
        assert r["malloc_mmap_threshold"] is None and r["ms_min"] > 0
        assert r["peak_source"].startswith("peak RSS in a child process")
        assert r["step_peak_bytes"] is not None and r["step_peak_bytes"] > 0
