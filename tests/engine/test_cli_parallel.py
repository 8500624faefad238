"""Experts in parallel: ``train`` and ``reproduce`` under torchrun, and the results.json rule
that two writers never lose each other's results.

Multi-process runs use torchrun on the CPU (gloo, 127.0.0.1, a free port), a tiny base model and
a few steps; every run has a deadline after which its whole process group is killed, so a rank
that hangs fails the test instead of hanging it.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparse_engine.experiments import results as result_files
from sparse_engine.cli import main

from .dist_harness import REPO, free_port

TIMEOUT = 240  # seconds per multi-process run


def small(batch_size: int = 8) -> list[str]:
    return ["--n-train", "32", "--n-test", "8", "--epochs", "1", "--batch-size", str(batch_size),
            "--update-interval", "2", "--no-progress"]


SMALL = small()
TASKS = ["reverse_words", "colour_to_fruit", "add_one"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # one thread per process, the same in the single-process reference runs: results compare bit for bit
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    return env


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """``cmd`` in its own session, killed with all its children (the ranks) at the deadline."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:8])} ... did not finish in {TIMEOUT} s (a rank hung)\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``args``: ``-m module ...`` or ``script.py ...``, started on ``nproc`` CPU ranks."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args])


def single(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "sparse_engine.cli", *args])


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"


def _same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_base_dir):
    """colour_to_fruit trained by one process (batch 8), the run the parallel ones must match."""
    out = tmp_path_factory.mktemp("single")
    _ok(single("train", "--tasks", "colour_to_fruit", "--model", str(tiny_base_dir), "--out", str(out), *SMALL))
    return out / "adapters" / "colour_to_fruit-sparse.safetensors"


def test_expert_parallel_train_splits_the_tasks_and_writes_one_complete_result(tmp_path, tiny_base_dir, reference):
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = torchrun("-m", "sparse_engine.cli", "train", "--tasks", *TASKS, "--model", str(tiny_base_dir),
                    "--out", str(out), "--eval", *SMALL)
    _ok(proc)
    results = json.loads((out / "results.json").read_text())
    # every task, in the order given, each trained by exactly one rank (round-robin), alone
    assert [e["task"] for e in results["experts"]] == TASKS
    assert [e["ranks"] for e in results["experts"]] == [[0], [1], [0]]
    assert all(e["world_size"] == 1 for e in results["experts"])
    assert list(results["scores"]["base"]) == TASKS and list(results["scores"]["sparse"]) == TASKS
    assert [(r["world_size"], r["experts"]) for r in results["runs"]] == [(2, [[t, "sparse"] for t in TASKS])]
    for task in TASKS:
        assert (out / "adapters" / f"{task}-sparse.safetensors").exists()
        assert (out / "results.md").read_text().count(f"| {task} |") == 1
    assert proc.stdout.count("results: ") == 1  # rank 0 alone reports
    # the expert rank 1 trained is the one a single process trains (same seed and settings)
    _same_tensors(out / "adapters" / "colour_to_fruit-sparse.safetensors", reference)
    print(f"expert-parallel run: {time.perf_counter() - start:.1f} s")


def test_data_parallel_trains_each_expert_with_every_rank(tmp_path, tiny_base_dir, reference):
    from sparse_engine.training import train_expert

    if "process_group" not in inspect.signature(train_expert).parameters:
        pytest.skip("train_expert has no process_group parameter yet (data-parallel training)")
    out = tmp_path / "out"
    # 2 ranks x 4 examples: the reference's batch of 8
    _ok(torchrun("-m", "sparse_engine.cli", "train", "--tasks", "colour_to_fruit", "--data-parallel",
                 "--model", str(tiny_base_dir), "--out", str(out), *small(batch_size=4)))
    (info,) = json.loads((out / "results.json").read_text())["experts"]
    assert info["ranks"] == [0, 1] and info["world_size"] == 2
    # the same mask as one process with the global batch, the values up to summation order
    x = load_file(str(out / "adapters" / "colour_to_fruit-sparse.safetensors"))
    y = load_file(str(reference))
    assert x.keys() == y.keys()
    for key in x:
        if key.endswith("indices"):
            assert torch.equal(x[key], y[key]), key
        else:
            torch.testing.assert_close(x[key], y[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("argv,message", [
    (["train", "--tasks", "no_such_task"], "unknown built-in task(s) ['no_such_task']"),
    (["train", "--tasks", "reverse_words"], "1 expert(s) to train on 2 ranks"),
    (["reproduce", "fig5", "--held-in", "no_such_task"], "unknown built-in task(s) ['no_such_task']"),
])
def test_bad_input_fails_on_every_rank_without_a_hang(tmp_path, tiny_base_dir, argv, message):
    model = ["--model", str(tiny_base_dir)] if argv[0] == "train" else []
    proc = torchrun("-m", "sparse_engine.cli", *argv, *model, "--out", str(tmp_path / "out"), "--no-progress")
    assert proc.returncode != 0
    for rank in (0, 1):
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"error: [rank {rank}/2]")]
        assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_ranks_started_with_different_settings_fail_on_every_rank(tmp_path, tiny_base_dir):
    script = _script(tmp_path, "differ.py", """
        import os, sys
        from sparse_engine.cli import main
        argv = sys.argv[1:] + (["--seed", "1"] if os.environ["RANK"] == "1" else [])
        sys.exit(main(argv))
    """)
    proc = torchrun(script, "train", "--tasks", *TASKS[:2], "--model", str(tiny_base_dir),
                    "--out", str(tmp_path / "out"), *SMALL)
    assert proc.returncode != 0
    for rank in (0, 1):
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"error: [rank {rank}/2]")]
        assert "the command line differs between ranks (seed: 0 on rank 0, 1 on rank 1)" in line
    assert not (tmp_path / "out").exists()


