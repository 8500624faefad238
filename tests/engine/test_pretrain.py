"""`sparse-engine pretrain`: a base whose tokenizer reads the user's text, loadable by --model."""
from __future__ import annotations

import importlib.util
import json
import math
from argparse import Namespace
from pathlib import Path

import pytest

from sparse_engine import data
from sparse_engine.cli import load_model, main

ROOT = Path(__file__).resolve().parents[2]


def _real_text_module():
    spec = importlib.util.spec_from_file_location("real_text_tasks", ROOT / "examples" / "real_text_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def flan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("flan") / "real_text.jsonl"
    _real_text_module().main(["--rows-per-task", "30", "--test-per-task", "4", "--out", str(path)])
    return path


@pytest.fixture(scope="module")
def base_dir(flan_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "base"
    rc = main(["pretrain", "--data", str(flan_file), "--out", str(out), "--tasks", "plural", "capital", "opposite",
               "--epochs", "2", "--hidden-size", "32", "--layers", "1", "--vocab-size", "500", "--no-progress"])
    assert rc == 0
    return out


def test_the_generated_file_keeps_test_questions_out_of_train(flan_file):
    tasks = data.load_flan(str(flan_file))
    assert len(tasks) == 8
    for td in tasks.values():
        assert td.test and td.train
        assert not {ex.source for ex in td.test} & {ex.source for ex in td.train}
        assert len({ex.source for ex in td.test}) == len(td.test)


def test_pretrained_base_loads_through_model_and_reads_its_text(base_dir, flan_file):
    model, tokenizer = load_model(Namespace(model=str(base_dir), cache_dir=None, no_progress=True))
    assert model.config.vocab_size == len(tokenizer) <= 500
    tasks = data.load_flan(str(flan_file))
    texts = [t for td in tasks.values() for split in ("train", "test") for ex in td.split(split)
             for t in (data.format_prompt(ex.source), ex.target)]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert data.unknown_token_rate(tokenizer, ids)[0] == 0
    for text, row in zip(texts, ids):
        assert tokenizer.decode(row) == " " + text  # byte-level: the space before the first word comes back
    # BPE learnt the text: far fewer tokens than bytes
    assert sum(map(len, ids)) < 0.5 * sum(len(t.encode()) for t in texts)
    record = json.loads((base_dir / "done.json").read_text())
    assert record["pretrain_tasks"] == ["plural", "capital", "opposite"]
    assert record["tokenizer_tasks"] == sorted(tasks)
    assert record["examples"] == sum(len(tasks[t].train) for t in record["pretrain_tasks"])
    assert record["pretrain"]["losses"][-1] < math.log(len(tokenizer))  # learnt something


def test_train_and_eval_take_the_base_as_model(base_dir, flan_file, tmp_path, capsys):
    out = tmp_path / "train"
    assert main(["train", "--data", str(flan_file), "--model", str(base_dir), "--tasks", "who_bought",
                 "--max-steps", "2", "--epochs", "1", "--eval", "--max-new-tokens", "4", "--out", str(out),
                 "--no-progress"]) == 0
    # the --data default of 1024 tokens is cut to the base's positions, with a note
    positions = json.loads((base_dir / "config.json").read_text())["max_position_embeddings"]
    assert positions < 1024 and f"cut to the model's {positions} positions" in capsys.readouterr().err
    assert main(["train", "--data", str(flan_file), "--model", str(base_dir), "--tasks", "who_bought",
                 "--max-length", str(positions + 1), "--out", str(tmp_path / "long"), "--no-progress"]) == 2
    assert f"exceeds the model's {positions} positions" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert "who_bought" in json.dumps(results)
    assert main(["eval", "--data", str(flan_file), "--model", str(base_dir), "--held-in", "plural", "--held-out",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "eval"), "--no-progress"]) == 0


def test_pretrain_refuses_an_out_that_holds_files_and_unknown_tasks(base_dir, flan_file, tmp_path, capsys):
    before = (base_dir / "model.safetensors").read_bytes()
    assert main(["pretrain", "--data", str(flan_file), "--out", str(base_dir), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (base_dir / "model.safetensors").read_bytes() == before
    assert main(["pretrain", "--data", str(flan_file), "--out", str(tmp_path / "b"), "--tasks", "nope",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "plural" in err
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
