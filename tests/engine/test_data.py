"""Tests of sparse_engine.data: built-in suite, tokenizer, encoding, FLAN loading."""
from __future__ import annotations

import json
import random

import pytest
import torch

from sparse_engine import data as D
from sparse_engine.data import (
    BUILTIN_TASKS,
    HELD_IN,
    HELD_OUT,
    PRETRAIN,
    Example,
    TaskData,
    build_builtin_tokenizer,
    builtin_suite,
    builtin_task_data,
    collate_causal_lm,
    encode_example,
    encode_prompt,
    format_prompt,
    list_builtin_tasks,
    load_flan,
    write_flan_jsonl,
)

ALL = list_builtin_tasks()


@pytest.fixture(scope="module")
def tok():
    return build_builtin_tokenizer()


# ------------------------------------------------------------------ independent references
# Written from the task descriptions, separately from the library's solvers.
_C2F = {"red": "lime", "blue": "plum", "green": "pear", "yellow": "grape", "black": "kiwi",
        "white": "fig", "pink": "lemon", "brown": "peach", "gray": "apple", "purple": "mango"}
_A2S = {"cat": "meow", "dog": "woof", "fox": "yip", "cow": "moo", "pig": "oink", "hen": "cluck",
        "owl": "hoot", "bee": "buzz", "duck": "quack", "rat": "squeak"}
_ANIMALS = set(_A2S)
_FRUITS = {"apple", "pear", "plum", "fig", "lime", "kiwi", "mango", "grape", "lemon", "peach"}
_COLOURS = set(_C2F)
_SOUNDS = set(_A2S.values())


def _kind(w):
    if w.isdigit():
        return "number"
    for name, pool in (("colour", _COLOURS), ("fruit", _FRUITS), ("animal", _ANIMALS), ("sound", _SOUNDS)):
        if w in pool:
            return name
    return "object"


def _ref_interleave(p):
    i = p.index("|")
    out = []
    for a, b in zip(p[:i], p[i + 1:]):
        out += [a, b]
    return out


def _ref_dedup(p):
    out = []
    for w in p:
        if w not in out:
            out.append(w)
    return out


