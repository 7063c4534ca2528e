"""What the store hands out: an entry with zero-copy payload, and file references."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vision_cache.keys import CacheKey


def expired(pinned: bool, expires_at: float | None, now: float) -> bool:
    """The one expiry rule (the index's SQL for expired rows says the same): a pinned entry
    never expires, one without an expiry time neither, any other at its expiry time."""
    return not pinned and expires_at is not None and expires_at <= now


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """Where a payload lives, for a reader that maps the file itself.

    `segment` is a bare file name inside DIR/segments (built from an integer),
    `offset` is a multiple of 4096, and `checksum` is XXH3-64 of the payload
    as 16 lowercase hex digits (what `xxhash.xxh3_64_hexdigest` returns and
    what C computes with XXH3_64bits).
    """

    segment: str
    offset: int
    length: int
    checksum: str


@dataclass(frozen=True, slots=True, eq=False)
class Entry:
    """A stored visual package.

    `payload` is a read-only memoryview over a private mmap of exactly the
    payload's bytes; the mapping (and one file descriptor) lives as long as
    any reference to the view, and stays valid even after compaction or
    eviction unlinks the segment file.
    """

    key: CacheKey
    meta: bytes
    payload: memoryview
    ref: SegmentRef
    pinned: bool
    created_at: float
    expires_at: float | None
    entry_id: int  # the index row id, for diagnostics

    @property
    def nbytes(self) -> int:
        return self.ref.length

    def array(self, dtype: npt.DTypeLike = np.float32) -> npt.NDArray[np.generic]:
        """A read-only numpy view of the payload, no copy."""
        return np.frombuffer(self.payload, dtype=dtype)

    def expired(self, now: float) -> bool:
        return expired(self.pinned, self.expires_at, now)


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """An index row without its payload, for listing."""

    key: CacheKey
    ref: SegmentRef
    meta_bytes: int
    pinned: bool
    created_at: float
    last_access: float
    expires_at: float | None
