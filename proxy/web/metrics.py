"""Prometheus metrics of one proxy, served at /vcache/metrics.

Each app gets its own registry, so several proxies (tests, benchmarks) live in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from proxy.version import VERSION
from vision_cache.shared.tier import SharedTierStats

if TYPE_CHECKING:
    from proxy.upstream.client import Capabilities

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.hits = Counter(
            "vcache_hits", "Images and audio clips served from the cache", registry=r
        )
        self.misses = Counter(
            "vcache_misses", "Images and clips encoded by upstream, then cached", registry=r
        )
        self.fallbacks = Counter(
            "vcache_fallbacks",
            "Images and clips forwarded as sent, because the cache path "
            "failed or upstream takes no packages",
            registry=r,
        )
        # the audio clips among the above
        self.audio_hits = Counter(
            "vcache_audio_hits", "Audio clips served from the cache", registry=r
        )
        self.audio_misses = Counter(
            "vcache_audio_misses", "Audio clips encoded by upstream, then cached", registry=r
        )
        self.audio_fallbacks = Counter(
            "vcache_audio_fallbacks", "Audio clips forwarded as sent", registry=r
        )
        self.package_bytes = Counter(
            "vcache_package_bytes", "Bytes of packages handed to upstream", registry=r
        )
        self.encode_ms = Counter(
            "vcache_encode_ms", "Encoder milliseconds spent on misses", registry=r
        )
        self.not_admitted = Counter(
            "vcache_not_admitted",
            "Packages not cached: their encode cost less than a hit of their size (admission)",
            registry=r,
        )
        self.encode_ms_saved = Counter(
            "vcache_encode_ms_saved", "Encoder milliseconds hits did not spend", registry=r
        )
        self.encode_seconds = Histogram(
            "vcache_encode_seconds", "Upstream encode latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.upstream_seconds = Histogram(
            "vcache_upstream_seconds",
            "Time to upstream response headers",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "vcache_requests",
            "Requests by endpoint and status class (2xx..5xx, or cancelled: the client went "
            "away before the whole response was sent)",
            ["endpoint", "status"],
            registry=r,
        )
        self.bypassed = Counter(
            "vcache_bypassed",
            "Images sent as they came because the request said Cache-Control: no-store or no-cache",
            registry=r,
        )
        build = Gauge("vcache_build_info", "vcache's version (always 1)", ["version"], registry=r)
        build.labels(VERSION).set(1)
        self.upstream_errors = Counter(
            "vcache_upstream_errors", "Requests that failed reaching upstream", registry=r
        )
        self.result_hits = Counter(
            "vcache_result_hits", "Answers replayed from the result cache", registry=r
        )
        self.result_misses = Counter(
            "vcache_result_misses", "Result-cache lookups that found nothing", registry=r
        )
        self.result_stores = Counter(
            "vcache_result_stores", "Answers stored in the result cache", registry=r
        )

    def watch_shared(self, stats: Callable[[], SharedTierStats]) -> None:
        """Export the shared tier's counters (vcache_shared_*), read at each scrape."""
        self.registry.register(_SharedTierCollector(stats))

    def watch_packages(self, capabilities: Callable[[], Capabilities | None]) -> None:
        """Export whether upstream takes packages (vcache_packages_enabled) and, when it does
        not, why (vcache_packages_off{reason=...}), read at each scrape."""
        self.registry.register(_PackagesCollector(capabilities))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SharedTierCollector:
    """The shared tier counts for itself (it lives in vision_cache, without Prometheus)."""

    COUNTERS = (
        ("hits", "Packages found in the shared tier (another proxy encoded them)"),
        ("misses", "Shared-tier lookups that found nothing"),
        ("publishes", "Packages this proxy published to the shared tier"),
        ("corrupt", "Shared-tier values that failed their checksum: deleted, then replaced"),
        ("errors", "Shared-tier calls that failed (Redis down, slow or refusing)"),
        ("lock_waits", "Times this proxy waited for another proxy's encode of the same image"),
        ("breaker_trips", "Times the circuit breaker opened"),
    )

    def __init__(self, stats: Callable[[], SharedTierStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for field, text in self.COUNTERS:
            yield CounterMetricFamily(f"vcache_shared_{field}", text, value=getattr(stats, field))
        yield GaugeMetricFamily(
            "vcache_shared_breaker_open",
            "1 while the circuit breaker skips the shared tier",
            value=int(stats.breaker_open),
        )


class _PackagesCollector:
    """Upstream's package state as last seen (nothing until it was first asked)."""

    def __init__(self, capabilities: Callable[[], Capabilities | None]) -> None:
        self._capabilities = capabilities

    def collect(self) -> Iterator[Metric]:
        caps = self._capabilities()
        if caps is None:
            return
        yield GaugeMetricFamily(
            "vcache_packages_enabled",
            "1 while upstream takes packages (images are cached), 0 while every image is "
            "forwarded and encoded by upstream each time",
            value=int(caps.packages),
        )
        off = GaugeMetricFamily(
            "vcache_packages_off",
            "1, labelled with why packages are off (unreachable, stock, disabled, unverified, "
            "no_mmproj, version, router_no_model); absent while they are on",
            labels=["reason"],
        )
        if not caps.packages:
            off.add_metric([caps.off_kind or "unknown"], 1)
        yield off
