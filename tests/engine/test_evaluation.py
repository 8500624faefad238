"""Tests of sparse_engine.evaluation: Rouge-L, batched greedy generation, result files."""
from __future__ import annotations

import json
import random

import pytest
import torch

from sparse_engine.data import WORD_PREFIX, build_builtin_tokenizer, builtin_suite, encode_prompt
from sparse_engine.evaluation import (
    evaluate_tasks,
    generate,
    markdown_table,
    mean_score,
    rouge_l,
    write_results_json,
)




@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run far faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------- Rouge-L
def _direct(pred, refs):
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    refs = [refs] if isinstance(refs, str) else refs
    return 100.0 * max(sc.score(r, pred)["rougeL"].fmeasure for r in refs)


PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("red fox blue", "blue fox red"),
    ("running dogs", ["the dog runs", "dogs running fast"]),  # stemming + max over refs
    ("1 2 3", ["4 5", "3 2 1", "1 2 3 4"]),
    ("", "cup pen"),
    ("cup pen", "cup pen"),
]


def test_rouge_l_equals_direct_rouge_score():
    for pred, refs in PAIRS:
        assert rouge_l([pred], [refs]) == pytest.approx(_direct(pred, refs))
    preds, refs = zip(*PAIRS)
    assert rouge_l(list(preds), list(refs)) == pytest.approx(
        sum(_direct(p, r) for p, r in PAIRS) / len(PAIRS)
    )


def test_rouge_l_random_word_lists():
    rng = random.Random()
    vocab = "red blue cat dog cup pen apple pear 3 7 11".split()
    preds, refs = [], []
    for _ in range(20):
        preds.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 6))))
        refs.append([" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))])
    assert rouge_l(preds, refs) == pytest.approx(sum(map(_direct, preds, refs)) / 20)


def test_rouge_l_extremes_and_errors():
    assert rouge_l(["red fox", "a b c"], ["red fox", ["x", "a b c"]]) == pytest.approx(100.0)
    assert rouge_l(["red fox"], ["blue cup"]) == 0.0
    assert rouge_l(["red fox", "cup"], ["red fox", "pen"]) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="empty"):
        rouge_l([], [])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_l(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no reference"):
        rouge_l(["a"], [[]])


def test_mean_score():
    assert mean_score({"a": 10.0, "b": 30.0}) == 20.0
    with pytest.raises(ValueError):
        mean_score({})


# ---------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def tok():
    return build_builtin_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tok):
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        initializer_range=0.2,  # a random model whose output depends strongly on its input
    )
    torch.manual_seed(1)
    return Phi3ForCausalLM(cfg)


def _one_at_a_time(model, tok, source, max_new_tokens):
    """Reference: a single unpadded prompt, token-by-token greedy decoding."""
    ids = torch.tensor([encode_prompt(tok, source, 128)["input_ids"]])
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(new, skip_special_tokens=True).strip()


def test_generate_batched_equals_one_at_a_time(tiny_model, tok):
    suite = builtin_suite(["reverse_words", "count_words", "interleave", "word_after"],
                          n_train=0, n_validation=0, n_test=5, seed=random.randrange(1000))
    sources = [e.source for td in suite.values() for e in td.test]
    random.shuffle(sources)
    tiny_model.train()
    out = generate(tiny_model, tok, sources, max_new_tokens=6, batch_size=7)
    assert tiny_model.training  # training flag restored
    assert isinstance(out, list) and len(out) == len(sources) and all(isinstance(s, str) for s in out)
    tiny_model.eval()
    ref = [_one_at_a_time(tiny_model, tok, s, 6) for s in sources]
    assert out == ref
    assert len(set(out)) > 1  # the check is not vacuous
    assert generate(tiny_model, tok, sources[:3], max_new_tokens=6, batch_size=1) == ref[:3]
    assert generate(tiny_model, tok, [], max_new_tokens=6) == []


def test_generate_stops_at_eos_and_skips_specials(tok):
    class Scripted(torch.nn.Module):
        """A causal LM stub that emits a fixed script after the prompt."""

        def __init__(self, script):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.script = script

        def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kw):
            assert (attention_mask[:, -1] == 1).all()  # left padding
            assert kw["do_sample"] is False
            b = input_ids.shape[0]
            new = torch.tensor([self.script[:max_new_tokens]] * b)
            return torch.cat([input_ids, new], dim=1)

    red, fox = tok.convert_tokens_to_ids(WORD_PREFIX + "red"), tok.convert_tokens_to_ids(WORD_PREFIX + "fox")
    model = Scripted([red, fox, tok.eos_token_id, red, red])
    out = generate(model, tok, ["copy the words : red fox", "copy the words : red"], max_new_tokens=5)
    assert out == ["red fox", "red fox"]


def test_generate_also_stops_at_the_model_config_stop_tokens(tiny_model, tok):
    """Phi-3's generation config lists several stop tokens (<|end|>, ...); passing only the
    tokenizer's eos overrode them, so text after <|end|> was scored."""
    source = "copy the words : red fox"
    free = generate(tiny_model, tok, [source], max_new_tokens=6)[0].split()
    assert len(free) >= 2
    stop = tok.convert_tokens_to_ids(WORD_PREFIX + free[1])
    tiny_model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    try:
        assert generate(tiny_model, tok, [source], max_new_tokens=6) == [" ".join(free[: free.index(free[1])])]
    finally:
        tiny_model.generation_config.eos_token_id = tok.eos_token_id


def test_evaluate_tasks(tiny_model, tok):
    suite = builtin_suite(["reverse_words", "count_words"], n_train=0, n_validation=0, n_test=4, seed=2)
    tasks = {n: td.test for n, td in suite.items()}
    scores = evaluate_tasks(tiny_model, tok, tasks, max_new_tokens=4, batch_size=3)
    assert list(scores) == ["reverse_words", "count_words"]
    for n, exs in tasks.items():
        preds = generate(tiny_model, tok, [e.source for e in exs], max_new_tokens=4)
        assert scores[n] == pytest.approx(rouge_l(preds, [e.target for e in exs]))
    assert evaluate_tasks(tiny_model, tok, suite, max_new_tokens=4) == scores  # TaskData -> test
    with pytest.raises(ValueError, match="empty_task"):
        evaluate_tasks(tiny_model, tok, {"empty_task": []})


# --------------------------------------------------------------------- result files
def test_write_results_json_atomic(tmp_path):
    path = tmp_path / "sub" / "results.json"
    payload = {"scores": {"a": 1.5}, "tensor": torch.tensor([1, 2]), "path": tmp_path}
    write_results_json(path, payload)
    got = json.loads(path.read_text())
    assert got == {"scores": {"a": 1.5}, "tensor": [1, 2], "path": str(tmp_path)}
    write_results_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}
    with pytest.raises(TypeError):
        write_results_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"v": 2}  # old file intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp left


def test_markdown_table():
    rows = [{"method": "sparse", "held_in": 51.436, "held_out": 43.0}, {"method": "a|b", "held_in": None}]
    table = markdown_table(rows, ["method", "held_in", "held_out"])
    assert table.splitlines() == [
        "| method | held_in | held_out |",
        "|---|---|---|",
        "| sparse | 51.44 | 43.00 |",
        "| a\\|b |  |  |",
    ]