REFERENCE = {
    "reverse_words": lambda p: list(reversed(p)),
    "sort_numbers": lambda p: sorted(p, key=int),
    "first_three": lambda p: p[0:3],
    "last_two": lambda p: [p[-2], p[-1]],
    "remove_repeats": _ref_dedup,
    "colour_to_fruit": lambda p: [_C2F[w] for w in p],
    "keep_animals": lambda p: [w for w in p if w in _ANIMALS],
    "mirror_words": lambda p: p + p[::-1],
    "odd_or_even": lambda p: [("even", "odd")[int(w) & 1] for w in p],
    "largest_number": lambda p: [max(p, key=int)],
    "rotate_left": lambda p: p[1:] + [p[0]],
    "interleave": _ref_interleave,
    "count_words": lambda p: [str(len(p))],
    "swap_pairs": lambda p: [p[i ^ 1] for i in range(len(p))],
    "animal_sounds": lambda p: [_A2S[w] for w in p],
    "say_each_twice": lambda p: [w for w in p for _ in "ab"],
    "add_one": lambda p: [str(int(w) + 1) for w in p],
    "every_other": lambda p: [w for i, w in enumerate(p) if i % 2 == 0],
    "first_and_last": lambda p: [p[0], p[-1]],
    "word_after": lambda p: [p[p.index(p[0], 2) + 1]],
    "sort_descending": lambda p: sorted(p, key=lambda w: -int(w)),
    "smallest_number": lambda p: [min(p, key=int)],
    "fruit_to_colour": lambda p: [next(c for c, f in _C2F.items() if f == w) for w in p],
    "remove_fruits": lambda p: [w for w in p if w not in _FRUITS],
    "drop_first": lambda p: p[1:],
    "double_numbers": lambda p: [str(int(w) * 2) for w in p],
    "count_animals": lambda p: [str(len([w for w in p if w in _ANIMALS]))],
    "middle_word": lambda p: [p[(len(p) - 1) // 2]],
    "keep_even": lambda p: [w for w in p if int(w) % 2 == 0],
    "sound_to_animal": lambda p: [next(a for a, s in _A2S.items() if s == w) for w in p],
    "copy_words": lambda p: p,
    "repeat_sentence": lambda p: p * 2,
    "add_brackets": lambda p: ["(", *p, ")"],
    "append_end": lambda p: [*p, "end"],
    "prepend_hello": lambda p: ["hello", *p],
    "join_with_and": lambda p: " and ".join(p).split(),
    "word_kinds": lambda p: [_kind(w) for w in p],
    "copy_second_list": lambda p: p[p.index("|") + 1:],
}

HAND_MADE = [  # (task, source, target), computed by hand
    ("reverse_words", "reverse the words : red fox cup", "cup fox red"),
    ("sort_numbers", "sort the numbers : 12 3 40 7", "3 7 12 40"),
    ("colour_to_fruit", "turn colours into fruits : red gray red", "lime apple lime"),
    ("interleave", "interleave the two lists : cat dog | pen hat", "cat pen dog hat"),
    ("mirror_words", "mirror the words : cat red pen", "cat red pen pen red cat"),
    ("word_after", "what word follows : red | cup red fox", "fox"),
    ("first_and_last", "give the first and last word : cup red fox hat", "cup hat"),
    ("swap_pairs", "swap each pair : a b c d", "b a d c"),
    ("keep_animals", "keep only the animals : red cat pen owl", "cat owl"),
    ("count_animals", "count the animals : red cat pen owl", "2"),
    ("remove_repeats", "remove repeated words : fox red fox cup red", "fox red cup"),
    ("sound_to_animal", "who makes these sounds : moo quack", "cow duck"),
    ("middle_word", "give the middle word : cup pen hat key box", "hat"),
]


def _payload(ex):
    head, sep, tail = ex.source.partition(" : ")
    assert sep, ex.source
    return head, tail.split()


# ------------------------------------------------------------------------- the suite
def test_groups_sizes_and_disjointness():
    assert len(HELD_IN) == 20 and len(set(HELD_IN)) == 20
    assert len(HELD_OUT) == 10 and len(set(HELD_OUT)) == 10
    assert 6 <= len(PRETRAIN) <= 10 and len(set(PRETRAIN)) == len(PRETRAIN)
    assert not (set(HELD_IN) & set(HELD_OUT))
    assert not (set(PRETRAIN) & (set(HELD_IN) | set(HELD_OUT)))
    assert set(ALL) == set(BUILTIN_TASKS) and len(ALL) >= 30 + 6
    assert list_builtin_tasks("held_out") == list(HELD_OUT)
    assert set(REFERENCE) == set(ALL), "every built-in task needs an independent reference here"


def test_instructions_distinct_and_templates():
    instr = [BUILTIN_TASKS[n].instruction for n in ALL]
    assert len(set(instr)) == len(instr)
    for n in ALL:
        ex = builtin_task_data(n, 0, 0, 3, seed=5).test[0]
        head, _ = _payload(ex)
        assert head == BUILTIN_TASKS[n].instruction
        assert ex.task_name == n


@pytest.mark.parametrize("name", ALL)
def test_task_matches_reference_and_is_small(name):
    td = builtin_task_data(name, n_train=40, n_validation=10, n_test=10, seed=random.randrange(10**6))
    for ex in td.train + td.validation + td.test:
        _, payload = _payload(ex)
        assert ex.target.split() == REFERENCE[name](payload), ex
        assert len(ex.source.split()) <= 14, ex.source
        assert 1 <= len(ex.target.split()) <= 10, ex.target


@pytest.mark.parametrize("task,source,target", HAND_MADE)
def test_hand_made_examples(task, source, target):
    head, payload = _payload(Example(source, target, task))
    assert head == BUILTIN_TASKS[task].instruction
    assert BUILTIN_TASKS[task].solve(payload) == target.split()


@pytest.mark.parametrize("name", ALL)
def test_deterministic_per_seed_and_splits_disjoint(name):
    seed = random.randrange(10**6)
    a = builtin_task_data(name, 30, 10, 10, seed=seed)
    b = builtin_task_data(name, 30, 10, 10, seed=seed)
    c = builtin_task_data(name, 30, 10, 10, seed=seed + 1)
    assert a == b
    assert a.test != c.test or a.train != c.train
    tr, va, te = ({e.source for e in s} for s in (a.train, a.validation, a.test))
    assert len(va) == 10 and len(te) == 10  # evaluation sources are distinct
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert a.sizes == {"train": 30, "validation": 10, "test": 10}


def test_default_sizes_and_test_set_independent_of_train_size():
    td = builtin_task_data("reverse_words")
    assert td.sizes == {"train": 1000, "validation": 100, "test": 100}
    small = builtin_task_data("reverse_words", n_train=5, n_validation=100, n_test=100)
    assert small.test == td.test


def test_no_two_tasks_trivially_the_same():
    """For every pair (A, B), B's function must disagree with A's on A's inputs, or A's
    with B's on B's inputs, most of the time (a task that only renames another would
    agree on both)."""
    rng = random.Random(1234)
    payloads = {n: [BUILTIN_TASKS[n].make_input(rng) for _ in range(100)] for n in ALL}

    def agreement(a, b):
        same = 0
        for p in payloads[a]:
            try:
                same += BUILTIN_TASKS[b].solve(list(p)) == REFERENCE[a](list(p))
            except Exception:  # B undefined on A's input: different
                pass
        return same / len(payloads[a])

    for i, a in enumerate(ALL):
        for b in ALL[i + 1:]:
            assert min(agreement(a, b), agreement(b, a)) < 0.5, (a, b)


def test_unknown_builtin_name_lists_known():
    with pytest.raises(ValueError, match="reverse_words"):
        builtin_task_data("no_such_task")
    with pytest.raises(ValueError, match="no_such_task"):
        builtin_suite(["reverse_words", "no_such_task"])
    with pytest.raises(ValueError, match="n_train"):
        builtin_task_data("reverse_words", n_train=-1)


def test_impossible_request_is_a_clear_error(monkeypatch):
    three = D.BuiltinTask("three_inputs", "held_in", "copy the words", "3 possible inputs",
                          lambda rng: [rng.choice(["red", "cup", "fox"])], lambda p: p)
    monkeypatch.setitem(D.BUILTIN_TASKS, "three_inputs", three)
    td = builtin_task_data("three_inputs", n_train=20, n_validation=0, n_test=2)
    assert {e.source for e in td.train} | {e.source for e in td.validation + td.test} == {
        "copy the words : red", "copy the words : cup", "copy the words : fox"}
    assert len(td.train) == 20 and len({e.source for e in td.train}) == 1  # repeats, never eval
    with pytest.raises(ValueError, match="distinct test"):
        builtin_task_data("three_inputs", n_train=0, n_validation=0, n_test=4)
    with pytest.raises(ValueError, match="no distinct input for train"):
        builtin_task_data("three_inputs", n_train=1, n_validation=1, n_test=2)


# ---------------------------------------------------------------------- tokenizer
def test_every_produced_word_is_in_vocabulary(tok):
    unk = tok.unk_token_id
    for seed in (0, 1):
        for name in ALL:
            td = builtin_task_data(name, 60, 10, 10, seed=seed)
            for ex in td.train + td.test:
                for text in (format_prompt(ex.source), ex.target):
                    ids = tok(text, add_special_tokens=False)["input_ids"]
                    assert unk not in ids, (name, text)
                    assert len(ids) == len(text.split())  # one token per word
    # the answer vocabulary of every mapping / pool
    for w in D.WORDS + D.SOUNDS + D.NUMBERS + D.ANSWER_WORDS + D.PUNCTUATION:
        assert tok.convert_tokens_to_ids(D.WORD_PREFIX + w) != unk, w


def test_tokenizer_deterministic_and_special_tokens(tok):
    again = build_builtin_tokenizer()
    assert tok.get_vocab() == again.get_vocab()
    assert D.builtin_pieces()[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert (tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token) == ("<pad>", "<unk>", "<s>", "</s>")
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert len(tok) == len(D.builtin_pieces()) == 4 + len(D.builtin_vocabulary()) + 1 + 256
    text = "reverse the words : red fox 17 | cup = cup 17 fox red"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[1:] + [tok.eos_token_id], skip_special_tokens=True) == text


def test_tokenizer_save_and_autotokenizer_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    rng = random.Random()
    texts = [builtin_task_data(n, 0, 0, 2, seed=rng.randrange(1000)).test[0] for n in rng.sample(ALL, 8)]
    for ex in texts:
        for text in (ex.source, ex.target, format_prompt(ex.source) + " " + ex.target):
            assert loaded(text)["input_ids"] == tok(text)["input_ids"]
            assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == (2, 3, 0, 1)
    ex = texts[0]
    assert encode_example(loaded, ex, 64) == encode_example(tok, ex, 64)


# ----------------------------------------------------------------------- encoding
def _words_ids(tok, text):
    return [tok.convert_tokens_to_ids(D.WORD_PREFIX + w) for w in text.split()]  # independent of the encoder


def test_format_prompt():
    assert format_prompt("  copy the words : red ") == "copy the words : red ="


def test_encode_example_labels_mask_exactly_the_prompt(tok):
    rng = random.Random()
    for name in rng.sample(ALL, 6):
        ex = builtin_task_data(name, 0, 0, 1, seed=rng.randrange(10**6)).test[0]
        enc = encode_example(tok, ex, 64)
        prompt = _words_ids(tok, ex.source) + [tok.convert_tokens_to_ids(D.WORD_PREFIX + "=")]
        target = _words_ids(tok, ex.target) + [tok.eos_token_id]
        assert enc["input_ids"] == [tok.bos_token_id] + prompt + target
        assert enc["labels"] == [-100] * (1 + len(prompt)) + target
        assert enc["attention_mask"] == [1] * len(enc["input_ids"])


def test_encode_example_left_truncates_the_prompt(tok):
    rng = random.Random()
    words = [rng.choice(D.WORDS) for _ in range(40)]
    ex = Example("copy the words : " + " ".join(words), " ".join(words[:5]), "copy_words")
    prompt = _words_ids(tok, format_prompt(ex.source))
    target = _words_ids(tok, ex.target) + [tok.eos_token_id]
    max_length = 20
    enc = encode_example(tok, ex, max_length)
    assert len(enc["input_ids"]) == max_length
    keep = max_length - 1 - len(target)
    assert enc["input_ids"] == [tok.bos_token_id] + prompt[-keep:] + target
    assert enc["input_ids"][keep] == tok.convert_tokens_to_ids(D.WORD_PREFIX + "=")  # prompt end kept
    assert enc["labels"] == [-100] * (1 + keep) + target


def test_encode_example_overlong_target_is_cut_on_the_right(tok):
    ex = Example("copy the words : red", " ".join(["cup"] * 30), "t")
    enc = encode_example(tok, ex, 16)
    prompt = _words_ids(tok, format_prompt(ex.source))  # 6 tokens < (16-1)//2
    assert len(enc["input_ids"]) == 16
    assert enc["input_ids"][: 1 + len(prompt)] == [tok.bos_token_id] + prompt
    assert enc["input_ids"][1 + len(prompt):] == [tok.convert_tokens_to_ids(D.WORD_PREFIX + "cup")] * (15 - len(prompt))
    with pytest.raises(ValueError, match="max_length"):
        encode_example(tok, ex, 2)


def test_encode_prompt_left_truncation(tok):
    words = " ".join(random.Random().choice(D.WORDS) for _ in range(30))
    full = _words_ids(tok, format_prompt("copy the words : " + words))
    enc = encode_prompt(tok, "copy the words : " + words, 64)
    assert enc["input_ids"] == [tok.bos_token_id] + full
    enc = encode_prompt(tok, "copy the words : " + words, 10)
    assert enc["input_ids"] == [tok.bos_token_id] + full[-9:]
    assert enc["attention_mask"] == [1] * 10


def test_collate_pads_right(tok):
    rng = random.Random()
    batch = []
    for _ in range(5):
        n, m = rng.randint(1, 9), rng.randint(1, 4)
        ids = [rng.randrange(4, len(tok)) for _ in range(n + m)]
        labels = [-100] * n + ids[n:]
        item = {"input_ids": ids, "labels": labels, "attention_mask": [1] * (n + m)}
        batch.append(item if rng.random() < 0.5 else {k: torch.tensor(v) for k, v in item.items()})
    out = collate_causal_lm(batch, pad_token_id=tok.pad_token_id)
    width = max(len(b["input_ids"]) for b in batch)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (5, width)
    for row, b in enumerate(batch):
        ids = list(map(int, b["input_ids"]))
        pad = width - len(ids)
        assert out["input_ids"][row].tolist() == ids + [tok.pad_token_id] * pad
        assert out["labels"][row].tolist() == list(map(int, b["labels"])) + [-100] * pad
        assert out["attention_mask"][row].tolist() == [1] * len(ids) + [0] * pad
    no_labels = collate_causal_lm([{"input_ids": [5, 6]}, {"input_ids": [7]}], pad_token_id=0)
    assert "labels" not in no_labels and no_labels["input_ids"].tolist() == [[5, 6], [7, 0]]


def test_tokenized_dataset_with_dataloader(tok):
    td = builtin_task_data("interleave", 10, 0, 0, seed=3)
    ds = D.TokenizedDataset(td.train, tok, max_length=32)
    assert len(ds) == 10 and ds[3] == encode_example(tok, td.train[3], 32)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, collate_fn=lambda b: collate_causal_lm(b, tok.pad_token_id)
    )
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert all((b["labels"][b["attention_mask"] == 0] == -100).all() for b in batches)
    with pytest.raises(ValueError):
        D.TokenizedDataset([], tok)


# ---------------------------------------------------------------------- FLAN loading
def _rows(n_tasks=3, per_task=40, seed=0):
    rng = random.Random(seed)
    rows = []
    for t in range(n_tasks):
        for i in range(per_task):
            rows.append({"source": f"src {t} {i} {rng.random():.6f}", "target": f"tgt {t} {i}",
                         "task_name": f"task_{t}"})
    rng.shuffle(rows)
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


def test_load_flan_round_trips_builtin_export(tmp_path, cache):
    suite = builtin_suite(["reverse_words", "add_one"], n_train=20, n_validation=5, n_test=7, seed=1)
    path = write_flan_jsonl(suite, tmp_path / "flan.jsonl")
    loaded = load_flan(path, cache_dir=cache)
    assert set(loaded) == {"reverse_words", "add_one"}
    for name, td in suite.items():
        assert loaded[name] == td  # split column used, order kept
    only = load_flan(str(path), tasks=["add_one"], cache_dir=cache)
    assert list(only) == ["add_one"] and only["add_one"] == suite["add_one"]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_load_flan_formats_without_split_column(tmp_path, cache, fmt):
    rows = _rows()
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    out = load_flan(path, val_fraction=0.1, test_fraction=0.2, seed=7, cache_dir=cache)
    assert list(out) == ["task_0", "task_1", "task_2"]
    for name, td in out.items():
        assert isinstance(td, TaskData) and td.sizes == {"train": 28, "validation": 4, "test": 8}
        want = {(r["source"], r["target"]) for r in rows if r["task_name"] == name}
        got = [(e.source, e.target) for e in td.train + td.validation + td.test]
        assert len(got) == len(set(got)) and set(got) == want
        assert all(e.task_name == name for e in td.train + td.validation + td.test)
    again = load_flan(path, val_fraction=0.1, test_fraction=0.2, seed=7, cache_dir=cache)
    other = load_flan(path, val_fraction=0.1, test_fraction=0.2, seed=8, cache_dir=cache)
    assert again == out
    assert any(other[n].test != out[n].test for n in out)


def test_load_flan_split_column_filter_and_cap(tmp_path, cache):
    rows = _rows(per_task=30)
    for i, r in enumerate(rows):
        r["split"] = ("train", "valid", "test")[i % 3]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    out = load_flan([path], tasks=["task_2", "task_0"], cache_dir=cache)
    assert list(out) == ["task_2", "task_0"]
    for name, td in out.items():
        for split, alias in (("train", "train"), ("validation", "valid"), ("test", "test")):
            want = [r["source"] for r in rows if r["task_name"] == name and r["split"] == alias]
            assert [e.source for e in getattr(td, split)] == want  # file order
    capped = load_flan(path, tasks=["task_1"], max_examples_per_task=12, cache_dir=cache)
    assert sum(capped["task_1"].sizes.values()) == 12


def test_load_flan_directory_and_multiple_files(tmp_path, cache):
    rows = _rows(n_tasks=2, per_task=10)
    d = tmp_path / "dir"
    d.mkdir()
    _write_jsonl(d / "a.jsonl", rows[:7])
    _write_jsonl(d / "b.jsonl", rows[7:])
    out = load_flan(d, val_fraction=0.0, test_fraction=0.0, cache_dir=cache)
    assert sorted(e.source for td in out.values() for e in td.train) == sorted(r["source"] for r in rows)


def test_load_flan_bad_inputs(tmp_path, cache):
    rows = _rows(n_tasks=2, per_task=5)
    good = _write_jsonl(tmp_path / "good.jsonl", rows)
    with pytest.raises(ValueError, match="target"):  # missing column named
        load_flan(_write_jsonl(tmp_path / "nocol.jsonl", [{"source": "a", "task_name": "t"}]), cache_dir=cache)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_flan(empty, cache_dir=cache)
    with pytest.raises(ValueError, match="unknown task.*task_0"):  # lists available names
        load_flan(good, tasks=["nope"], cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_flan(tmp_path / "missing.jsonl", cache_dir=cache)
    bad = tmp_path / "data.csv"
    bad.write_text("source,target,task_name\na,b,c\n")
    with pytest.raises(ValueError, match="extension"):
        load_flan(bad, cache_dir=cache)
    with pytest.raises(ValueError, match="val_fraction"):
        load_flan(good, val_fraction=0.6, test_fraction=0.5, cache_dir=cache)
    rows_bad_split = [dict(r, split="holdout") for r in rows]
    with pytest.raises(ValueError, match="holdout"):
        load_flan(_write_jsonl(tmp_path / "bs.jsonl", rows_bad_split), cache_dir=cache)


@pytest.mark.parametrize("value,kind", [(["a", "b"], "JSON list"), ({"k": 1}, "JSON object"), (7, "number"),
                                        (True, "boolean")])
@pytest.mark.parametrize("column", ["source", "target", "task_name"])
def test_load_flan_refuses_non_text_naming_line_and_column(tmp_path, cache, value, kind, column):
    rows = _rows(n_tasks=1, per_task=6)
    rows[3] = dict(rows[3], **{column: value})  # a string column until line 4: no reader may turn it into text
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=rf"d\.jsonl line 4, column '{column}': a {kind} .*not a string"):
        load_flan(path, cache_dir=cache)
    # a JSON file holding a list names the row
    listed = tmp_path / "d.json"
    listed.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=rf"d\.json row 4, column '{column}'"):
        load_flan(listed, cache_dir=cache)


