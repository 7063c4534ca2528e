"""Damage and faults: a bad payload or index row is a miss plus quarantine,
never an exception and never wrong bytes; a failing disk makes puts fail
softly while gets keep working."""

from __future__ import annotations

import errno
import os
import random
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.store_helpers import integrity, key, meta_for, payload_for, sql
from vision_cache import Store
from vision_cache.store import index as index_module
from vision_cache.store.entry import SegmentRef

COUNT = 30


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    with Store.open(path, hot_bytes=0, segment_bytes=128 * 1024) as store:
        for i in range(COUNT):
            assert store.put(key(i), meta_for(key(i)), payload_for(key(i))) is not None
    return path


@pytest.fixture
def store(root: Path) -> Iterator[Store]:
    with Store.open(root, hot_bytes=1 << 20) as opened:
        yield opened


def ref_of(root: Path, i: int) -> SegmentRef:
    with Store.open(root, hot_bytes=0) as store:
        entry = store.get(key(i))
        assert entry is not None
        return entry.ref


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


def quarantined(root: Path, suffix: str) -> list[Path]:
    return sorted((root / "quarantine").glob(f"*{suffix}"))


def assert_exact_or_missing(store: Store, indices: range | list[int]) -> int:
    """Every get is either a miss or exactly the bytes put; returns hits."""
    hits = 0
    for i in indices:
        entry = store.get(key(i))
        if entry is not None:
            assert bytes(entry.payload) == payload_for(key(i))
            assert entry.meta == meta_for(key(i))
            hits += 1
    return hits


# -- damaged payloads ---------------------------------------------------------


