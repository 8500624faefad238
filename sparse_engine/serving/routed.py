"""Routed evaluation: every request sent to its own expert, all in mixed batches."""
from __future__ import annotations

from collections.abc import Mapping

from sparse_engine.serving.library import AdapterLibrary


def evaluate_routed(library: AdapterLibrary, tokenizer, tasks: Mapping, routes: Mapping[str, str | None] | None = None,
                    *, batch_size: int = 32, max_new_tokens: int = 16, max_length: int = 48,
                    progress: bool = False, return_predictions: bool = False):
    """Rouge-L per task with every request sent to its task's expert, in mixed batches.

    ``tasks``: ``{task: [Example] | TaskData}`` (the ``test`` split of a TaskData);
    ``routes``: ``{task: adapter name or None}`` (default: the adapter named like the task).
    All requests are pooled, ordered and batched exactly like
    :func:`sparse_engine.evaluation.generate` (longest prompt first, left padding, greedy), and
    each batch runs once with its per-row experts, so a score equals the task's expert evaluated
    alone up to the other rows' padding. Returns ``{task: Rouge-L}``, or
    ``(scores, {task: [prediction]})`` with ``return_predictions``.
    """
    from sparse_engine import evaluation
    from sparse_engine.data import TaskData, encode_prompt

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    routes = dict(routes) if routes is not None else {t: t for t in tasks}
    requests = []  # (task, example)
    for task, examples in tasks.items():
        if task not in routes:
            raise ValueError(f"no route for task {task!r}; routes cover {sorted(routes)[:10]}")
        if routes[task] is not None and routes[task] not in library:
            raise ValueError(f"task {task!r} is routed to {routes[task]!r}, which is not registered; "
                             f"registered: {library.names[:20]}")
        if isinstance(examples, TaskData):
            examples = examples.test
        examples = list(examples)
        if not examples:
            raise ValueError(f"task {task!r} has no examples to evaluate")
        requests.extend((task, ex) for ex in examples)
    lengths = [len(encode_prompt(tokenizer, ex.source, max_length)["input_ids"]) for _, ex in requests]
    order = sorted(range(len(requests)), key=lambda i: -lengths[i])  # the order generate() uses
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="routed", leave=False)
    predictions: list[str | None] = [None] * len(requests)
    for idx in batches:
        names = [routes[requests[i][0]] for i in idx]
        with library.use(names):
            outs = evaluation.generate(library.model, tokenizer, [requests[i][1].source for i in idx],
                                       max_new_tokens=max_new_tokens, batch_size=len(idx), max_length=max_length)
        for i, text in zip(idx, outs):
            predictions[i] = text
    scores, per_task = {}, {}
    for task in tasks:
        sel = [i for i, (t, _) in enumerate(requests) if t == task]
        per_task[task] = [predictions[i] for i in sel]
        scores[task] = evaluation.rouge_l(per_task[task], [requests[i][1].target for i in sel])
    return (scores, per_task) if return_predictions else scores
