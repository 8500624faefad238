"""What the commands write to --out: results are added to, an earlier run's files are replaced only
with --overwrite (one rule for every command); flags mean the same with --data as without."""
from __future__ import annotations

import json

import pytest
import torch

from sparse_engine import data
from sparse_engine.cli import main
from sparse_engine.training import CHECKPOINT_NAME

FAST = ["--epochs", "1", "--batch-size", "8", "--update-interval", "1", "--max-length", "48", "--no-progress"]


@pytest.fixture(scope="module")
def flan(tmp_path_factory):
    """Two tasks in a FLAN-format file: 40 train and 6 test rows each."""
    path = tmp_path_factory.mktemp("flan") / "flan.jsonl"
    suite = {t: data.builtin_task_data(t, n_train=40, n_validation=0, n_test=6, seed=3)
             for t in ("reverse_words", "colour_to_fruit")}
    return data.write_flan_jsonl(suite, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base_dir, flan):
    """One train run on the FLAN file with --n-train 16: its --out."""
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", "--tasks", "reverse_words", "--data", str(flan), "--model", str(tiny_base_dir),
                 "--out", str(out), "--n-train", "16", *FAST]) == 0
    return out


def _one_error(capsys, *words) -> str:
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)
    return err


def test_n_train_is_honoured_with_data(trained):
    (info,) = json.loads((trained / "results.json").read_text())["experts"]
    assert info["steps"] == 2  # 16 of the 40 train rows, batch 8, one epoch (all 40 would be 5 steps)


def test_eval_adds_to_results_and_refuses_other_settings(tmp_path, tiny_base_dir, flan, trained, capsys):
    out = tmp_path / "eval"
    adapter = trained / "adapters" / "reverse_words-sparse.safetensors"
    common = ["--model", str(tiny_base_dir), "--data", str(flan), "--max-new-tokens", "4", "--out", str(out),
              "--no-progress"]
    assert main(["eval", "--held-in", "reverse_words", *common]) == 0
    assert main(["eval", "--adapter", str(adapter), *common]) == 0  # --data, no --held-in: every task of the data
    assert main(["eval", "--held-in", "reverse_words", *common]) == 0  # the same measurement again: in place
    saved = json.loads((out / "results.json").read_text())
    keys = [(e["evaluated"], e["task"]) for e in saved["entries"]]
    assert keys == [("base model", "reverse_words"), (str(adapter), "colour_to_fruit"),
                    (str(adapter), "reverse_words")] or keys == [
        ("base model", "reverse_words"), (str(adapter), "reverse_words"), (str(adapter), "colour_to_fruit")]
    assert len(saved["runs"]) == 3 and all(e["settings"]["n_test"] is None for e in saved["entries"])
    before = (out / "results.json").read_text()
    # the same model and task measured otherwise (3 test rows): refused before any work, file untouched
    capsys.readouterr()
    assert main(["eval", "--held-in", "reverse_words", "--n-test", "3", *common]) == 2
    _one_error(capsys, "other settings", "n_test", "--overwrite")
    assert (out / "results.json").read_text() == before
    assert main(["eval", "--held-in", "reverse_words", "--n-test", "3", "--overwrite", *common]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["entries"]) == 3 and saved["entries"][0]["settings"]["n_test"] == 3
    assert "| base model | held_in | reverse_words |" in (out / "results.md").read_text()
    # a held-out task the data does not have: named, with the tasks it has
    capsys.readouterr()
    assert main(["eval", "--held-out", "no_such_task", *common]) == 2
    _one_error(capsys, "no_such_task", "colour_to_fruit, reverse_words")
    # a train --out holds train's results.json: eval refuses to mix into it
    capsys.readouterr()
    assert main(["eval", "--held-in", "reverse_words", *common[:-3], "--out", str(trained), "--no-progress"]) == 2
    _one_error(capsys, "another command")


def test_routed_eval_takes_data_and_model(tmp_path, tiny_base_dir, flan, trained):
    out = tmp_path / "routed"
    assert main(["eval", "--routed", str(trained / "adapters"), "--data", str(flan), "--model", str(tiny_base_dir),
                 "--max-new-tokens", "4", "--out", str(out), "--no-progress"]) == 0
    (entry,) = json.loads((out / "results.json").read_text())["entries"]
    assert entry["task"] == "reverse_words" and entry["settings"]["data"] == [str(flan)]  # the only task with a file
    assert 0.0 <= entry["Rouge-L"] <= 100.0