def test_a_rank_that_fails_alone_stops_every_rank(tmp_path, tiny_base_dir):
    """Rank 1's training raises while rank 0 trains its own expert: rank 0 must not wait forever."""
    script = _script(tmp_path, "fail_one.py", """
        import os, sys
        import sparse_engine.experiments.experts as experts
        from sparse_engine.cli import main
        if os.environ["RANK"] == "1":
            def broken(*args, **kwargs):
                raise RuntimeError("injected failure")
            experts.train_task_expert = broken
        sys.exit(main(sys.argv[1:]))
    """)
    out = tmp_path / "out"
    proc = torchrun(script, "train", "--tasks", *TASKS[:2], "--model", str(tiny_base_dir), "--out", str(out), *SMALL)
    assert proc.returncode != 0
    for rank in (0, 1):
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"error: [rank {rank}/2]")]
        assert "RuntimeError: injected failure (on rank 1)" in line
    assert "Traceback" in proc.stderr  # the unexpected error's traceback, from rank 1
    assert not (out / "results.json").exists()


def test_reproduce_splits_the_missing_experts_across_ranks(tmp_path, tiny_base_cache, tiny_base_spec):
    script = _script(tmp_path, "reproduce.py", """
        import json, sys
        import torch.distributed as dist
        from sparse_engine import distributed
        from sparse_engine.experiments import analysis
        from sparse_engine.builtin import BuiltinBaseSpec
        from sparse_engine.experiments.ranks import Ranks

        out, cache, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        ranks = Ranks(distributed.init_from_env())
        setup = analysis.PaperSetup(
            out_dir=out, held_in=("reverse_words", "colour_to_fruit", "add_one"), held_out=("sort_descending",),
            kinds=("sparse",), n_train=32, n_test=4, epochs=1, update_interval=1, max_new_tokens=4,
            base_spec=BuiltinBaseSpec(**spec), cache_dir=cache, progress=False)
        payloads = analysis.reproduce("fig5", setup, ranks=ranks)
        print(json.dumps({"rank": ranks.rank, "analyses": sorted(payloads)}))
        ranks.close()
        dist.destroy_process_group()
    """)
    out = tmp_path / "paper"
    proc = torchrun(script, str(out), str(tiny_base_cache), json.dumps(dataclasses.asdict(tiny_base_spec)))
    _ok(proc)
    (index_path,) = out.glob("experts-*/index.json")
    experts = json.loads(index_path.read_text())["experts"]
    # every expert fig5 needs is in the one index, each trained by one rank, the ranks' shares disjoint
    assert {k: v["ranks"] for k, v in experts.items()} == {
        "reverse_words-sparse": [0], "colour_to_fruit-sparse": [1], "add_one-sparse": [0]}
    assert all((index_path.parent / v["file"]).exists() for v in experts.values())
    # rank 0 alone ran the analysis and wrote its outputs
    # the ranks share one stdout, so their lines may run together: find each report by its shape
    found = re.findall(r'\{"rank": \d+, "analyses": \[[^\]]*\]\}', proc.stdout)
    reports = sorted((json.loads(text)["rank"], json.loads(text)["analyses"]) for text in found)
    assert reports == [(0, ["fig5"]), (1, [])]
    assert (out / "fig5.json").exists() and (out / "fig5.md").exists()


# --------------------------------------------------------------- results.json concurrency


def _run_payload(task: str, method: str = "sparse", steps: int = 4, base: float | None = None) -> dict:
    info = {"task": task, "method": method, "trainable_params": 10, "steps": steps, "final_loss": 1.0, "ranks": [0]}
    scores = {"base": {task: base}} if base is not None else {}
    return {"tasks": [task], "methods": [method], "experts": [info], "scores": scores, "settings": {"task": task}}


