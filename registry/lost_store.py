"""Lost-store detection: a shared store that lost its data is not served as the registry.

Policy (shared backends, whose index offers ``marks()``): a store that restarted empty (Redis
without persistence), or was flushed, must not be served as if it were the registry. Each
process remembers the highest generation it has seen; every ``generation()`` and every
resolve of the Registry also reads the generation and the base key together, and when the
base key is gone (or names another base) or the generation went below the highest seen,
raises ``RegistryLostError`` (a StorageError: 503) until the store is restored, i.e. the base
key is back and the generation is at least the highest seen (a restored backup, or a
rewritten generation). The ``on_lost`` hooks hear when that starts and when it clears.
Writes are not refused (re-pushing is one way back). A deliberately fresh registry is
accepted by restarting the process (or calling ``Registry.accept_current``), which forgets
the remembered generation. An embedded store (no ``marks()``) is never checked: it is not
shared, nothing can wipe it underneath.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from registry.errors import StorageError

log = logging.getLogger(__name__)

LostHook = Callable[[str | None, int], None]
Marks = Callable[[], tuple[int, str | None]]  # () -> (generation, base key or None)


class RegistryLostError(StorageError):
    """The shared store lost its data: the base key vanished or the generation went back."""

    def __init__(self, message: str, generation: int, highest: int) -> None:
        super().__init__(message)
        self.generation, self.highest = generation, highest


class LostStoreGuard:
    """The highest generation this process has seen, and whether the store is lost."""

    def __init__(self, marks: Marks, base_fingerprint: str) -> None:
        self._marks, self._base = marks, base_fingerprint
        self._lock = threading.Lock()
        self._highest = 0
        self._lost: str | None = None
        self._hooks: list[LostHook] = []

    def on_lost(self, hook: LostHook) -> None:
        """Call ``hook(reason, generation)`` when the store is found lost and
        ``hook(None, generation)`` when it is intact again."""
        with self._lock:
            self._hooks.append(hook)

    @property
    def lost(self) -> str | None:
        """Why the store is considered lost (None: intact, as far as last checked)."""
        with self._lock:
            return self._lost

    def accept(self, generation: int) -> None:
        """Take ``generation`` as the highest seen (a store accepted as it is now)."""
        with self._lock:
            self._highest = generation

    def floor(self) -> int:
        """The highest generation seen: take it BEFORE a read that :meth:`check` judges."""
        with self._lock:
            return self._highest

    def check(self, resolved: int | None = None, floor: int | None = None) -> int:
        """Read the generation and base key together; raise RegistryLostError if lost, else
        return the generation read.

        The floor is taken BEFORE the read: a read that starts after this process saw
        generation N can only see N or more in a store that kept its data, so concurrent
        resolves never mistake each other's progress for a regression. ``resolved``: the
        generation a resolve just read (the lower of the two is judged).
        """
        if floor is None:
            floor = self.floor()
        generation, base = self._marks()
        generation = int(generation)
        seen = generation if resolved is None else min(generation, resolved)
        reason = self._reason(seen, floor, base)
        with self._lock:
            was = self._lost
            self._lost = reason
            if reason is None:
                self._highest = max(self._highest, generation)
            hooks = list(self._hooks) if (was is None) != (reason is None) else []
        for hook in hooks:
            try:
                hook(reason, generation)
            except Exception:  # a hook never breaks a read
                log.exception("registry lost-store hook %r failed", hook)
        if reason is not None:
            raise RegistryLostError(reason, seen, floor)
        return generation

    def _reason(self, seen: int, floor: int, base: str | None) -> str | None:
        """Why a store with these marks is lost, and what to do; None: it is intact."""
        problems = []
        if seen < floor:
            problems.append(f"generation {seen} after {floor}")
        if base is None:
            problems.append("base key missing")
        elif base != self._base:
            problems.append(f"base key names another base {base[:16]}…")
        if not problems:
            return None
        return (f"the shared registry lost its data ({'; '.join(problems)}): restore Redis "
                "from a backup (or write back the base key and a generation of at least "
                f"{floor}), or re-push the components and restart the replicas to accept the "
                "new registry; this replica refuses to serve compositions until then")
