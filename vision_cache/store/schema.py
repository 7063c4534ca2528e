"""The index schema and its migrations (sqlite-utils `Migrations`).

A migration is appended, never edited: `SCHEMA_VERSION` is the number of
migrations, and an index that has applied a migration this code does not know
was written by a newer vcache, which `check_version` refuses to touch.
"""

from __future__ import annotations

import functools

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from vision_cache.errors import SchemaVersionError

migrations = Migrations("vision_cache")

_INITIAL = [
    # nsid is a rowid alias so every entry carries an 8-byte integer instead
    # of the 64-char namespace id; rows are never deleted, so a process may
    # cache id -> nsid for its lifetime.
    """CREATE TABLE namespaces (
        nsid INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        text TEXT,
        ttl REAL,
        created_at REAL NOT NULL
    )""",
    # AUTOINCREMENT (not plain rowid) so an id, and with it a file name, is
    # never reused even after the highest segment is deleted: a stale file
    # reference can then only miss, never point at different bytes.
    """CREATE TABLE segments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        state TEXT NOT NULL CHECK (state IN ('active', 'sealed')),
        created_at REAL NOT NULL,
        live_bytes INTEGER NOT NULL DEFAULT 0,
        live_count INTEGER NOT NULL DEFAULT 0
    )""",
    # UNIQUE (nsid, digest) is both the get() lookup index and what makes a
    # duplicate put from another process a no-op (INSERT ... ON CONFLICT).
    # row_check (XXH3 over key, location and meta) catches damaged rows,
    # since SQLite itself does not checksum row contents.
    """CREATE TABLE entries (
        id INTEGER PRIMARY KEY,
        nsid INTEGER NOT NULL,
        digest TEXT NOT NULL,
        meta BLOB NOT NULL,
        segment INTEGER NOT NULL,
        byte_offset INTEGER NOT NULL,
        byte_length INTEGER NOT NULL CHECK (byte_length > 0),
        checksum TEXT NOT NULL,
        row_check TEXT NOT NULL,
        pinned INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1)),
        ttl_explicit INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        last_access REAL NOT NULL,
        expires_at REAL,
        UNIQUE (nsid, digest)
    )""",
    # Eviction walks unpinned entries oldest-access first; with pinned as
    # the leading column the walk never visits pinned rows at all.
    "CREATE INDEX entries_lru ON entries (pinned, last_access)",
    # Compaction and segment reclaim list the entries of one segment.
    "CREATE INDEX entries_segment ON entries (segment)",
    # Partial: most entries have no TTL, so they cost nothing here.
    "CREATE INDEX entries_expiry ON entries (expires_at) WHERE expires_at IS NOT NULL",
    # WITHOUT ROWID: the primary key is the only access path.
    """CREATE TABLE names (
        nsid INTEGER NOT NULL,
        name TEXT NOT NULL,
        digest TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (nsid, name)
    ) WITHOUT ROWID""",
    # One row, kept exact by the triggers below, so budgets and stats never
    # need SUM() over a million rows.
    """CREATE TABLE totals (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        entries INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        pinned_entries INTEGER NOT NULL,
        pinned_bytes INTEGER NOT NULL
    )""",
    "INSERT INTO totals VALUES (1, 0, 0, 0, 0)",
    "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE settings (name TEXT PRIMARY KEY, value) WITHOUT ROWID",
    # Triggers rather than application code keep totals and per-segment live
    # bytes exact on every path: put, delete, eviction, compaction, check
    # --fix, and even a manual edit in the sqlite3 shell.
    """CREATE TRIGGER entries_need_segment BEFORE INSERT ON entries
    WHEN NOT EXISTS (SELECT 1 FROM segments WHERE id = NEW.segment)
    BEGIN SELECT RAISE(ABORT, 'entry references a missing segment'); END""",
    """CREATE TRIGGER entries_added AFTER INSERT ON entries BEGIN
        UPDATE segments SET live_bytes = live_bytes + NEW.byte_length,
            live_count = live_count + 1 WHERE id = NEW.segment;
        UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.byte_length,
            pinned_entries = pinned_entries + NEW.pinned,
            pinned_bytes = pinned_bytes + NEW.pinned * NEW.byte_length WHERE id = 1;
    END""",
    """CREATE TRIGGER entries_removed AFTER DELETE ON entries BEGIN
        UPDATE segments SET live_bytes = live_bytes - OLD.byte_length,
            live_count = live_count - 1 WHERE id = OLD.segment;
        UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.byte_length,
            pinned_entries = pinned_entries - OLD.pinned,
            pinned_bytes = pinned_bytes - OLD.pinned * OLD.byte_length WHERE id = 1;
    END""",
    """CREATE TRIGGER entries_changed AFTER UPDATE OF segment, byte_length, pinned
    ON entries BEGIN
        UPDATE segments SET live_bytes = live_bytes - OLD.byte_length,
            live_count = live_count - 1 WHERE id = OLD.segment;
        UPDATE segments SET live_bytes = live_bytes + NEW.byte_length,
            live_count = live_count + 1 WHERE id = NEW.segment;
        UPDATE totals SET bytes = bytes - OLD.byte_length + NEW.byte_length,
            pinned_entries = pinned_entries - OLD.pinned + NEW.pinned,
            pinned_bytes = pinned_bytes - OLD.pinned * OLD.byte_length
                + NEW.pinned * NEW.byte_length WHERE id = 1;
    END""",
]


