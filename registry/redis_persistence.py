"""Forgetting reaches Redis's disk files: after a forget, rewrite the AOF and the RDB snapshot.

A forget deletes an id's records and bytes from Redis's memory at once, but Redis's
persistence files keep them until they are rewritten: the AOF (Redis 7's multi-part AOF: a
base file and incremental files in ``appendonlydir``, listed by a manifest) and the RDB
snapshot (``dump.rdb``); what Redis says about them is read by registry.redis_probe. After
every forget, the stage here (``RedisPersistence``, added by ``watch_persistence``) makes a
rewrite of each file kind that is on START AFTER the delete,
waits a bounded time (``PURGE_WAIT_S``) for it, and its ``StorePurge`` says what is true:

* ``purged``: each kind that is on was rewritten by a rewrite that started after the delete
  and finished OK (AOF: Redis unlinks the old base and incr files when the rewrite finishes;
  RDB: the new ``dump.rdb`` replaces the old one);
* ``rewriting``: such a rewrite is running or scheduled but did not finish within the wait;
  ``check`` names the admin route that tells when it has;
* ``failed``: that rewrite failed (``aof_last_bgrewrite_status`` / ``rdb_last_bgsave_status``
  err) or Redis refused the command: the old files may still hold the forgotten data;
* ``not-persisted``: AOF off, no RDB save rule and no snapshot written since Redis started;
* ``unknown``: Redis does not let us tell (INFO or ``CONFIG GET save`` refused, Redis older
  than 7, or unreachable); ``detail`` says why and what the operator can do.

Which rewrite counts. Redis 7 numbers rewrites as it forks them (INFO ``aof_rewrites``,
``rdb_saves``). The stage reads INFO after the delete: a rewrite numbered above the count it
read started after the delete. One already running then does not count (its child forked a
snapshot that still holds the data). A kind counts as rewritten through number N when INFO
shows nothing of that kind running, the counter at N and the last status ok: the finished one
is then the latest. Redis 7 semantics this relies on: BGREWRITEAOF while an AOF rewrite runs
is refused ("already in progress") and is asked again once it ends; while another child (a
BGSAVE) runs it is scheduled (``aof_rewrite_scheduled``), which counts (it starts later).
BGSAVE SCHEDULE while an AOF rewrite runs is scheduled; while a BGSAVE runs it is refused and
asked again. A Redis restart (a new ``run_id``) resets the counters: every forget not yet
covered then wants any rewrite of the new run.

Coalescing: one pump thread per watcher asks for rewrites; it keeps, per kind, the highest
number any forget wants and asks only when nothing that covers it is running or was accepted,
so a burst of forgets costs one or two rewrites, not one each. The pump ends when every
forget is covered (or failed), and after ``GIVE_UP_S`` without reaching Redis.

Scope: what one process (replica) did: ``report`` (the admin route) covers this process's
forgets since it started. Replicas forgetting at once coalesce in Redis itself. Redis
replicas (``connected_slaves``) rewrite their own files only by their own settings (named in
the detail). A deleted file's disk blocks are freed, not overwritten, as for any deletion.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

from registry.core import Registry
from registry.errors import StorageError
from registry.redis_probe import AOF, KINDS, FileKind, Probe, read_probe
from registry.types import JsonObject, StorePurge

PURGE_WAIT_S = 2.0  # how long a forget's receipt waits for the rewrite it asked for
POLL_S = 0.05  # how often the pump reads INFO while a rewrite is wanted
GIVE_UP_S = 60.0  # the pump stops after this long without reaching Redis (a forget restarts it)
STORE = "redis-persistence"
ROUTE = "GET /v1/admin/registry/persistence"
CHECK = (f"{ROUTE} on the replica that answered (admin token): \"covered\": true once every "
         "forget it made is out of Redis's AOF/RDB files")


@dataclass
class _Progress:
    """What this process knows of one file kind's rewrites in the current Redis run."""

    need: int = 0  # the rewrite number that covers every forget so far (0: none wanted)
    ok_through: int = 0  # the highest rewrite number seen finished OK
    failed_at: int = 0  # the highest rewrite number seen failed (or refused)
    asked: int = 0  # the highest need a command was accepted for (started or scheduled)
    error: str = ""

    def outcome(self, need: int) -> str:
        if self.ok_through >= need:
            return "purged"
        return "failed" if self.failed_at >= need else "rewriting"

    def pending(self) -> bool:
        return self.outcome(self.need) == "rewriting"


