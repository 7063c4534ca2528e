"""Shared helpers for the store tests: deterministic keys and payloads, a
fake clock, and the layout patterns a store directory may contain.

Payload and meta are pure functions of the key, so any process (a stress
worker, a crash survivor) can check that a get returned exactly what was put.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from pathlib import Path

from vision_cache import CacheKey, Namespace

NAMESPACE = Namespace.for_encoder(
    model="test-vlm",
    mmproj="mmproj-test.gguf:0000",
    build="test-build",
    format_version=1,
    encoder={"image_min_tokens": 16, "image_max_tokens": 64},
)

# Every file a store directory may hold, relative to its root.
ALLOWED_FILES = re.compile(
    r"index\.sqlite(-wal|-shm)?|open\.lock|index\.suspect"
    r"|segments/seg-\d{8,}\.vseg"
    r"|quarantine/(\d{20}-\d+-[a-z]+\.(bin|json)|index-\d{20}/index\.sqlite(-wal|-shm)?)"
)


def key(i: int, namespace: Namespace = NAMESPACE) -> CacheKey:
    return namespace.key_for_image(f"image-{i}".encode())


def payload_for(key: CacheKey, min_size: int = 1024, spread: int = 16 * 1024) -> bytes:
    """1 KiB .. 17 KiB of bytes derived from the digest (sizes vary by key)."""
    size = min_size + int(key.digest[:6], 16) % max(1, spread)
    return hashlib.shake_128(key.text.encode()).digest(size)


def meta_for(key: CacheKey) -> bytes:
    return f'{{"digest":"{key.digest}","n_tokens":64}}'.encode()


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def store_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def integrity(root: Path) -> str:
    """PRAGMA integrity_check on the index, through a separate connection."""
    conn = sqlite3.connect(root / "index.sqlite")
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()
    return ";".join(str(row[0]) for row in rows)


def sql(root: Path, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run one statement on the index behind the store's back (to damage it)."""
    conn = sqlite3.connect(root / "index.sqlite", isolation_level=None)
    try:
        return list(conn.execute(statement, params).fetchall())
    finally:
        conn.close()
