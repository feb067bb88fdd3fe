"""`python -m bench.scrape` reads the text the app's /metrics serves, histograms and labels
included, into the {series: value} map every benchmark looks its figures up in.

The text comes from the app's own metric registry (app.metrics.Metrics, what GET /metrics
renders) after known observations; the command parses it with prometheus_client's parser.
Each series must be keyed exactly as the exposition line writes it (the key the benchmarks
use verbatim), with the value of that line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest

from app.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]


def _exposition() -> str:
    m = Metrics()
    for seconds in (0.0004, 0.003, 0.02):  # buckets 0.0005, 0.005 and 0.025
        m.forward_seconds.labels(kind="linearized").observe(seconds)
    m.request_seconds.labels(route="/v1/predict").observe(0.2)
    for size in (1, 8, 8):
        m.batch_items.observe(size)
    m.cache_bytes.labels(cache="components").set(1234)
    m.cache_bytes.labels(cache="compositions").set(56)
    m.cache_misses.inc(3)
    m.build.info({"base": 'effnet "lite0" \\ one\ntwo'})  # a value escaped on the wire
    return generate_latest(m.registry).decode()


def _scrape(source: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.scrape", source], cwd=REPO,
                          input=stdin, capture_output=True, text=True, timeout=120, check=False)


def test_every_exposition_line_is_one_series_with_its_value(tmp_path: Path) -> None:
    text = _exposition()
    path = tmp_path / "metrics.txt"
    path.write_text(text)
    done = _scrape(str(path))
    assert done.returncode == 0, done.stderr
    series = json.loads(done.stdout)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    written = {key: float(value) for key, _, value in (ln.rpartition(" ") for ln in lines)}
    assert series == written
    assert len(series) == len(lines) > 100


def test_histogram_and_labelled_values(tmp_path: Path) -> None:
    series = json.loads(_scrape("-", stdin=_exposition()).stdout)
    assert series['tmc_forward_duration_seconds_count{kind="linearized"}'] == 3
    assert abs(series['tmc_forward_duration_seconds_sum{kind="linearized"}'] - 0.0234) < 1e-12
    buckets = {le: series[f'tmc_forward_duration_seconds_bucket{{kind="linearized",le="{le}"}}']
               for le in ("0.0005", "0.001", "0.005", "0.025", "+Inf")}
    assert buckets == {"0.0005": 1, "0.001": 1, "0.005": 2, "0.025": 3, "+Inf": 3}
    assert series['tmc_request_duration_seconds_count{route="/v1/predict"}'] == 1
    assert series["tmc_batch_size_count"] == 3 and series["tmc_batch_size_sum"] == 17
    assert series['tmc_cache_bytes{cache="components"}'] == 1234
    assert series['tmc_cache_bytes{cache="compositions"}'] == 56
    assert series["tmc_composition_cache_misses_total"] == 3
    assert series['tmc_build_info{base="effnet \\"lite0\\" \\\\ one\\ntwo"}'] == 1


def test_text_that_is_not_an_exposition_is_refused(tmp_path: Path) -> None:
    done = _scrape("-", stdin="tmc_queue_depth not-a-number\n")
    assert done.returncode == 1
    assert "is not Prometheus text exposition" in done.stderr
    missing = _scrape(str(tmp_path / "absent.txt"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
