"""The store: visual packages by key, zero-copy, shared by processes.

    >>> with Store.open(path, hot_bytes=256 << 20, disk_bytes=20 << 30) as store:
    ...     entry = store.get(key)
    ...     if entry is None:
    ...         entry = store.put(key, meta, embeddings)   # None: serve uncached
    ...     embeddings = entry.array()                      # numpy view over mmap

`get` never raises on a damaged, missing or locked store: it misses (and
quarantines what is bad). `put` returns None when the disk is full, an I/O
error occurs or the budget is all pinned. Both are blocking calls (SQLite,
fsync); an asyncio caller runs them in a thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import xxhash

from vision_cache.errors import (
    BudgetExceededError,
    IndexBusyError,
    IndexCorruptError,
    IndexUnavailableError,
    InvalidDigestError,
    InvalidEntryError,
    PayloadCorruptError,
    PayloadError,
    StoreError,
    StoreNotFoundError,
)
from vision_cache.keys import BytesLike, CacheKey, Namespace, validate_digest, validate_name
from vision_cache.store.check import Checker, CheckReport, ProblemKind, Progress
from vision_cache.store.compaction import Compactor, GcReport
from vision_cache.store.entry import Entry, EntryInfo, SegmentRef
from vision_cache.store.hot_tier import HotTier, hot_tier
from vision_cache.store.index import Clock, DamagedRowError, Index, IndexRow, NewEntry
from vision_cache.store.layout import StoreLayout, parse_segment_name, segment_name
from vision_cache.store.quarantine import Quarantine, Reason
from vision_cache.store.segments import Appender, map_payload
from vision_cache.store.stats import Counters, StoreStats

log = logging.getLogger(__name__)

DEFAULT_HOT_BYTES = 256 * 1024 * 1024
DEFAULT_DISK_BYTES = 16 * 1024 * 1024 * 1024
DEFAULT_SEGMENT_BYTES = 256 * 1024 * 1024
MAX_META_BYTES = 1024 * 1024
ABANDONED_AFTER_S = 60.0
# locations whose payload this process has verified, remembered up to this many
MAX_VERIFIED = 65_536


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    id: str
    namespace: Namespace | None
    ttl: float | None


class Store:
    """A store directory opened by this process. Thread-safe."""

    def __init__(
        self,
        layout: StoreLayout,
        index: Index,
        hot: HotTier,
        *,
        default_ttl: float | None,
        segment_bytes: int,
        durable: bool,
        clock: Clock,
    ) -> None:
        self._layout = layout
        self._hot = hot
        self._default_ttl = default_ttl
        self._segment_bytes = segment_bytes
        self._durable = durable
        self._clock = clock
        self._counters = Counters()
        # Payload locations this process has checksummed; a location's bytes
        # never change (segments are append-only, ids never reused).
        self._verified: set[tuple[int, int]] = set()
        self._quarantine = Quarantine(layout)
        self._closed = False
        self._attach(index)

    def _attach(self, index: Index) -> None:
        """Wire up everything that talks to `index`."""
        self._index = index
        self._appender = Appender(
            self._layout,
            index.new_segment,
            index.seal_segment,
            segment_bytes=self._segment_bytes,
            durable=self._durable,
        )
        self._compactor = Compactor(
            index, self._appender, self._layout, self._quarantine, self._hot.discard
        )

    # -- lifecycle --------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        hot_bytes: int = DEFAULT_HOT_BYTES,
        disk_bytes: int | None = None,
        default_ttl: float | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        durable: bool = True,
        create: bool = True,
        clock: Clock = time.time,
    ) -> Store:
        """Open (or create) the store at `path`.

        `disk_bytes` is stored in the index and shared by every process; None
        keeps the stored value. `durable=False` skips fsync (bulk loads and
        benchmarks: a power loss may then lose entries, never corrupt them).
        """
        _check_ttl(default_ttl)
        layout = StoreLayout(Path(path).expanduser())
        if not create and not layout.exists():
            raise StoreNotFoundError(f"no store at {layout.root}")
        layout.create_dirs()
        with _open_lock(layout):
            index = _open_index(layout, clock)
        try:
            if disk_bytes is not None:
                index.set_setting("disk_bytes", _check_budget(disk_bytes))
        except BaseException:
            index.close()
            raise
        return cls(
            layout,
            index,
            hot_tier(hot_bytes),
            default_ttl=default_ttl,
            segment_bytes=segment_bytes,
            durable=durable,
            clock=clock,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._appender.retire()
        self._hot.clear()
        self._index.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._layout.root

    @property
    def id(self) -> str:
        """This store's identity, made when first asked for and kept in its index: two stores
        at the same path on two machines (or one replaced by another) tell themselves apart."""
        return str(self._index.setting_or_default("store_id", uuid.uuid4().hex))

    @property
    def segments_dir(self) -> Path:
        """Where the payloads lie: the directory file references are relative to (a patched
        llama-server's ``--image-embedding-dir``)."""
        return self._layout.segments_dir

    # -- reads ------------------------------------------------------------

    def get(self, key: CacheKey) -> Entry | None:
        """The entry for `key`, or None (absent, expired, damaged, or the
        index unavailable). Never raises for store trouble."""
        try:
            entry = self._hot_get(key) or self._disk_get(key, record=True)
        except StoreError as exc:
            self._index_trouble(exc)
            entry = None
        if entry is None:
            self._count("misses")
            return None
        with contextlib.suppress(StoreError):
            self._index.touch(entry.entry_id, self._clock())
        return entry

    def _hot_get(self, key: CacheKey) -> Entry | None:
        entry = self._hot.get(key)
        if entry is None:
            return None
        # A hot entry stays readable (its own mapping), but its file
        # reference is only worth handing out while the file still exists.
        if entry.expired(self._clock()) or not self._ref_exists(entry.ref):
            self._hot.discard(key)
            return None
        self._count("hits_hot")
        return entry

    def _disk_get(self, key: CacheKey, *, record: bool) -> Entry | None:
        for _ in range(2):  # a second look if compaction moved the payload
            row = self._lookup(key)
            if row is None:
                return None
            if row.expired(self._clock()):
                self._expire(row)
                return None
            try:
                entry = self._materialize(row)
            except PayloadError as exc:
                if self._moved(row):
                    continue
                self._reject(row, _reason(exc), None, str(exc))
                return None
            if entry is not None:
                self._hot.put(entry)
                if record:
                    self._count("hits_disk")
            return entry
        return None

    def _lookup(self, key: CacheKey) -> IndexRow | None:
        try:
            return self._index.lookup(key)
        except DamagedRowError as exc:
            if exc.entry_id is not None:
                self._quarantine.record(Reason.ROW, exc.entry_id, None, None, str(exc))
                self._index.delete_id(exc.entry_id)
                self._count("quarantined")
            return None

    def _materialize(self, row: IndexRow) -> Entry | None:
        """Map and (once per location) verify a row's payload; None if bad."""
        if not row.intact():
            self._reject(row, Reason.ROW, None, "row check mismatch")
            return None
        mapping = map_payload(self._layout.segment_path(row.segment), row.offset, row.length)
        view = memoryview(mapping)
        location = (row.segment, row.offset)
        if location not in self._verified:
            if xxhash.xxh3_64_hexdigest(view) != row.checksum:
                self._reject(row, Reason.CHECKSUM, view, "payload checksum mismatch")
                return None
            self._mark_verified(location)
        return _entry(row, view)

    def _mark_verified(self, location: tuple[int, int]) -> None:
        # Forgetting costs one more checksum pass later; remembering every location ever
        # read grows a long-lived process by about 185 bytes per entry (4 MB a 30-minute soak).
        if len(self._verified) >= MAX_VERIFIED:
            self._verified.clear()
        self._verified.add(location)

    def _moved(self, row: IndexRow) -> bool:
        current = self._index.lookup(row.key)
        return current is not None and (current.segment, current.offset) != (
            row.segment,
            row.offset,
        )

    def _reject(self, row: IndexRow, reason: Reason, view: memoryview | None, why: str) -> None:
        """Quarantine a bad entry and drop it from the index: a miss now, a
        fresh put later."""
        log.warning("quarantining %s: %s", row.key.text, why)
        self._quarantine.record(reason, row.id, row, view, why)
        self._index.delete_row(row)
        self._hot.discard(row.key)
        self._count("quarantined")

    def _expire(self, row: IndexRow) -> None:
        if self._index.delete_row(row):
            self._count("expirations")
        self._hot.discard(row.key)

    def _ref_exists(self, ref: SegmentRef) -> bool:
        return os.path.exists(self._layout.segments_dir / ref.segment)

    # -- writes -----------------------------------------------------------

    def put(
        self,
        key: CacheKey,
        meta: bytes,
        payload: BytesLike,
        *,
        pin: bool = False,
        ttl: float | None = None,
    ) -> Entry | None:
        """Store a package; returns its entry, or None if it could not be
        stored (disk full, I/O error, budget all pinned, index unavailable).

        The first put of a key wins: a later put (from any process) returns
        the stored entry, pinning it if asked.
        """
        view = _payload_view(payload)
        _check_meta(meta)
        _check_ttl(ttl)
        new = NewEntry(key, bytes(meta), 0, 0, view.nbytes, "", pin, ttl)
        try:
            existing = self._existing(new)
            if existing is not None:
                return existing
            checksum = xxhash.xxh3_64_hexdigest(view)
            return self._put(dataclasses.replace(new, checksum=checksum), view)
        except StoreError as exc:
            log.warning("put %s failed, serving uncached: %s", key.text, exc)
            self._index_trouble(exc)
            self._count("put_failures")
            return None

    def _existing(self, new: NewEntry) -> Entry | None:
        """The stored entry if `new.key` is already present (pinned if asked)."""
        row = self._lookup(new.key)
        if row is None or row.expired(self._clock()):
            return None
        if new.pinned and not row.pinned:
            self._set_pinned(new.key, True)
        return self._disk_get(new.key, record=False)

    def _put(self, new: NewEntry, view: memoryview) -> Entry | None:
        budget = self._precheck(new.length)
        with self._appender.lock:
            segment, offset = self._appender.append(view)
            located = dataclasses.replace(new, segment=segment, offset=offset)
            try:
                result = self._index.insert(located, budget, self._default_ttl)
            except (IndexBusyError, BudgetExceededError):
                raise
            except StoreError:
                self._appender.retire()  # e.g. our segment row was reaped: start afresh
                raise
        if result.inserted:
            # These bytes were just written from the buffer we hashed.
            self._mark_verified((segment, offset))
            self._count("puts")
        self._after_evictions(result.evicted)
        # Map the row we got rather than looking the key up again: another
        # thread or process may delete or evict it the moment we commit.
        try:
            entry = self._materialize(result.row)
        except PayloadError:
            return None  # evicted and its segment reclaimed in that moment
        if entry is not None:
            self._hot.put(entry)
        return entry

    def _precheck(self, length: int) -> int:
        """Fail before writing anything if the entry cannot fit at all."""
        budget = self.disk_budget()
        totals = self._index.totals()
        if totals.pinned_bytes + length > budget:
            raise BudgetExceededError(f"{length} bytes do not fit the disk budget {budget}")
        return budget

    def _after_evictions(self, keys: tuple[CacheKey, ...]) -> None:
        if not keys:
            return
        for key in keys:
            self._hot.discard(key)
        self._count("evictions", len(keys))
        self._reclaim_dead()

    def _reclaim_dead(self) -> None:
        # Best effort: a segment left behind now is reclaimed by a later call.
        with contextlib.suppress(StoreError):
            self._compactor.reclaim_dead()

    def pin(self, key: CacheKey) -> bool:
        """Exempt an entry from budget eviction and TTL; False if absent."""
        return self._set_pinned(key, True)

    def unpin(self, key: CacheKey) -> bool:
        return self._set_pinned(key, False)

    def _set_pinned(self, key: CacheKey, pinned: bool) -> bool:
        self._hot.discard(key)  # its Entry.pinned would be stale
        return self._index.set_pinned(key, pinned)

    def delete(self, key: CacheKey) -> bool:
        """Remove an entry; False if it was not there. Names pointing at it
        are kept (they dangle: resolve_name still answers, get misses)."""
        self._hot.discard(key)
        deleted = self._index.delete(key)
        if deleted:
            self._reclaim_dead()
        return deleted

    # -- namespaces and names ---------------------------------------------

    def register_namespace(self, namespace: Namespace) -> None:
        """Record a namespace's components so listings can show them."""
        self._index.register_namespace(namespace.id, namespace.text)

    def set_namespace_ttl(self, namespace: Namespace, ttl: float | None) -> None:
        """TTL for entries of `namespace` without their own TTL, existing
        ones included (they expire `ttl` after creation). None clears it."""
        _check_ttl(ttl)
        self.register_namespace(namespace)
        nsid = self._index.nsid(namespace.id, create=True)
        assert nsid is not None
        self._index.set_namespace_ttl(nsid, ttl)
        self._hot.clear()  # cached expiry times may have changed

    def namespaces(self) -> list[NamespaceInfo]:
        return [
            NamespaceInfo(row.id, _parse_namespace(row.text), row.ttl)
            for row in self._index.namespaces()
        ]

    def set_name(self, key: CacheKey, name: str) -> None:
        """Point `name` (in the key's namespace) at the key's digest."""
        self._index.set_name(key, validate_name(name))

    def resolve_name(self, namespace: Namespace | str, name: str) -> CacheKey | None:
        namespace_id = _namespace_id(namespace)
        digest = self._index.resolve_name(namespace_id, validate_name(name))
        return None if digest is None else CacheKey(namespace_id, digest)

    def names(self, namespace: Namespace | str) -> dict[str, CacheKey]:
        namespace_id = _namespace_id(namespace)
        return {
            name: CacheKey(namespace_id, digest)
            for name, digest in self._index.names(namespace_id).items()
        }

    def delete_name(self, namespace: Namespace | str, name: str) -> bool:
        return self._index.delete_name(_namespace_id(namespace), validate_name(name))

    def add_tag(self, key: CacheKey, tag: str) -> None:
        """Tag the key's digest (in its namespace) with `tag`, a name-like word."""
        self._index.add_tag(key, validate_name(tag))

    def remove_tag(self, key: CacheKey, tag: str) -> bool:
        return self._index.remove_tag(key, validate_name(tag))

    def tagged(self, namespace: Namespace | str, tag: str) -> list[CacheKey]:
        """The keys tagged `tag` in `namespace`, in digest order (entries may be gone)."""
        namespace_id = _namespace_id(namespace)
        return [
            CacheKey(namespace_id, digest)
            for digest in self._index.tagged(namespace_id, validate_name(tag))
        ]

    # -- listing, stats, maintenance --------------------------------------

    def iter_entries(self, namespace: Namespace | str | None = None) -> Iterator[EntryInfo]:
        namespace_id = None if namespace is None else _namespace_id(namespace)
        for row in self._index.iter_rows(namespace_id):
            yield EntryInfo(
                row.key,
                _ref(row),
                len(row.meta),
                row.pinned,
                row.created_at,
                row.last_access,
                row.expires_at,
            )

    def find_keys(
        self, namespace_prefix: str, digest_prefix: str, limit: int = 2
    ) -> list[CacheKey]:
        """The keys whose namespace id and digest start with these prefixes (like git's short
        hashes: a caller that gets exactly one has found its entry)."""
        for prefix in (namespace_prefix, digest_prefix):
            if not all(c in "0123456789abcdef" for c in prefix):
                raise InvalidDigestError(f"a key prefix is lowercase hex, got {prefix!r:.80}")
        return self._index.find_keys(namespace_prefix, digest_prefix, limit)

    def disk_budget(self) -> int:
        stored = self._index.setting("disk_bytes")
        return int(stored) if isinstance(stored, int) else DEFAULT_DISK_BYTES

    def stats(self) -> StoreStats:
        self.flush()
        totals = self._index.totals()
        files = _segment_sizes(self._layout)
        oldest, newest = self._index.age_range()
        usage = self._quarantine.usage()
        return StoreStats(
            totals.entries,
            totals.bytes,
            totals.pinned_entries,
            totals.pinned_bytes,
            self.disk_budget(),
            len(files),
            sum(files),
            self._hot.count,
            self._hot.nbytes,
            self._hot.budget,
            len(self._index.namespaces()),
            oldest,
            newest,
            usage.files,
            usage.bytes,
            self._counters.snapshot(),
            self._index.counters(),
        )

    def check(
        self, *, fix: bool = False, deep: bool = True, progress: Progress | None = None
    ) -> CheckReport:
        """Verify the store (`deep` reads every payload). With `fix`, bad
        entries are quarantined and removed, and a damaged index is moved to
        quarantine and replaced by an empty one (other processes keep the
        old file until they reopen)."""
        with contextlib.suppress(StoreError):
            self.flush()
        try:
            checker = Checker(self._index, self._layout, self._quarantine)
            report = checker.run(fix=fix, deep=deep, progress=progress)
        except IndexBusyError:
            raise
        except (IndexCorruptError, IndexUnavailableError) as exc:
            report = CheckReport.index_unreadable(str(exc))
        if fix and any(p.kind == ProblemKind.INTEGRITY for p in report.problems):
            self._reset_index()
        if fix:
            self._hot.clear()
        return report

    def gc(
        self,
        *,
        min_dead_ratio: float = 0.5,
        abandoned_after: float = ABANDONED_AFTER_S,
        progress: Progress | None = None,
    ) -> GcReport:
        """Expire, enforce the budget and reclaim space (see compaction).

        `abandoned_after` is how old an unlocked 'active' segment or an
        unknown file must be before it counts as a crashed writer's; pass 0
        only when no other process is writing to the store.
        """
        self.flush()
        return self._compactor.run(
            now=self._clock(),
            budget=self.disk_budget(),
            min_dead_ratio=min_dead_ratio,
            abandoned_after=abandoned_after,
            progress=progress,
        )

    def flush(self) -> None:
        """Write buffered recency and counters to the index."""
        self._index.flush()

    # -- internals --------------------------------------------------------

    def _count(self, name: str, amount: int = 1) -> None:
        self._counters.add(name, amount)
        with contextlib.suppress(StoreError):
            self._index.count(name, amount)

    def _index_trouble(self, exc: StoreError) -> None:
        """Leave a marker so the next open runs a quick_check."""
        if isinstance(exc, IndexCorruptError):
            log.error("index reported damage: %s", exc)
            with contextlib.suppress(OSError):
                self._layout.suspect_marker.touch()

    def _reset_index(self) -> None:
        self._appender.retire()
        self._index.close()
        with _open_lock(self._layout):
            _replace_index(self._layout)
            self._attach(_open_index(self._layout, self._clock))
        self._hot.clear()
        self._verified.clear()


def _entry(row: IndexRow, view: memoryview) -> Entry:
    return Entry(
        row.key, row.meta, view, _ref(row), row.pinned, row.created_at, row.expires_at, row.id
    )


def _ref(row: IndexRow) -> SegmentRef:
    return SegmentRef(segment_name(row.segment), row.offset, row.length, row.checksum)


def _segment_sizes(layout: StoreLayout) -> list[int]:
    sizes = []
    for entry in os.scandir(layout.segments_dir):
        if parse_segment_name(entry.name) is not None:
            with contextlib.suppress(FileNotFoundError):  # gc may unlink it meanwhile
                sizes.append(entry.stat().st_size)
    return sizes


def _reason(exc: PayloadError) -> Reason:
    return Reason.BOUNDS if isinstance(exc, PayloadCorruptError) else Reason.MISSING


def _payload_view(payload: BytesLike) -> memoryview:
    try:
        view = memoryview(payload).cast("B")
    except (TypeError, ValueError) as exc:
        raise InvalidEntryError(f"payload must be a contiguous buffer: {exc}") from None
    if view.nbytes == 0:
        raise InvalidEntryError("payload is empty")
    return view


def _check_meta(meta: bytes) -> None:
    if not isinstance(meta, bytes | bytearray | memoryview):
        raise InvalidEntryError("meta must be bytes")
    if len(meta) > MAX_META_BYTES:
        raise InvalidEntryError(f"meta larger than {MAX_META_BYTES} bytes")


def _check_ttl(ttl: float | None) -> None:
    if ttl is not None and not ttl > 0:
        raise InvalidEntryError(f"ttl must be a positive number of seconds, got {ttl!r}")


def _check_budget(disk_bytes: int) -> int:
    if not isinstance(disk_bytes, int) or disk_bytes <= 0:
        raise InvalidEntryError(f"disk_bytes must be a positive int, got {disk_bytes!r}")
    return disk_bytes


def _namespace_id(namespace: Namespace | str) -> str:
    return (
        namespace.id
        if isinstance(namespace, Namespace)
        else validate_digest(namespace, "namespace id")
    )


def _parse_namespace(text: str | None) -> Namespace | None:
    if text is None:
        return None
    try:
        return Namespace.parse(text)
    except ValueError:
        return None


@contextlib.contextmanager
def _open_lock(layout: StoreLayout) -> Iterator[None]:
    """Serialise open, migration and index replacement across processes."""
    fd = os.open(layout.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open_index(layout: StoreLayout, clock: Clock) -> Index:
    """Open the index, replacing it if SQLite says it is damaged. The
    segments it described become orphans, which gc reclaims."""
    suspect = layout.suspect_marker.exists()
    try:
        index = Index.open(layout.index_path, clock)
        if suspect and index.integrity_errors(quick=True):
            index.close()
            raise IndexCorruptError("quick_check failed after a reported error")
    except IndexCorruptError as exc:
        log.error("index unusable (%s); moving it to quarantine", exc)
        _replace_index(layout)
        index = Index.open(layout.index_path, clock)
    with contextlib.suppress(FileNotFoundError):
        layout.suspect_marker.unlink()
    return index


def _replace_index(layout: StoreLayout) -> None:
    Quarantine(layout).take_index()
    index = Index.open(layout.index_path, time.time)
    try:
        # Old segment files may survive the reset; new ids must not collide.
        highest = max(
            (parse_segment_name(p.name) or 0 for p in layout.segments_dir.iterdir()), default=0
        )
        index.reserve_segment_ids(highest)
    finally:
        index.close()
