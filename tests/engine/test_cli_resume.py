"""``train --resume`` and Ctrl-C: an interrupted CLI run, resumed, ends with the uninterrupted run's
adapter; Ctrl-C ends with one line naming the checkpoint (exit code 130, no traceback)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sparse_engine import training
from sparse_engine.cli import main

from .dist_harness import REPO

# 2 epochs of 4 steps, a mask update every 2 steps: a checkpoint at step 3 is mid-epoch, in the search phase
SMALL = ["--tasks", "reverse_words", "--n-train", "32", "--n-test", "4", "--epochs", "2", "--batch-size", "8",
         "--update-interval", "2", "--max-length", "48", "--no-progress"]


def _same_adapter(a, b) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys() and x
    for key in x:
        assert torch.equal(x[key], y[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_base_dir):
    """The uninterrupted run (it writes checkpoints too, so both runs do the same work)."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["train", *SMALL, "--model", str(tiny_base_dir), "--out", str(out), "--checkpoint-every", "3"]) == 0
    return out / "adapters" / "reverse_words-sparse.safetensors"


def test_interrupted_run_resumes_to_the_uninterrupted_adapter(tmp_path, tiny_base_dir, reference, monkeypatch,
                                                              capsys):
    out = tmp_path / "out"
    argv = ["train", *SMALL, "--model", str(tiny_base_dir), "--out", str(out), "--checkpoint-every", "3"]
    save = training.save_checkpoint
    steps = []

    def save_then_interrupt(path, model, optimizer, scheduler, state, settings=None):
        save(path, model, optimizer, scheduler, state, settings)
        steps.append(state["step"])
        raise KeyboardInterrupt  # Ctrl-C right after the first checkpoint (step 3 of 8)

    monkeypatch.setattr(training, "save_checkpoint", save_then_interrupt)
    assert main(argv) == 130
    monkeypatch.setattr(training, "save_checkpoint", save)
    err = capsys.readouterr().err
    checkpoint = out / "checkpoints" / "reverse_words-sparse" / training.CHECKPOINT_NAME
    assert steps == [3]
    assert err.count("\n") == 1 and f"{checkpoint} (step 3)" in err and "--resume" in err
    assert not (out / "adapters").exists() and not (out / "results.json").exists()
    # a plain rerun would discard the checkpoint: refused, naming both ways on
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--resume" in err and "--overwrite" in err and str(checkpoint) in err
    assert main([*argv, "--resume"]) == 0
    _same_adapter(out / "adapters" / "reverse_words-sparse.safetensors", reference)
    # without the resume the first steps would be retrained: the same adapter proves they were not repeated
    assert torch.load(checkpoint, weights_only=False)["state"]["step"] == 8


def test_resume_without_a_checkpoint_says_so(tmp_path, tiny_base_dir, capsys):
    out = tmp_path / "out"
    assert main(["train", *SMALL, "--model", str(tiny_base_dir), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "no checkpoint to resume" in err and "--checkpoint-every" in err
    assert not out.exists()


def test_ctrl_c_on_a_real_process(tmp_path, tiny_base_dir, capsys):
    """SIGINT to a running ``sparse-engine train`` once a checkpoint is on disk: exit 130, one line
    naming the checkpoint, no traceback; ``--resume`` then continues from that step to the end
    (that the resumed adapter is the uninterrupted one is the test above)."""
    out = tmp_path / "out"
    checkpoint = out / "checkpoints" / "reverse_words-sparse" / training.CHECKPOINT_NAME
    # 20 steps, a checkpoint after each: the signal lands long before the end
    args = [*SMALL, "--epochs", "5", "--model", str(tiny_base_dir), "--checkpoint-every", "1", "--out", str(out)]
    # SIGINT back to its default in the child: a test run started in the background (a shell
    # without job control) ignores SIGINT, and Python then keeps ignoring it
    proc = subprocess.Popen([sys.executable, "-m", "sparse_engine.cli", "train", *args], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    step = torch.load(checkpoint, weights_only=False)["state"]["step"]
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.count("\n") == 1, err[-3000:]
    assert err.startswith(f"interrupted: the last checkpoint is {checkpoint} (step {step})")
    assert 1 <= step < 20
    assert main(["train", *args, "--resume"]) == 0
    capsys.readouterr()
    final = torch.load(checkpoint, weights_only=False)["state"]
    assert final["step"] == 20 and len(final["losses"]) == 20  # the first steps' losses come from the checkpoint


@pytest.mark.parametrize("command", ["train", "reproduce", "eval"])
def test_ctrl_c_says_what_is_left_in_one_line(tmp_path, monkeypatch, capsys, command):
    """Ctrl-C before any checkpoint: no traceback, exit 130, one line saying what a rerun does."""
    from sparse_engine.experiments import analysis, experts, reports

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr({"train": experts, "reproduce": analysis, "eval": reports}[command],
                        {"train": "run_experts", "reproduce": "reproduce", "eval": "evaluate_held"}[command], interrupt)
    monkeypatch.setattr("sparse_engine.cli.load_model", lambda args: (None, None))
    out = str(tmp_path / "out")
    argv = {"train": ["train", "--tasks", "add_one", "--n-train", "8", "--out", out],
            "reproduce": ["reproduce", "table3", "--held-in", "add_one", "--held-out", "--out", out],
            "eval": ["eval", "--held-in", "add_one", "--held-out", "--out", out]}[command]
    assert main([*argv, "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted:"), err
    expected = {"train": "no checkpoint was written (--checkpoint-every N writes one every N steps)",
                "reproduce": f"the experts finished so far are kept under {out}; run the same command again",
                "eval": "`sparse-engine eval` stopped before it finished"}[command]
    assert expected in err
