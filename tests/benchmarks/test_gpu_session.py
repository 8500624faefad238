"""The prepared GPU session script: it parses, refuses a missing output folder, and without CUDA
stops at once having run nothing (its --smoke steps are the smoke runs of test_smoke.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_without_an_output_folder_it_says_how_to_call_it():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage: bash benchmarks/gpu_session.sh OUT_DIR" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the session")
def test_without_cuda_it_stops_cleanly_and_runs_nothing(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device here: nothing run" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.txt"]
