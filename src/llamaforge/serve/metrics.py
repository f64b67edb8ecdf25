"""Prometheus metrics of one server, in a registry of its own (two apps in one process, as
tests make, do not collide)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

from llamaforge.serve.engine import EngineStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, stats: EngineStats) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "llamaforge_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "llamaforge_prompt_tokens", "prompt tokens of finished requests", registry=r
        )
        self.generated_tokens = Counter(
            "llamaforge_generated_tokens", "tokens generated for finished requests", registry=r
        )
        self.latency = Histogram(
            "llamaforge_request_latency_seconds", "time from request to its last token",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "llamaforge_time_to_first_token_seconds", "time from request to its first token",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        for endpoint in ("completions", "chat"):  # every series from the start
            self.latency.labels(endpoint)
        gauges = {
            "llamaforge_queue_depth": ("requests waiting for a cache slot", lambda: stats.waiting),
            "llamaforge_running_requests": (
                "requests in the batch (prefilling or decoding)",
                lambda: stats.running + stats.prefilling,
            ),
            "llamaforge_kv_cache_usage_ratio": (
                "fraction of the KV pool's blocks in use",
                lambda: stats.kv_blocks_used / max(stats.kv_blocks_total, 1),
            ),
            "llamaforge_kv_cache_positions": ("KV pool size in positions", lambda: stats.kv_total),
            "llamaforge_kv_cache_tokens": (
                "token positions whose keys and values the running requests hold",
                lambda: stats.kv_used,
            ),
            "llamaforge_kv_cache_blocks_used": (
                "KV blocks held by requests",
                lambda: stats.kv_blocks_used,
            ),
            "llamaforge_kv_cache_blocks_total": (
                "KV blocks in the pool",
                lambda: stats.kv_blocks_total,
            ),
            "llamaforge_kv_cache_blocks_cached": (
                "KV blocks keyed by their tokens for prefix caching (in use or evictable)",
                lambda: stats.kv_blocks_cached,
            ),
            "llamaforge_kv_cache_bytes_per_token": (
                "bytes of KV cache held per token in use (the draft's cache included)",
                lambda: stats.kv_bytes_per_token,
            ),
            "llamaforge_prefix_cache_hit_ratio": (
                "fraction of looked-up prompt tokens found in the prefix cache",
                lambda: stats.prefix_hit_rate,
            ),
            "llamaforge_tokens_per_second": (
                "tokens generated per second over the last 10 s",
                stats.tokens_per_second,
            ),
        }
        r.register(_EngineCounters(stats))
        if stats.draft_k:
            gauges["llamaforge_spec_acceptance_ratio"] = (
                "fraction of the draft's proposed tokens the model accepted",
                lambda: stats.acceptance_rate or 0.0,
            )
            r.register(_SpecCounters(stats))
        for name, (doc, fn) in gauges.items():
            Gauge(name, doc, registry=r).set_function(fn)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SpecCounters:
    """Speculative decoding's counters, read from the engine's stats at each scrape."""

    def __init__(self, stats: EngineStats) -> None:
        self.stats = stats

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        yield CounterMetricFamily(
            "llamaforge_spec_draft_tokens",
            "tokens the draft model proposed (speculative decoding)",
            value=self.stats.spec_drafted,
        )
        yield CounterMetricFamily(
            "llamaforge_spec_accepted_tokens",
            "proposed tokens the model accepted (speculative decoding)",
            value=self.stats.spec_accepted,
        )


class _EngineCounters:
    """The prefix cache's and the scheduler's counters, read from the engine's stats at each
    scrape."""

    def __init__(self, stats: EngineStats) -> None:
        self.stats = stats

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        s = self.stats
        yield CounterMetricFamily(
            "llamaforge_prefix_cache_queries",
            "prompt tokens looked up in the prefix cache",
            value=s.prefix_queries,
        )
        yield CounterMetricFamily(
            "llamaforge_prefix_cache_hits",
            "looked-up prompt tokens found in the prefix cache (not prefilled)",
            value=s.prefix_hits,
        )
        yield CounterMetricFamily(
            "llamaforge_preemptions",
            "requests preempted when the KV pool ran out (recomputed later)",
            value=s.preemptions,
        )
