"""The bytes of one image the proxy holds: its SHA-256, its media type, and the bytes themselves
only when someone needs them.

Most images arrive inline, as a data URI or bare base64 inside the request's JSON, and the
proxy needs three things from them: the SHA-256 of the decoded bytes (the cache key), their
first bytes (the header check, `proxy.images.inspection`), and, on a miss only, the bytes.
`read_inline` decodes the base64 in pieces where it lies in the body, hashing as it goes and
keeping only the first piece: the image is never held decoded beside the body that carries it,
and no step holds the interpreter for long (pybase64 decodes 4 MiB in well under a millisecond,
hashlib lets go of the GIL while it hashes), so it runs on a worker thread while the event loop
serves everyone else::

    image = read_reference(slot.span or slot.ref, max_bytes)  # MediaError, MediaTooLarge
    key = namespace.key(image.digest)
    ...                                                       # image.data() on a miss

Images the proxy fetched itself (URLs, files) are bytes already: `ImageBytes.of(data, mime)`.

Where the media loader and llama-server differ on data URIs and base64, see
`proxy.images.media`: strict base64 (padding required, no whitespace or URL-safe letters),
``data:``, the media type and ``;base64`` matched case-insensitively, image types only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import pybase64

from proxy.errors import MediaError, MediaTooLarge, shorten
from proxy.images.json_body import Span

PIECE = 4 * 1024 * 1024  # base64 characters per decoded piece: a multiple of 4
HEAD = 3 * 1024 * 1024  # decoded bytes kept for the header check (one piece)
HEADER_MAX = 512  # longest data URI header read ("data:image/png;base64,")
MEDIA_TYPE = re.compile(  # type/subtype, as a data URI or Content-Type names it
    r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*"
)


@dataclasses.dataclass(frozen=True)
class ImageBytes:
    """One image: its SHA-256, media type, first bytes, and its bytes or base64 text."""

    digest: str
    mime: str | None
    size: int
    head: bytes = dataclasses.field(repr=False)
    _data: bytes | None = dataclasses.field(default=None, repr=False)
    _base64: memoryview | bytes | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def of(cls, data: bytes, mime: str | None) -> ImageBytes:
        """An image held as bytes (hashing megabytes: call it off the event loop)."""
        return cls(hashlib.sha256(data).hexdigest(), mime, len(data), data[:HEAD], data)

    def data(self) -> bytes:
        """The image's bytes; decoded now if they came inline (their base64 is known valid)."""
        if self._data is not None:
            return self._data
        assert self._base64 is not None
        return pybase64.b64decode(self._base64)

    def base64(self) -> bytes | memoryview:
        """The image as base64 text, as it came where it came inline."""
        if self._base64 is not None:
            return self._base64
        assert self._data is not None
        return pybase64.b64encode(self._data)

    def complete(self) -> bool:
        """Whether `head` is the whole image."""
        return len(self.head) == self.size


def read_reference(ref: Span | str, max_bytes: int) -> ImageBytes:
    """The image written inline in a client's reference: a data URI, or bare base64.

    Raises MediaTooLarge past `max_bytes` decoded, MediaError for a data URI that is not an
    image in base64 or base64 that is not strict."""
    if isinstance(ref, Span) and ref.escaped:
        ref = ref.text()  # a JSON escape in an image's text is legal and rare: read it whole
    # latin-1: one character per byte, so positions in the head are positions in the bytes
    head = (
        ref[:HEADER_MAX] if isinstance(ref, str) else bytes(ref.view[:HEADER_MAX]).decode("latin-1")
    )
    if head[:5].lower() != "data:":
        return read_inline(ref, None, max_bytes)
    comma = head.find(",")
    if comma < 0:
        raise MediaError(f"{shorten(head)}: a data URI needs a ',' before its data")
    mime = data_uri_mime(head[:comma])
    payload = ref[comma + 1 :] if isinstance(ref, str) else Span(ref.view[comma + 1 :], False)
    return read_inline(payload, mime, max_bytes)


def data_uri_mime(header: str) -> str:
    """The image media type of a data URI's header (what comes before its comma)."""
    shown = shorten(header)  # the header only: never echo the payload
    mime, *params = header[len("data:") :].split(";")
    mime = mime.strip().lower()
    if not params or params[-1].strip().lower() != "base64":
        raise MediaError(f"{shown}: only base64 data URIs are accepted")
    if not MEDIA_TYPE.fullmatch(mime):
        raise MediaError(f"{shown}: the data URI has no valid media type")
    if not mime.startswith(("image/", "audio/")):
        raise MediaError(f"{shown}: media type {mime!r} is not an image or audio")
    return mime


def read_inline(text: Span | str, mime: str | None, max_bytes: int) -> ImageBytes:
    """The image whose base64 is `text` (the part of a data URI after its comma, or bare
    base64). Raises MediaTooLarge past `max_bytes` decoded, MediaError for anything that is
    not strict base64 (padding required, no whitespace), like the media loader's decoder."""
    encoded = _encoded(text)
    n = len(encoded)
    if not n:
        raise MediaError("empty base64 image data")
    if n // 4 * 3 - 2 > max_bytes:  # four characters carry three bytes: refuse before decoding
        raise MediaTooLarge(f"base64 image data is over the {max_bytes}-byte cap")
    if n % 4:
        raise MediaError(
            "image data is not valid base64: Incorrect padding (its length is not a multiple of 4)"
        )
    hasher = hashlib.sha256()
    head, size = b"", 0
    for start in range(0, n, PIECE):
        piece = _decode(encoded[start : start + PIECE])
        hasher.update(piece)  # releases the GIL for anything this large
        head = head or piece
        size += len(piece)
    if size > max_bytes:
        raise MediaTooLarge(f"base64 image data is over the {max_bytes}-byte cap")
    return ImageBytes(hasher.hexdigest(), mime, size, head, None, encoded)


def _encoded(text: Span | str) -> memoryview | bytes:
    if isinstance(text, str):
        try:
            return text.encode("ascii")
        except UnicodeEncodeError as e:
            raise MediaError(f"image data is not valid base64: {e.reason}") from e
    if text.escaped:
        # a JSON escape (\/, \u0041) in base64 is legal and rare: read the value whole
        return _encoded(text.text())
    return text.view


def _decode(piece: memoryview | bytes) -> bytes:
    try:
        return pybase64.b64decode(piece, validate=True)
    except ValueError as e:  # binascii.Error is a ValueError
        raise MediaError(f"image data is not valid base64: {e}") from e
