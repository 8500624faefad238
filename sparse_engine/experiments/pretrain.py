"""A tiny Phi-3 base that knows the user's text (``sparse-engine pretrain``): a byte-level BPE
tokenizer trained on the train rows of FLAN-format files, then a small Phi-3 (the built-in
base's shape) trained as a language model on them, written as a checkpoint for ``--model``."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterable, Sequence

from sparse_engine import data
from sparse_engine.builtin import BuiltinBaseSpec, build_model, pretrain_on, save_base

# The built-in base's shape; sequences of real text are longer than the suite's 48 tokens.
DEFAULT_SPEC = BuiltinBaseSpec(max_length=128, pretrain_epochs=3)
DEFAULT_VOCAB_SIZE = 2048


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, *, max_length: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` learnt from ``texts``: every byte is in its
    alphabet, so it reads any text without an unknown token. Special tokens are the built-in
    tokenizer's (``<pad>``, ``<unk>``, ``<s>``, ``</s>``); ``tokenizer(text)`` prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(data.SPECIAL_TOKENS)
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be >= {256 + len(specials)} (the bytes and special tokens), got {vocab_size}")
    core = Tokenizer(models.BPE())
    # a space before every word, also the first: a target tokenized alone matches its place after "="
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", core.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False, model_max_length=max_length)


def check_out_dir(out, overwrite: bool) -> Path:
    """``out`` may be new or empty; one that holds files is refused unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the base is written as a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} already holds files (an earlier base?); choose another directory or pass "
                         "--overwrite to replace it")
    return out


def pretrain_base(files: Sequence[str] | str, out_dir, *, tasks: Sequence[str] | None = None,
                  vocab_size: int = DEFAULT_VOCAB_SIZE, spec: BuiltinBaseSpec = DEFAULT_SPEC,
                  max_examples_per_task: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Pretrain a tiny Phi-3 on FLAN-format ``files`` and write it to ``out_dir``.

    The tokenizer learns from the train rows of every task in the files (so later experts on
    any of them read their text); the model is trained on the train rows of ``tasks`` (default:
    every task) as a language model, prompt and answer both (``"<source> = <target></s>"``).
    Keep tasks out of ``tasks`` to train experts on them later: a base pretrained on a task has
    already learnt it. Returns the record written to ``out_dir/done.json``.
    """
    out = check_out_dir(out_dir, overwrite)
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    source = files if len(files) > 1 else files[0]
    every = data.load_flan(source, max_examples_per_task=max_examples_per_task, seed=spec.seed)
    chosen = list(dict.fromkeys(tasks)) if tasks else list(every)
    unknown = [t for t in chosen if t not in every]
    if unknown:
        raise ValueError(f"--tasks {unknown}: not in the data; its tasks are {', '.join(every)}")
    examples = [ex for t in chosen for ex in every[t].train]
    if not examples:
        raise ValueError(f"no train rows in the tasks {chosen}")
    start = time.perf_counter()
    texts = (f"{data.format_prompt(ex.source)} {ex.target}" for td in every.values() for ex in td.train)
    tokenizer = train_tokenizer(texts, vocab_size, max_length=spec.max_position_embeddings)
    model = build_model(tokenizer, spec)
    dataset = data.TokenizedDataset(examples, tokenizer, spec.max_length, loss_on_prompt=True)
    result = pretrain_on(model, tokenizer, dataset, spec, progress=progress, desc="pretrain")
    model.config._name_or_path = str(out)
    record = {"spec": asdict(spec), "vocab_size": len(tokenizer), "files": [str(f) for f in files],
              "tokenizer_tasks": list(every), "pretrain_tasks": chosen, "examples": len(examples),
              "parameters": sum(p.numel() for p in model.parameters()),
              "seconds": round(time.perf_counter() - start, 1),
              "pretrain": result.to_dict() | {"losses": result.losses[-5:]}}
    save_base(model, tokenizer, out, record, replace=True)
    return record


def spec_with(**overrides) -> BuiltinBaseSpec:
    """:data:`DEFAULT_SPEC` with the given fields changed (``None`` values keep the default)."""
    return replace(DEFAULT_SPEC, **{k: v for k, v in overrides.items() if v is not None})


def describe(record: dict, out_dir) -> str:
    """The lines ``sparse-engine pretrain`` prints when done."""
    loss = record["pretrain"]["losses"][-1] if record["pretrain"]["losses"] else float("nan")
    return (f"pretrained a {record['parameters']:,}-parameter Phi-3 on {record['examples']} rows of "
            f"{', '.join(record['pretrain_tasks'])}: {record['pretrain']['steps']} steps in {record['seconds']} s, "
            f"last loss {loss:.3f}; tokenizer of {record['vocab_size']} tokens\n"
            f"base: {out_dir} (train experts on it with --model {out_dir})")
