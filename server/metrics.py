"""Prometheus metrics (prometheus_client): requests and their latency by route, engine steps
(latency and batch size, observed by the engine thread), and gauges read from the runner and
the steering store when scraped."""

from __future__ import annotations

from collections.abc import Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .runner import Runner
from .steering_store import SteeringStore

prometheus_client.disable_created_metrics()  # NOTE: *_created series only double the output

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)


class _RunnerCollector(Collector):
    """Gauges and totals read from the runner at scrape time."""

    def __init__(self) -> None:
        self.runner: Runner | None = None

    def collect(self) -> Iterator[Metric]:
        runner = self.runner
        yield GaugeMetricFamily("tiller_model_ready", "1 once the model is loaded.",
                                value=0 if runner is None else 1)
        if runner is None:
            return
        snap = runner.snapshot()
        stats = runner.stats
        yield CounterMetricFamily("tiller_prompt_tokens", "Prompt tokens computed.",
                                  value=stats.prompt_tokens)
        yield CounterMetricFamily("tiller_generated_tokens", "Tokens sampled.",
                                  value=stats.generated_tokens)
        yield CounterMetricFamily("tiller_sampling_seconds",
                                  "Seconds spent sampling tokens from logits (each step's "
                                  "sequences in one call).", value=stats.sampling_seconds)
        yield GaugeMetricFamily("tiller_queue_depth", "Requests waiting for a slot.",
                                value=snap["waiting"])
        yield GaugeMetricFamily("tiller_running_sequences", "Sequences in the running batch.",
                                value=len(snap["running"]))
        yield GaugeMetricFamily("tiller_kv_blocks_used", "KV-cache blocks holding sequences.",
                                value=snap["kv_blocks_used"])
        yield GaugeMetricFamily("tiller_kv_blocks_total", "KV-cache blocks in the pool.",
                                value=snap["kv_blocks_total"])
        yield GaugeMetricFamily("tiller_kv_cache_usage_ratio", "Used fraction of the KV cache.",
                                value=snap["kv_blocks_used"] / max(snap["kv_blocks_total"], 1))
        cache = runner.engine.cache.stats
        yield CounterMetricFamily("tiller_prefix_cache_queries",
                                  "Prompt tokens looked up in the prefix cache.",
                                  value=cache.lookups)
        yield CounterMetricFamily("tiller_prefix_cache_hits",
                                  "Prompt tokens served from the prefix cache.",
                                  value=cache.hit_tokens)
        yield CounterMetricFamily("tiller_prefix_cache_hit_blocks",
                                  "KV blocks served from the prefix cache.",
                                  value=cache.hit_blocks)
        yield CounterMetricFamily("tiller_prefix_cache_row_copies",
                                  "Lookups that copied the first rows of a cached block.",
                                  value=cache.row_hits)
        yield CounterMetricFamily("tiller_prefix_cache_evictions",
                                  "Cached KV blocks evicted to make room.",
                                  value=cache.evictions)
        yield GaugeMetricFamily("tiller_kv_blocks_cached",
                                "KV blocks kept by content for reuse (in use or not).",
                                value=snap["kv_blocks_cached"])
        yield GaugeMetricFamily("tiller_kv_blocks_shared",
                                "KV blocks used by more than one sequence.",
                                value=snap["kv_blocks_shared"])
        yield GaugeMetricFamily("tiller_last_step_seconds", "Latency of the latest engine step.",
                                value=stats.last_step_seconds)


class _StoreCollector(Collector):
    """The steering store's health, read at scrape time (no call that could reach Redis)."""

    def __init__(self) -> None:
        self.store: SteeringStore | None = None

    def collect(self) -> Iterator[Metric]:
        if self.store is not None:
            yield GaugeMetricFamily("tiller_steering_store_damaged_entries",
                                    "Stored steering vectors found damaged and skipped (the "
                                    "log names each).", value=self.store.damaged_entries)


class Metrics:
    """One registry per application (tests run several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tiller_requests", "HTTP requests by route and status.",
                                ["route", "status"], registry=self.registry)
        self.request_seconds = Histogram("tiller_request_seconds",
                                         "Time to serve a request (streams: until the end), "
                                         "by route.", ["route"], buckets=REQUEST_BUCKETS,
                                         registry=self.registry)
        self.step_seconds = Histogram("tiller_step_seconds", "Engine step latency.",
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("tiller_batch_size", "Sequences per engine step.",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self._runner = _RunnerCollector()
        self.registry.register(self._runner)
        self._store = _StoreCollector()
        self.registry.register(self._store)

    def watch_store(self, store: SteeringStore) -> None:
        self._store.store = store

    def watch(self, runner: Runner) -> None:
        """Read the runner's gauges at scrape time and observe its steps as they run."""
        self._runner.runner = runner
        runner.on_step = self.observe_step

    def observe_step(self, seconds: float, batch_size: int) -> None:
        """Called on the engine thread after every step (prometheus_client is thread-safe)."""
        self.step_seconds.observe(seconds)
        self.batch_size.observe(batch_size)

    def count_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        body = prometheus_client.generate_latest(self.registry)
        return body, prometheus_client.CONTENT_TYPE_LATEST