@dataclass(frozen=True)
class _Ticket:
    """One forget: the rewrite number it wants per kind, in Redis run ``epoch``."""

    epoch: int
    needs: Mapping[str, int]


class RedisPersistence:
    """The forget stage for a Redis that persists, and the state the admin route reports."""

    def __init__(self, client: redis.Redis, *, wait_s: float = PURGE_WAIT_S,
                 poll_s: float = POLL_S) -> None:
        self._client, self._wait_s, self._poll_s = client, wait_s, poll_s
        self._cond = threading.Condition()
        self._progress = {k.name: _Progress() for k in KINDS}
        self._run_id = ""
        self._epoch = 0
        self._forgets = 0
        self._last_forget: float | None = None
        self._blind = False  # a forget happened while INFO could not be read
        self._pump: threading.Thread | None = None
        self._unreachable = ""  # the pump's last connection error ("" when it reached Redis)

    # -- the forget stage ------------------------------------------------------------

    def __call__(self, digests: list[str]) -> StorePurge:
        """Ask for the rewrites that purge this forget from Redis's files; wait a while."""
        try:
            probe = read_probe(self._client)
        except redis.RedisError as exc:
            return self._blind_forget(exc)
        ticket = self._register(probe)
        outcomes = self._await(ticket)
        return _receipt(probe, outcomes)

    def _blind_forget(self, exc: redis.RedisError) -> StorePurge:
        """A forget after which INFO could not be read: a rewrite is asked for once it can."""
        refused = isinstance(exc, redis.ResponseError)
        with self._cond:
            self._forgets, self._last_forget = self._forgets + 1, time.time()
            if not refused:
                self._blind = True
                self._start_pump()
        then = ("if Redis persists, run BGREWRITEAOF / BGSAVE after forgetting" if refused
                else "a rewrite is asked for once Redis answers")
        return StorePurge(STORE, "unknown", "unknown",
                          f"could not read Redis INFO after the forget ({exc}): {then}", CHECK)

    def _register(self, probe: Probe) -> _Ticket:
        with self._cond:
            self._observe(probe)
            needs = {}
            for kind in probe.on():
                needs[kind.name] = probe.number(kind) + 1
                progress = self._progress[kind.name]
                progress.need = max(progress.need, needs[kind.name])
            self._forgets, self._last_forget = self._forgets + 1, time.time()
            if needs:
                self._start_pump()
                self._cond.notify_all()
            return _Ticket(self._epoch, needs)

    def _needs(self, ticket: _Ticket) -> dict[str, int]:
        restarted = ticket.epoch != self._epoch  # then any rewrite of the new run covers it
        return {name: 1 if restarted else need for name, need in ticket.needs.items()}

    def _await(self, ticket: _Ticket) -> dict[str, tuple[str, str]]:
        """Each kind's (state, note) once none is "rewriting" or the wait is over."""
        deadline = time.monotonic() + self._wait_s
        with self._cond:
            while True:
                needs = self._needs(ticket)
                states = {k: self._progress[k].outcome(n) for k, n in needs.items()}
                left = deadline - time.monotonic()
                if "rewriting" not in states.values() or left <= 0:
                    return {k: (state, self._note(k, state, needs[k]))
                            for k, state in states.items()}
                self._cond.wait(left)

    def _note(self, name: str, state: str, need: int) -> str:
        progress = self._progress[name]
        if state == "failed":
            return progress.error
        if state == "rewriting" and progress.asked < need:
            return ("a rewrite that started before the delete still runs; this replica asks "
                    "for another when it ends")
        return ""

    # -- what Redis says -------------------------------------------------------------

    def _observe(self, probe: Probe) -> None:
        """Fold one INFO reading into the progress (lock held)."""
        if probe.run_id != self._run_id:
            self._new_run(probe.run_id)
        for kind in KINDS:
            if probe.running(kind) or kind.counter not in probe.info:
                continue
            progress, number = self._progress[kind.name], probe.number(kind)
            if probe.ok(kind):
                progress.ok_through = max(progress.ok_through, number)
            elif number > progress.failed_at:
                progress.failed_at = number
                progress.error = (f"{kind.status}:err (see the Redis log); the old files may "
                                  "still hold the forgotten data")
        if self._blind:
            self._blind = False
            for kind in probe.on():
                progress = self._progress[kind.name]
                progress.need = max(progress.need, probe.number(kind) + 1)
        self._cond.notify_all()

    def _new_run(self, run_id: str) -> None:
        """Redis restarted (or this is the first reading): counters start again."""
        if self._run_id:
            self._epoch += 1
            for name, progress in self._progress.items():
                uncovered = progress.need > progress.ok_through  # pending or failed
                self._progress[name] = _Progress(need=1 if uncovered else 0)
        self._run_id = run_id

    # -- the pump --------------------------------------------------------------------

    def _start_pump(self) -> None:
        """Start the pump unless it runs (lock held)."""
        if self._pump is None:
            self._pump = threading.Thread(target=self._pump_loop, daemon=True,
                                          name="tmc-redis-persistence")
            self._pump.start()

    def _wanted(self) -> bool:
        return self._blind or any(p.pending() for p in self._progress.values())

    def _pump_loop(self) -> None:
        failing_since: float | None = None
        while True:
            with self._cond:
                if not self._wanted():
                    self._pump = None
                    return
            try:
                probe = read_probe(self._client)
            except redis.ResponseError as exc:  # INFO refused: polling cannot tell anything
                self._stop_pump(f"Redis refuses INFO: {exc}")
                return
            except redis.RedisError as exc:
                failing_since = failing_since or time.monotonic()
                if not self._note_unreachable(str(exc), failing_since):
                    return
                continue
            failing_since = None
            with self._cond:
                self._unreachable = ""
                self._observe(probe)
                asks = self._to_ask(probe)
            for kind, need in asks:
                self._ask(kind, need)
            with self._cond:
                self._cond.wait(self._poll_s)  # a new forget wakes it early

    def _stop_pump(self, error: str) -> None:
        with self._cond:
            self._unreachable, self._pump = error, None

    def _note_unreachable(self, error: str, since: float) -> bool:
        """Remember why Redis did not answer; False (pump ended) after GIVE_UP_S of it."""
        with self._cond:
            self._unreachable = error
            if time.monotonic() - since > GIVE_UP_S:
                self._pump = None
                return False
            self._cond.wait(min(1.0, 10 * self._poll_s))
            return True

    def _to_ask(self, probe: Probe) -> list[tuple[FileKind, int]]:
        """The kinds whose wanted rewrite nothing running or accepted covers (lock held)."""
        asks = []
        for kind in probe.on():
            progress = self._progress[kind.name]
            covering_runs = probe.running(kind) and probe.number(kind) >= progress.need
            if covering_runs or probe.scheduled(kind):  # Redis will run one that covers it
                progress.asked = max(progress.asked, progress.need)
            elif progress.pending() and progress.asked < progress.need:
                asks.append((kind, progress.need))
        return asks

    def _ask(self, kind: FileKind, need: int) -> None:
        """Send BGREWRITEAOF / BGSAVE SCHEDULE for rewrite number ``need`` or later."""
        try:
            if kind is AOF:
                self._client.bgrewriteaof()
            else:
                self._client.bgsave(schedule=True)
        except redis.ResponseError as exc:
            if "already in progress" in str(exc):
                return  # one that started before: ask again when it has ended
            with self._cond:
                progress = self._progress[kind.name]
                progress.failed_at = max(progress.failed_at, need)
                progress.error = f"{' '.join(kind.command)} refused: {exc}"
                self._cond.notify_all()
            return
        except redis.RedisError as exc:
            with self._cond:
                self._unreachable = str(exc)
            return
        with self._cond:
            progress = self._progress[kind.name]
            progress.asked = max(progress.asked, need)

    # -- the admin route -------------------------------------------------------------

    def report(self) -> JsonObject:
        """The state now: rewrites in progress, and whether every forget this process made
        is covered by a finished rewrite. StorageError when Redis does not answer."""
        try:
            probe = read_probe(self._client)
        except redis.ResponseError as exc:
            with self._cond:
                return {**self._summary(), "state": "unknown",
                        "detail": f"Redis refuses INFO ({exc}): cannot tell"}
        except redis.RedisError as exc:
            raise StorageError(f"Redis is unreachable: {exc}") from exc
        with self._cond:
            self._observe(probe)
            if self._wanted():
                self._start_pump()
            return {**self._summary(), **_state_of(probe, self._kinds_report(probe))}

    def _summary(self) -> dict[str, Any]:
        return {"backend": "redis", "store": STORE, "forgets": self._forgets,
                "last_forget_at": self._last_forget, "pump_error": self._unreachable,
                "scope": "this replica's forgets since it started (ask each replica)"}

    def _kinds_report(self, probe: Probe) -> dict[str, dict[str, Any]]:
        kinds: dict[str, dict[str, Any]] = {}
        for kind in KINDS:
            progress = self._progress[kind.name]
            kinds[kind.name] = {
                "on": probe.enabled.get(kind.name), "in_progress": probe.running(kind),
                "scheduled": probe.scheduled(kind), "rewrites": probe.number(kind),
                "last_status": str(probe.info.get(kind.status, "")),
                "covered": progress.outcome(progress.need) == "purged",
                "error": progress.error if progress.outcome(progress.need) == "failed" else "",
                "why_unknown": probe.why.get(kind.name, "")}
        return kinds


