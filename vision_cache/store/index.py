"""The SQLite index: keys, meta, file references, budgets and names.

One connection per Store, shared by its threads under a lock. Every write is
one `BEGIN IMMEDIATE` transaction retried on SQLITE_BUSY until a deadline, so
"database is locked" never reaches a caller: it becomes IndexBusyError, and
the Store turns that into a miss or a soft put failure. Damage reported by
SQLite becomes IndexCorruptError the same way.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import xxhash
from sqlite_utils import Database

from vision_cache.errors import (
    BudgetExceededError,
    IndexBusyError,
    IndexCorruptError,
    IndexUnavailableError,
    StoreError,
    write_error,
)
from vision_cache.keys import CacheKey
from vision_cache.store import schema
from vision_cache.store.entry import expired

T = TypeVar("T")
Clock = Callable[[], float]

BUSY_TIMEOUT_S = 5.0
RETRY_DEADLINE_S = 60.0
TOUCH_FLUSH_ENTRIES = 4096
TOUCH_FLUSH_SECONDS = 1.0
EVICT_BATCH = 64

_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
# Full statements spelled out (no string building), one per access path.
_SELECT_BY_KEY = (
    "SELECT id, nsid, digest, meta, segment, byte_offset, byte_length, checksum, row_check,"
    " pinned, created_at, last_access, expires_at FROM entries WHERE nsid = ? AND digest = ?"
)
_SELECT_IN_SEGMENT = (
    "SELECT n.id, e.id, e.nsid, e.digest, e.meta, e.segment, e.byte_offset, e.byte_length,"
    " e.checksum, e.row_check, e.pinned, e.created_at, e.last_access, e.expires_at"
    " FROM entries e JOIN namespaces n ON n.nsid = e.nsid WHERE e.segment = ?"
    " ORDER BY e.byte_offset"
)
# Keyset pagination on the rowid: each page is an index range scan, however
# deep into the table it starts.
_SELECT_PAGE = (
    "SELECT n.id, e.id, e.nsid, e.digest, e.meta, e.segment, e.byte_offset, e.byte_length,"
    " e.checksum, e.row_check, e.pinned, e.created_at, e.last_access, e.expires_at"
    " FROM entries e JOIN namespaces n ON n.nsid = e.nsid WHERE e.id > ?"
    " ORDER BY e.id LIMIT ?"
)
_SELECT_PAGE_IN_NAMESPACE = (
    "SELECT n.id, e.id, e.nsid, e.digest, e.meta, e.segment, e.byte_offset, e.byte_length,"
    " e.checksum, e.row_check, e.pinned, e.created_at, e.last_access, e.expires_at"
    " FROM entries e JOIN namespaces n ON n.nsid = e.nsid WHERE e.id > ? AND n.id = ?"
    " ORDER BY e.id LIMIT ?"
)


def row_check(
    namespace_id: str,
    digest: str,
    segment: int,
    offset: int,
    length: int,
    checksum: str,
    meta: bytes,
) -> str:
    """XXH3-64 over everything that decides which bytes a row serves."""
    hasher = xxhash.xxh3_64(
        f"{namespace_id}:{digest}:{segment}:{offset}:{length}:{checksum}:".encode()
    )
    hasher.update(meta)
    return hasher.hexdigest()


@dataclass(frozen=True, slots=True)
class IndexRow:
    id: int
    key: CacheKey
    meta: bytes
    segment: int
    offset: int
    length: int
    checksum: str
    row_check: str
    pinned: bool
    created_at: float
    last_access: float
    expires_at: float | None

    def intact(self) -> bool:
        expected = row_check(
            self.key.namespace_id,
            self.key.digest,
            self.segment,
            self.offset,
            self.length,
            self.checksum,
            self.meta,
        )
        return expected == self.row_check

    def expired(self, now: float) -> bool:
        return expired(self.pinned, self.expires_at, now)


@dataclass(frozen=True, slots=True)
class NewEntry:
    """The columns a put supplies; the index derives the rest."""

    key: CacheKey
    meta: bytes
    segment: int
    offset: int
    length: int
    checksum: str
    pinned: bool
    ttl: float | None


@dataclass(frozen=True, slots=True)
class InsertResult:
    row: IndexRow
    inserted: bool
    evicted: tuple[CacheKey, ...]


@dataclass(frozen=True, slots=True)
class SegmentRow:
    id: int
    state: str
    created_at: float
    live_bytes: int
    live_count: int


@dataclass(frozen=True, slots=True)
class Totals:
    entries: int
    bytes: int
    pinned_entries: int
    pinned_bytes: int


@dataclass(frozen=True, slots=True)
class NamespaceRow:
    id: str
    text: str | None
    ttl: float | None


class DamagedRowError(IndexCorruptError):
    """A row whose columns do not decode; carries its id for quarantine."""

    def __init__(self, entry_id: int | None, detail: str) -> None:
        super().__init__(detail)
        self.entry_id = entry_id


# What a sqlite3 call can raise: its own errors, and UnicodeDecodeError when
# a damaged file puts invalid UTF-8 into an error message.
SQLITE_ERRORS = (sqlite3.Error, UnicodeDecodeError)


def translate(exc: Exception) -> StoreError:
    """Map a sqlite3 error onto the most specific store error."""
    if isinstance(exc, UnicodeDecodeError):
        return IndexCorruptError(f"undecodable text from the index: {exc}")
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(exc).lower()
    if primary in _BUSY_CODES or "locked" in text or "busy" in text:
        return IndexBusyError(str(exc))
    if primary in _CORRUPT_CODES or "malformed" in text or "not a database" in text:
        return IndexCorruptError(str(exc))
    if primary in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
        code_ = errno.ENOSPC if primary == sqlite3.SQLITE_FULL else errno.EIO
        return write_error(OSError(code_, str(exc)))
    return IndexUnavailableError(str(exc))


def connect(path: Path) -> sqlite3.Connection:
    """Open the index file with the pragmas every connection needs."""
    # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a write
    # transaction takes the write lock up front and can never fail half way
    # on a read->write lock upgrade (the classic SQLITE_BUSY deadlock).
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    # A damaged page can hold invalid UTF-8; decoding with replacement turns
    # that into a row that fails its row check instead of an exception.
    conn.text_factory = _lenient_text
    try:
        # WAL: readers never block the writer nor each other, across processes.
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL survives any process crash; a power loss may drop the
        # last commits, which only orphans payload bytes (they are fsynced
        # before their row commits) or resurrects a deleted entry.
        conn.execute("PRAGMA synchronous=NORMAL")
        # Keep the WAL file from growing without bound between checkpoints.
        conn.execute("PRAGMA journal_size_limit=67108864")
        # 16 MiB page cache: the hot part of a 1M-entry lookup index fits,
        # and the RSS budget (hot tier + 64 MiB) still holds.
        conn.execute("PRAGMA cache_size=-16384")
    except BaseException:
        conn.close()
        raise
    return conn


def _lenient_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class Index:
    """All SQL lives here; callers see dataclasses and store errors."""

    def __init__(self, conn: sqlite3.Connection, clock: Clock) -> None:
        self._conn = conn
        self._clock = clock
        self._lock = threading.RLock()
        self._nsids: dict[str, int] = {}
        self._touches: dict[int, float] = {}
        self._counter_deltas: dict[str, int] = {}
        self._last_flush = clock()

    @classmethod
    def open(cls, path: Path, clock: Clock) -> Index:
        """Connect and migrate; the caller holds the store's open lock."""
        try:
            conn = connect(path)
        except SQLITE_ERRORS as exc:
            raise translate(exc) from exc
        try:
            # execute_plugins=False: no third-party hooks on our connection.
            db = Database(conn, execute_plugins=False)
            schema.migrate(db)
            damage = schema.schema_differences(db)
            if damage:
                raise IndexCorruptError("; ".join(damage))
        except SQLITE_ERRORS as exc:
            conn.close()
            error = translate(exc)
            if isinstance(error, IndexBusyError):
                raise error from exc
            # Our migrations are known-good SQL; if they fail on this file
            # (say "no such column"), its schema is what is damaged.
            raise IndexCorruptError(f"index schema unusable: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return cls(conn, clock)

    def close(self) -> None:
        with self._lock:
            # Recency and counters are advisory; losing them is fine.
            with contextlib.suppress(StoreError):
                self.flush()
            self._conn.close()

    # -- transactions -----------------------------------------------------

    def read(self, body: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            return self._retry(lambda: body(self._conn))

    def write(self, body: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        """Run `body` in one IMMEDIATE transaction; `durable` fsyncs the commit."""
        with self._lock:
            return self._retry(lambda: self._transaction(body, durable))

    def _transaction(self, body: Callable[[sqlite3.Connection], T], durable: bool) -> T:
        conn = self._conn
        if durable:
            # FULL for this commit only: compaction unlinks a segment right
            # after it, so the moved rows must be on disk first.
            conn.execute("PRAGMA synchronous=FULL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            if durable:
                conn.execute("PRAGMA synchronous=NORMAL")
        return result

    def _retry(self, attempt: Callable[[], T]) -> T:
        deadline = time.monotonic() + RETRY_DEADLINE_S
        delay = 0.001
        while True:
            try:
                return attempt()
            except SQLITE_ERRORS as exc:
                error = translate(exc)
                if not isinstance(error, IndexBusyError) or time.monotonic() > deadline:
                    raise error from exc
            # Jittered backoff so competing processes do not retry in step.
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.1)

    # -- namespaces -------------------------------------------------------

    def nsid(self, namespace_id: str, *, create: bool) -> int | None:
        cached = self._nsids.get(namespace_id)
        if cached is not None:
            return cached
        found = self.read(lambda c: _select_nsid(c, namespace_id))
        if found is None and create:
            found = self.write(lambda c: _ensure_namespace(c, namespace_id, self._clock()))
        if found is not None:
            self._nsids[namespace_id] = found
        return found

    def register_namespace(self, namespace_id: str, text: str) -> None:
        def body(conn: sqlite3.Connection) -> int:
            nsid = _ensure_namespace(conn, namespace_id, self._clock())
            # Only fill text in when missing: the id is a hash of the text,
            # so an existing text can only be equal.
            conn.execute(
                "UPDATE namespaces SET text = ? WHERE nsid = ? AND text IS NULL", (text, nsid)
            )
            return nsid

        self._nsids[namespace_id] = self.write(body)

    def set_namespace_ttl(self, nsid: int, ttl: float | None) -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE namespaces SET ttl = ? WHERE nsid = ?", (ttl, nsid))
            # Re-time existing entries that follow the namespace TTL (not
            # those given an explicit per-entry TTL).
            conn.execute(
                "UPDATE entries SET expires_at = CASE WHEN ? IS NULL THEN NULL"
                " ELSE created_at + ? END WHERE nsid = ? AND ttl_explicit = 0",
                (ttl, ttl, nsid),
            )

        self.write(body)

    def namespaces(self) -> list[NamespaceRow]:
        rows = self.read(
            lambda c: c.execute("SELECT id, text, ttl FROM namespaces ORDER BY nsid").fetchall()
        )
        return [NamespaceRow(*row) for row in rows]

    # -- entries ----------------------------------------------------------

    def lookup(self, key: CacheKey) -> IndexRow | None:
        nsid = self.nsid(key.namespace_id, create=False)
        if nsid is None:
            return None
        # The UNIQUE (nsid, digest) index serves this as one b-tree probe.
        row = self.read(lambda c: c.execute(_SELECT_BY_KEY, (nsid, key.digest)).fetchone())
        return None if row is None else _decode(row, key.namespace_id)

    def insert(self, new: NewEntry, budget: int, default_ttl: float | None) -> InsertResult:
        nsid = self.nsid(new.key.namespace_id, create=True)
        assert nsid is not None
        now = self._clock()
        return self.write(lambda c: _insert(c, nsid, new, budget, default_ttl, now))

    def delete(self, key: CacheKey) -> bool:
        nsid = self.nsid(key.namespace_id, create=False)
        if nsid is None:
            return False
        return self.write(
            lambda c: (
                c.execute(
                    "DELETE FROM entries WHERE nsid = ? AND digest = ?", (nsid, key.digest)
                ).rowcount
                > 0
            )
        )

    def delete_id(self, entry_id: int) -> bool:
        return self.write(
            lambda c: c.execute("DELETE FROM entries WHERE id = ?", (entry_id,)).rowcount > 0
        )

    def delete_row(self, row: IndexRow) -> bool:
        """Delete `row` only if it still points where it did when read: a
        row another process moved or replaced meanwhile is not ours to drop."""
        return self.write(
            lambda c: (
                c.execute(
                    "DELETE FROM entries WHERE id = ? AND segment = ? AND byte_offset = ?"
                    " AND checksum = ?",
                    (row.id, row.segment, row.offset, row.checksum),
                ).rowcount
                > 0
            )
        )

    def dangling_names(self) -> int:
        # NOT EXISTS probes the UNIQUE (nsid, digest) index once per name.
        row = self.read(
            lambda c: c.execute(
                "SELECT COUNT(*) FROM names n WHERE NOT EXISTS (SELECT 1 FROM entries e"
                " WHERE e.nsid = n.nsid AND e.digest = n.digest)"
            ).fetchone()
        )
        return int(row[0])

    def set_pinned(self, key: CacheKey, pinned: bool) -> bool:
        nsid = self.nsid(key.namespace_id, create=False)
        if nsid is None:
            return False
        return self.write(
            lambda c: (
                c.execute(
                    "UPDATE entries SET pinned = ? WHERE nsid = ? AND digest = ?",
                    (int(pinned), nsid, key.digest),
                ).rowcount
                > 0
            )
        )

    def iter_rows(self, namespace_id: str | None = None, batch: int = 512) -> Iterator[IndexRow]:
        """All rows in id order, read in short transactions so that a long
        listing never pins a WAL snapshot (which would stall checkpoints)."""
        after = 0
        while True:
            page = functools.partial(_page, namespace_id=namespace_id, after=after, batch=batch)
            rows = self.read(page)
            for entry_id, namespace, row in rows:
                try:
                    yield _decode(row, namespace)
                except DamagedRowError:
                    yield _damaged_placeholder(entry_id)
            if len(rows) < batch:
                return
            after = rows[-1][0]

    def find_keys(self, namespace_prefix: str, digest_prefix: str, limit: int) -> list[CacheKey]:
        """Keys whose namespace id and digest start with these prefixes (lowercase hex), at
        most `limit` of them. A scan: for the command line, never the request path."""
        sql = (
            "SELECT n.id, e.digest FROM entries e JOIN namespaces n ON n.nsid = e.nsid"
            " WHERE substr(e.digest, 1, ?) = ? AND substr(n.id, 1, ?) = ?"
            " ORDER BY n.id, e.digest LIMIT ?"
        )
        args = (len(digest_prefix), digest_prefix, len(namespace_prefix), namespace_prefix, limit)
        rows = self.read(lambda c: c.execute(sql, args).fetchall())
        return [CacheKey(namespace_id, digest) for namespace_id, digest in rows]

    def rows_in_segment(self, segment: int) -> list[IndexRow]:
        rows = self.read(lambda c: c.execute(_SELECT_IN_SEGMENT, (segment,)).fetchall())
        return [_decode(row[1:], row[0]) for row in rows]

    def move(self, row: IndexRow, segment: int, offset: int) -> bool:
        """Point `row` at a copy of its payload, unless it changed meanwhile."""
        check = row_check(
            row.key.namespace_id,
            row.key.digest,
            segment,
            offset,
            row.length,
            row.checksum,
            row.meta,
        )
        # Compare-and-swap on the old location: a concurrent delete or move
        # wins, and our copy simply becomes dead bytes for the next gc.
        return self.write(
            lambda c: (
                c.execute(
                    "UPDATE entries SET segment = ?, byte_offset = ?, row_check = ?"
                    " WHERE id = ? AND segment = ? AND byte_offset = ?",
                    (segment, offset, check, row.id, row.segment, row.offset),
                ).rowcount
                > 0
            )
        )

    def expire(self, now: float, limit: int = 1024) -> list[CacheKey]:
        return self.write(lambda c: _delete_expired(c, now, limit))

    def evict_to(self, budget: int) -> list[CacheKey]:
        """Evict unpinned LRU entries until live bytes fit `budget`."""
        return self.write(lambda c: _evict(c, max(0, _totals(c).bytes - budget)))

    # -- segments ---------------------------------------------------------

    def new_segment(self) -> int:
        # Committed before the file exists, so the id is unique across
        # processes; gc leaves young 'active' rows without a file alone.
        segment_id = self.write(
            lambda c: (
                c.execute(
                    "INSERT INTO segments (state, created_at) VALUES ('active', ?)",
                    (self._clock(),),
                ).lastrowid
            )
        )
        assert segment_id is not None
        return segment_id

    def seal_segment(self, segment_id: int) -> None:
        self.write(
            lambda c: c.execute("UPDATE segments SET state = 'sealed' WHERE id = ?", (segment_id,))
        )

    def drop_segment_if_dead(self, segment_id: int) -> bool:
        """Delete a sealed segment's row if no entry uses it; True if deleted.

        Only the caller that deletes the row unlinks the file, so two
        processes reclaiming at once never race on the same file. The commit
        is durable because WAL commits reach disk in order: once this one is
        synced, so are the compaction moves that emptied the segment, and
        the file can go."""
        return self.write(
            lambda c: (
                c.execute(
                    "DELETE FROM segments WHERE id = ? AND live_count = 0 AND state = 'sealed'",
                    (segment_id,),
                ).rowcount
                > 0
            ),
            durable=True,
        )

    def segments(self) -> list[SegmentRow]:
        rows = self.read(
            lambda c: c.execute(
                "SELECT id, state, created_at, live_bytes, live_count FROM segments ORDER BY id"
            ).fetchall()
        )
        return [SegmentRow(*row) for row in rows]

    def dead_segments(self) -> list[int]:
        # The segments table holds one row per file (hundreds), so a scan
        # is cheaper than maintaining another index.
        rows = self.read(
            lambda c: c.execute(
                "SELECT id FROM segments WHERE live_count = 0 AND state = 'sealed'"
            ).fetchall()
        )
        return [row[0] for row in rows]

    def reserve_segment_ids(self, above: int) -> None:
        """Make future segment ids larger than `above` (after an index reset,
        old files may still sit in segments/)."""

        def body(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM sqlite_sequence WHERE name = 'segments'")
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('segments', ?)", (above,))

        self.write(body)

    # -- names ------------------------------------------------------------

    def set_name(self, key: CacheKey, name: str) -> None:
        nsid = self.nsid(key.namespace_id, create=True)
        # Upsert: re-pointing a name at a new image is the normal update.
        self.write(
            lambda c: c.execute(
                "INSERT INTO names (nsid, name, digest, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (nsid, name) DO UPDATE SET digest = excluded.digest,"
                " created_at = excluded.created_at",
                (nsid, name, key.digest, self._clock()),
            )
        )

    def resolve_name(self, namespace_id: str, name: str) -> str | None:
        nsid = self.nsid(namespace_id, create=False)
        if nsid is None:
            return None
        row = self.read(
            lambda c: c.execute(
                "SELECT digest FROM names WHERE nsid = ? AND name = ?", (nsid, name)
            ).fetchone()
        )
        return None if row is None else str(row[0])

    def names(self, namespace_id: str) -> dict[str, str]:
        nsid = self.nsid(namespace_id, create=False)
        if nsid is None:
            return {}
        rows = self.read(
            lambda c: c.execute(
                "SELECT name, digest FROM names WHERE nsid = ? ORDER BY name", (nsid,)
            ).fetchall()
        )
        return {str(name): str(digest) for name, digest in rows}

    def delete_name(self, namespace_id: str, name: str) -> bool:
        nsid = self.nsid(namespace_id, create=False)
        if nsid is None:
            return False
        return self.write(
            lambda c: (
                c.execute("DELETE FROM names WHERE nsid = ? AND name = ?", (nsid, name)).rowcount
                > 0
            )
        )

    # -- tags ---------------------------------------------------------------

    def add_tag(self, key: CacheKey, tag: str) -> None:
        nsid = self.nsid(key.namespace_id, create=True)
        self.write(
            lambda c: c.execute(
                "INSERT INTO tags (nsid, tag, digest, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (nsid, tag, key.digest, self._clock()),
            )
        )

    def remove_tag(self, key: CacheKey, tag: str) -> bool:
        nsid = self.nsid(key.namespace_id, create=False)
        if nsid is None:
            return False
        return self.write(
            lambda c: (
                c.execute(
                    "DELETE FROM tags WHERE nsid = ? AND tag = ? AND digest = ?",
                    (nsid, tag, key.digest),
                ).rowcount
                > 0
            )
        )

    def tagged(self, namespace_id: str, tag: str) -> list[str]:
        nsid = self.nsid(namespace_id, create=False)
        if nsid is None:
            return []
        rows = self.read(
            lambda c: c.execute(
                "SELECT digest FROM tags WHERE nsid = ? AND tag = ? ORDER BY digest", (nsid, tag)
            ).fetchall()
        )
        return [str(row[0]) for row in rows]

    # -- recency and counters ---------------------------------------------

    def touch(self, entry_id: int, now: float) -> None:
        """Record an access; written in batches, since one UPDATE per get
        would put every reader in the write lock queue."""
        with self._lock:
            self._touches[entry_id] = now
            self._maybe_flush(now)

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counter_deltas[name] = self._counter_deltas.get(name, 0) + amount
            self._maybe_flush(self._clock())

    def _maybe_flush(self, now: float) -> None:
        if (
            len(self._touches) >= TOUCH_FLUSH_ENTRIES
            or now - self._last_flush >= TOUCH_FLUSH_SECONDS
        ):
            # Advisory data, dropped by flush() on failure so it cannot pile up.
            with contextlib.suppress(StoreError):
                self.flush()

    def flush(self) -> None:
        with self._lock:
            touches, self._touches = self._touches, {}
            deltas, self._counter_deltas = self._counter_deltas, {}
            self._last_flush = self._clock()
            if touches or deltas:
                self.write(lambda c: _flush(c, touches, deltas))

    def counters(self) -> dict[str, int]:
        rows = self.read(lambda c: c.execute("SELECT name, value FROM counters").fetchall())
        return {str(name): int(value) for name, value in rows}

    # -- totals, settings, checks -----------------------------------------

    def totals(self) -> Totals:
        return self.read(_totals)

    def age_range(self) -> tuple[float | None, float | None]:
        # A full scan (no index on created_at): stats are rare, and another
        # index would cost every put.
        row = self.read(
            lambda c: c.execute("SELECT MIN(created_at), MAX(created_at) FROM entries").fetchone()
        )
        return row[0], row[1]

    def setting(self, name: str) -> Any:
        row = self.read(
            lambda c: c.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        )
        return None if row is None else row[0]

    def set_setting(self, name: str, value: Any) -> None:
        self.write(
            lambda c: c.execute(
                "INSERT INTO settings (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )
        )

    def setting_or_default(self, name: str, default: Any) -> Any:
        """The setting `name`, stored as `default` first if it has none (the first writer wins)."""

        def body(c: sqlite3.Connection) -> Any:
            c.execute("INSERT OR IGNORE INTO settings (name, value) VALUES (?, ?)", (name, default))
            return c.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()[0]

        return self.write(body)

    def integrity_errors(self, *, quick: bool) -> list[str]:
        """SQLite's own check plus the schema comparison; [] when healthy."""
        pragma = "PRAGMA quick_check" if quick else "PRAGMA integrity_check"
        rows = self.read(lambda c: c.execute(pragma).fetchall())
        messages = [str(row[0]) for row in rows]
        messages = [] if messages == ["ok"] else messages
        return messages + self.read(
            lambda c: schema.schema_differences(Database(c, execute_plugins=False))
        )

    def recount(self, *, fix: bool) -> list[str]:
        """Compare trigger-maintained totals with the rows; optionally fix."""
        if fix:
            return self.write(lambda c: _recount(c, fix=True))
        return self.read(lambda c: _recount(c, fix=False))

    def checkpoint(self) -> None:
        # PASSIVE never waits for readers; it just folds what it can.
        self.read(lambda c: c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())


# -- SQL helpers (run inside Index.read / Index.write) ----------------------


def _select_nsid(conn: sqlite3.Connection, namespace_id: str) -> int | None:
    row = conn.execute("SELECT nsid FROM namespaces WHERE id = ?", (namespace_id,)).fetchone()
    return None if row is None else int(row[0])


def _ensure_namespace(conn: sqlite3.Connection, namespace_id: str, now: float) -> int:
    conn.execute(
        "INSERT INTO namespaces (id, created_at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
        (namespace_id, now),
    )
    nsid = _select_nsid(conn, namespace_id)
    assert nsid is not None
    return nsid


def _decode(row: Sequence[Any], namespace_id: str) -> IndexRow:
    """Build an IndexRow, refusing values a damaged page could produce."""
    (
        entry_id,
        _nsid,
        digest,
        meta,
        segment,
        offset,
        length,
        checksum,
        check,
        pinned,
        created,
        accessed,
        expires,
    ) = row
    try:
        _expect_types(row, (int, int, str, bytes, int, int, int, str, str, int))
        return IndexRow(
            int(entry_id),
            CacheKey(namespace_id, digest),
            bytes(meta),
            segment,
            offset,
            length,
            checksum,
            check,
            bool(pinned),
            float(created),
            float(accessed),
            None if expires is None else float(expires),
        )
    except (TypeError, ValueError) as exc:
        raise DamagedRowError(
            entry_id if isinstance(entry_id, int) else None, f"undecodable index row: {exc}"
        ) from None


def _expect_types(row: Sequence[Any], types: Sequence[type]) -> None:
    for value, expected in zip(row, types, strict=False):
        if not isinstance(value, expected):
            raise TypeError(f"{type(value).__name__} where {expected.__name__} belongs")


def _damaged_placeholder(entry_id: int) -> IndexRow:
    """A row that fails `intact()`, so listings and checks can report it."""
    key = CacheKey("0" * 64, "0" * 64)
    return IndexRow(entry_id, key, b"", 0, 0, 0, "", "damaged", False, 0.0, 0.0, None)


def _page(
    conn: sqlite3.Connection, namespace_id: str | None, after: int, batch: int
) -> list[tuple[int, str, tuple[Any, ...]]]:
    if namespace_id is None:
        rows = conn.execute(_SELECT_PAGE, (after, batch)).fetchall()
    else:
        rows = conn.execute(_SELECT_PAGE_IN_NAMESPACE, (after, namespace_id, batch)).fetchall()
    return [(row[1], row[0], tuple(row[1:])) for row in rows]


def _totals(conn: sqlite3.Connection) -> Totals:
    row = conn.execute(
        "SELECT entries, bytes, pinned_entries, pinned_bytes FROM totals WHERE id = 1"
    ).fetchone()
    return Totals(*row)


def _insert(
    conn: sqlite3.Connection,
    nsid: int,
    new: NewEntry,
    budget: int,
    default_ttl: float | None,
    now: float,
) -> InsertResult:
    existing = conn.execute(_SELECT_BY_KEY, (nsid, new.key.digest)).fetchone()
    if existing is not None:
        return InsertResult(_decode(existing, new.key.namespace_id), False, ())
    evicted = _make_room(conn, new, budget, now)
    ttl = new.ttl if new.ttl is not None else _namespace_ttl(conn, nsid, default_ttl)
    expires = None if ttl is None else now + ttl
    check = row_check(
        new.key.namespace_id,
        new.key.digest,
        new.segment,
        new.offset,
        new.length,
        new.checksum,
        new.meta,
    )
    cursor = conn.execute(
        "INSERT INTO entries (nsid, digest, meta, segment, byte_offset, byte_length, checksum,"
        " row_check, pinned, ttl_explicit, created_at, last_access, expires_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            nsid,
            new.key.digest,
            new.meta,
            new.segment,
            new.offset,
            new.length,
            new.checksum,
            check,
            int(new.pinned),
            int(new.ttl is not None),
            now,
            now,
            expires,
        ),
    )
    assert cursor.lastrowid is not None
    row = IndexRow(
        cursor.lastrowid,
        new.key,
        new.meta,
        new.segment,
        new.offset,
        new.length,
        new.checksum,
        check,
        new.pinned,
        now,
        now,
        expires,
    )
    return InsertResult(row, True, tuple(evicted))


def _namespace_ttl(conn: sqlite3.Connection, nsid: int, default: float | None) -> float | None:
    row = conn.execute("SELECT ttl FROM namespaces WHERE nsid = ?", (nsid,)).fetchone()
    return default if row is None or row[0] is None else float(row[0])


def _make_room(conn: sqlite3.Connection, new: NewEntry, budget: int, now: float) -> list[CacheKey]:
    totals = _totals(conn)
    if totals.pinned_bytes + new.length > budget:
        raise BudgetExceededError(
            f"{new.length} bytes do not fit: {totals.pinned_bytes} of {budget} are pinned"
        )
    excess = totals.bytes + new.length - budget
    if excess <= 0:
        return []
    # Expired entries go first: they are dead weight whatever their recency.
    evicted = _delete_expired(conn, now, limit=1 << 30)
    excess = _totals(conn).bytes + new.length - budget
    return evicted + _evict(conn, excess)


def _evict(conn: sqlite3.Connection, excess: int) -> list[CacheKey]:
    evicted: list[CacheKey] = []
    while excess > 0:
        # Walks entries_lru from the least recent unpinned entry.
        victims = conn.execute(
            "SELECT e.id, n.id, e.digest, e.byte_length FROM entries e"
            " JOIN namespaces n ON n.nsid = e.nsid WHERE e.pinned = 0"
            " ORDER BY e.last_access LIMIT ?",
            (EVICT_BATCH,),
        ).fetchall()
        if not victims:
            raise BudgetExceededError("only pinned entries are left to evict")
        for entry_id, namespace_id, digest, length in victims:
            conn.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
            evicted.append(CacheKey(namespace_id, digest))
            excess -= length
            if excess <= 0:
                break
    return evicted


def _delete_expired(conn: sqlite3.Connection, now: float, limit: int) -> list[CacheKey]:
    # Served by the partial index entries_expiry; the rule of entry.expired, in SQL.
    rows = conn.execute(
        "SELECT e.id, n.id, e.digest FROM entries e JOIN namespaces n ON n.nsid = e.nsid"
        " WHERE e.expires_at IS NOT NULL AND e.expires_at <= ? AND e.pinned = 0 LIMIT ?",
        (now, limit),
    ).fetchall()
    conn.executemany("DELETE FROM entries WHERE id = ?", [(row[0],) for row in rows])
    return [CacheKey(namespace_id, digest) for _, namespace_id, digest in rows]


def _flush(conn: sqlite3.Connection, touches: dict[int, float], deltas: dict[str, int]) -> None:
    # max(): another process may have recorded a later access already.
    conn.executemany(
        "UPDATE entries SET last_access = max(last_access, ?) WHERE id = ?",
        [(when, entry_id) for entry_id, when in touches.items()],
    )
    conn.executemany(
        "INSERT INTO counters (name, value) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        list(deltas.items()),
    )


def _recount(conn: sqlite3.Connection, *, fix: bool) -> list[str]:
    problems: list[str] = []
    actual = Totals(
        *conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(byte_length), 0), COALESCE(SUM(pinned), 0),"
            " COALESCE(SUM(pinned * byte_length), 0) FROM entries"
        ).fetchone()
    )
    if actual != _totals(conn):
        problems.append(f"totals {_totals(conn)} differ from rows {actual}")
        if fix:
            conn.execute(
                "UPDATE totals SET entries = ?, bytes = ?, pinned_entries = ?,"
                " pinned_bytes = ? WHERE id = 1",
                (actual.entries, actual.bytes, actual.pinned_entries, actual.pinned_bytes),
            )
    problems += _recount_segments(conn, fix=fix)
    return problems


def _recount_segments(conn: sqlite3.Connection, *, fix: bool) -> list[str]:
    wrong = conn.execute(
        "SELECT s.id, s.live_bytes, s.live_count, COALESCE(SUM(e.byte_length), 0), COUNT(e.id)"
        " FROM segments s LEFT JOIN entries e ON e.segment = s.id GROUP BY s.id"
        " HAVING s.live_bytes != COALESCE(SUM(e.byte_length), 0) OR s.live_count != COUNT(e.id)"
    ).fetchall()
    if fix:
        conn.executemany(
            "UPDATE segments SET live_bytes = ?, live_count = ? WHERE id = ?",
            [(row[3], row[4], row[0]) for row in wrong],
        )
    return [f"segment {row[0]} live totals {row[1:3]} differ from rows {row[3:]}" for row in wrong]
