"""Evaluation: batched greedy generation and Rouge-L, as in the paper (section 4).

* :func:`generate` runs greedy decoding on prompts built by
  :func:`sparse_engine.data.encode_prompt` (``[bos] "<source> ="``, left-truncated),
  left-padded in batches, and returns the decoded continuations. Prompt plus new tokens
  never run past the model's positions (``max_position_embeddings``): both are clipped,
  with a :class:`LengthClippedWarning` naming the new lengths.
* :func:`rouge_l` is Rouge-L F-measure x 100 from ``rouge-score`` with the Porter
  stemmer on, max over the references of an example, mean over examples.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import torch

from sparse_engine._files import atomic_write
from sparse_engine.data import Example, TaskData, encode_prompt, warn_unknown_tokens

__all__ = [
    "rouge_l",
    "generate",
    "LengthClippedWarning",
    "model_positions",
    "fit_to_positions",
    "evaluate_tasks",
    "mean_score",
    "write_results_json",
    "markdown_table",
]


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean over examples of the best Rouge-L F-measure (x 100) against its references.

    ``references[i]`` is one string or a non-empty list of strings.
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("rouge_l: predictions and references must be lists, not a single string")
    if len(predictions) == 0:
        raise ValueError("rouge_l: no predictions (empty list)")
    if len(predictions) != len(references):
        raise ValueError(
            f"rouge_l: {len(predictions)} predictions but {len(references)} references"
        )
    scorer = _scorer()
    total = 0.0
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if isinstance(refs, str):
            refs = [refs]
        if len(refs) == 0:
            raise ValueError(f"rouge_l: example {i} has no reference")
        best = max(scorer.score(str(r), str(pred))["rougeL"].fmeasure for r in refs)
        total += best
    return 100.0 * total / len(predictions)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _config_stop_tokens(model) -> list[int]:
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    if ids is None:
        return []
    return [int(t) for t in (ids if isinstance(ids, (list, tuple)) else [ids])]


class LengthClippedWarning(UserWarning):
    """Prompts or generation length were cut to fit the model's positions."""


def model_positions(model) -> int | None:
    """The model's ``max_position_embeddings`` (None when its config has none)."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if n else None


def fit_to_positions(positions: int | None, longest_prompt: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt tokens kept, new tokens) so that their sum fits ``positions``.

    Unchanged when it already fits; otherwise the new tokens keep what the longest prompt
    leaves, but at least half the positions, and the prompts keep the rest (cut on the left)."""
    if positions is None or longest_prompt + max_new_tokens <= positions:
        return longest_prompt, max_new_tokens
    if positions < 2:
        raise ValueError(f"the model has {positions} position(s): no room for a prompt and an answer")
    new = min(max_new_tokens, max(positions - longest_prompt, positions // 2))
    return positions - new, new


def generate(
    model,
    tokenizer,
    sources: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    max_length: int = 128,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of ``format_prompt(source)`` for every source, in input order.

    Prompts are ``[bos] prompt`` left-truncated to ``max_length`` tokens, sorted by
    length (longest first) into batches of ``batch_size``, LEFT-padded with the pad token
    (eos when the tokenizer has none) and a zero attention mask. Decoding stops at eos;
    the text returned is the continuation only, special tokens skipped, stripped.
    When the longest prompt plus ``max_new_tokens`` exceeds the model's positions, both are
    clipped by :func:`fit_to_positions` with a :class:`LengthClippedWarning`; prompts the
    tokenizer cannot read warn with :class:`~sparse_engine.data.UnknownTokenWarning`.
    The model runs in eval mode under ``torch.no_grad()``; its training flag is restored.
    """
    if isinstance(sources, str):
        raise ValueError("generate: `sources` must be a list of strings, not a string")
    if batch_size < 1:
        raise ValueError(f"generate: batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    sources = list(sources)
    if not sources:
        return []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("generate: the tokenizer has no eos token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # Stop at the tokenizer's eos and at every stop token of the model's generation config
    # (Phi-3 lists <|end|> there): passing one eos_token_id would override that list.
    stops = [eos] + [t for t in _config_stop_tokens(model) if t != eos]

    prompts = [encode_prompt(tokenizer, s, max_length)["input_ids"] for s in sources]
    warn_unknown_tokens(tokenizer, prompts, f"the {len(prompts)} prompt(s) given to generate")
    positions = model_positions(model)
    longest = max(len(p) for p in prompts)
    keep, new_tokens = fit_to_positions(positions, longest, int(max_new_tokens))
    if (keep, new_tokens) != (longest, max_new_tokens):
        warnings.warn(
            f"generate: prompts of up to {longest} tokens plus max_new_tokens={max_new_tokens} exceed the model's "
            f"{positions} positions (max_position_embeddings): prompts keep their last {keep} tokens and at most "
            f"{new_tokens} new tokens are generated", LengthClippedWarning, stacklevel=2)
        if keep < longest:
            prompts = [encode_prompt(tokenizer, s, keep)["input_ids"] for s in sources]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # stable
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    device = _model_device(model)
    outputs: list[str | None] = [None] * len(sources)

    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="generate", leave=False)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for idx in iterator:
                width = max(len(prompts[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    p = prompts[i]
                    ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                    mask[row, width - len(p):] = 1
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=stops,
                    pad_token_id=pad,
                )
                new = out[:, width:].tolist()
                for row, i in enumerate(idx):
                    toks = new[row]
                    end = next((j for j, t in enumerate(toks) if t in stops), len(toks))
                    toks = toks[:end]
                    outputs[i] = tokenizer.decode(toks, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return outputs  # type: ignore[return-value]


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Mapping[str, Sequence[Example] | TaskData],
    *,
    progress: bool = False,
    **gen_kwargs,
) -> dict[str, float]:
    """Rouge-L of greedy generations, per task: ``{task: score}``.

    Values are lists of :class:`Example` (their ``target`` is the reference); a
    :class:`TaskData` is evaluated on its ``test`` split. ``gen_kwargs`` go to
    :func:`generate`.
    """
    gen_kwargs.pop("progress", None)
    items = list(tasks.items())
    iterator = items
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(items, desc="evaluate", unit="task")
    scores: dict[str, float] = {}
    for name, examples in iterator:
        if isinstance(examples, TaskData):
            examples = examples.test
        examples = list(examples)
        if not examples:
            raise ValueError(f"evaluate_tasks: task {name!r} has no examples to evaluate")
        preds = generate(model, tokenizer, [ex.source for ex in examples], **gen_kwargs)
        scores[name] = rouge_l(preds, [ex.target for ex in examples])
    return scores


def mean_score(scores: Mapping[str, float]) -> float:
    """Unweighted mean over tasks."""
    if not scores:
        raise ValueError("mean_score: no scores")
    return float(sum(float(v) for v in scores.values()) / len(scores))


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def write_results_json(path, payload) -> Path:
    """Write ``payload`` as indented JSON, atomically (temp file in the same folder,
    fsync, ``os.replace``). Parent folders are created."""
    text = json.dumps(payload, indent=2, default=_json_default, allow_nan=True)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(Path(path), write)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    """A GitHub-markdown table of ``rows`` restricted to ``columns`` (floats with 2
    decimals, missing cells empty, ``|`` escaped)."""
    columns = list(columns)
    if not columns:
        raise ValueError("markdown_table: no columns")
    lines = [
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
