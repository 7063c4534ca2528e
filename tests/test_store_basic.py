"""Storage basics: put/get/delete, zero-copy reads, file references, names,
listing, stats, schema, persistence, the CLI."""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlite_utils import Database

from proxy.cli.main import main
from tests.support.store_helpers import NAMESPACE, key, meta_for, payload_for, sql
from vision_cache import Namespace, Store
from vision_cache.errors import (
    InvalidEntryError,
    InvalidNameError,
    SchemaVersionError,
    StoreNotFoundError,
)
from vision_cache.store.hot_tier import LruHotTier, NullHotTier
from vision_cache.store.schema import KNOWN_MIGRATIONS, migrations
from vision_cache.store.segments import ALIGNMENT, HEADER_SIZE


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> Iterator[Store]:
    with Store.open(root, hot_bytes=1 << 20, disk_bytes=1 << 30) as opened:
        yield opened


def put(store: Store, i: int, **kwargs: object) -> None:
    k = key(i)
    assert store.put(k, meta_for(k), payload_for(k), **kwargs) is not None  # type: ignore[arg-type]


def test_get_returns_exactly_what_was_put(store: Store) -> None:
    k = key(1)
    assert store.get(k) is None
    stored = store.put(k, meta_for(k), payload_for(k))
    assert stored is not None
    entry = store.get(k)
    assert entry is not None
    assert entry.key == k
    assert entry.meta == meta_for(k)
    assert bytes(entry.payload) == payload_for(k)
    assert not entry.pinned


def test_payload_is_a_read_only_view_over_a_mapping(store: Store) -> None:
    k = key(2)
    put(store, 2)
    entry = store.get(k)
    assert entry is not None
    assert entry.payload.readonly
    assert isinstance(entry.payload.obj, mmap.mmap)
    array = entry.array(np.uint8)
    assert not array.flags.writeable
    assert not array.flags.owndata  # a view, not a copy
    assert array.tobytes() == payload_for(k)


def test_file_reference_points_at_the_payload_bytes(store: Store, root: Path) -> None:
    k = key(3)
    put(store, 3)
    put(store, 4)
    for i in (3, 4):
        entry = store.get(key(i))
        assert entry is not None
        ref = entry.ref
        assert ref.offset % ALIGNMENT == 0 and ref.offset >= HEADER_SIZE
        assert ref.checksum == xxhash.xxh3_64_hexdigest(payload_for(key(i)))
        assert len(ref.checksum) == 16
        with (root / "segments" / ref.segment).open("rb") as file:
            file.seek(ref.offset)
            assert file.read(ref.length) == payload_for(key(i))
    assert k.text not in json.dumps([store.get(k).ref.segment])  # type: ignore[union-attr]


def test_f32_payload_round_trips_as_numpy(store: Store) -> None:
    k = key(5)
    embeddings = np.arange(64 * 128, dtype=np.float32).reshape(64, 128)
    assert store.put(k, b"{}", embeddings.tobytes()) is not None
    entry = store.get(k)
    assert entry is not None
    assert np.array_equal(entry.array().reshape(64, 128), embeddings)


def test_duplicate_put_keeps_the_first_package(store: Store) -> None:
    k = key(6)
    first = store.put(k, b"first", b"1" * 100)
    second = store.put(k, b"second", b"2" * 200)
    assert first is not None and second is not None
    assert second.meta == b"first" and bytes(second.payload) == b"1" * 100
    assert store.stats().entries == 1


def test_duplicate_put_with_pin_pins_the_stored_entry(store: Store) -> None:
    put(store, 7)
    entry = store.put(key(7), b"x", b"y", pin=True)
    assert entry is not None and entry.pinned


def test_delete(store: Store) -> None:
    put(store, 8)
    assert store.delete(key(8))
    assert store.get(key(8)) is None
    assert not store.delete(key(8))


def test_entries_survive_reopen(root: Path) -> None:
    with Store.open(root, durable=True) as store:
        for i in range(10):
            put(store, i)
    with Store.open(root) as store:
        for i in range(10):
            entry = store.get(key(i))
            assert entry is not None and bytes(entry.payload) == payload_for(key(i))


