"""`tmc forget` (without --json) names every store the forget has not purged for sure."""

from __future__ import annotations

from cli.client_cmds import unfinished_purges


def test_only_stores_not_surely_purged_are_named_with_what_to_do() -> None:
    receipt = {"purged": [
        {"store": "index", "kind": "redis", "state": "purged", "detail": "", "check": ""},
        {"store": "blobs", "kind": "s3", "state": "purged", "detail": "2 object version(s)",
         "check": ""},
        {"store": "redis-persistence", "kind": "aof", "state": "rewriting",
         "detail": "BGREWRITEAOF running", "check": "GET /v1/admin/registry/persistence"},
        {"store": "redis-persistence", "kind": "rdb", "state": "not-persisted", "detail": "",
         "check": ""},
    ]}
    assert unfinished_purges(receipt) == (
        "\n  redis-persistence (aof): rewriting — BGREWRITEAOF running; "
        "check: GET /v1/admin/registry/persistence")
    assert unfinished_purges({"purged": receipt["purged"][:2]}) == ""
    assert unfinished_purges({}) == ""  # an older server's receipt
