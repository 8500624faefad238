"""Records shared by every task source: examples, a task's splits, the label and prompt constants."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field


IGNORE_INDEX = -100
PROMPT_SEPARATOR = "="
REQUIRED_COLUMNS = ("source", "target", "task_name")
SPLITS = ("train", "validation", "test")
# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Example:
    """One text-to-text example."""

    source: str
    target: str
    task_name: str


@dataclass
class TaskData:
    """The three splits of one task."""

    name: str
    train: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    @property
    def sizes(self) -> dict[str, int]:
        return {s: len(getattr(self, s)) for s in SPLITS}


def stable_hash(text: str) -> int:
    """A process-independent 64-bit hash (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def task_rng(seed: int, name: str) -> random.Random:
    return random.Random(int(seed) + stable_hash(name))