def test_an_entry_outlives_the_store_that_returned_it(root: Path) -> None:
    with Store.open(root) as store:
        put(store, 9)
        entry = store.get(key(9))
    assert entry is not None
    assert bytes(entry.payload) == payload_for(key(9))


@pytest.mark.parametrize("payload", [b"", 123, "text"])
def test_unusable_payloads_raise(store: Store, payload: object) -> None:
    with pytest.raises(InvalidEntryError):
        store.put(key(1), b"{}", payload)  # type: ignore[arg-type]


def test_oversized_meta_and_bad_ttl_raise(store: Store) -> None:
    with pytest.raises(InvalidEntryError):
        store.put(key(1), b"x" * (1024 * 1024 + 1), b"payload")
    with pytest.raises(InvalidEntryError):
        store.put(key(1), b"{}", b"payload", ttl=0)


def test_non_contiguous_buffers_are_refused(store: Store) -> None:
    strided = np.arange(100, dtype=np.float32)[::2]
    with pytest.raises(InvalidEntryError):
        store.put(key(1), b"{}", strided.data)


def test_open_without_create_needs_an_existing_store(root: Path) -> None:
    with pytest.raises(StoreNotFoundError):
        Store.open(root, create=False)
    assert not root.exists()


def test_hot_bytes_zero_uses_the_null_tier(root: Path) -> None:
    with Store.open(root, hot_bytes=0) as store:
        assert isinstance(store._hot, NullHotTier)
        put(store, 1)
        assert store.get(key(1)) is not None
        assert store.stats().hot_entries == 0
    with Store.open(root, hot_bytes=1 << 20) as store:
        assert isinstance(store._hot, LruHotTier)


def test_hot_hits_and_disk_hits_are_counted(store: Store) -> None:
    put(store, 1)
    store.get(key(1))
    store.get(key(2))
    counts = store.stats().process
    assert counts["hits_hot"] == 1 and counts["misses"] == 1 and counts["puts"] == 1
    assert store.stats().all_processes["hits_hot"] == 1


def test_names_resolve_and_dangle_after_delete(store: Store) -> None:
    put(store, 1)
    store.set_name(key(1), "logo")
    assert store.resolve_name(NAMESPACE, "logo") == key(1)
    assert store.resolve_name(NAMESPACE.id, "logo") == key(1)
    assert store.names(NAMESPACE) == {"logo": key(1)}
    assert store.resolve_name(NAMESPACE, "other") is None
    store.delete(key(1))
    assert store.resolve_name(NAMESPACE, "logo") == key(1)  # dangling, detectable:
    assert store.get(key(1)) is None
    assert store.check().dangling_names == 1
    store.set_name(key(2), "logo")  # re-pointing is an upsert
    assert store.resolve_name(NAMESPACE, "logo") == key(2)
    assert store.delete_name(NAMESPACE, "logo")
    assert store.names(NAMESPACE) == {}


def test_names_are_per_namespace_and_validated(store: Store) -> None:
    other = Namespace.from_components({"model": "other"})
    store.set_name(key(1), "x")
    assert store.resolve_name(other, "x") is None
    with pytest.raises(InvalidNameError):
        store.set_name(key(1), "../x")


def test_iter_entries_by_namespace(store: Store) -> None:
    other = Namespace.from_components({"model": "other"})
    for i in range(5):
        put(store, i)
    assert store.put(key(1, other), b"{}", b"payload") is not None
    assert {info.key for info in store.iter_entries()} == {key(i) for i in range(5)} | {
        key(1, other)
    }
    assert [info.key for info in store.iter_entries(other)] == [key(1, other)]
    info = next(iter(store.iter_entries(NAMESPACE)))
    assert info.meta_bytes == len(meta_for(info.key))


def test_registered_namespaces_are_listed_with_components(store: Store) -> None:
    store.register_namespace(NAMESPACE)
    put(store, 1)
    [info] = store.namespaces()
    assert info.namespace == NAMESPACE and info.id == NAMESPACE.id
    assert info.namespace.components["model"] == "test-vlm"


