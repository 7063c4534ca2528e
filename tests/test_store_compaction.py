"""Compaction and space reclaim: dead segments go, mostly-dead ones are
copied out, orphans are found, and no reader's mapping is ever cut short."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.store_helpers import key, meta_for, payload_for, sql
from vision_cache import Store
from vision_cache.errors import IndexUnavailableError
from vision_cache.store.index import Index
from vision_cache.store.layout import segment_name
from vision_cache.store.segments import HEADER_SIZE

SEGMENT = 64 * 1024  # small segments so a few puts roll over


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> Iterator[Store]:
    with Store.open(root, hot_bytes=0, segment_bytes=SEGMENT, durable=False) as opened:
        yield opened


def fill(store: Store, count: int) -> None:
    for i in range(count):
        assert store.put(key(i), meta_for(key(i)), payload_for(key(i))) is not None


def segment_files(root: Path) -> set[str]:
    return {p.name for p in (root / "segments").iterdir()}


def assert_all_exact(store: Store, indices: Iterator[int] | range | list[int]) -> None:
    for i in indices:
        entry = store.get(key(i))
        assert entry is not None, i
        assert bytes(entry.payload) == payload_for(key(i)) and entry.meta == meta_for(key(i))


def test_segments_roll_over_at_their_size(store: Store, root: Path) -> None:
    fill(store, 40)
    assert len(segment_files(root)) > 3
    for name in segment_files(root):
        assert (root / "segments" / name).stat().st_size <= SEGMENT + 17 * 1024


def test_deleting_every_entry_of_a_sealed_segment_unlinks_it(store: Store, root: Path) -> None:
    fill(store, 40)
    first = store.get(key(0))
    assert first is not None
    victims = [i for i in range(40) if store.get(key(i)).ref.segment == first.ref.segment]  # type: ignore[union-attr]
    for i in victims:
        store.delete(key(i))
    assert first.ref.segment not in segment_files(root)
    assert bytes(first.payload) == payload_for(key(0))  # the old mapping still reads
    assert_all_exact(store, [i for i in range(40) if i not in victims])


def test_gc_compacts_mostly_dead_segments(store: Store, root: Path) -> None:
    fill(store, 60)
    before = segment_files(root)
    kept = list(range(0, 60, 4))
    for i in range(60):
        if i not in kept:
            store.delete(key(i))
    dead_before = store.stats().dead_bytes
    report = store.gc()
    assert report.segments_compacted > 0 and report.entries_moved > 0
    assert report.bytes_reclaimed > 0
    assert store.stats().dead_bytes < dead_before / 2
    assert len(segment_files(root) & before) < len(before)
    assert_all_exact(store, kept)
    assert store.check().ok


def test_a_mapping_survives_compaction_of_its_segment(store: Store) -> None:
    """Guards against truncating or rewriting a mapped file (SIGBUS)."""
    fill(store, 60)
    held = [store.get(key(i)) for i in range(0, 60, 5)]
    for i in range(60):
        if i % 5:
            store.delete(key(i))
    store.gc(min_dead_ratio=0.0)
    for i, entry in zip(range(0, 60, 5), held, strict=True):
        assert entry is not None and bytes(entry.payload) == payload_for(key(i))
        fresh = store.get(key(i))
        assert fresh is not None and fresh.ref != entry.ref  # it moved


def test_orphaned_payloads_are_reclaimed(
    store: Store, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payload written but never indexed (the put failed after the write)
    is dead space that gc returns."""
    fill(store, 5)

    def fail(*args: object, **kwargs: object) -> None:
        raise IndexUnavailableError("injected")

    with monkeypatch.context() as patch:
        patch.setattr(Index, "insert", fail)
        for i in range(100, 110):
            assert store.put(key(i), b"{}", payload_for(key(i))) is None
    assert store.stats().dead_bytes >= sum(len(payload_for(key(i))) for i in range(100, 110))
    store.gc(min_dead_ratio=0.2, abandoned_after=0)
    assert store.stats().dead_bytes < 5 * 4096 + 4096
    assert_all_exact(store, range(5))


def test_unknown_segment_files_are_removed_by_gc(store: Store, root: Path) -> None:
    fill(store, 3)
    stray = root / "segments" / segment_name(999)
    stray.write_bytes(b"x" * 10_000)
    report = store.check()
    assert report.ok and report.orphan_files == 1
    assert store.gc(abandoned_after=3600).orphan_files_removed == 0  # too young
    os.utime(stray, (time.time() - 7200, time.time() - 7200))
    assert store.gc(abandoned_after=3600).orphan_files_removed == 1
    assert not stray.exists()


def test_an_abandoned_active_segment_is_sealed_and_reclaimed(store: Store, root: Path) -> None:
    """A writer killed mid-segment leaves an 'active' row nobody locks."""
    fill(store, 3)
    sql(root, "INSERT INTO segments (state, created_at) VALUES ('active', 0)")
    [(segment_id,)] = sql(root, "SELECT max(id) FROM segments")
    path = root / "segments" / segment_name(int(str(segment_id)))
    path.write_bytes(b"\0" * HEADER_SIZE + b"orphan" * 1000)
    report = store.gc(abandoned_after=0)
    assert report.segments_removed >= 1
    assert not path.exists()
    assert_all_exact(store, range(3))


def test_a_live_writers_segment_is_left_alone(root: Path) -> None:
    with (
        Store.open(root, hot_bytes=0, durable=False) as writer,
        Store.open(root, hot_bytes=0, durable=False) as collector,
    ):
        fill(writer, 5)
        for i in range(4):
            writer.delete(key(i))
        before = segment_files(root)
        collector.gc(min_dead_ratio=0.0, abandoned_after=0)
        assert segment_files(root) == before  # still locked by the writer
        assert_all_exact(collector, [4])


def test_move_refuses_a_row_that_changed(store: Store, root: Path) -> None:
    fill(store, 2)
    index = store._index
    row = index.lookup(key(0))
    assert row is not None
    store.delete(key(0))
    assert not index.move(row, row.segment, row.offset + 4096)
    row1 = index.lookup(key(1))
    assert row1 is not None
    assert index.move(row1, row1.segment, row1.offset)  # unchanged: the swap goes through
