"""Evaluation helpers and the paper's analyses (Table 1, Fig. 6, Fig. 5, Table 3, Table 4), at toy size."""
import json

import pytest

from sparse_engine import evaluation
from sparse_engine.experiments import analysis
from sparse_engine.experiments.reports import write_report


def test_our_rouge_l_equals_rouge_score():
    from rouge_score import rouge_scorer

    preds = ["the cats are running home", "red blue green", "", "one two three four"]
    refs = [["the cat runs home", "a dog"], "green blue red", "nothing here", ["one two", "three four one two"]]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = 0.0
    for p, r in zip(preds, refs):
        r = [r] if isinstance(r, str) else r
        expected += max(scorer.score(x, p)["rougeL"].fmeasure for x in r)
    expected = 100 * expected / len(preds)
    assert evaluation.rouge_l(preds, refs) == pytest.approx(expected, abs=1e-12)
    # the stemmer is on: "running"/"runs" → "run"
    assert evaluation.rouge_l(["cats running"], ["cat runs"]) == pytest.approx(100.0)


def test_write_report_writes_json_and_markdown(tmp_path):
    rows = [{"method": "a", "held-in": 1.234, "held-out": None}]
    js, md = write_report(tmp_path, "t", {"x": 1}, rows, ["method", "held-in", "held-out"], title="T",
                                   notes=["note"])
    assert json.loads(js.read_text())["rows"] == rows
    text = md.read_text()
    assert text.startswith("## T") and "| a | 1.23 |  |" in text and text.rstrip().endswith("note")


def test_paper_setup_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown built-in task"):
        analysis.PaperSetup(held_in=("no_such_task",))
    with pytest.raises(ValueError, match="kinds"):
        analysis.PaperSetup(kinds=("dense",))
    with pytest.raises(ValueError, match="n_test must be an integer"):
        analysis.PaperSetup(n_test=0)
    with pytest.raises(ValueError, match="unknown analysis"):
        analysis.reproduce("table9", analysis.PaperSetup())


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_base_cache, tiny_base_spec):
    setup = analysis.PaperSetup(
        out_dir=str(tmp_path_factory.mktemp("paper")), held_in=("reverse_words", "colour_to_fruit", "add_one"),
        held_out=("sort_descending",), n_train=32, n_test=4, epochs=1, update_interval=1, multitask_epochs=1,
        max_new_tokens=4, base_spec=tiny_base_spec, cache_dir=str(tiny_base_cache), progress=False)
    return setup, analysis.Workspace(setup)


def test_table1_fig6_fig5_table3_table4_at_toy_size(toy):
    from pathlib import Path

    setup, ws = toy
    t1 = analysis.run_table1(setup, ws)
    labels = [(r["method"], r["merging"]) for r in t1["rows"]]
    assert labels[0] == ("Base model", "-") and labels[-1] == ("Multitask", "-")
    assert ("Element-Sparse", "Averaging (Eq. 4)") in labels and ("Full-Finetune", "Ties") in labels
    routable = [k for k in setup.kinds if k in analysis.ROUTABLE_KINDS]
    assert len(labels) == 2 + sum(len(v) for v in analysis.TABLE1_METHODS.values()) + len(routable)
    sparse_row = labels.index(("Element-Sparse", "Averaging (Eq. 4)"))
    assert t1["rows"][sparse_row]["paper held-in"] == 51.44
    for row in t1["rows"]:
        assert 0.0 <= row["held-in"] <= 100.0
        assert row["held-out"] is None if row["merging"] == "routed, no merge" else 0.0 <= row["held-out"] <= 100.0
    # routed serving = each expert on its own task: the individual experts' scores, task by task
    for kind in routable:
        routed = t1["details"]["routed"][kind]["held_in"]
        individual = t1["details"]["individual"][kind]
        assert routed.keys() == individual.keys()
        assert all(routed[t] == pytest.approx(individual[t], abs=1e-9) for t in routed), (routed, individual)
    out = Path(setup.out_dir)
    assert "| Multitask |" in (out / "table1.md").read_text()

    f6 = analysis.run_fig6(setup, ws, ns=(1, 3), trials=2, pairs=(("sparse", "overlap_average"), ("full", "ties")))
    assert set(f6["scores"]) == {"Element-Sparse / Averaging (Eq. 4)", "Full-Finetune / Ties"}
    assert all(len(v["1"]) == 2 and len(v["3"]) == 2 for v in f6["scores"].values())
    assert (out / "fig6.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    f5 = analysis.run_fig5(setup, ws)
    assert set(f5["details"]["sparse"]) == {"single", "masked", "merged"}
    assert (out / "fig5.png").exists()

    t3 = analysis.run_table3(setup, ws)
    assert [r["method"] for r in t3["rows"]] == ["Element-Sparse", "Element-Sparse + layer drop"]
    assert all(1 <= a <= 2 for a in t3["details"]["sparse_ld"]["active_layers"])

    t4 = analysis.run_table4(setup, ws, epochs=(1,))
    assert [r["training"] for r in t4["rows"]][1:3] == ["Sparse-Merge + ST (1 epoch)", "Sparse-Merge + FFT (1 epoch)"]
    assert t4["details"]["st-1"]["trainable_params"] < t4["details"]["fft-1"]["trainable_params"]


def test_the_expert_library_is_reused(toy, monkeypatch):
    setup, _ = toy
    import sparse_engine.experiments.experts as experts

    def no_training(*args, **kwargs):
        raise AssertionError("an expert was trained again")

    monkeypatch.setattr(experts, "train_task_expert", no_training)
    ws = analysis.Workspace(setup)  # a new workspace finds the index and the files
    loaded = ws.ensure_experts("lora", setup.held_in)
    assert sorted(loaded) == sorted(setup.held_in) and all(e.kind == "lora" for e in loaded.values())
    assert "scores" in ws.ensure_multitask()


def test_cli_reproduce_rejects_bad_input(tmp_path, capsys):
    from sparse_engine.cli import main

    assert main(["reproduce", "table1", "--held-in", "nope", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "unknown built-in task" in err
    assert not (tmp_path / "p").exists()


def test_table4_trains_a_copy_of_the_merge():
    import torch

    from sparse_engine.formats import SparseDelta

    delta = SparseDelta((4, 4), torch.ones(3), torch.tensor([0, 5, 9], dtype=torch.int32))
    copy_ = delta.clone()
    copy_.values.add_(1.0)
    assert torch.equal(delta.values, torch.ones(3))