def test_another_base_is_named_with_the_flag_that_exists(tmp_path, tiny_base_dir, trained, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other-base"
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_base_dir).save_pretrained(other)
    adapter = trained / "adapters" / "reverse_words-sparse.safetensors"
    argv = ["eval", "--adapter", str(adapter), "--model", str(other), "--held-in", "reverse_words", "--held-out",
            "--n-test", "2", "--max-new-tokens", "2", "--out", str(tmp_path / "e"), "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 2
    err = _one_error(capsys, str(adapter), "another base model", "--no-check-base")
    assert "check_base=False" not in err and "merge" not in err
    assert main([*argv, "--no-check-base"]) == 0
    routed = ["eval", "--routed", str(trained / "adapters"), "--model", str(other), "--held-in", "reverse_words",
              "--n-test", "2", "--max-new-tokens", "2", "--out", str(tmp_path / "r"), "--no-progress"]
    capsys.readouterr()
    assert main(routed) == 2
    _one_error(capsys, "another base model", "--no-check-base")
    assert main([*routed, "--no-check-base"]) == 0


def test_merge_refuses_to_replace_its_output(tmp_path, trained, capsys):
    adapter = str(trained / "adapters" / "reverse_words-sparse.safetensors")
    out = tmp_path / "m.safetensors"
    assert main(["merge", adapter, adapter, "--out", str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["merge", adapter, "--out", str(out)]) == 2
    _one_error(capsys, str(out), "--overwrite")
    assert out.read_bytes() == before
    model_out = tmp_path / "model"
    model_out.mkdir()
    (model_out / "config.json").write_text("{}")
    assert main(["merge", adapter, "--out", str(tmp_path / "n.safetensors"), "--model-out", str(model_out)]) == 2
    _one_error(capsys, "--model-out", "--overwrite")
    assert main(["merge", adapter, "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != before  # one expert, not the average of two copies: another file


def test_train_overwrite_starts_afresh_and_drops_the_old_checkpoint(tmp_path, tiny_base_dir, capsys):
    out = tmp_path / "out"
    argv = ["train", "--tasks", "add_one", "--model", str(tiny_base_dir), "--out", str(out), "--n-train", "16",
            "--n-test", "2", *FAST]
    assert main([*argv, "--checkpoint-every", "1"]) == 0
    checkpoint = out / "checkpoints" / "add_one-sparse" / CHECKPOINT_NAME
    assert checkpoint.is_file()
    capsys.readouterr()
    assert main(argv) == 2
    _one_error(capsys, "add_one-sparse.safetensors", "--overwrite", "--resume")
    assert main([*argv, "--overwrite"]) == 0
    # trained afresh without checkpoints: the old run's must not be resumed later in place of this one
    assert not checkpoint.exists()
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    _one_error(capsys, "no checkpoint to resume")


@pytest.mark.parametrize("command", ["reproduce", "demo"])
def test_reports_of_other_settings_are_refused_before_any_work(tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    if command == "reproduce":
        report = out / "table3.json"
        from sparse_engine.experiments.analysis import PaperSetup

        setup = PaperSetup(out_dir=str(out), held_in=("add_one",), held_out=()).to_dict()
        report.write_text(json.dumps({"table": "table3", "setup": dict(setup, n_train=5)}))
        argv = ["reproduce", "table3", "--held-in", "add_one", "--held-out", "--out", str(out)]
    else:
        report = out / "results.json"
        report.write_text(json.dumps({"rows": [], "tasks": ["add_one"], "methods": ["sparse"],
                                      "settings": {"n_train": 5}}))
        argv = ["demo", "--tasks", "add_one", "--methods", "sparse", "--out", str(out)]
    assert main(argv) == 2
    _one_error(capsys, str(report), "other settings", "n_train", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == [report.name]  # nothing trained, nothing written


def test_concurrent_eval_writers_keep_each_others_scores(tmp_path, monkeypatch):
    import threading
    import time

    from sparse_engine.experiments import results as result_files

    original = result_files.merge_eval_results

    def slow(*args, **kwargs):  # a wide read-merge-write window: without the lock entries would be lost
        time.sleep(0.01)
        return original(*args, **kwargs)

    monkeypatch.setattr(result_files, "merge_eval_results", slow)

    def writer(name):
        for i in range(8):
            entry = {"evaluated": name, "group": "held_in", "task": f"t{i}", "settings": {}, "Rouge-L": float(i)}
            result_files.write_eval_results(tmp_path, [entry], {"evaluated": name})

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sorted((e["evaluated"], e["task"]) for e in saved["entries"]) == sorted(
        (n, f"t{i}") for n in "ab" for i in range(8))
    assert {(m["evaluated"], m["Rouge-L"], m["tasks"]) for m in saved["means"]} == {("a", 3.5, 8), ("b", 3.5, 8)}
    assert len(saved["runs"]) == 16
