"""What Redis says about its persistence files: which kinds are on, and their rewrites.

Two file kinds: the AOF (Redis 7's multi-part ``appendonlydir``) and the RDB snapshot
(``dump.rdb``). A :class:`Probe` is one reading of INFO (default sections) plus whether each
kind is on: the AOF by ``aof_enabled``; RDB when a save rule is set or a snapshot was written
since Redis started (that file then exists and holds old data). A kind is undecided (None,
with why) when Redis cannot tell: CONFIG GET refused and no snapshot written, or a Redis
older than 7 that does not number rewrites in INFO (``aof_rewrites``, ``rdb_saves``). The
forget stage that uses these readings is registry.redis_persistence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis


@dataclass(frozen=True)
class FileKind:
    """One kind of Redis persistence file and the INFO fields that tell about its rewrite."""

    name: str  # "aof" | "rdb"
    command: tuple[str, ...]
    counter: str  # rewrites forked since Redis started (Redis >= 7)
    running: str
    status: str
    scheduled: str = ""
    label: str = ""


AOF = FileKind("aof", ("BGREWRITEAOF",), "aof_rewrites", "aof_rewrite_in_progress",
               "aof_last_bgrewrite_status", "aof_rewrite_scheduled", "AOF (appendonlydir)")
RDB = FileKind("rdb", ("BGSAVE", "SCHEDULE"), "rdb_saves", "rdb_bgsave_in_progress",
               "rdb_last_bgsave_status", "", "RDB snapshot (dump.rdb)")
KINDS = (AOF, RDB)


@dataclass(frozen=True)
class Probe:
    """One reading of Redis's INFO, and which file kinds are on (None: cannot tell, ``why``)."""

    info: Mapping[str, Any]
    enabled: Mapping[str, bool | None]
    why: Mapping[str, str] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return str(self.info.get("run_id", ""))

    def on(self) -> list[FileKind]:
        return [k for k in KINDS if self.enabled.get(k.name)]

    def undecided(self) -> list[FileKind]:
        return [k for k in KINDS if self.enabled.get(k.name) is None]

    def number(self, kind: FileKind) -> int:
        return int(self.info.get(kind.counter, 0))

    def running(self, kind: FileKind) -> bool:
        return bool(int(self.info.get(kind.running, 0)))

    def scheduled(self, kind: FileKind) -> bool:
        return bool(kind.scheduled) and bool(int(self.info.get(kind.scheduled, 0)))

    def ok(self, kind: FileKind) -> bool:
        return str(self.info.get(kind.status, "ok")) == "ok"


def read_probe(client: redis.Redis) -> Probe:
    """INFO (default sections) and the save rules; raises redis.RedisError."""
    info = client.info()
    if not isinstance(info, dict):
        raise redis.ResponseError(f"INFO answered {type(info).__name__}, not a mapping")
    enabled: dict[str, bool | None] = {}
    why: dict[str, str] = {}
    version = str(info.get("redis_version", "?"))
    enabled["aof"] = bool(int(info.get("aof_enabled", 0)))
    enabled["rdb"], why["rdb"] = _rdb_enabled(client, info)
    for kind in KINDS:
        if enabled[kind.name] and kind.counter not in info:
            enabled[kind.name] = None
            why[kind.name] = (f"Redis {version} does not number rewrites in INFO "
                              f"({kind.counter}; Redis 7 does), so no rewrite can be shown to "
                              "have started after the forget")
    return Probe(info, enabled, why)


def _rdb_enabled(client: redis.Redis, info: Mapping[str, Any]) -> tuple[bool | None, str]:
    """RDB snapshots are on when a save rule is set or a snapshot was written since Redis
    started (by hand, or for a replica's sync): that file exists and holds old data."""
    if int(info.get("rdb_saves", 0)) > 0:
        return True, ""
    try:
        rules = client.config_get("save")
    except redis.ResponseError as exc:  # managed Redis: CONFIG renamed or not allowed
        return None, (f"CONFIG GET save is refused ({exc}) and Redis wrote no snapshot since "
                      "it started, so whether RDB snapshots are configured cannot be told")
    return bool(isinstance(rules, dict) and str(rules.get("save", "")).strip()), ""
