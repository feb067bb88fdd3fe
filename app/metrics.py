"""Prometheus metrics: one registry per app; tmc_ prefix, base units, no per-request labels."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: one timestamp per counter is noise here

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tmc_requests", "HTTP requests by route template and status",
                                ["route", "status"], registry=r)
        self.request_seconds = Histogram("tmc_request_duration_seconds",
                                         "HTTP request latency by route template", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.inference_items = Counter("tmc_inference_items",
                                       "Inputs predicted (one request may carry several)",
                                       registry=r)
        self.queue_seconds = Histogram("tmc_queue_wait_seconds", "Time from admission to batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("tmc_queue_depth", "Requests admitted and waiting", registry=r)
        self.batch_items = Histogram("tmc_batch_size", "Inputs per device batch",
                                     buckets=SIZE_BUCKETS, registry=r)
        self.batch_groups = Histogram("tmc_batch_groups", "Distinct compositions per batch",
                                      buckets=SIZE_BUCKETS, registry=r)
        self.trunk_seconds = Histogram("tmc_trunk_duration_seconds",
                                       "Device time of the trunk pass shared by a batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.forward_seconds = Histogram("tmc_forward_duration_seconds",
                                         "Device time per composition group: its tangent tail "
                                         "(after the shared trunk), or the whole network when "
                                         "the group runs alone", ["kind"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("tmc_composition_cache_hits",
                                  "Composed-Δ cache hits", registry=r)
        self.cache_misses = Counter("tmc_composition_cache_misses",
                                    "Composed-Δ cache misses (Σ w_k Δ_k computed)", registry=r)
        self.cache_bytes = Gauge("tmc_cache_bytes", "Bytes of cached tangents", ["cache"],
                                 registry=r)
        self.components = Gauge("tmc_components", "Registered components", registry=r)
        self.generation = Gauge("tmc_registry_generation", "Registry generation last seen",
                                registry=r)
        self.registry_lost = Gauge("tmc_registry_lost",
                                   "1 while the shared registry has lost its data (Redis wiped: "
                                   "generation went back or base key missing): compositions "
                                   "refused, not ready", registry=r)
        self.forgets = Counter("tmc_forgets", "Components forgotten", registry=r)
        self.forget_seconds = Histogram("tmc_forget_duration_seconds",
                                        "Forget latency incl. cache purge",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.component_fetch_seconds = Histogram(
            "tmc_component_fetch_duration_seconds",
            "Fetch + sha256 + decode of one cold component version, off the device thread",
            buckets=LATENCY_BUCKETS, registry=r)
        self.component_fetches = Counter(
            "tmc_component_fetches", "Cold component versions staged at admission, by kind: "
            "fetched, failed, or shared (a request joined a fetch already on its way)",
            ["kind"], registry=r)
        for kind in ("fetched", "failed", "shared"):  # every series from the start
            self.component_fetches.labels(kind=kind)
        self.rejected = Counter("tmc_rejected_requests", "Requests refused before the device",
                                ["reason"], registry=r)
        self.build = Info("tmc_build", "Build and base model", registry=r)
        self._seen_hits = self._seen_misses = 0

    def sync_cache(self, hits: int, misses: int) -> None:
        """Advance the cache counters to the LRU's own tallies (read at scrape time)."""
        self.cache_hits.inc(max(0, hits - self._seen_hits))
        self.cache_misses.inc(max(0, misses - self._seen_misses))
        self._seen_hits, self._seen_misses = max(hits, self._seen_hits), max(
            misses, self._seen_misses)

    def observe_batch(self, items: int, groups: int) -> None:
        self.batch_items.observe(items)
        self.batch_groups.observe(groups)
