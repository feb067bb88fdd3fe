"""A byte-budgeted LRU of tensors dicts, keyed by content digests (never names)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tangent import Delta, delta_nbytes


@dataclass
class _Entry:
    value: Delta
    nbytes: int
    tags: frozenset[str]  # component digests this entry was built from


class DeltaLRU:
    """Least-recently-used cache with a byte budget; purgeable by component digest."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Delta | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.value

    def put(self, key: str, value: Delta, tags: Iterable[str]) -> None:
        size = delta_nbytes(value)
        with self._lock:
            self._drop(key)
            if size > self.budget:
                return  # too big to keep: computed per request instead
            self._entries[key] = _Entry(value, size, frozenset(tags))
            self.nbytes += size
            while self.nbytes > self.budget:
                self._drop(next(iter(self._entries)))

    def get_or_build(self, key: str, tags: Iterable[str], build: Callable[[], Delta]) -> Delta:
        cached = self.get(key)
        if cached is not None:
            return cached
        value = build()
        self.put(key, value, tags)
        return value

    def purge(self, digests: Iterable[str]) -> int:
        """Drop every entry built from any of these component digests."""
        gone = set(digests)
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.tags & gone]
            for k in keys:
                self._drop(k)
        return len(keys)

    def count_built_from(self, digest: str) -> int:
        """How many entries were built from this component digest (0 after its purge)."""
        with self._lock:
            return sum(digest in e.tags for e in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            for k in list(self._entries):
                self._drop(k)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes  # tensors are freed once no forward holds them
