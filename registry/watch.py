"""In-process notification state: purge hooks, change hooks, and the digests this
process has loaded (so a forget made elsewhere can be turned into a purge here).

Hooks may run on the thread that called the registry or on the Redis event thread;
they must be quick, thread-safe and idempotent. A failing hook is logged, never raised.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

log = logging.getLogger(__name__)
A = TypeVar("A")
ForgetHook = Callable[[list[str]], None]
ChangeHook = Callable[[int], None]


class Watch:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._forget_hooks: list[ForgetHook] = []
        self._change_hooks: list[ChangeHook] = []
        self._loaded: set[str] = set()
        self._seen = -1

    def on_forget(self, hook: ForgetHook) -> None:
        with self._lock:
            self._forget_hooks.append(hook)

    def on_change(self, hook: ChangeHook) -> None:
        with self._lock:
            self._change_hooks.append(hook)

    def loaded(self, digest: str) -> None:
        with self._lock:
            self._loaded.add(digest)

    def loaded_digests(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded)

    def is_stale(self, generation: int) -> bool:
        with self._lock:
            return generation != self._seen

    def forgotten(self, digests: Iterable[str], *, own: bool = False) -> None:
        """Fire the purge hooks with the digests this process loaded (all, if ``own``)."""
        with self._lock:
            wanted = list(digests)
            hit = wanted if own else [d for d in wanted if d in self._loaded]
            self._loaded.difference_update(wanted)
            hooks = list(self._forget_hooks)
        if hit:
            for hook in hooks:
                _call(hook, hit)

    def changed(self, generation: int) -> None:
        """Fire the change hooks once per newer generation seen."""
        with self._lock:
            if generation <= self._seen:
                return
            self._seen = generation
            hooks = list(self._change_hooks)
        for hook in hooks:
            _call(hook, generation)


def _call(hook: Callable[[A], None], arg: A) -> None:
    try:
        hook(arg)
    except Exception:
        log.exception("registry hook %r failed", hook)
