"""Request bodies, read under the size limit and the body budget (their JSON is read by
`proxy.images.json_body`).

The limit holds while the body streams in (a chunked body is caught too), and every byte held
counts against the proxy's body budget (`proxy.web.budget`) until the response is over.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from proxy.errors import BodyTooLarge, ClientError
from proxy.web.budget import Reservation

CHUNK = 64 * 1024


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
