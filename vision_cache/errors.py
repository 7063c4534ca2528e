"""
The store's exception hierarchy:

* VisionCacheError
  x InvalidKeyError (also ValueError)
    - InvalidDigestError
    - InvalidNamespaceError
    - InvalidNameError
  x InvalidEntryError (also ValueError)
  x PackageError (also ValueError)
  x StoreError
    + StoreOpenError
      - StoreNotFoundError
      - SchemaVersionError
    + IndexUnavailableError
      - IndexBusyError
      - IndexCorruptError
    + PayloadError
      - PayloadMissingError
      - PayloadCorruptError
    + WriteFailedError
      - DiskFullError
      - BudgetExceededError
  x SharedTierError
    + SharedTierConfigError (also ValueError)
    + SharedTierUnavailableError
      - SharedTierTimeoutError
    + SharedTierRefusedError
    + SharedEntryCorruptError
  x WarmError (vision_cache.client.warmup: warm-up cannot start)
  x PackError (vision_cache.client.pack: a reference pack cannot be written or imported)
  x CompareError (vision_cache.client.compare: a comparison could not be made)
  x RubricError (also ValueError; vision_cache.judging: a rubric that cannot be judged)
  x VerdictError (also ValueError; vision_cache.judging: a judge's answer holds no verdict)
  x LlamaLibsError (vision_cache.llama.libs: llama.cpp's libraries cannot be loaded)
  x EncoderError (vision_cache.llama.mtmd: the vision encoder failed)
    - ImageRejected (the bytes are not an image it takes)
  x BuildError (vision_cache.llama.server_build: llama-server cannot be built; its tree there)

Classes marked with a module live beside the code that raises them, but join this tree.

sqlite3 and OSError failures are translated into these classes where they
happen (vision_cache.store.index, vision_cache.store.segments). `Store.get` and `Store.put`
never raise the StoreError branch: a failed read is a miss and a failed write
returns None, so the caller serves the request uncached.

redis-py's errors are translated into the SharedTierError branch in one place
(vision_cache.shared.tier); the shared tier's public calls never raise that
branch either, except SharedTierConfigError for a configuration that cannot work.
"""

from __future__ import annotations

import errno


class VisionCacheError(Exception):
    """Base class of every error raised by vision_cache."""


class InvalidKeyError(VisionCacheError, ValueError):
    """A key, or one of its parts, is malformed."""


class InvalidDigestError(InvalidKeyError):
    """A content digest or namespace id is not 64 lowercase hex digits."""


class InvalidNamespaceError(InvalidKeyError):
    """Namespace components are not canonical JSON-able data."""


class InvalidNameError(InvalidKeyError):
    """A reference name does not match the allowed character set."""


class InvalidEntryError(VisionCacheError, ValueError):
    """Meta, payload or TTL passed to `Store.put` are unusable."""


class PackageError(VisionCacheError, ValueError):
    """A visual package (wire form or stored header) is malformed."""


class StoreError(VisionCacheError):
    """The store could not do what was asked."""


class StoreOpenError(StoreError):
    """The store directory cannot be opened."""


class StoreNotFoundError(StoreOpenError):
    """No store exists at the path and creating one was not requested."""


class SchemaVersionError(StoreOpenError):
    """The index was written by a newer version of vision_cache."""


class IndexUnavailableError(StoreError):
    """The SQLite index cannot answer right now."""


class IndexBusyError(IndexUnavailableError):
    """Other processes held the index lock past the retry deadline."""


class IndexCorruptError(IndexUnavailableError):
    """SQLite reports the index file as damaged."""


class PayloadError(StoreError):
    """An entry's payload bytes cannot be served."""


class PayloadMissingError(PayloadError):
    """The segment file holding a payload is gone or unreadable."""


class PayloadCorruptError(PayloadError):
    """A payload's bytes do not match the index (checksum, bounds, header)."""


class WriteFailedError(StoreError):
    """A put could not be made durable."""


class DiskFullError(WriteFailedError):
    """The file system reported ENOSPC or EDQUOT."""


class BudgetExceededError(WriteFailedError):
    """The disk budget cannot fit the entry without evicting pinned entries."""


class SharedTierError(VisionCacheError):
    """The shared (fleet-wide) tier could not do what was asked."""


class SharedTierConfigError(SharedTierError, ValueError):
    """The shared tier's URL, prefix or limits are unusable."""


class SharedTierUnavailableError(SharedTierError):
    """Redis cannot be reached (refused, reset, auth failed) or the breaker is open."""


class SharedTierTimeoutError(SharedTierUnavailableError):
    """Redis did not answer in time."""


class SharedTierRefusedError(SharedTierError):
    """Redis answered with an error (out of memory under maxmemory, wrong type)."""


class SharedEntryCorruptError(SharedTierError):
    """A value in Redis does not decode or fails its checksum."""


def write_error(exc: OSError) -> WriteFailedError:
    """Translate an OSError raised while writing into the most specific class."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(str(exc))
    return WriteFailedError(str(exc))