def _state_of(probe: Probe, kinds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The route's overall answer from each kind's."""
    on = [k.name for k in probe.on()]
    covered = all(kinds[name]["covered"] for name in on)
    if not on and not probe.undecided():
        state = "not-persisted"
    elif any(kinds[name]["error"] for name in on):
        state = "failed"
    elif probe.undecided():
        state = "unknown"
    else:
        state = "purged" if covered else "rewriting"
    return {"state": state, "persistence": "+".join(on) or "none", "covered": covered,
            "rewrite_in_progress": any(probe.running(k) for k in KINDS), "files": kinds,
            "detail": _replica_note(probe)}


def _receipt(probe: Probe, outcomes: Mapping[str, tuple[str, str]]) -> StorePurge:
    """The StorePurge of one forget from each kind's (state, note): failed > unknown >
    rewriting > purged."""
    names = "+".join(outcomes) or "none"
    notes = [_outcome_note(kind, *outcomes[kind.name]) for kind in KINDS
             if kind.name in outcomes]
    notes += [f"{k.label}: unknown: {probe.why.get(k.name, '')}" for k in probe.undecided()]
    if not outcomes and not probe.undecided():
        notes.append("Redis keeps no files: AOF is off, no RDB save rule, and no snapshot was "
                     "written since it started")
    notes.append(_replica_note(probe))
    detail = "; ".join(n for n in notes if n)
    states = [state for state, _ in outcomes.values()]
    if "failed" in states:
        return StorePurge(STORE, names, "failed", detail, CHECK)
    if probe.undecided():
        return StorePurge(STORE, names, "unknown", detail + "; if Redis persists, run "
                          "BGREWRITEAOF / BGSAVE after forgetting", CHECK)
    if "rewriting" in states:
        return StorePurge(STORE, names, "rewriting", detail, CHECK)
    return StorePurge(STORE, names, "purged" if outcomes else "not-persisted", detail)


def _outcome_note(kind: FileKind, state: str, note: str) -> str:
    if state == "purged":
        return f"{kind.label}: rewritten by a rewrite that started after the delete"
    if state == "failed":
        return f"{kind.label}: rewrite failed: {note}"
    return (f"{kind.label}: not rewritten yet after {PURGE_WAIT_S:g} s: "
            + (note or "a rewrite that started after the delete runs or is scheduled"))


def _replica_note(probe: Probe) -> str:
    replicas = int(probe.info.get("connected_slaves", 0))
    if not replicas:
        return ""
    return (f"{replicas} Redis replica(s) of this server keep their own files, rewritten only "
            "by their own settings")


# -- wiring ----------------------------------------------------------------------------

_WATCHERS: weakref.WeakKeyDictionary[Registry, RedisPersistence] = weakref.WeakKeyDictionary()
SQLITE_NOTE = ("SQLite index: PRAGMA secure_delete=ON zeroes deleted rows and freed pages, and "
               "a wal_checkpoint(TRUNCATE) after every deletion empties the WAL before the "
               "receipt returns (a reader in another process holding an old snapshot can "
               "defer the truncation to the next checkpoint)")


def watch_persistence(registry: Registry, client: redis.Redis) -> RedisPersistence:
    """Add the Redis-persistence forget stage to ``registry`` (whose records or bytes live in
    the Redis behind ``client``); ``persistence_report(registry)`` then reports it."""
    watcher = RedisPersistence(client)
    registry.add_forget_stage(watcher)
    _WATCHERS[registry] = watcher
    return watcher


def persistence_report(registry: Registry) -> JsonObject:
    """What the admin route answers: the Redis watcher's state, or the embedded story."""
    watcher = _WATCHERS.get(registry)
    if watcher is not None:
        return watcher.report()
    if registry.backend == "sqlite":
        return {"backend": "sqlite", "state": "purged", "covered": True,
                "rewrite_in_progress": False, "detail": SQLITE_NOTE,
                "scope": "this machine's registry directory"}
    return {"backend": registry.backend, "state": "unknown", "covered": False,
            "rewrite_in_progress": False,
            "detail": "no persistence watcher for this backend: nothing tracks its files"}
