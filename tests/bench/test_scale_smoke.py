"""`bench.scale` cannot rot between full runs: its smoke mode (a few dozen components) runs
here, in a subprocess, against the redis-server and `weed mini` it starts itself.

Checks what the benchmark claims to measure, not how fast: every phase ran on both setups,
each forget receipt says what each store did, and Redis holds component bytes only when it
is the blob store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUPS = {"redis+s3", "sqlite+files"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("scale")
    done = subprocess.run([sys.executable, "-m", "bench.scale", "--smoke", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "scale_smoke.json").read_text()), out


@pytest.mark.redis
@pytest.mark.s3
def test_every_phase_ran_on_both_setups(smoke: tuple[dict[str, Any], Path]) -> None:
    doc, out = smoke
    setups = doc["results"]["setups"]
    assert set(setups) == SETUPS
    for res in setups.values():
        assert [r["count"] for r in res["add_small"]] == [20, 40]
        assert {(r["registry_size"], r["k"]) for r in res["resolve"]} == {
            (20, 1), (20, 10), (40, 1), (40, 10)}
        assert [r["active"] for r in res["star"]] == [5, 10]  # every 4th component
        assert res["star_cost"]["active"] == 10 and res["star_cost"]["default_pool"] == "staged"
        assert res["star_cost"]["composed_delta_bytes"] == (32 * 32 + 32) * 4
        assert res["large"]["composed_delta_bytes"] == res["large"]["delta_bytes"]
    assert set(doc["targets"]) == {f"resolve is O(k), {name}" for name in SETUPS}
    assert (out / "scale_smoke.png").stat().st_size > 0


@pytest.mark.redis
@pytest.mark.s3
def test_forget_receipts_name_each_store(smoke: tuple[dict[str, Any], Path]) -> None:
    setups = smoke[0]["results"]["setups"]
    for row in setups["redis+s3"]["forget"]:
        n = row["n"]
        persisted = "not-persisted" if row["persistence"] == "none" else "purged"
        assert row["receipts"] == {"index": {"purged": n}, "blobs": {"purged": n},
                                   "local-cache": {"purged": n},
                                   "redis-persistence": {persisted: n}}
    for row in setups["sqlite+files"]["forget"]:
        n = row["n"]
        assert row["receipts"] == {"index": {"purged": n}, "blobs": {"purged": n}}


@pytest.mark.redis
@pytest.mark.s3
def test_redis_holds_bytes_only_as_the_blob_store(smoke: tuple[dict[str, Any], Path]) -> None:
    memory = smoke[0]["results"]["redis_memory"]
    in_redis, in_s3 = memory["bytes_in_redis"], memory["bytes_in_s3"]
    small, large = in_redis["small_component_bytes"], in_redis["large_component_bytes"]
    assert in_redis["per_small"]["key_bytes"] > small
    assert in_redis["per_large"]["key_bytes"] > large
    assert 0 < in_s3["per_small"]["key_bytes"] < small / 2
    assert 0 < in_s3["per_large"]["key_bytes"] < small / 2