@migrations(name="0001_initial")
def initial(db: Database) -> None:
    for statement in _INITIAL:
        db.execute(statement)


@migrations(name="0002_tags")
def tags(db: Database) -> None:
    # A tag groups references (`vcache warm --tag T`, `vcache compare --tag T`); like names,
    # tags point at digests and outlive the entries (a comparison reports what is gone).
    # The primary key serves both "the digests of a tag" and a duplicate tag being a no-op.
    db.execute("""CREATE TABLE tags (
        nsid INTEGER NOT NULL,
        tag TEXT NOT NULL,
        digest TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (nsid, tag, digest)
    ) WITHOUT ROWID""")


# Every migration name, in order; tests assert it matches `migrations`.
KNOWN_MIGRATIONS = ("0001_initial", "0002_tags")
SCHEMA_VERSION = len(KNOWN_MIGRATIONS)


def check_version(db: Database) -> int:
    """Raise if the index holds migrations unknown here; return its version."""
    applied = tuple(m.name for m in migrations.applied(db))
    if applied != KNOWN_MIGRATIONS[: len(applied)]:
        unknown = sorted(set(applied) - set(KNOWN_MIGRATIONS))
        raise SchemaVersionError(f"index has migrations unknown to this vcache: {unknown}")
    return len(applied)


def migrate(db: Database) -> int:
    """Apply pending migrations; the caller holds the store's open lock."""
    check_version(db)
    migrations.apply(db)
    return check_version(db)


_SCHEMA_QUERY = (
    "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
)


@functools.cache
def expected_schema() -> tuple[tuple[str, str, str], ...]:
    """What sqlite_master holds after every migration, from a scratch
    in-memory database."""
    db = Database(memory=True, execute_plugins=False)
    try:
        migrations.apply(db)
        return tuple(db.execute(_SCHEMA_QUERY).fetchall())
    finally:
        db.close()


def schema_differences(db: Database) -> list[str]:
    """Objects whose definition differs from what the migrations create.

    A byte flip in sqlite_master can rename a column or break a trigger
    while PRAGMA integrity_check still says ok; comparing the text catches
    it. Only meaningful once the index is at SCHEMA_VERSION."""
    actual = set(db.execute(_SCHEMA_QUERY).fetchall())
    expected = set(expected_schema())
    return sorted(
        f"{kind} {name} differs from the migrations"
        for kind, name, _ in expected.symmetric_difference(actual)
    )
