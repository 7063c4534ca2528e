"""Request bodies, read under the size limit and the body budget, and JSON parsed as
llama-server parses it.

The limit holds while the body streams in (a chunked body is caught too), and every byte held
counts against the proxy's body budget (`proxy.web.budget`) until the response is over.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from proxy.errors import BodyTooLarge, ClientError
from proxy.web.budget import Reservation

CHUNK = 64 * 1024
_JSON = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, and nothing else


def check_declared_length(request: web.Request, limit: int) -> int | None:
    """The Content-Length, refused with 413 before a byte is read if it is over `limit`."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"request body of {declared} bytes is over the {limit}-byte limit")
    return declared


async def read_body(request: web.Request, limit: int, held: Reservation) -> bytearray:
    """The whole request body, refused with 413 as soon as it passes `limit` (chunked too).

    Its bytes are taken from the proxy's body budget through `held`: all at once when the
    length is declared, chunk by chunk when it is not. With a length, the buffer is made at
    its final size and filled in place: a 100 MB body is never copied while it is read."""
    declared = check_declared_length(request, limit)
    if declared is not None:
        await held.take(declared)
        return await _read_declared(request, declared)
    body = bytearray()
    async with held.streaming():
        async for chunk in request.content.iter_chunked(CHUNK):
            body.extend(chunk)
            if len(body) > limit:
                raise BodyTooLarge(f"request body is over the {limit}-byte limit")
            await held.take(len(chunk))
    return body


async def _read_declared(request: web.Request, declared: int) -> bytearray:
    # one buffer of the final size, filled in place: a growing one is copied as it grows
    body = bytearray(declared)
    filled = 0
    with memoryview(body) as view:
        async for chunk in request.content.iter_chunked(CHUNK):
            if filled + len(chunk) > declared:  # aiohttp stops at Content-Length: cannot be
                raise BodyTooLarge("request body is longer than its Content-Length")
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
    if filled != declared:
        raise ClientError(f"request body ended after {filled} of its {declared} bytes")
    return body


async def stream_body(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives, for endpoints the proxy does not read."""
    seen = 0
    async for chunk in request.content.iter_chunked(CHUNK):
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLarge(f"request body is over the {limit}-byte limit")
        yield chunk


def decode_body(raw: bytearray) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ClientError(f"request body is not UTF-8 text: {e.reason} at byte {e.start}") from e


def dump_body(body: Any) -> bytes:
    """A parsed body, rewritten, as JSON again: by the standard library, like the parse.

    orjson refuses integers past 64 bits and writes NaN as null, and the parser reads both:
    a body it can read, the proxy can write back as the client meant it (non-ASCII escaped,
    which keeps lone surrogates writable)."""
    return json.dumps(body, separators=(",", ":"), allow_nan=True).encode()


def parse_body(text: str) -> Any:
    """The body as llama-server reads it, or a 400: what the proxy cannot read, it refuses.

    Forwarded unread, such a body would reach a parser more lenient than ours, which would
    then fetch image URLs the proxy never saw. Two ways around the SSRF guard worked like
    that: a UTF-8 byte order mark, and nesting deeper than orjson's 1024 levels (llama-server's
    nlohmann::json skips the one and has no limit on the other). The standard library's
    parser is used: it reads more than nlohmann does (NaN, huge numbers), never less, except
    nesting deeper than the interpreter's recursion limit (refused here); and it costs one
    copy of a huge string where orjson's costs two.
    """
    start = 1 if text.startswith("\ufeff") else 0  # nlohmann skips a BOM: so do we
    try:
        body, end = _JSON.raw_decode(text, _skip_whitespace(text, start))
    except (ValueError, RecursionError) as e:
        raise ClientError(f"request body is not valid JSON: {e}") from e
    if _skip_whitespace(text, end) != len(text):
        raise ClientError("request body has more after its JSON value")
    return body


def _skip_whitespace(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()
