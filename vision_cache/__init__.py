"""vision_cache: the cache of visual packages and its clients (no HTTP server here).

The public API, loaded on first use (``import vision_cache`` loads nothing heavy: the store
brings SQLite and numpy, warm-up brings httpx)::

    from vision_cache import CacheKey, Namespace, Store, warm

    with Store.open("~/.cache/vcache/store") as store:
        entry = store.get(key)

Subpackages, in the order a package travels: `keys` and `package` (what a cached image is
called and what it holds), `store` (the local store), `shared` (the fleet's Redis tier),
`llama` (llama.cpp bindings that encode and decode packages in-process), `client` (warm-up
and reference packs, beside a running proxy), `synthetic` (random-weight test models and test
images). See docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vision_cache.client.compare import compare, references_in
    from vision_cache.client.compare_api import CompareReply, References
    from vision_cache.client.warmup import WarmReport, warm
    from vision_cache.errors import VisionCacheError
    from vision_cache.keys import CacheKey, Namespace, content_digest
    from vision_cache.singleflight import SingleFlight
    from vision_cache.store import NamespaceInfo, Store
    from vision_cache.store.check import CheckReport, Problem, ProblemKind
    from vision_cache.store.compaction import GcReport
    from vision_cache.store.entry import Entry, EntryInfo, SegmentRef
    from vision_cache.store.stats import StoreStats

# public name -> the module that defines it
_EXPORTS = {
    "CacheKey": "vision_cache.keys",
    "CheckReport": "vision_cache.store.check",
    "CompareReply": "vision_cache.client.compare_api",
    "References": "vision_cache.client.compare_api",
    "compare": "vision_cache.client.compare",
    "references_in": "vision_cache.client.compare",
    "Entry": "vision_cache.store.entry",
    "EntryInfo": "vision_cache.store.entry",
    "GcReport": "vision_cache.store.compaction",
    "Namespace": "vision_cache.keys",
    "NamespaceInfo": "vision_cache.store",
    "Problem": "vision_cache.store.check",
    "ProblemKind": "vision_cache.store.check",
    "SegmentRef": "vision_cache.store.entry",
    "SingleFlight": "vision_cache.singleflight",
    "Store": "vision_cache.store",
    "StoreStats": "vision_cache.store.stats",
    "VisionCacheError": "vision_cache.errors",
    "WarmReport": "vision_cache.client.warmup",
    "content_digest": "vision_cache.keys",
    "warm": "vision_cache.client.warmup",
}

__all__ = [
    "CacheKey",
    "CheckReport",
    "CompareReply",
    "Entry",
    "EntryInfo",
    "GcReport",
    "Namespace",
    "NamespaceInfo",
    "Problem",
    "ProblemKind",
    "References",
    "SegmentRef",
    "SingleFlight",
    "Store",
    "StoreStats",
    "VisionCacheError",
    "WarmReport",
    "compare",
    "content_digest",
    "references_in",
    "warm",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vision_cache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
