"""The local store of visual packages: a SQLite index over payloads in mmap'd segment files.

`store.Store` is the one entry point (get, put, pin, names, expiry, eviction, gc, check);
beneath it `index` (the SQLite index) and `schema` (its migrations), `segments` (append-only
payload files), `layout` (file names on disk), `entry` (what a lookup hands out),
`hot_tier` (the in-memory tier), `compaction`, `quarantine`, `check` and `stats`.
See docs/store.md.
"""

from vision_cache.store.store import NamespaceInfo, Store

__all__ = ["NamespaceInfo", "Store"]
