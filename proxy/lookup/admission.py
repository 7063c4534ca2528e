"""Admission: which packages are worth keeping, by what their encode cost against what a hit costs.

A hit is not free: the package travels to upstream (by file reference, which upstream maps and
checksums, or inline, base64 in the JSON that upstream parses and decodes) and upstream checks
its chunk layout. Where the encoder is fast (a small vision tower on a GPU), encoding again can
cost less than that, and a cache that kept the package would make the request slower. So a
package is admitted only when its measured encode time is at least what a hit of its size costs
by the transport in use (`HitCost`), or at least an operator's fixed threshold::

    admission = Admission()                       # break-even by size and transport
    admission.admits(encode_ms=40.0, nbytes=2_621_440, by_file=False)
    Admission(min_encode_ms=0.0)                  # keep everything
    Admission(min_encode_ms=50.0)                 # keep what took 50 ms or more to encode

An encode time of 0 means the encoder did not say (an older server): such packages are kept.
Images not admitted are remembered (`Declined`), so their next requests go upstream raw
without asking for an export again.
"""

from __future__ import annotations

import collections
import dataclasses

MB = 1_000_000


@dataclasses.dataclass(frozen=True)
class HitCost:
    """What a hit adds to a request beyond the prompt itself, for a package of `nbytes`."""

    fixed_ms: float
    ms_per_mb: float

    def ms(self, nbytes: int) -> float:
        return self.fixed_ms + self.ms_per_mb * nbytes / MB


# What a hit adds to the time to first token over the same prompt without the image, by package
# size. Estimates from the costs of the steps involved on 2 CPU cores, not yet a benchmark of
# their own: inline, the package's base64 written into the request, parsed and decoded by
# upstream; by file, upstream maps the payload and checksums it. They matter only where encodes
# take milliseconds (small towers on a GPU); --admit-min-encode-ms overrides them.
INLINE = HitCost(fixed_ms=0.5, ms_per_mb=2.5)
BY_FILE = HitCost(fixed_ms=0.3, ms_per_mb=0.3)


@dataclasses.dataclass(frozen=True)
class Admission:
    """Which packages the store takes. `min_encode_ms` None: a package is kept when its
    encode took at least what a hit of its size costs (`HitCost`); else that fixed time."""

    min_encode_ms: float | None = None

    def threshold_ms(self, nbytes: int, by_file: bool) -> float:
        if self.min_encode_ms is not None:
            return self.min_encode_ms
        return (BY_FILE if by_file else INLINE).ms(nbytes)

    def admits(self, encode_ms: float, nbytes: int, by_file: bool) -> bool:
        if encode_ms <= 0.0:
            return True  # not measured: an encoder that does not report its time
        return encode_ms >= self.threshold_ms(nbytes, by_file)


class Declined:
    """Keys of images not admitted lately (bounded, least recently declined forgotten first)."""

    def __init__(self, size: int = 4096) -> None:
        self._keys: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._size = size

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self._size:
            self._keys.popitem(last=False)
