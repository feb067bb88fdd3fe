"""When each component version was last purged from this process's device caches.

Forgetting stays exact (``PurgeLog``). A forget purges the device caches with a control
command on the device thread, and its receipt returns after that purge. Every purge
advances the purge epoch and records, per digest, the epoch of its last purge. A request reads
the epoch before it resolves its plan, and each fetch reads it when it is queued (before it
reads the index);
the job keeps the smallest of those epochs. Just before a batch runs (on the device thread,
where purges also run, so nothing can slip in between) a job one of whose digests was purged
after its epoch fails with ``NotFoundError``, which the service turns into a re-plan: tensors
fetched before a forget are never used after it, whether they arrived before or after the
purge, and a composed Δ cached at admission and purged since is not rebuilt from them. A
version added again after a forget (same bytes, same digest) is served again: its new
requests have a later epoch. A flight queued before a purge of its digest is not joined by
later requests; they queue a new fetch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable

# Tombstones kept: a job admitted before the oldest one dropped is re-planned (see PurgeLog).
KEEP_PURGED = 65536


class PurgeLog:
    """When each component digest was last purged from this process's device caches.

    ``record`` runs on the device thread (``Executor.purge``); ``epoch`` and
    ``forgotten_since`` may be read from any thread. Only the newest ``keep`` digests are
    remembered; a job older than the oldest one forgotten here counts as purged (it is
    re-planned, never served from what it brought).
    """

    def __init__(self, keep: int = KEEP_PURGED) -> None:
        self._lock = threading.Lock()
        self._epoch = 0
        self._last: OrderedDict[str, int] = OrderedDict()  # digest -> epoch of its last purge
        self._floor = 0  # the newest epoch among the tombstones dropped
        self._keep = keep

    @property
    def epoch(self) -> int:
        return self._epoch

    def record(self, digests: Iterable[str]) -> None:
        with self._lock:
            self._epoch += 1
            for digest in digests:
                self._last[digest] = self._epoch
                self._last.move_to_end(digest)
            while len(self._last) > self._keep:
                _, dropped = self._last.popitem(last=False)
                self._floor = max(self._floor, dropped)

    def forgotten_since(self, digests: Collection[str], epoch: int) -> list[str]:
        """Those of ``digests`` purged after ``epoch`` (all of them when that is unknowable)."""
        if not digests:
            return []
        with self._lock:
            if epoch < self._floor:
                return sorted(digests)
            return sorted(d for d in digests if self._last.get(d, 0) > epoch)
