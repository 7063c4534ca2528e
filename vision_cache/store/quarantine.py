"""Where bad data goes: copies of corrupt payloads, records of bad rows and
damaged index files, kept for diagnosis and pruned to a byte cap.

Quarantining is best effort and never raises: the caller has already
decided the entry is a miss, and a full disk must not turn that into an
error.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vision_cache.store.index import IndexRow
from vision_cache.store.layout import StoreLayout

log = logging.getLogger(__name__)

DEFAULT_QUARANTINE_BYTES = 256 * 1024 * 1024
INDEX_FILES = ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm")


class Reason(enum.StrEnum):
    CHECKSUM = "checksum"
    MISSING = "missing"
    BOUNDS = "bounds"
    ROW = "row"
    INDEX = "index"


@dataclass(frozen=True, slots=True)
class QuarantineUsage:
    files: int
    bytes: int


class Quarantine:
    def __init__(self, layout: StoreLayout, max_bytes: int = DEFAULT_QUARANTINE_BYTES) -> None:
        self._dir = layout.quarantine_dir
        self._layout = layout
        self._max_bytes = max_bytes

    def record(
        self,
        reason: Reason,
        entry_id: int | None,
        row: IndexRow | None,
        payload: memoryview | None = None,
        detail: str = "",
    ) -> None:
        """Write a JSON record (and the payload bytes, if any) for one entry."""
        # File names are built from a clock, an integer id and an enum value
        # only: nothing from a key or a client reaches the path.
        stem = f"{time.time_ns():020d}-{entry_id or 0:d}-{reason.value}"
        record = {
            "reason": reason.value,
            "entry_id": entry_id,
            "detail": detail,
            "row": _describe(row),
        }
        try:
            if payload is not None:
                self._write(f"{stem}.bin", payload)
            self._write(f"{stem}.json", memoryview(json.dumps(record, indent=1).encode()))
        except OSError as exc:
            log.warning("could not quarantine entry %s (%s): %s", entry_id, reason, exc)

    def _write(self, name: str, data: memoryview) -> None:
        # Write under a temporary name, then rename, so a crash never leaves
        # a half-written file under a final name.
        tmp = self._dir / f".{name}.tmp"
        with tmp.open("wb") as file:
            file.write(data)
        os.replace(tmp, self._dir / name)

    def take_index(self) -> Path | None:
        """Move the index files aside (called with the open lock held)."""
        target = self._dir / f"index-{time.time_ns():020d}"
        try:
            target.mkdir(parents=True)
            for name in INDEX_FILES:
                source = self._layout.root / name
                if source.exists():
                    os.replace(source, target / name)
        except OSError as exc:
            log.error("could not move the damaged index aside: %s", exc)
            return None
        return target

    def usage(self) -> QuarantineUsage:
        files = self._files()
        return QuarantineUsage(len(files), sum(size for _, size in files))

    def prune(self) -> int:
        """Delete the oldest records beyond the byte cap; returns bytes freed."""
        files = self._files()
        excess = sum(size for _, size in files) - self._max_bytes
        freed = 0
        for path, size in sorted(files):
            if freed >= excess:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                freed += size
        return freed

    def _files(self) -> list[tuple[Path, int]]:
        try:
            paths = [p for p in self._dir.rglob("*") if p.is_file()]
            return [(p, p.stat().st_size) for p in paths]
        except OSError:
            return []


def _describe(row: IndexRow | None) -> dict[str, object] | None:
    if row is None:
        return None
    described = asdict(row)
    described["key"] = row.key.text
    described["meta"] = row.meta[:4096].hex()
    return described
