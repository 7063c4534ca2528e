"""Counters and the snapshot returned by `Store.stats()`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from vision_cache.store.segments import HEADER_SIZE

COUNTER_NAMES = (
    "hits_hot",
    "hits_disk",
    "misses",
    "puts",
    "put_failures",
    "evictions",
    "expirations",
    "quarantined",
)


class Counters:
    """This process's event counts (the index keeps totals for all processes)."""

    def __init__(self) -> None:
        self._values = dict.fromkeys(COUNTER_NAMES, 0)
        self._lock = threading.Lock()

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] += amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


@dataclass(frozen=True, slots=True)
class StoreStats:
    entries: int
    live_bytes: int
    pinned_entries: int
    pinned_bytes: int
    disk_budget: int
    segment_files: int
    segment_bytes: int
    hot_entries: int
    hot_bytes: int
    hot_budget: int
    namespaces: int
    oldest: float | None
    newest: float | None
    quarantine_files: int
    quarantine_bytes: int
    process: dict[str, int] = field(default_factory=dict)
    all_processes: dict[str, int] = field(default_factory=dict)

    @property
    def dead_bytes(self) -> int:
        """Segment bytes past the headers not holding a live payload
        (padding, deleted and orphaned payloads); gc returns most of it."""
        return max(0, self.segment_bytes - self.segment_files * HEADER_SIZE - self.live_bytes)
