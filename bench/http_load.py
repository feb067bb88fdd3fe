"""Closed-loop HTTP load against ``tmc serve``: requests pre-encoded as raw HTTP/1.1 bytes on
kept-alive loopback connections, one request in flight per client. Hand-written rather than
an HTTP client library: the client shares the cores with the server it measures, so it does
as little per request as possible (write bytes, read the head, read Content-Length bytes).

Policy: a level runs every client for a warm-up and then a measured window; only requests
completed inside the window count, the server's /metrics and CPU time (psutil) are read at
both ends of the window, and so is this process's CPU time, so that the figures say how busy
the client itself was. Latency percentiles are common.percentile's (inclusive method).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from bench import common, processes, scrape

# the server's histograms read over a window
FORWARD = 'tmc_forward_duration_seconds{kind="linearized"}'
TRUNK = "tmc_trunk_duration_seconds"
REQUEST = 'tmc_request_duration_seconds{route="/v1/predict"}'


def request_bytes(port: int, body: dict[str, Any]) -> bytes:
    """A POST /v1/predict with this JSON body, as the raw bytes sent on the connection."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
    return head.encode() + payload


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes
                   ) -> tuple[int, bytes]:
    """Send one request, read its answer (status, body; the body sized by Content-Length)."""
    writer.write(req)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                  if k.strip().lower() == "content-length")
    return status, await reader.readexactly(length)


class Recorder(Protocol):
    """Where a client loop puts each answer: its status, body, and when the request was sent
    and its answer read (time.perf_counter)."""

    def record(self, status: int, body: bytes, sent: float, answered: float) -> None: ...


@dataclass
class LevelStats:
    """One load level's answers; only those completed inside the window count."""

    per_request: int  # inputs per request
    warm_until: float  # the window: (warm_until, deadline), on time.perf_counter
    deadline: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    completed: int = 0  # inputs answered inside the window
    requests: int = 0  # requests answered inside the window

    def record(self, status: int, body: bytes, sent: float, answered: float) -> None:
        if status != 200:
            self.errors += 1
            self.first_error = self.first_error or f"{status}: {body[:200]!r}"
        elif self.warm_until <= answered <= self.deadline:  # completions inside the window
            self.latencies.append(answered - sent)
            self.completed += self.per_request
            self.requests += 1


async def client_loop(port: int, requests: list[bytes], deadline: float,
                      stats: Recorder) -> None:
    """One client (a kept-alive connection, one request in flight): send ``requests`` in turn
    until ``deadline``; each answer goes to ``stats``, which decides what counts."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        k = 0
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            status, body = await exchange(reader, writer, requests[k % len(requests)])
            stats.record(status, body, sent, time.perf_counter())
            k += 1
    finally:
        writer.close()


async def scrape_metrics(url: str) -> scrape.Metrics:
    async with httpx.AsyncClient(timeout=30.0) as client:
        return scrape.parse_metrics((await client.get(f"{url}/metrics")).text)


async def run_level(server: processes.Server, per_client: list[list[bytes]], per_request: int,
                    warmup_s: float, duration_s: float) -> dict[str, Any]:
    """One load level: a client per entry of ``per_client``, a warm-up, then the window."""
    start = time.perf_counter()
    warm_until, deadline = start + warmup_s, start + warmup_s + duration_s
    stats = LevelStats(per_request, warm_until, deadline)
    tasks = [asyncio.create_task(client_loop(server.port, reqs, deadline, stats))
             for reqs in per_client]
    await asyncio.sleep(max(0.0, warm_until - time.perf_counter()))
    m0, cpu0, own0, t0 = await _window_edge(server)
    await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
    m1, cpu1, own1, t1 = await _window_edge(server)
    await asyncio.gather(*tasks)
    window = t1 - t0
    return level_result(stats, m0, m1, window, cpu1 - cpu0, own1 - own0)


async def _window_edge(server: processes.Server) -> tuple[scrape.Metrics, float, float, float]:
    """At one end of the window: the server's /metrics and CPU seconds, this process's CPU
    seconds, and the clock."""
    metrics = await scrape_metrics(server.url)
    return (metrics, processes.cpu_seconds(server.proc.pid), time.process_time(),
            time.perf_counter())


def level_result(stats: LevelStats, m0: scrape.Metrics, m1: scrape.Metrics,
                 window: float, server_cpu: float, client_cpu: float) -> dict[str, Any]:
    return {
        "completed_inputs": stats.completed, "completed_requests": stats.requests,
        "errors": stats.errors, "first_error": stats.first_error,
        "window_s": window,
        "throughput_inputs_per_s": stats.completed / window if window else None,
        "latency_ms": latency_ms(stats.latencies),
        **_server_side(m0, m1),
        "server_cpu_cores": server_cpu / window if window else None,
        "server_cpu_ms_per_input": server_cpu / stats.completed * 1e3 if stats.completed
        else None,
        "client_cpu_cores": client_cpu / window if window else None,
    }


def latency_ms(seconds: list[float]) -> dict[str, float | None]:
    """p50, p99 (common.percentile), mean, min and max of request latencies, in ms."""
    ms = common.ms
    return {"p50": ms(common.percentile(seconds, 50)), "p99": ms(common.percentile(seconds, 99)),
            "mean": ms(statistics.fmean(seconds) if seconds else None),
            "min": ms(min(seconds, default=None)), "max": ms(max(seconds, default=None))}


def _server_side(m0: scrape.Metrics, m1: scrape.Metrics) -> dict[str, float | None]:
    """What the server's /metrics say about the window between two scrapes."""
    batches = scrape.delta(m0, m1, "tmc_batch_size_count")

    def per_batch(key: str) -> float | None:
        return scrape.delta(m0, m1, key) / batches if batches else None
    return {
        "batches": batches,
        "mean_batch_size": per_batch("tmc_batch_size_sum"),
        "mean_groups_per_batch": per_batch("tmc_batch_groups_sum"),
        "composition_cache_misses": scrape.delta(m0, m1, "tmc_composition_cache_misses_total"),
        # tail per composition group; shared trunk per device batch
        "server_forward_ms_mean": scrape.histogram_mean_ms(m0, m1, FORWARD),
        "server_trunk_ms_mean": scrape.histogram_mean_ms(m0, m1, TRUNK),
        "server_queue_wait_ms_mean": scrape.histogram_mean_ms(m0, m1, "tmc_queue_wait_seconds"),
        "server_request_ms_mean": scrape.histogram_mean_ms(m0, m1, REQUEST),
    }


def rotate(xs: list[bytes], k: int) -> list[bytes]:
    """The same requests starting at the k-th, so that clients do not move in lockstep."""
    k %= len(xs)
    return xs[k:] + xs[:k]
