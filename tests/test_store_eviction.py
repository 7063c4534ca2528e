"""Tiers and policies: hot-tier LRU, disk budget with LRU eviction, pinning,
TTL per entry / namespace / store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.store_helpers import NAMESPACE, FakeClock, key
from vision_cache import Namespace, Store
from vision_cache.store.entry import Entry, SegmentRef
from vision_cache.store.hot_tier import LruHotTier, NullHotTier, hot_tier

SIZE = 10_000  # bytes per test payload


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    # Room for 10 payloads on disk, 3 in the hot tier.
    with Store.open(
        tmp_path / "store", hot_bytes=3 * SIZE, disk_bytes=10 * SIZE, clock=clock, durable=False
    ) as opened:
        yield opened


def try_put(store: Store, i: int, *, pin: bool = False, ttl: float | None = None) -> Entry | None:
    """A put that may be refused (None): only where a test expects the refusal."""
    return store.put(key(i), b"{}", bytes([i % 256]) * SIZE, pin=pin, ttl=ttl)


def put(store: Store, i: int, *, pin: bool = False, ttl: float | None = None) -> Entry:
    """A put that must succeed: a refused one would make an eviction test pass for nothing."""
    entry = try_put(store, i, pin=pin, ttl=ttl)
    assert entry is not None, f"put of entry {i} was refused"
    return entry


def present(store: Store, count: int) -> set[int]:
    return {i for i in range(count) if store.get(key(i)) is not None}


# -- hot tier -----------------------------------------------------------------


def fake_entry(i: int, size: int) -> Entry:
    return Entry(
        key(i),
        b"",
        memoryview(bytes(size)),
        SegmentRef("seg-00000001.vseg", 4096, size, "0" * 16),
        False,
        0.0,
        None,
        i,
    )


def test_hot_tier_evicts_least_recently_used_by_bytes() -> None:
    tier = LruHotTier(budget=300)
    for i in range(3):
        tier.put(fake_entry(i, 100))
    assert tier.get(key(0)) is not None  # 0 is now the most recent
    tier.put(fake_entry(3, 100))
    assert tier.get(key(1)) is None
    assert {i for i in range(4) if tier.get(key(i))} == {0, 2, 3}
    assert tier.nbytes == 300 and tier.count == 3


def test_hot_tier_caps_entry_count_and_skips_oversized_entries() -> None:
    tier = LruHotTier(budget=10_000, max_entries=2)
    for i in range(3):
        tier.put(fake_entry(i, 1))
    assert tier.count == 2
    tier.put(fake_entry(9, 20_000))
    assert tier.get(key(9)) is None


def test_zero_budget_gives_the_null_tier() -> None:
    tier = hot_tier(0)
    assert isinstance(tier, NullHotTier)
    tier.put(fake_entry(1, 10))
    assert tier.get(key(1)) is None and tier.nbytes == 0
    with pytest.raises(ValueError):
        hot_tier(-1)


# -- disk budget and pinning -------------------------------------------------------


def test_budget_evicts_least_recently_used(store: Store, clock: FakeClock) -> None:
    for i in range(10):
        clock.advance(1)
        put(store, i)
    clock.advance(1)
    assert store.get(key(0)) is not None  # 0 becomes the most recent
    store.flush()
    clock.advance(1)
    put(store, 10)
    assert present(store, 11) == set(range(11)) - {1}
    assert store.stats().live_bytes <= 10 * SIZE
    assert store.stats().process["evictions"] == 1


def test_a_flood_of_one_off_images_never_evicts_pinned_entries(
    store: Store, clock: FakeClock
) -> None:
    for i in range(3):
        put(store, i, pin=True)
    for i in range(100, 400):  # 30x the budget of one-off images
        clock.advance(1)
        put(store, i)
    assert present(store, 3) == {0, 1, 2}
    assert store.stats().live_bytes <= 10 * SIZE
    assert store.check().ok


def test_put_fails_softly_when_pinned_entries_fill_the_budget(store: Store) -> None:
    for i in range(10):
        put(store, i, pin=True)
    assert try_put(store, 10) is None
    assert store.stats().process["put_failures"] == 1
    assert store.get(key(0)) is not None
    store.unpin(key(0))
    put(store, 10)
    assert store.get(key(0)) is None  # the only unpinned entry made room


def test_a_payload_larger_than_the_budget_is_refused(store: Store) -> None:
    assert store.put(key(1), b"{}", b"x" * (11 * SIZE)) is None
    assert store.check().ok and store.stats().entries == 0


def test_pin_and_unpin_report_missing_keys(store: Store) -> None:
    assert not store.pin(key(1))
    put(store, 1)
    assert store.pin(key(1))
    entry = store.get(key(1))
    assert entry is not None and entry.pinned
    assert store.unpin(key(1))
    entry = store.get(key(1))
    assert entry is not None and not entry.pinned


def test_hot_tier_is_bounded_while_disk_keeps_everything(store: Store) -> None:
    for i in range(8):
        put(store, i)
    for i in range(8):
        assert store.get(key(i)) is not None
    stats = store.stats()
    assert stats.hot_bytes <= 3 * SIZE and stats.hot_entries == 3
    assert stats.entries == 8


def test_evicted_entries_leave_the_hot_tier_too(store: Store, clock: FakeClock) -> None:
    put(store, 0)
    assert store.get(key(0)) is not None
    for i in range(1, 11):
        clock.advance(1)
        put(store, i)
    assert store.get(key(0)) is None


# -- TTL --------------------------------------------------------------------------


def test_entry_ttl_expires(store: Store, clock: FakeClock) -> None:
    entry = put(store, 1, ttl=60)
    assert entry is not None and entry.expires_at == clock.now + 60
    put(store, 2)
    clock.advance(59)
    assert store.get(key(1)) is not None
    clock.advance(2)
    assert store.get(key(1)) is None
    assert store.get(key(2)) is not None
    assert store.stats().process["expirations"] == 1


def test_namespace_ttl_applies_to_new_and_existing_entries(store: Store, clock: FakeClock) -> None:
    trending = Namespace.from_components({"model": "m", "profile": "trending"})
    old = trending.key_for_image(b"old")
    assert store.put(old, b"{}", b"x" * 100) is not None
    assert store.put(trending.key_for_image(b"own"), b"{}", b"x" * 100, ttl=3600) is not None
    store.set_namespace_ttl(trending, 300)
    new = trending.key_for_image(b"new")
    assert store.put(new, b"{}", b"x" * 100) is not None
    put(store, 1)  # another namespace: no TTL
    clock.advance(301)
    assert store.get(old) is None and store.get(new) is None
    assert store.get(trending.key_for_image(b"own")) is not None  # its own TTL wins
    assert store.get(key(1)) is not None
    assert [ns.ttl for ns in store.namespaces() if ns.id == trending.id] == [300]


def test_clearing_the_namespace_ttl(store: Store, clock: FakeClock) -> None:
    store.set_namespace_ttl(NAMESPACE, 10)
    put(store, 1)
    store.set_namespace_ttl(NAMESPACE, None)
    clock.advance(100)
    assert store.get(key(1)) is not None


def test_default_ttl_applies_without_other_ttl(tmp_path: Path, clock: FakeClock) -> None:
    with Store.open(tmp_path / "s", default_ttl=5, clock=clock) as store:
        put(store, 1)
        clock.advance(6)
        assert store.get(key(1)) is None


@pytest.mark.parametrize("hot_bytes", [0, 3 * SIZE])
def test_pinned_entries_do_not_expire(tmp_path: Path, clock: FakeClock, hot_bytes: int) -> None:
    with Store.open(tmp_path / "s", hot_bytes=hot_bytes, clock=clock) as store:
        put(store, 1, ttl=1, pin=True)
        clock.advance(10)
        assert store.get(key(1)) is not None
        assert store.gc().expired == 0
        store.unpin(key(1))
        assert store.get(key(1)) is None


def test_gc_removes_expired_entries_first(store: Store, clock: FakeClock) -> None:
    for i in range(5):
        put(store, i, ttl=10)
    put(store, 5)
    clock.advance(11)
    report = store.gc()
    assert report.expired == 5
    assert store.stats().entries == 1


def test_expired_entries_are_evicted_before_live_ones(store: Store, clock: FakeClock) -> None:
    for i in range(5):
        put(store, i)
    for i in range(5, 10):
        put(store, i, ttl=10)
    clock.advance(11)
    put(store, 10)
    assert present(store, 5) == set(range(5))
