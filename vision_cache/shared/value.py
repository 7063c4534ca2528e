"""How a package is laid out in the shared tier: one value per package, checksummed.

    value = encode_value(meta, payload)
    meta, payload = decode_value(value)       # raises SharedEntryCorruptError

A value is a fixed 44-byte header (little-endian), the meta, then the payload:

    4  magic b"VCS1" (the layout version)     8  payload length
    2  package format version                 8  XXH3-64 of the meta
    2  reserved (0)                           8  XXH3-64 of the payload
    4  meta length                            8  random nonce of this write

The key a value is stored under names the layout and the namespace the format, so anything
that does not parse, add up or match its checksums is damage. The nonce is not checked: it makes
two writes of the same package tell apart, so a damaged value can be deleted only if it is still
the one that was read.
"""

from __future__ import annotations

import dataclasses
import secrets
import struct

import xxhash

from vision_cache.errors import SharedEntryCorruptError
from vision_cache.package import FORMAT_VERSION

_HEADER = struct.Struct("<4sHHIQQQ8s")
HEADER_SIZE = _HEADER.size
MAGIC = b"VCS1"


@dataclasses.dataclass(frozen=True, slots=True)
class ValueHeader:
    """The fixed-size header that starts every value (little-endian)."""

    meta_len: int
    payload_len: int
    meta_xxh3: int
    payload_xxh3: int
    nonce: bytes
    format_version: int = FORMAT_VERSION

    @property
    def total(self) -> int:
        return HEADER_SIZE + self.meta_len + self.payload_len

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            self.format_version,
            0,
            self.meta_len,
            self.payload_len,
            self.meta_xxh3,
            self.payload_xxh3,
            self.nonce,
        )

    @classmethod
    def parse(cls, head: bytes, size: int) -> ValueHeader:
        """The header of a value of `size` bytes that starts with `head`."""
        if len(head) < HEADER_SIZE:
            raise SharedEntryCorruptError(f"value of {size} bytes is shorter than its header")
        magic, fmt, _, meta_len, payload_len, meta_h, payload_h, nonce = _HEADER.unpack_from(head)
        if magic != MAGIC or fmt != FORMAT_VERSION:
            # the key names the layout and the namespace the format: anything else is damage
            raise SharedEntryCorruptError(f"bad magic {magic!r} or format version {fmt}")
        header = cls(meta_len, payload_len, meta_h, payload_h, nonce, fmt)
        if header.total != size:
            raise SharedEntryCorruptError(f"header says {header.total} bytes, value has {size}")
        return header

    def split(self, value: bytes) -> tuple[bytes, memoryview]:
        """Meta and payload of the whole value, checksums verified."""
        view = memoryview(value)
        meta = view[HEADER_SIZE : HEADER_SIZE + self.meta_len]
        payload = view[HEADER_SIZE + self.meta_len :]
        if xxhash.xxh3_64_intdigest(meta) != self.meta_xxh3:
            raise SharedEntryCorruptError("meta checksum mismatch")
        if xxhash.xxh3_64_intdigest(payload) != self.payload_xxh3:
            raise SharedEntryCorruptError("payload checksum mismatch")
        return bytes(meta), payload


def encode_value(meta: bytes, payload: bytes | memoryview, nonce: bytes | None = None) -> bytes:
    """One value: header, meta, payload."""
    header = ValueHeader(
        len(meta),
        memoryview(payload).nbytes,
        xxhash.xxh3_64_intdigest(meta),
        xxhash.xxh3_64_intdigest(payload),
        nonce or secrets.token_bytes(8),
    )
    return b"".join((header.pack(), meta, payload))


def decode_value(value: bytes) -> tuple[bytes, memoryview]:
    """Inverse of `encode_value`; raises SharedEntryCorruptError."""
    return ValueHeader.parse(value, len(value)).split(value)