def test_load_flan_names_the_bad_row_of_a_parquet_file(tmp_path, cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r, target=[r["target"]]) for r in _rows(n_tasks=1, per_task=4)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match=r"row 1, column 'target': a JSON list"):
        load_flan(path, cache_dir=cache)


def test_load_flan_names_the_line_of_a_malformed_row(tmp_path, cache):
    lines = [json.dumps(r) for r in _rows(n_tasks=1, per_task=5)]
    lines.insert(2, "")  # blank lines are skipped, but still counted
    lines[4] = lines[4][:-1]  # line 5 loses its closing brace
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl line 5 is not valid JSON"):
        load_flan(path, cache_dir=cache)
    (tmp_path / "null.jsonl").write_text(lines[0] + "\n" + json.dumps({"source": "a", "target": None,
                                                                     "task_name": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"null\.jsonl line 2 has no value in column 'target'"):
        load_flan(tmp_path / "null.jsonl", cache_dir=cache)


def test_load_flan_caps_train_and_test_only(tmp_path, cache):
    path = _write_jsonl(tmp_path / "d.jsonl", _rows(n_tasks=2, per_task=50))
    full = load_flan(path, seed=1, cache_dir=cache)
    capped = load_flan(path, n_train=7, n_test=3, seed=1, cache_dir=cache)
    for name, td in capped.items():
        assert td.sizes == {"train": 7, "validation": 5, "test": 3}
        assert td.validation == full[name].validation
        # a sample of the full splits, in their order
        for split in ("train", "test"):
            whole = getattr(full[name], split)
            positions = [whole.index(ex) for ex in getattr(td, split)]
            assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert load_flan(path, n_train=7, n_test=3, seed=1, cache_dir=cache) == capped
    assert load_flan(path, n_train=1000, seed=1, cache_dir=cache) == full  # a cap above the size changes nothing
    with pytest.raises(ValueError, match="n_train must be >= 1"):
        load_flan(path, n_train=0, cache_dir=cache)
