"""Reading a tmc server's Prometheus ``/metrics`` as ``{series: value}``, and windows of it.

Policy: the text is parsed by ``prometheus_client.parser`` (the library the app exposes its
metrics with), never by splitting lines by hand. A series is keyed the way the exposition
writes it, ``name{label="value",...}`` with the labels in their written order and the value
escaped as on the wire (``name`` alone without labels), so callers look up
``'tmc_cache_bytes{cache="components"}'`` or ``"tmc_batch_size_count"`` verbatim. A window is
two scrapes: ``delta`` of a counter, ``histogram_mean_ms`` of a histogram over the window.

    python -m bench.scrape http://127.0.0.1:8000/metrics   # or a file, or - for stdin

prints every series as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

Metrics = dict[str, float]


def parse_metrics(text: str) -> Metrics:
    """Prometheus text exposition -> {'name{labels}': value}, one entry per sample."""
    return {series_key(sample.name, sample.labels): float(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples}


def series_key(name: str, labels: Mapping[str, str]) -> str:
    """``name{k="v",...}`` as the exposition format writes it (``name`` without labels)."""
    if not labels:
        return name
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    return f"{name}{{{inner}}}"


def _escape(value: str) -> str:
    """A label value as written on the wire: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def delta(before: Metrics, after: Metrics, key: str) -> float:
    """How much a series grew between two scrapes (a series not yet there counts as 0)."""
    return after.get(key, 0.0) - before.get(key, 0.0)


def histogram_mean_ms(before: Metrics, after: Metrics, metric: str) -> float | None:
    """Mean observation of a histogram between two scrapes, in ms (None: none observed).

    ``metric`` is the histogram's name with its labels, e.g.
    ``'tmc_forward_duration_seconds{kind="linearized"}'``: its ``_count`` and ``_sum`` series
    carry the same labels.
    """
    name, brace, labels = metric.partition("{")
    count = delta(before, after, f"{name}_count{brace}{labels}")
    total = delta(before, after, f"{name}_sum{brace}{labels}")
    return total / count * 1e3 if count else None


def _read(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    if source.startswith(("http://", "https://")):
        import httpx

        try:
            answer = httpx.get(source, timeout=30.0)
            answer.raise_for_status()
        except httpx.HTTPError as exc:
            raise OSError(str(exc)) from exc
        return answer.text
    with open(source, encoding="utf-8") as f:
        return f.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print a Prometheus /metrics text as JSON "
                                                 "{series: value}.")
    parser.add_argument("source", help="a /metrics URL, a file with its text, or - for stdin")
    args = parser.parse_args(argv)
    try:
        text = _read(args.source)
    except OSError as exc:
        print(f"cannot read {args.source}: {exc}", file=sys.stderr)
        return 2
    try:
        series = parse_metrics(text)
    except ValueError as exc:
        print(f"{args.source} is not Prometheus text exposition: {exc}", file=sys.stderr)
        return 1
    json.dump(series, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