def test_a_flipped_payload_byte_is_a_miss_and_quarantined(root: Path) -> None:
    ref = ref_of(root, 3)
    flip(root / "segments" / ref.segment, ref.offset + ref.length // 2)
    with Store.open(root) as store:
        assert store.get(key(3)) is None
        assert store.stats().process["quarantined"] == 1
        [copy] = quarantined(root, ".bin")
        assert len(copy.read_bytes()) == ref.length
        assert quarantined(root, ".json")
        assert store.check().ok  # the bad row is gone
        assert assert_exact_or_missing(store, range(COUNT)) == COUNT - 1
        assert store.put(key(3), meta_for(key(3)), payload_for(key(3))) is not None
        assert store.get(key(3)) is not None


def test_verified_locations_are_bounded_and_forgetting_means_checking_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-lived process does not remember every location it verified; one it forgot is
    checked again on its next read, so a payload damaged since is still caught."""
    from vision_cache.store import store as store_module

    monkeypatch.setattr(store_module, "MAX_VERIFIED", 8)
    with Store.open(root, hot_bytes=0) as store:
        assert assert_exact_or_missing(store, range(COUNT)) == COUNT  # each read verified
        assert len(store._verified) <= 8
        ref = ref_of(root, 0)  # read (and forgotten) long ago by now
        flip(root / "segments" / ref.segment, ref.offset + ref.length // 2)
        assert store.get(key(0)) is None
        assert store.stats().process["quarantined"] == 1


def test_a_missing_segment_file_is_a_miss(root: Path) -> None:
    ref = ref_of(root, 0)
    (root / "segments" / ref.segment).unlink()
    with Store.open(root) as store:
        assert store.get(key(0)) is None
        assert quarantined(root, ".json")
        report = store.check(fix=True)
        assert all(p.kind == "missing" for p in report.problems)
        assert store.check().ok
        assert_exact_or_missing(store, range(COUNT))


def test_a_truncated_segment_is_a_miss_not_a_crash(root: Path) -> None:
    """Truncating a file nobody maps yet: the row now points past its end."""
    ref = ref_of(root, 0)
    os.truncate(root / "segments" / ref.segment, ref.offset + 10)
    with Store.open(root) as store:
        assert store.get(key(0)) is None
        assert_exact_or_missing(store, range(COUNT))
        store.check(fix=True)
        assert store.check().ok


def test_check_finds_a_flipped_byte_before_anyone_reads_it(root: Path) -> None:
    ref = ref_of(root, 5)
    flip(root / "segments" / ref.segment, ref.offset)
    with Store.open(root) as store:
        report = store.check()
        assert [(p.kind, p.key) for p in report.problems] == [("checksum", key(5).text)]
        assert not store.check(deep=False).problems  # bounds are fine, bytes are not
        store.check(fix=True)
        assert store.check().ok and store.get(key(5)) is None


# -- damaged index ---------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE entries SET meta = X'00' || meta",
        "UPDATE entries SET byte_offset = byte_offset + 4096",
        "UPDATE entries SET byte_length = byte_length - 1",
        "UPDATE entries SET checksum = '0000000000000000'",
        "UPDATE entries SET segment = segment + 1",
    ],
)
def test_a_damaged_index_row_is_a_miss_and_quarantined(root: Path, statement: str) -> None:
    """Row contents are not checksummed by SQLite; our row check is."""
    ref = ref_of(root, 7)
    sql(
        root,
        statement + " WHERE byte_offset = ? AND segment = ?",
        (ref.offset, int(ref.segment[4:12])),
    )
    with Store.open(root) as store:
        assert store.get(key(7)) is None
        assert quarantined(root, ".json")
        assert store.check().ok
        assert assert_exact_or_missing(store, range(COUNT)) == COUNT - 1


def test_an_undecodable_row_is_a_miss(root: Path) -> None:
    sql(root, "UPDATE entries SET byte_offset = 'garbage' WHERE digest = ?", (key(2).digest,))
    with Store.open(root) as store:
        assert store.get(key(2)) is None
        assert quarantined(root, ".json")
        assert store.check().ok


def test_a_destroyed_index_header_is_replaced_on_open(root: Path) -> None:
    with (root / "index.sqlite").open("r+b") as file:
        file.write(b"this is not a database file....")
    with Store.open(root) as store:
        assert store.get(key(0)) is None
        assert list((root / "quarantine").glob("index-*/index.sqlite"))
        assert store.put(key(0), b"{}", b"fresh") is not None  # new ids skip old files
        assert store.check().ok
        report = store.gc(abandoned_after=0)
        assert report.orphan_files_removed >= 1  # the old index's segments
        assert store.check().ok and store.get(key(0)) is not None


@pytest.mark.parametrize("seed", range(12))
def test_random_index_corruption_never_raises_or_serves_wrong_bytes(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    index = root / "index.sqlite"
    size = index.stat().st_size
    for _ in range(rng.randint(1, 8)):
        flip(index, rng.randrange(100, size))
    with Store.open(root) as store:
        assert_exact_or_missing(store, range(COUNT))
        store.put(key(COUNT), meta_for(key(COUNT)), payload_for(key(COUNT)))  # may fail softly
        store.check(fix=True)
    with Store.open(root) as store:
        assert store.check().ok, store.check().problems
        assert integrity(root) == "ok"
        assert_exact_or_missing(store, range(COUNT + 1))


# -- write faults ------------------------------------------------------------------


def enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def eio(*args: object, **kwargs: object) -> None:
    raise OSError(errno.EIO, "Input/output error")


def short_write_then(fault: Callable[..., None]) -> Callable[..., int]:
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 1 and len(data) > 1:
            return real(fd, data[: len(data) // 2], offset)
        fault()
        return 0

    return pwrite


def create_fails(fault: Callable[..., None]) -> Callable[..., int]:
    real = os.open

    def open_(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_CREAT and str(path).endswith(".vseg"):
            fault()
        return real(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    return open_


def index_full(*args: object, **kwargs: object) -> None:
    raise sqlite3.OperationalError("database or disk is full")


FAULTS: dict[str, tuple[object, str, Callable[..., object]]] = {
    "write-enospc": (os, "pwrite", enospc),
    "write-eio": (os, "pwrite", eio),
    "short-write-then-enospc": (os, "pwrite", short_write_then(enospc)),
    "fsync-eio": (os, "fdatasync", eio),
    "create-enospc": (os, "open", create_fails(enospc)),
    "index-commit-full": (index_module, "_insert", index_full),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_write_faults_fail_puts_softly(root: Path, fault: str) -> None:
    target, name, replacement = FAULTS[fault]
    with Store.open(root, hot_bytes=0, segment_bytes=64 * 1024) as store:
        store._appender.retire()  # the next put creates a segment (for create-enospc)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(target, name, replacement)
            for i in range(100, 105):
                assert store.put(key(i), meta_for(key(i)), payload_for(key(i))) is None
            assert assert_exact_or_missing(store, range(COUNT)) == COUNT  # gets still work
        assert store.stats().process["put_failures"] == 5
        assert store.check().ok  # no row points at a partial payload
        assert all(store.get(key(i)) is None for i in range(100, 105))
        assert store.put(key(100), meta_for(key(100)), payload_for(key(100))) is not None
        assert assert_exact_or_missing(store, [100]) == 1


@pytest.mark.parametrize("failing", ["replace", "open"])
def test_a_failing_quarantine_still_gives_a_miss(
    root: Path, failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = ref_of(root, 1)
    flip(root / "segments" / ref.segment, ref.offset)
    with Store.open(root) as store:
        if failing == "replace":
            monkeypatch.setattr(os, "replace", enospc)
        else:
            monkeypatch.setattr(Path, "open", enospc)
        assert store.get(key(1)) is None
        monkeypatch.undo()
        assert store.check().ok
