"""The built-in base reads any text: its tokenizer, the unknown-token warning where data are
encoded, generation kept inside the model's positions, and the base's cache key."""
from __future__ import annotations

import random
import warnings

import pytest
import torch

from sparse_engine import data as D
from sparse_engine.evaluation import LengthClippedWarning, fit_to_positions, generate


@pytest.fixture(scope="module")
def tok():
    return D.build_builtin_tokenizer()


def _random_text(rng: random.Random) -> str:
    alphabets = [(0x20, 0x7F), (0xA0, 0x250), (0x370, 0x400), (0x4E00, 0x4F00), (0x1F600, 0x1F650)]
    out = []
    for _ in range(rng.randint(1, 40)):
        if rng.random() < 0.2:
            out.append(rng.choice(" \t\n"))
        else:
            lo, hi = rng.choice(alphabets)
            out.append(chr(rng.randrange(lo, hi)))
    return "".join(out)


def test_any_text_is_read_without_unknown_tokens_and_decoded_back(tok):
    rng = random.Random()
    texts = [_random_text(rng) for _ in range(300)]
    texts += ["What is the plural of the noun 'mouse'?", "Zürich, 東京 and Kraków — naïve café ☕"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        # the decoder drops the one space the pre-tokenizer puts before the first word
        assert tok.decode(ids) == (text[1:] if text.startswith(" ") else text), text


def test_suite_words_stay_one_token_each_and_other_words_are_bytes(tok):
    for w in D.WORDS + D.SOUNDS + D.NUMBERS + D.ANSWER_WORDS + D.PUNCTUATION:
        assert tok.convert_ids_to_tokens(tok(w, add_special_tokens=False)["input_ids"]) == [D.WORD_PREFIX + w]
    word = "Kraków"  # not in the suite: the marker, then one token per UTF-8 byte
    pieces = tok.convert_ids_to_tokens(tok(word, add_special_tokens=False)["input_ids"])
    assert pieces == [D.WORD_PREFIX] + [f"<0x{b:02X}>" for b in word.encode("utf-8")]


def _closed_tokenizer(words):
    """The old closed word-level vocabulary: everything else is <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(D.SPECIAL_TOKENS) + sorted(set(words)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_unknown_tokens_warn_with_their_rate_where_data_are_encoded():
    rng = random.Random()
    known = ["alpha", "beta", "gamma", "delta", "="]
    closed = _closed_tokenizer(known)
    examples, n_unk, n_all = [], 0, 0
    for _ in range(20):
        src = [rng.choice(known[:4] + ["zeta", "eta"]) for _ in range(rng.randint(2, 6))]
        tgt = [rng.choice(known[:4] + ["theta"]) for _ in range(rng.randint(1, 4))]
        examples.append(D.Example(" ".join(src), " ".join(tgt), rng.choice(["task_a", "task_b"])))
        words = src + ["="] + tgt  # the prompt's "=" is a word too
        n_unk += sum(w not in known for w in words)
        n_all += len(words)
    assert n_unk > 0
    with pytest.warns(D.UnknownTokenWarning) as caught:
        dataset = D.TokenizedDataset(examples, closed, max_length=64)
    message = str(caught[0].message)
    assert f"{n_unk / n_all:.1%}" in message and f"({n_unk} of {n_all})" in message
    assert "task_a" in message and "sparse-engine pretrain" in message
    assert dataset.unknown_rate == pytest.approx(n_unk / n_all)
    # the built-in tokenizer reads the same text: no warning, rate 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", D.UnknownTokenWarning)
        assert D.TokenizedDataset(examples, D.build_builtin_tokenizer(), max_length=64).unknown_rate == 0.0


def test_unknown_rate_threshold_is_strict():
    closed = _closed_tokenizer(["w"])
    unk = closed.unk_token_id
    at = [[5] * 98 + [unk] * 2]  # exactly 2%: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error", D.UnknownTokenWarning)
        assert D.warn_unknown_tokens(closed, at, "at the threshold") == pytest.approx(D.UNKNOWN_WARN_RATE)
    with pytest.warns(D.UnknownTokenWarning, match=r"3\.0% .*above"):
        D.warn_unknown_tokens(closed, [[5] * 97 + [unk] * 3], "above")
    # bos / eos / pad are not text
    assert D.unknown_token_rate(closed, [[closed.bos_token_id, unk, closed.eos_token_id, closed.pad_token_id]]) == (1, 1)


def test_fit_to_positions():
    assert fit_to_positions(None, 900, 128) == (900, 128)
    assert fit_to_positions(128, 40, 16) == (40, 16)  # fits: unchanged
    assert fit_to_positions(128, 100, 128) == (64, 64)  # at least half the positions for the answer
    assert fit_to_positions(128, 20, 128) == (20, 108)  # short prompts leave the answer the rest
    assert fit_to_positions(128, 1024, 8) == (120, 8)
    rng = random.Random()
    for _ in range(200):
        positions, longest, new = rng.randint(2, 300), rng.randint(1, 400), rng.randint(1, 300)
        keep, n = fit_to_positions(positions, longest, new)
        assert keep + n <= positions and 1 <= n <= new and keep >= 1


@pytest.fixture(scope="module")
def short_model(tok):
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=24,
                     original_max_position_embeddings=24, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2)
    torch.manual_seed(3)
    return Phi3ForCausalLM(cfg).eval()


def test_generation_never_runs_past_the_model_positions(short_model, tok):
    rng = random.Random()
    sources = ["copy the words : " + " ".join(rng.choice(D.WORDS) for _ in range(rng.randint(12, 30)))
               for _ in range(5)]
    calls = []
    original = short_model.generate

    def spy(**kw):
        calls.append((kw["input_ids"].shape[1], kw["max_new_tokens"]))
        return original(**kw)

    short_model.generate = spy
    try:
        with pytest.warns(LengthClippedWarning, match="24 positions") as caught:
            out = generate(short_model, tok, sources, max_new_tokens=20, max_length=1024)
        # the same prompts and lengths asked for explicitly: the same answers, no note
        keep, new = fit_to_positions(24, max(len(D.encode_prompt(tok, s, 1024)["input_ids"]) for s in sources), 20)
        assert f"last {keep} tokens" in str(caught[0].message) and f"at most {new} new" in str(caught[0].message)
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", LengthClippedWarning)
            assert generate(short_model, tok, sources, max_new_tokens=new, max_length=keep) == out
    finally:
        del short_model.generate
    assert calls and all(width + n <= 24 for width, n in calls)


def test_base_spec_from_the_environment(monkeypatch):
    from sparse_engine.builtin import SPEC_ENV, BuiltinBaseSpec

    monkeypatch.delenv(SPEC_ENV, raising=False)
    assert BuiltinBaseSpec.from_env() == BuiltinBaseSpec()
    monkeypatch.setenv(SPEC_ENV, '{"hidden_size": 32, "num_hidden_layers": 1}')
    spec = BuiltinBaseSpec.from_env()
    assert (spec.hidden_size, spec.num_hidden_layers, spec.max_length) == (32, 1, BuiltinBaseSpec().max_length)
    assert spec.key() != BuiltinBaseSpec().key()
    for bad in ('{"hidden": 3}', "[1]", "not json"):
        monkeypatch.setenv(SPEC_ENV, bad)
        with pytest.raises(ValueError, match=SPEC_ENV):
            BuiltinBaseSpec.from_env()


def test_cache_key_follows_the_tokenizer(monkeypatch):
    """A base cached with another tokenizer must not be loaded with this one."""
    from sparse_engine import builtin

    before = builtin.BuiltinBaseSpec().key()
    pieces = D.builtin_pieces()
    monkeypatch.setattr(builtin.data, "builtin_pieces", lambda: pieces[:-1])
    assert builtin.BuiltinBaseSpec().key() != before


def test_the_cached_base_reads_real_text(tiny_base_cache, tiny_base_spec):
    from sparse_engine.builtin import load_builtin_base

    model, tokenizer = load_builtin_base(tiny_base_spec, cache_dir=tiny_base_cache, progress=False)
    text = "Rewrite the sentence in the past tense: Anna sells the bicycle at the market."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert model.config.max_position_embeddings == tiny_base_spec.max_position_embeddings >= 512
