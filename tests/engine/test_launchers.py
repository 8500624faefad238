"""The README's multi-process commands, as printed there: torchrun and accelerate launch of
examples/trainer_ddp.py on 2 CPU ranks (127.0.0.1, a free port, a deadline)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.engine.dist_harness import REPO, free_port

BIN = Path(sys.executable).parent
SCRIPT = ["examples/trainer_ddp.py", "--n-train", "64", "--update-interval", "2"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _launch(launcher: list[str], out: Path, model_dir: Path) -> str:
    proc = subprocess.run([*launcher, *SCRIPT, "--model", str(model_dir), "--out", str(out)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _two_nodes(out: Path, model_dir: Path) -> str:
    """Two torchrun agents meeting through the c10d rendezvous, as on two machines (here both
    on 127.0.0.1): the multi-node command of the README."""
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", endpoint, "--rdzv_id", "sparse-engine-test", *SCRIPT, "--model", str(model_dir),
           "--out", str(out)]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            stdout, stderr = node.communicate(timeout=240)
            assert node.returncode == 0, stderr[-3000:]
            outputs.append(stdout)
    finally:
        for node in nodes:
            node.kill()
    return "".join(outputs)


def test_torchrun_accelerate_and_two_node_rendezvous_train_the_same_adapter(tmp_path, tiny_base_dir):
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    accelerate = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    outputs = {}
    for name, launcher in (("torchrun", torchrun), ("accelerate", accelerate), ("two-nodes", None)):
        out = tmp_path / name
        stdout = _two_nodes(out, tiny_base_dir) if launcher is None else _launch(launcher, out, tiny_base_dir)
        # 64 examples, 2 ranks × 8 per step, 2 epochs; only rank 0 wrote the file
        assert stdout.count("wrote ") == 1 and "after 8 steps on 2 rank(s)" in stdout, stdout
        outputs[name] = load_file(tmp_path / name / "reverse_words.safetensors")
    for other in ("accelerate", "two-nodes"):
        assert outputs["torchrun"].keys() == outputs[other].keys()
        for key, value in outputs["torchrun"].items():
            assert torch.isfinite(value.float()).all()
            assert torch.equal(value, outputs[other][key]), (other, key)
