"""What every request handler needs: the `Proxy` (upstream, package lookup, store, metrics,
limits, body budget), reachable from a request through `PROXY_KEY`.

Its own module so that the app and the admin endpoints both import it, and not each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from aiohttp import web

from proxy.lookup.package_lookup import PackageLookup
from proxy.lookup.result_cache import ResultCache
from proxy.upstream.client import Upstream
from proxy.web.budget import BodyBudget
from proxy.web.metrics import Metrics
from vision_cache.client.admin_api import ManagedState
from vision_cache.store import Store


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request limits; `max_body_bytes` also bounds all bodies held at once (BodyBudget).

    `upstream_idle_s` is the longest silence from upstream (before its headers, or between two
    chunks) before the request fails with 504, or its stream ends with an error event."""

    max_body_bytes: int = 100 * 1024 * 1024
    max_images: int = 32
    upstream_idle_s: float | None = 600.0


@dataclasses.dataclass
class Proxy:
    """Everything a request handler needs."""

    upstream: Upstream
    lookup: PackageLookup
    store: Store
    metrics: Metrics
    limits: Limits = dataclasses.field(default_factory=Limits)
    api_key: str | None = None
    accept_client_packages: bool = False
    managed_state: Callable[[], ManagedState] | None = None  # managed mode: the server's
    # None: a result cache that is off unless a request asks for it
    results: ResultCache | None = None
    # a llama-server with --embeddings, for compare's shortlist (None: pooled packages)
    embedding_upstream: str | None = None
    budget: BodyBudget = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.budget = BodyBudget(self.limits.max_body_bytes)
        if self.results is None:
            self.results = ResultCache(self.store, self.lookup.run)

    @property
    def result_cache(self) -> ResultCache:
        assert self.results is not None  # set in __post_init__
        return self.results


PROXY_KEY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)