def test_stats_report_entries_and_bytes(store: Store) -> None:
    for i in range(3):
        put(store, i)
    put(store, 3, pin=True)
    stats = store.stats()
    assert stats.entries == 4
    assert stats.live_bytes == sum(len(payload_for(key(i))) for i in range(4))
    assert stats.pinned_entries == 1 and stats.pinned_bytes == len(payload_for(key(3)))
    assert stats.segment_files == 1 and stats.namespaces == 1
    assert stats.oldest is not None and stats.newest is not None
    assert stats.disk_budget == 1 << 30


def test_disk_budget_is_shared_through_the_index(root: Path) -> None:
    with Store.open(root, disk_bytes=12345678):
        pass
    with Store.open(root) as store:
        assert store.disk_budget() == 12345678


def test_migrations_list_is_complete_and_applied(root: Path) -> None:
    assert tuple(m.name for m in migrations.pending(Database(memory=True))) == KNOWN_MIGRATIONS
    with Store.open(root):
        pass
    applied = sql(root, "SELECT name FROM _sqlite_migrations ORDER BY id")
    assert tuple(row[0] for row in applied) == KNOWN_MIGRATIONS


def test_an_index_from_a_newer_version_is_refused(root: Path) -> None:
    with Store.open(root):
        pass
    sql(
        root,
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at)"
        " VALUES ('vision_cache', '9999_future', 'now')",
    )
    with pytest.raises(SchemaVersionError):
        Store.open(root)


def test_check_is_clean_on_a_healthy_store(store: Store) -> None:
    for i in range(20):
        put(store, i)
    store.delete(key(3))
    report = store.check()
    assert report.ok and report.entries_checked == 19
    assert report.bytes_verified == sum(len(payload_for(key(i))) for i in range(20) if i != 3)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payloads=st.lists(st.binary(min_size=1, max_size=9000), min_size=1, max_size=8))
def test_any_payloads_round_trip(tmp_path: Path, payloads: list[bytes]) -> None:
    with Store.open(tmp_path / "prop", hot_bytes=0, durable=False) as store:
        keys = [NAMESPACE.key_for_image(os.urandom(8)) for _ in payloads]
        for k, payload in zip(keys, payloads, strict=True):
            assert store.put(k, b"m", payload) is not None
        for k, payload in zip(keys, payloads, strict=True):
            entry = store.get(k)
            assert entry is not None and bytes(entry.payload) == payload


# -- CLI --------------------------------------------------------------------


def test_cli_ls_stats_rm_gc_verify(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Store.open(root) as store:
        for i in range(3):
            put(store, i)
    assert main(["ls", "--store", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {row["key"] for row in listed} == {key(i).text for i in range(3)}
    assert main(["stats", "--store", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 3
    assert main(["rm", "--store", str(root), key(0).text]) == 0
    assert "deleted" in capsys.readouterr().out
    assert main(["rm", "--store", str(root), key(0).text, "--json"]) == 1
    gone = capsys.readouterr()
    assert gone.out == "" and f"no entry matches '{key(0).text}'" in gone.err
    assert main(["gc", "--store", str(root), "--json"]) == 0
    assert "segments_removed" in json.loads(capsys.readouterr().out)
    assert main(["verify", "--store", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_cli_tables_and_env_default(
    root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(root) as store:
        put(store, 1)
    monkeypatch.setenv("VCACHE_STORE", str(root))
    for command in ("ls", "stats", "verify", "gc"):
        assert main([command]) == 0
        out = capsys.readouterr().out
        assert out.strip() and not out.lstrip().startswith(("{", "["))  # a table, not JSON


def test_cli_reports_a_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--store", str(tmp_path / "none")]) == 2
    assert "no store" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_cli_verify_fails_on_problems(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Store.open(root) as store:
        put(store, 1)
        ref = store.get(key(1)).ref  # type: ignore[union-attr]
    with (root / "segments" / ref.segment).open("r+b") as file:
        file.seek(ref.offset)
        file.write(b"\xff\xfe")
    assert main(["verify", "--store", str(root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [p["kind"] for p in report["problems"]] == ["checksum"]
    assert main(["verify", "--fix", "--store", str(root)]) == 0
    capsys.readouterr()
    assert main(["verify", "--store", str(root)]) == 0