def test_merge_rule_replaces_the_same_expert_and_keeps_the_others(tmp_path):
    merged = None
    for payload in (_run_payload("a", base=1.0), _run_payload("b"), _run_payload("a", steps=8, base=2.0),
                    _run_payload("a", method="lora")):
        merged = result_files.merge_train_results(merged, payload)
    assert [(e["task"], e["method"], e["steps"]) for e in merged["experts"]] == [
        ("a", "sparse", 8), ("b", "sparse", 4), ("a", "lora", 4)]
    assert merged["tasks"] == ["a", "b"] and merged["methods"] == ["sparse", "lora"]
    assert merged["scores"]["base"] == {"a": 2.0}
    assert merged["settings"] == {"task": "a"} and len(merged["runs"]) == 4
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="results.json is not valid JSON.*move it away"):
        result_files.write_train_results(tmp_path, _run_payload("a"))
    assert bad.read_text() == "{not json"  # nothing written over it


def _slow_merge(delay: float = 0.01):
    """Make the read-merge-write window wide, so writers without the lock would lose entries."""
    original = result_files.merge_train_results

    def slow(old, new):
        time.sleep(delay)
        return original(old, new)

    return slow


def test_concurrent_writers_in_threads_never_lose_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(result_files, "merge_train_results", _slow_merge())

    def writer(prefix):
        for i in range(10):
            result_files.write_train_results(tmp_path, _run_payload(f"{prefix}{i}"))

    threads = [threading.Thread(target=writer, args=(p,)) for p in "xy"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(e["task"] for e in results["experts"]) == sorted(f"{p}{i}" for p in "xy" for i in range(10))
    assert len(results["runs"]) == 20
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {p}{i} |" in table for p in "xy" for i in range(10))


def test_concurrent_writer_processes_never_lose_entries(tmp_path):
    script = _script(tmp_path, "writer.py", """
        import sys, time
        from sparse_engine.experiments import results
        original = results.merge_train_results
        def slow(old, new):
            time.sleep(0.01)
            return original(old, new)
        results.merge_train_results = slow
        out, prefix = sys.argv[1], sys.argv[2]
        for i in range(10):
            info = {"task": f"{prefix}{i}", "method": "sparse", "trainable_params": 1, "steps": 1, "final_loss": 0.0}
            results.write_train_results(out, {"tasks": [info["task"]], "methods": ["sparse"], "experts": [info],
                                              "scores": {}})
    """)
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, script, str(out), p], cwd=REPO, env=_env(), stderr=subprocess.PIPE,
                              text=True) for p in "xy"]
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert sorted(e["task"] for e in results["experts"]) == sorted(f"{p}{i}" for p in "xy" for i in range(10))


def test_two_train_runs_sharing_one_out_keep_both(tmp_path, tiny_base_dir, capsys):
    out = tmp_path / "out"
    common = ["--model", str(tiny_base_dir), "--out", str(out), *SMALL]
    assert main(["train", "--tasks", "reverse_words", *common]) == 0
    assert main(["train", "--tasks", "colour_to_fruit", "--eval", *common]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [e["task"] for e in results["experts"]] == ["reverse_words", "colour_to_fruit"]
    assert list(results["scores"]["base"]) == ["colour_to_fruit"]
    table = (out / "results.md").read_text()
    assert "| reverse_words |" in table and "| colour_to_fruit |" in table
    # the same (task, method) again: refused (its adapter file is there), unless --overwrite; then the
    # newer expert replaces the older, in place
    adapter = out / "adapters" / "reverse_words-sparse.safetensors"
    before = adapter.read_bytes()
    assert main(["train", "--tasks", "reverse_words", *common, "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and str(adapter) in err and "--overwrite" in err
    assert adapter.read_bytes() == before and len(json.loads((out / "results.json").read_text())["runs"]) == 2
    assert main(["train", "--tasks", "reverse_words", *common, "--epochs", "2", "--overwrite"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(e["task"], e["steps"]) for e in results["experts"]] == [("reverse_words", 8), ("colour_to_fruit", 4)]
    assert len(results["runs"]) == 3


def test_single_process_commands_refuse_torchrun(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["eval", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "`sparse-engine eval` runs in one process" in err
    assert not (tmp_path / "o").exists()


def test_one_process_is_a_world_of_one_rank():
    from sparse_engine.experiments.ranks import RankFailed, Ranks

    ranks = Ranks()
    assert (ranks.rank, ranks.size, ranks.is_main, ranks.prefix()) == (0, 1, True, "")
    assert ranks.mine("abc") == ["a", "b", "c"] and ranks.gather(lambda: 7) == [7] and ranks.run(lambda: 7) == 7
    ranks.check_same("anything", {"a": 1})
    with pytest.raises(KeyError):  # one process: the error itself, unchanged
        ranks.run(lambda: {}["missing"])
    assert str(RankFailed({0: "bad", 1: "bad"}, 2)) == "bad (on every rank)"
    assert str(RankFailed({1: "bad"}, 3)) == "bad (on rank 1)"
    assert str(RankFailed({0: "x", 2: "y"}, 3)) == "rank 0: x; rank 2: y"
