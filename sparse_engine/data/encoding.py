"""Prompt format and tokenization: ``"<source> ="`` continued by ``" <target></s>"``; training
sequences ``[bos] prompt target [eos]`` with the loss on ``target [eos]`` only; batching; a
warning when the tokenizer cannot read the text (too many unknown tokens)."""
from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import torch

from sparse_engine.data.records import IGNORE_INDEX, PROMPT_SEPARATOR, Example

def format_prompt(source: str) -> str:
    """The prompt template: ``f"{source} ="`` (source stripped of outer whitespace).

    The target follows after a space; generation continues from the ``=``."""
    return f"{source.strip()} {PROMPT_SEPARATOR}"


def _text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def encode_example(tokenizer, example: Example, max_length: int, *,
                   loss_on_prompt: bool = False) -> dict[str, list[int]]:
    """``[bos] prompt target [eos]`` with labels -100 on ``[bos] prompt`` (on ``[bos]`` only
    with ``loss_on_prompt``: language-model pretraining learns the prompts' text too).

    Prompt and target are tokenized separately (no special tokens) and concatenated.
    Truncation, when ``1 + len(prompt) + len(target) + 1 > max_length``:

    * the target keeps ``target + [eos]`` whole as long as that leaves the prompt at
      least ``min(len(prompt), (max_length - 1) // 2)`` tokens; otherwise ``target+[eos]``
      is cut on the right to fit (the eos is then lost);
    * the prompt is truncated on the LEFT (its end, with the ``=`` separator, is kept).

    Returns python lists ``input_ids``, ``labels``, ``attention_mask``.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("encode_example: the tokenizer has no eos token")
    bos = _bos(tokenizer)
    if max_length < len(bos) + 2:
        raise ValueError(f"encode_example: max_length must be >= {len(bos) + 2}, got {max_length}")
    prompt = _text_ids(tokenizer, format_prompt(example.source))
    answer = _text_ids(tokenizer, example.target) + [tokenizer.eos_token_id]
    budget = max_length - len(bos)
    if len(prompt) + len(answer) > budget:
        prompt_floor = min(len(prompt), budget // 2)
        answer = answer[: max(budget - prompt_floor, 1)]
        keep = budget - len(answer)
        prompt = prompt[len(prompt) - keep:] if keep > 0 else []
    input_ids = bos + prompt + answer
    labels = [IGNORE_INDEX] * len(bos) + (prompt if loss_on_prompt else [IGNORE_INDEX] * len(prompt)) + answer
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def encode_prompt(tokenizer, source: str, max_length: int) -> dict[str, list[int]]:
    """``[bos] format_prompt(source)`` for generation, the prompt left-truncated so the
    whole is at most ``max_length`` tokens."""
    bos = _bos(tokenizer)
    if max_length < len(bos) + 1:
        raise ValueError(f"encode_prompt: max_length must be >= {len(bos) + 1}, got {max_length}")
    prompt = _text_ids(tokenizer, format_prompt(source))
    keep = max_length - len(bos)
    if len(prompt) > keep:
        prompt = prompt[len(prompt) - keep:]
    ids = bos + prompt
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


# Above this fraction of unknown tokens the model learns (and emits) <unk> instead of the text.
UNKNOWN_WARN_RATE = 0.02


class UnknownTokenWarning(UserWarning):
    """The tokenizer maps too much of the data to its unknown token."""


def unknown_token_rate(tokenizer, id_lists: Iterable[Sequence[int]]) -> tuple[int, int]:
    """(unknown tokens, text tokens) over ``id_lists``; bos, eos and pad are not text."""
    unk = tokenizer.unk_token_id
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    n_unk = n_text = 0
    for ids in id_lists:
        for t in ids:
            if t not in special:
                n_text += 1
                n_unk += t == unk
    return (n_unk if unk is not None else 0), n_text


def warn_unknown_tokens(tokenizer, id_lists: Iterable[Sequence[int]], what: str) -> float:
    """Warn (:class:`UnknownTokenWarning`) when more than ``UNKNOWN_WARN_RATE`` of the text
    tokens in ``id_lists`` are the tokenizer's unknown token; returns that fraction."""
    n_unk, n_text = unknown_token_rate(tokenizer, id_lists)
    rate = n_unk / n_text if n_text else 0.0
    if rate > UNKNOWN_WARN_RATE:
        warnings.warn(
            f"{rate:.1%} of the tokens of {what} ({n_unk} of {n_text}) are the tokenizer's unknown token "
            f"{tokenizer.unk_token!r}: the model cannot read this text and learns to emit {tokenizer.unk_token!r}. "
            "Use a model whose tokenizer covers it, e.g. one made by `sparse-engine pretrain --data FILES --out DIR` "
            "and passed as --model DIR.", UnknownTokenWarning, stacklevel=3)
    return rate


def _describe(examples: Sequence[Example]) -> str:
    names = sorted({ex.task_name for ex in examples})
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"the examples of {shown}"


class TokenizedDataset(torch.utils.data.Dataset):
    """Examples encoded once with :func:`encode_example`; items are dicts of lists. Warns
    (:class:`UnknownTokenWarning`) when the tokenizer cannot read the examples' text."""

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int = 128, *,
                 loss_on_prompt: bool = False):
        if len(examples) == 0:
            raise ValueError("TokenizedDataset: no examples")
        self.max_length = int(max_length)
        self.items = [encode_example(tokenizer, ex, self.max_length, loss_on_prompt=loss_on_prompt)
                      for ex in examples]
        self.unknown_rate = warn_unknown_tokens(tokenizer, (it["input_ids"] for it in self.items),
                                                _describe(examples))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def collate_causal_lm(batch: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` with ``pad_token_id``, ``labels`` with -100,
    ``attention_mask`` with 0. Items hold lists or 1-D tensors; ``labels`` is optional
    (present in the output only when every item has it)."""
    if len(batch) == 0:
        raise ValueError("collate_causal_lm: empty batch")
    if pad_token_id is None:
        raise ValueError("collate_causal_lm: pad_token_id is None")

    def as_list(x):
        return x.tolist() if isinstance(x, torch.Tensor) else list(x)

    ids = [as_list(b["input_ids"]) for b in batch]
    width = max(len(x) for x in ids)
    out = {
        "input_ids": torch.tensor([x + [pad_token_id] * (width - len(x)) for x in ids], dtype=torch.long),
        "attention_mask": torch.tensor(
            [as_list(b.get("attention_mask", [1] * len(x))) + [0] * (width - len(x)) for b, x in zip(batch, ids)],
            dtype=torch.long,
        ),
    }
    if all("labels" in b for b in batch):
        labels = [as_list(b["labels"]) for b in batch]
        out["labels"] = torch.tensor(
            [y + [IGNORE_INDEX] * (width - len(y)) for y in labels], dtype=torch.long
        )
    return out
