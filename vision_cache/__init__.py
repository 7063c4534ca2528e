"""The visual-package store: content keys, SQLite index, mmap payloads,
hot and disk tiers. See docs/store.md and docs/cache-keys.md."""

from vision_cache.check import CheckReport, Problem, ProblemKind
from vision_cache.compaction import GcReport
from vision_cache.entry import Entry, EntryInfo, FileRef
from vision_cache.errors import VisionCacheError
from vision_cache.keys import CacheKey, Namespace, content_digest
from vision_cache.singleflight import SingleFlight
from vision_cache.stats import StoreStats
from vision_cache.store import NamespaceInfo, Store
from vision_cache.warmup import WarmReport, warm

__all__ = [
    "CacheKey",
    "CheckReport",
    "Entry",
    "EntryInfo",
    "FileRef",
    "GcReport",
    "Namespace",
    "NamespaceInfo",
    "Problem",
    "ProblemKind",
    "SingleFlight",
    "Store",
    "StoreStats",
    "VisionCacheError",
    "WarmReport",
    "content_digest",
    "warm",
]
