import json
import subprocess
import sys

import pytest

from sparse_engine.cli import build_parser, main


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["tasks"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(command + ["--help"])
    assert exc.value.code == 0
    assert "usage: sparse-engine" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--keep-ratio", "0"], "keep_ratio must be in"),
        (["--keep-ratio", "1.5"], "keep_ratio must be in"),
        (["--target-modules", "nothing_like_this"], "matches no module"),
    ],
)
def test_bad_input_gives_one_clear_message_and_writes_nothing(tmp_path, capsys, args, message, tiny_base_dir):
    out = tmp_path / "out"
    code = main(["train", "--tasks", "reverse_words", "--out", str(out), "--model", str(tiny_base_dir),
                 "--n-train", "8", "--n-test", "4", "--epochs", "1", "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("error:") == 1
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["train", "--tasks", "reverse_words", "--lr", "0"], "must be > 0"),
    (["eval", "--max-new-tokens", "0"], "must be > 0"),
    (["reproduce", "table4", "--table4-epochs", "0"], "must be > 0"),
])
def test_zero_is_refused_not_replaced_by_a_default(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_paths_are_checked_before_any_work(tmp_path, capsys):
    """A bad --out / --model / --model-out fails at once with one error line, not after training."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["train", "--tasks", "reverse_words", "--out", str(a_file)], "is a file"),
        (["train", "--tasks", "reverse_words", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
         "no such directory"),
        (["eval", "--out", str(a_file)], "is a file"),
        (["merge", "x.safetensors", "--out", str(tmp_path / "m.safetensors"), "--model-out", str(a_file)],
         "is a file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.safetensors").exists()


def test_unknown_task_and_empty_data(tmp_path, capsys):
    assert main(["train", "--tasks", "no_such_task", "--out", str(tmp_path / "o")]) == 2
    assert "unknown built-in task" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["train", "--tasks", "x", "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_on_flan_files_and_a_local_checkpoint(tmp_path, tiny_base_dir):
    from sparse_engine import data

    flan = tmp_path / "flan.jsonl"
    data.write_flan_jsonl({"reverse_words": data.builtin_task_data("reverse_words", 16, 0, 4)}, flan)
    out = tmp_path / "run"
    code = main(["train", "--tasks", "reverse_words", "--data", str(flan), "--out", str(out), "--model",
                 str(tiny_base_dir), "--epochs", "1", "--batch-size", "8", "--update-interval", "1", "--eval",
                 "--max-length", "48", "--max-new-tokens", "8", "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["experts"][0]["task"] == "reverse_words"
    assert (out / "adapters" / "reverse_words-sparse.safetensors").exists()
    assert "expert Rouge-L" in (out / "results.md").read_text()
    # the trained expert served by routing (the routed evaluation, eval --routed), from the CLI
    routed = tmp_path / "routed"
    code = main(["eval", "--routed", str(out / "adapters"), "--model", str(tiny_base_dir), "--held-in",
                 "reverse_words", "--n-test", "4", "--out", str(routed), "--no-progress"])
    assert code == 0
    saved = json.loads((routed / "results.json").read_text())
    assert [(e["group"], e["task"]) for e in saved["entries"]] == [("held_in", "reverse_words")]
    assert 0.0 <= saved["means"][0]["Rouge-L"] <= 100.0
    # without --held-in: every held-in task that has an expert file (here one of twenty)
    code = main(["eval", "--routed", str(out / "adapters"), "--model", str(tiny_base_dir), "--n-test", "4",
                 "--out", str(tmp_path / "routed_default"), "--no-progress"])
    assert code == 0
    saved = json.loads((tmp_path / "routed_default" / "results.json").read_text())
    assert [e["task"] for e in saved["entries"]] == ["reverse_words"]
    assert oct((out / "results.json").stat().st_mode & 0o777) != oct(0o600)  # not the temp file's private mode


def test_console_entry_point_module_runs():
    proc = subprocess.run([sys.executable, "-m", "sparse_engine.cli", "tasks", "--group", "held_out"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "sort_descending" in proc.stdout and "held_out (10)" in proc.stdout
