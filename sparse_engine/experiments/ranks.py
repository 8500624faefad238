"""Expert parallelism: which rank does what, and the steps where all ranks agree.

Under torchrun, ``train`` and ``reproduce`` give each rank whole experts to train alone
(round-robin), then gather what the ranks did. Every rank reaches the same agreement steps in
the same order; a step reports a failure on any rank to every rank (:class:`RankFailed`), so
that each rank stops with one clear error instead of waiting for a rank that has given up.

torch is imported only when several ranks run, so ``cli`` can catch :class:`RankFailed`
without importing it.
"""
from __future__ import annotations

import sys
import traceback
from datetime import timedelta

# How long a rank waits for the others at an agreement step. Expert parallelism makes ranks
# wait for the slowest one's share of experts (hours on a large model), far beyond the default
# group's timeout. A rank that raises reports through the step itself and a crashed one is
# stopped by torchrun, so only a rank that is stuck makes the others wait this long.
WAIT_TIMEOUT = timedelta(days=3)
# How long a rank that stops on an error waits for the others to print theirs (see Ranks.settle).
SETTLE_TIMEOUT = timedelta(seconds=60)


class RankFailed(RuntimeError):
    """A step failed on some rank of a multi-process run; raised on every rank, with the
    failing ranks' messages."""

    def __init__(self, errors: dict[int, str], world_size: int):
        self.errors = dict(errors)
        messages = set(errors.values())
        if len(messages) == 1:
            where = "every rank" if len(errors) == world_size else "rank " + ", ".join(map(str, sorted(errors)))
            text = f"{messages.pop()} (on {where})"
        else:
            text = "; ".join(f"rank {r}: {m}" for r, m in sorted(errors.items()))
        super().__init__(text)


class Ranks:
    """This process's place in a run of one or several ranks.

    ``Ranks()`` is a single process: every step just runs its function. ``Ranks(group)`` takes
    the default process group (``distributed.init_from_env()`` under torchrun) and makes a gloo
    side group with a long timeout (:data:`WAIT_TIMEOUT`) for the agreement steps
    (:meth:`gather`, :meth:`run`, :meth:`main_first`, :meth:`check_same`). ``group`` is what a
    data-parallel step trains over.
    """

    def __init__(self, group=None):
        self.group = group
        self.rank, self.size, self._wait = 0, 1, None
        if group is not None:
            import torch.distributed as dist

            self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
            if self.size != dist.get_world_size():
                raise ValueError("Ranks takes the default process group (every rank), not a sub-group")
            if self.size > 1:
                self._wait = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)

    @property
    def is_main(self) -> bool:
        """True on the rank that writes the shared files (rank 0)."""
        return self.rank == 0

    def prefix(self) -> str:
        """``"[rank r/N] "`` for messages of a multi-process run, ``""`` for one process."""
        return f"[rank {self.rank}/{self.size}] " if self.size > 1 else ""

    def mine(self, items) -> list:
        """This rank's share of ``items``, round-robin: items[rank], items[rank + size], ..."""
        return list(items)[self.rank::self.size]

    def gather(self, fn) -> list:
        """``fn()`` on every rank; every rank gets the list of all ranks' results (small,
        picklable), or :class:`RankFailed` on every rank when ``fn`` raised on any. ``fn`` must
        not itself make an agreement step."""
        if self._wait is None:
            return [fn()]
        import torch.distributed as dist

        try:
            outcome = (fn(), None)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
            expected = isinstance(exc, (ValueError, OSError))
            if not expected:
                traceback.print_exc()  # an unexpected error keeps its traceback, on the rank that had it
            outcome = (None, str(exc) if expected else f"{type(exc).__name__}: {exc}")
        outcomes = [None] * self.size
        dist.all_gather_object(outcomes, outcome, group=self._wait)
        errors = {r: error for r, (_, error) in enumerate(outcomes) if error is not None}
        if errors:
            raise RankFailed(errors, self.size)
        return [value for value, _ in outcomes]

    def run(self, fn):
        """``fn()`` on every rank; returns this rank's result (only whether it failed is sent).
        Also a barrier: no rank returns before every rank has run ``fn``."""
        local = []
        self.gather(lambda: local.append(fn()))
        return local[0]

    def main_first(self, fn):
        """``fn()`` on rank 0, then on the other ranks: for work that fills a shared cache
        (building the built-in base model) that the other ranks then read."""
        first = self.run(lambda: fn() if self.is_main else None)
        later = self.run(lambda: None if self.is_main else fn())
        return first if self.is_main else later

    def check_same(self, what: str, value) -> None:
        """Raise on every rank when ``value`` (small, picklable; a dict is compared key by key)
        differs between ranks: ranks started with different settings or files would train
        experts that do not belong in one result."""
        from sparse_engine.distributed import first_difference

        diff = first_difference(self.gather(lambda: value))
        if diff is not None:
            raise ValueError(f"{what} differs between ranks ({diff}); start every rank with the same command "
                             "line and the same files")

    def settle(self, timeout: timedelta = SETTLE_TIMEOUT) -> None:
        """Wait, at most ``timeout``, until every rank is here. Called by ranks that stop on an
        error after printing it: torchrun stops the other ranks as soon as one exits, which
        could cut off an error line a busy rank has not printed yet. Never raises."""
        if self._wait is None:
            return
        import torch.distributed as dist

        try:
            dist.monitored_barrier(group=self._wait, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - a rank that is gone: nothing left to wait for
            print(f"{self.prefix()}not every rank reached the error exit: {type(exc).__name__}", file=sys.stderr)

    def close(self) -> None:
        """Release the side group (the default group is its creator's to destroy)."""
        if self._wait is not None:
            import torch.distributed as dist

            dist.destroy_process_group(self._wait)
            self._wait = None
