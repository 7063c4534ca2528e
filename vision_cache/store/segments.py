"""Append-only segment files and zero-copy payload mapping.

A segment is a 4096-byte header (magic + segment id) followed by payloads,
each starting at a multiple of 4096 so that both Python's mmap and a C
reader can map a payload directly. A segment has exactly one writer: the
process that created it holds an exclusive flock on it while appending, and
compaction takes the same lock, so "locked" means "someone may still write
here" and "unlocked" means the file will never grow again.

Files are never truncated or rewritten once a payload is in them: a reader's
mmap of a truncated file faults with SIGBUS, which Python cannot catch.
Space comes back by copying live payloads elsewhere and unlinking the file,
which leaves existing mappings intact.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from vision_cache.errors import (
    PayloadCorruptError,
    PayloadMissingError,
    StoreError,
    write_error,
)
from vision_cache.store.layout import StoreLayout

ALIGNMENT = 4096
HEADER_SIZE = 4096
MAGIC = b"VCSEG001"
_HEADER = struct.Struct("<8sQ")
_CREATE_ATTEMPTS = 3


def align_up(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def header_bytes(segment_id: int) -> bytes:
    return _HEADER.pack(MAGIC, segment_id).ljust(HEADER_SIZE, b"\0")


def read_header(path: Path) -> int | None:
    """The segment id recorded in a file's header, or None if it has none."""
    try:
        with path.open("rb") as file:
            raw = file.read(_HEADER.size)
    except OSError:
        return None
    if len(raw) < _HEADER.size:
        return None
    magic, segment_id = _HEADER.unpack(raw)
    return int(segment_id) if magic == MAGIC else None


def try_lock(fd: int) -> bool:
    """Take the segment's exclusive flock without waiting."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def locked(path: Path) -> Iterator[bool]:
    """Hold a segment's flock for the block if it is free; yields whether it is."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield False
        return
    try:
        yield try_lock(fd)
    finally:
        os.close(fd)  # closing the descriptor drops the flock


def map_payload(path: Path, offset: int, length: int) -> mmap.mmap:
    """Map exactly one payload read-only; raises PayloadError subclasses."""
    if length <= 0 or offset < HEADER_SIZE or offset % ALIGNMENT:
        raise PayloadCorruptError(f"bad payload bounds {offset}+{length}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PayloadMissingError(f"{path.name} is gone") from None
    except OSError as exc:
        raise PayloadMissingError(f"{path.name}: {exc}") from None
    try:
        # Python refuses (ValueError) to map past the end of the file, so a
        # row pointing beyond EOF is caught here instead of faulting later.
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=offset)
    except ValueError as exc:
        raise PayloadCorruptError(f"{path.name} {offset}+{length}: {exc}") from None
    except OSError as exc:
        raise PayloadMissingError(f"{path.name}: {exc}") from None
    finally:
        os.close(fd)  # the mapping keeps its own reference to the file


def write_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite until every byte is written (pwrite may write less)."""
    while data:
        written = os.pwrite(fd, data, offset)
        if written <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        data = data[written:]
        offset += written


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentWriter:
    """One open segment file that this process alone appends to."""

    def __init__(self, segment_id: int, fd: int) -> None:
        self.segment_id = segment_id
        self.end = HEADER_SIZE
        self._fd = fd

    @classmethod
    def create(cls, layout: StoreLayout, segment_id: int, *, durable: bool) -> SegmentWriter:
        """Create, lock and stamp a new file; raises FileExistsError,
        BlockingIOError (someone else locked it first) or OSError."""
        path = layout.segment_path(segment_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            if not try_lock(fd):
                raise BlockingIOError(errno.EWOULDBLOCK, f"{path.name} is locked by another")
            write_all(fd, memoryview(header_bytes(segment_id)), 0)
            if durable:
                os.fdatasync(fd)
                fsync_dir(layout.segments_dir)  # make the new name itself durable
        except BaseException:
            os.close(fd)
            raise
        return cls(segment_id, fd)

    def append(self, payload: memoryview, *, durable: bool) -> int:
        """Write `payload` at the next aligned offset and return that offset."""
        offset = self.end
        # Advance first: after a failed write the region may hold partial
        # bytes, and it must never be handed out again.
        self.end = align_up(offset + len(payload))
        write_all(self._fd, payload, offset)
        if durable:
            os.fdatasync(self._fd)
        return offset

    def close(self) -> None:
        os.close(self._fd)


class Appender:
    """This Store's single active segment, rolled over at `segment_bytes`.

    The caller holds `lock` from `append` until the entry is indexed, so the
    segment cannot be sealed (and reclaimed as empty) in between.
    """

    def __init__(
        self,
        layout: StoreLayout,
        allocate: Callable[[], int],
        seal: Callable[[int], None],
        *,
        segment_bytes: int,
        durable: bool,
    ) -> None:
        self.lock = threading.RLock()
        self._layout = layout
        self._allocate = allocate
        self._seal = seal
        self._segment_bytes = segment_bytes
        self._durable = durable
        self._writer: SegmentWriter | None = None

    @property
    def active_segment(self) -> int | None:
        return None if self._writer is None else self._writer.segment_id

    def append(self, payload: memoryview) -> tuple[int, int]:
        """Returns (segment id, offset); raises WriteFailedError subclasses."""
        with self.lock:
            try:
                writer = self._writer_for(len(payload))
                return writer.segment_id, writer.append(payload, durable=self._durable)
            except OSError as exc:
                # Never append after a failure: the next put starts a fresh file.
                self.retire()
                raise write_error(exc) from exc

    def _writer_for(self, length: int) -> SegmentWriter:
        writer = self._writer
        if writer is not None and (
            writer.end == HEADER_SIZE or writer.end + length <= self._segment_bytes
        ):
            return writer
        self.retire()
        self._writer = self._create()
        return self._writer

    def _create(self) -> SegmentWriter:
        for _ in range(_CREATE_ATTEMPTS):
            segment_id = self._allocate()
            try:
                return SegmentWriter.create(self._layout, segment_id, durable=self._durable)
            except (FileExistsError, BlockingIOError):
                # A stray file from an older index, or a gc that beat us to
                # the lock: give the id up and take the next one.
                self._seal_quietly(segment_id)
            except OSError:
                self._seal_quietly(segment_id)
                raise
        raise OSError(errno.EEXIST, "could not create a fresh segment file")

    def retire(self) -> None:
        """Seal and release the active segment, if any."""
        with self.lock:
            writer, self._writer = self._writer, None
            if writer is None:
                return
            writer.close()
            self._seal_quietly(writer.segment_id)

    def _seal_quietly(self, segment_id: int) -> None:
        # If sealing fails, unlocked-and-unsealed reads as abandoned, which
        # gc seals later.
        with contextlib.suppress(StoreError):
            self._seal(segment_id)
