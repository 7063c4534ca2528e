"""The in-process hot tier: recently used entries kept mapped and verified.

A hit here skips the SQLite lookup, the mmap call and the checksum. The
budget counts payload bytes, which is what the kept mappings can pin in
memory. `hot_tier(0)` returns `NullHotTier`, so callers never test for a
disabled tier.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict

from vision_cache.keys import CacheKey
from vision_cache.store.entry import Entry

# Each kept entry holds a mapping and (through Python's mmap) one file
# descriptor; the cap keeps a budget full of tiny payloads from exhausting
# the descriptor table.
MAX_HOT_ENTRIES = 1024


class HotTier(ABC):
    @abstractmethod
    def get(self, key: CacheKey) -> Entry | None: ...

    @abstractmethod
    def put(self, entry: Entry) -> None: ...

    @abstractmethod
    def discard(self, key: CacheKey) -> None: ...

    @abstractmethod
    def clear(self) -> None: ...

    @property
    @abstractmethod
    def budget(self) -> int: ...

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    @property
    @abstractmethod
    def count(self) -> int: ...


class NullHotTier(HotTier):
    """The disabled tier: remembers nothing."""

    def get(self, key: CacheKey) -> Entry | None:
        return None

    def put(self, entry: Entry) -> None:
        return None

    def discard(self, key: CacheKey) -> None:
        return None

    def clear(self) -> None:
        return None

    @property
    def budget(self) -> int:
        return 0

    @property
    def nbytes(self) -> int:
        return 0

    @property
    def count(self) -> int:
        return 0


class LruHotTier(HotTier):
    """Least-recently-used entries, bounded by payload bytes and count."""

    def __init__(self, budget: int, max_entries: int = MAX_HOT_ENTRIES) -> None:
        self._budget = budget
        self._max_entries = max_entries
        self._entries: OrderedDict[CacheKey, Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: CacheKey) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, entry: Entry) -> None:
        if entry.nbytes > self._budget:
            return  # would evict everything else and still not fit
        with self._lock:
            self._drop(entry.key)
            self._entries[entry.key] = entry
            self._bytes += entry.nbytes
            while self._bytes > self._budget or len(self._entries) > self._max_entries:
                self._drop(next(iter(self._entries)))

    def discard(self, key: CacheKey) -> None:
        with self._lock:
            self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes

    @property
    def budget(self) -> int:
        return self._budget

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def count(self) -> int:
        return len(self._entries)


def hot_tier(budget: int, max_entries: int = MAX_HOT_ENTRIES) -> HotTier:
    if budget < 0:
        raise ValueError("hot_bytes must be >= 0")
    return NullHotTier() if budget == 0 else LruHotTier(budget, max_entries)
