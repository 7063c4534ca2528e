"""A request body's JSON, read as llama-server reads it, with its big strings left in place.

An image endpoint's body is read whole, because its JSON says where the images are; but
almost all of a body with an image is one huge string (the image's base64), which the proxy
only needs to decode, hash, or pass on as it came. `parse` hands the JSON parser a skeleton
instead: every string value of `min_span` bytes or more is replaced by a short placeholder
string, and stays in the body as a `Span`. So a 100 MB body is never held twice (once as bytes
and once as a parsed string), and never parsed or re-serialised character by character::

    body = parse(raw)                     # raw: bytes or bytearray, as read from the client
    tree = body.tree                      # dicts, lists and scalars; big strings are placeholders
    span = body.span(tree["messages"][0]["content"][1]["image_url"]["url"])
    ...                                   # span.head(): its first characters; span.view: its bytes
    payload = body.dumps()                # a `Segments`: the skeleton re-serialised, spans spliced

How the strings are found: in valid JSON every double quote that no backslash escapes opens or
closes a string, so the strings are the consecutive pairs of such quotes. The quotes are found
with numpy (memory speed, whatever their number) and their pairs measured; only pairs that are
long enough, and are values rather than object keys, become spans.

What the proxy cannot read, it refuses (400): forwarded unread, such a body would reach a
parser more lenient than ours, which would then fetch image URLs the proxy never saw. Two ways
around the SSRF guard worked like that: a UTF-8 byte order mark, and nesting deeper than
orjson's 1024 levels (llama-server's nlohmann::json skips the one and has no limit on the
other). The skeleton is parsed by the standard library's parser: it reads more than nlohmann
does (NaN, huge numbers), never less, except nesting deeper than the interpreter's recursion
limit (refused here).

What this does not check, and why that is safe: a span's bytes are passed on unparsed, so a
span holding an invalid escape, a control character or bad UTF-8 is not refused here; but such
a body is invalid JSON, and llama-server refuses it whole, so nothing in it (no image URL) can
be read differently by the two parsers. A span used as an image is decoded (and so checked)
by whoever reads it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Iterator
from typing import Any

from proxy.errors import ClientError

MIN_SPAN = 64 * 1024
_QUOTE, _BACKSLASH = 0x22, 0x5C
_WHITESPACE = b" \t\n\r"
_SCAN_WINDOW = 1 << 22  # numpy temporaries stay this small, whatever the body's size
_JSON = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")


@dataclasses.dataclass(frozen=True)
class Span:
    """One string value left in the raw body: the bytes between its quotes, escapes and all."""

    view: memoryview
    escaped: bool  # holds a backslash: its value is not its bytes

    def __len__(self) -> int:
        return self.view.nbytes

    def head(self, n: int = 512) -> str:
        """The first characters of the value, enough to tell a data URI or URL apart."""
        raw = bytes(self.view[:n])
        if not self.escaped:
            return raw.decode("utf-8", errors="replace")
        try:
            return _string(raw, errors="replace")
        except ValueError:  # cut inside an escape: end before the last run of backslashes
            cut = raw.rfind(b"\\")
            while cut > 0 and raw[cut - 1] == _BACKSLASH:
                cut -= 1
            return _string(raw[:cut], errors="replace")

    def text(self) -> str:
        """The whole value as a str (a copy as large as the span: only for what needs it)."""
        if not self.escaped:
            return bytes(self.view).decode("utf-8")
        return _string(bytes(self.view))


def _string(content: bytes, errors: str = "strict") -> str:
    """The value of a JSON string whose text between the quotes is `content`."""
    value = json.loads('"' + content.decode("utf-8", errors) + '"')
    assert isinstance(value, str)
    return value


@dataclasses.dataclass
class Segments:
    """A body to send as it is: byte strings and views, in order, and their total length."""

    parts: list[bytes | memoryview]

    def __len__(self) -> int:
        return sum(memoryview(p).nbytes for p in self.parts)

    def chunks(self, size: int = 256 * 1024) -> Iterator[memoryview]:
        """The body in pieces of at most `size` bytes, without copying it."""
        for part in self.parts:
            view = memoryview(part)
            for start in range(0, view.nbytes, size):
                yield view[start : start + size]

    def join(self) -> bytes:
        return b"".join(self.parts)


class JsonBody:
    """A parsed body whose big strings stay in the raw bytes (see the module docstring)."""

    def __init__(self, tree: Any, spans: dict[str, Span], nonce: str) -> None:
        self.tree = tree
        self._spans = spans
        self._nonce = nonce

    @classmethod
    def of(cls, tree: Any) -> JsonBody:
        """A body built here rather than read (the proxy's own requests): no spans yet."""
        return cls(tree, {}, secrets.token_hex(8))

    def span(self, value: object) -> Span | None:
        """The span a value of the tree stands for; None for any other value."""
        if isinstance(value, str) and value.startswith("\0") and value[1:17] == self._nonce:
            return self._spans.get(value)
        return None

    def insert(self, raw: bytes) -> str:
        """A new string value whose JSON text is `raw` (which needs no escaping: base64, a data
        URI), to put in the tree; written out as it is, never re-serialised."""
        placeholder = f"\0{self._nonce}:{len(self._spans)}"
        self._spans[placeholder] = Span(memoryview(raw), escaped=False)
        return placeholder

    def dumps(self) -> Segments:
        """The tree as JSON again, each span's bytes spliced back in place of its placeholder.

        Written by the standard library, like the parse: orjson refuses integers past 64 bits
        and writes NaN as null, and the parser reads both; a body it can read, the proxy can
        write back as the client meant it (non-ASCII escaped, which keeps lone surrogates
        writable)."""
        text = json.dumps(self.tree, separators=(",", ":"), allow_nan=True)
        marker = '"\\u0000' + self._nonce + ":"
        pieces = text.split(marker)
        parts: list[bytes | memoryview] = [pieces[0].encode()]
        for piece in pieces[1:]:
            index, _, rest = piece.partition('"')
            parts += [b'"', self._spans[f"\0{self._nonce}:{index}"].view, b'"' + rest.encode()]
        return Segments(parts)


def parse(raw: bytes | bytearray, *, min_span: int = MIN_SPAN) -> JsonBody:
    """The body's JSON, its string values of `min_span` bytes or more left as spans.

    Raises ClientError (400) for a body that is not one JSON value (a UTF-8 byte order mark
    before it is skipped, as llama-server does), or that is not UTF-8 outside its spans."""
    nonce = secrets.token_hex(8)
    strings = _long_strings(raw, min_span) if len(raw) >= min_span else []
    view = memoryview(raw)
    skeleton: list[bytes | memoryview] = []
    spans: dict[str, Span] = {}
    done = 0
    for start, end in strings:  # the content of each string is raw[start:end]
        placeholder = f"\0{nonce}:{len(spans)}"
        spans[placeholder] = Span(view[start:end], raw.find(b"\\", start, end) >= 0)
        skeleton += [view[done : start - 1], f'"\\u0000{nonce}:{len(spans) - 1}"'.encode()]
        done = end + 1
    skeleton.append(view[done:])
    return JsonBody(_parse_text(_text(b"".join(skeleton))), spans, nonce)


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ClientError(f"request body is not UTF-8 text: {e.reason} at byte {e.start}") from e


def _parse_text(text: str) -> Any:
    start = 1 if text.startswith("\ufeff") else 0  # nlohmann skips a BOM: so do we
    try:
        value, end = _JSON.raw_decode(text, _WS.match(text, start).end())  # type: ignore[union-attr]
    except (ValueError, RecursionError) as e:
        raise ClientError(f"request body is not valid JSON: {e}") from e
    if _WS.match(text, end).end() != len(text):  # type: ignore[union-attr]
        raise ClientError("request body has more after its JSON value")
    return value


def _long_strings(raw: bytes | bytearray, min_span: int) -> list[tuple[int, int]]:
    """(start, end) of the content of every string value of `min_span` bytes or more.

    Empty when the quotes do not pair up (not valid JSON): the whole body is then parsed as
    it is, and the parser says what is wrong with it."""
    import numpy as np

    quotes = _unescaped_quotes(raw)
    if len(quotes) % 2:
        return []
    opens, closes = quotes[0::2], quotes[1::2]
    long = np.flatnonzero(closes - opens - 1 >= min_span)
    found = []
    for i in long.tolist():
        start, end = int(opens[i]) + 1, int(closes[i])
        if not _is_key(raw, end + 1):
            found.append((start, end))
    return found


def _unescaped_quotes(raw: bytes | bytearray) -> Any:
    """Positions of the double quotes no backslash escapes, in order (a numpy array)."""
    import numpy as np

    data = np.frombuffer(raw, np.uint8)
    pieces = [
        np.flatnonzero(data[i : i + _SCAN_WINDOW] == _QUOTE) + i
        for i in range(0, len(data), _SCAN_WINDOW)
    ]
    quotes = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    after_backslash = quotes[(quotes > 0) & (data[np.maximum(quotes - 1, 0)] == _BACKSLASH)]
    if not len(after_backslash):
        return quotes
    # a quote after a run of backslashes is escaped when the run is odd (rare: a loop is fine)
    escaped = [q for q in after_backslash.tolist() if _run_before(raw, q) % 2]
    return np.setdiff1d(quotes, np.asarray(escaped, np.int64), assume_unique=True)


def _run_before(raw: bytes | bytearray, pos: int) -> int:
    n = 0
    while pos - n - 1 >= 0 and raw[pos - n - 1] == _BACKSLASH:
        n += 1
    return n


def _is_key(raw: bytes | bytearray, pos: int) -> bool:
    """Whether the string that ends just before `pos` is an object key (a ':' follows)."""
    while pos < len(raw) and raw[pos] in _WHITESPACE:
        pos += 1
    return pos < len(raw) and raw[pos] == ord(":")
