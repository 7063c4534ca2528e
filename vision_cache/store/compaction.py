"""Garbage collection: expiry, budget, abandoned segments, compaction.

Space held by deleted, evicted and orphaned payloads (bytes written by a
put that crashed or failed before its row committed) comes back in two
ways. A sealed segment with no live entry is unlinked at once. A sealed
segment that is mostly dead has its live payloads copied into this
process's active segment, each row switched over by compare-and-swap, and
is unlinked once no row points at it. No file is ever truncated, so a
reader's existing mapping stays valid through all of this.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import xxhash

from vision_cache.errors import PayloadError
from vision_cache.keys import CacheKey
from vision_cache.store.check import Progress
from vision_cache.store.index import Index, IndexRow, SegmentRow
from vision_cache.store.layout import StoreLayout, parse_segment_name
from vision_cache.store.quarantine import Quarantine, Reason
from vision_cache.store.segments import HEADER_SIZE, Appender, locked, map_payload

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GcReport:
    expired: int = 0
    evicted: int = 0
    segments_removed: int = 0
    segments_compacted: int = 0
    entries_moved: int = 0
    bytes_reclaimed: int = 0
    orphan_files_removed: int = 0
    quarantined: int = 0
    quarantine_bytes_freed: int = 0


@dataclass(slots=True)
class _Tally:
    removed: int = 0
    compacted: int = 0
    moved: int = 0
    reclaimed: int = 0
    orphans: int = 0
    quarantined: int = 0


class Compactor:
    def __init__(
        self,
        index: Index,
        appender: Appender,
        layout: StoreLayout,
        quarantine: Quarantine,
        forget: Callable[[CacheKey], None],
    ) -> None:
        self._index = index
        self._appender = appender
        self._layout = layout
        self._quarantine = quarantine
        self._forget = forget  # drops a key from the hot tier

    def run(
        self,
        *,
        now: float,
        budget: int,
        min_dead_ratio: float,
        abandoned_after: float,
        progress: Progress | None = None,
    ) -> GcReport:
        expired = self._expire(now)
        evicted = self._index.evict_to(budget)
        for key in evicted:
            self._forget(key)
        tally = _Tally()
        self._seal_abandoned(now - abandoned_after)
        self._retire_if_mostly_dead(min_dead_ratio)
        segments = self._index.segments()
        for done, segment in enumerate(segments, 1):
            if segment.state == "sealed":
                self._collect(segment, min_dead_ratio, tally)
            if progress is not None:
                progress(done, len(segments))
        self._remove_orphan_files(now - abandoned_after, tally)
        freed = self._quarantine.prune()
        self._index.checkpoint()
        return GcReport(
            len(expired),
            len(evicted),
            tally.removed,
            tally.compacted,
            tally.moved,
            tally.reclaimed,
            tally.orphans,
            tally.quarantined,
            freed,
        )

    def reclaim_dead(self) -> int:
        """Unlink sealed segments without live entries; the cheap path run
        after evictions and deletes. Returns bytes freed."""
        tally = _Tally()
        for segment_id in self._index.dead_segments():
            self._drop(segment_id, tally)
        return tally.reclaimed

    def _expire(self, now: float) -> list[CacheKey]:
        expired: list[CacheKey] = []
        while batch := self._index.expire(now):
            expired += batch
        for key in expired:
            self._forget(key)
        return expired

    def _seal_abandoned(self, created_before: float) -> None:
        """Seal 'active' segments whose writer is gone (crashed or failed).

        The age limit covers the moment between a writer committing the
        segment row and creating and locking the file."""
        for segment in self._index.segments():
            if segment.state != "active" or segment.created_at > created_before:
                continue
            if segment.id == self._appender.active_segment:
                continue
            path = self._layout.segment_path(segment.id)
            with locked(path) as free:
                if free or not path.exists():
                    self._index.seal_segment(segment.id)

    def _retire_if_mostly_dead(self, min_dead_ratio: float) -> None:
        """Our own active segment is only collectable once sealed; seal it
        when it is as dead as a segment we would compact."""
        active = self._appender.active_segment
        segment = next((s for s in self._index.segments() if s.id == active), None)
        if segment is not None and _dead_enough(self._layout, segment, min_dead_ratio):
            self._appender.retire()

    def _collect(self, segment: SegmentRow, min_dead_ratio: float, tally: _Tally) -> None:
        if segment.live_count == 0:
            self._drop(segment.id, tally)
            return
        # Rows pointing at a missing file are check()'s business, not ours.
        if _dead_enough(self._layout, segment, min_dead_ratio):
            self._compact(segment, tally)

    def _compact(self, segment: SegmentRow, tally: _Tally) -> None:
        path = self._layout.segment_path(segment.id)
        with locked(path) as free:
            if not free:
                return  # another gc is on it
            for row in self._index.rows_in_segment(segment.id):
                tally.moved += self._move(row, tally)
            tally.compacted += 1
            self._unlink_if_dead(segment.id, tally)

    def _move(self, row: IndexRow, tally: _Tally) -> int:
        """Copy one payload to the active segment; 1 if the row now uses it."""
        path = self._layout.segment_path(row.segment)
        try:
            mapping = map_payload(path, row.offset, row.length)
        except PayloadError as exc:
            self._discard(row, Reason.MISSING, None, str(exc), tally)
            return 0
        with mapping, memoryview(mapping) as view:
            if not row.intact() or xxhash.xxh3_64_hexdigest(view) != row.checksum:
                self._discard(row, Reason.CHECKSUM, view, "found while compacting", tally)
                return 0
            with self._appender.lock:
                segment_id, offset = self._appender.append(view)
                moved = self._index.move(row, segment_id, offset)
        if moved:
            self._forget(row.key)
        return int(moved)

    def _discard(
        self, row: IndexRow, reason: Reason, view: memoryview | None, detail: str, tally: _Tally
    ) -> None:
        self._quarantine.record(reason, row.id, row, view, detail)
        self._index.delete_row(row)
        self._forget(row.key)
        tally.quarantined += 1

    def _drop(self, segment_id: int, tally: _Tally) -> None:
        path = self._layout.segment_path(segment_id)
        with locked(path) as free:
            if free or not path.exists():
                self._unlink_if_dead(segment_id, tally)
            # else a compactor elsewhere holds it and will drop it itself

    def _unlink_if_dead(self, segment_id: int, tally: _Tally) -> None:
        """Drop row and file if no entry uses the segment; the caller holds
        its lock (flock is per open file, so we must not take it twice)."""
        if not self._index.drop_segment_if_dead(segment_id):
            return
        path = self._layout.segment_path(segment_id)
        size = _size(path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        tally.removed += 1
        tally.reclaimed += size

    def _remove_orphan_files(self, older_than: float, tally: _Tally) -> None:
        """Unlink segment files that no row knows: left by a crash between
        dropping a row and unlinking its file, or by an index reset. Locked
        or young files are left alone in case a writer still uses them."""
        known = {segment.id for segment in self._index.segments()}
        for path in self._layout.segments_dir.iterdir():
            segment_id = parse_segment_name(path.name)
            if segment_id is None or segment_id in known:
                continue
            with contextlib.suppress(FileNotFoundError), locked(path) as free:
                if free and path.stat().st_mtime < older_than:
                    size = path.stat().st_size
                    path.unlink()
                    tally.orphans += 1
                    tally.reclaimed += size


def _dead_enough(layout: StoreLayout, segment: SegmentRow, min_dead_ratio: float) -> bool:
    size = _size(layout.segment_path(segment.id))
    dead = size - HEADER_SIZE - segment.live_bytes
    return size > 0 and dead > 0 and dead >= min_dead_ratio * size


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
