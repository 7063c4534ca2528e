"""Relaying one request to upstream and its response back, unchanged and unbuffered.

Hop-by-hop headers are dropped both ways (RFC 9110 section 7.6.1), everything else passes:
status, headers, and the body byte for byte, chunk by chunk as upstream sends it, which keeps
server-sent event streams live. A client that goes away cancels the handler (the app runs with
handler cancellation), which closes the upstream response and so cancels the generation there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import BodyTooLarge, ProxyError, UpstreamError, UpstreamTimeout

log = logging.getLogger("vcache.forwarding")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# recomputed by whoever frames the body next
FRAMING = frozenset({"content-length", "host"})
CHUNK = 64 * 1024


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("connection", "")
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def request_headers(incoming: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    drop = HOP_BY_HOP | FRAMING | _connection_tokens(incoming)
    return [(k, v) for k, v in incoming.items() if k.lower() not in drop]


def response_headers(upstream: httpx.Headers) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | _connection_tokens(upstream) | {"content-length"}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in upstream.multi_items():
        if k.lower() not in drop:
            out.add(k, v)
    return out


def error_response(err: ProxyError, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=err.status, body=orjson.dumps(err.body()),
                        content_type="application/json", headers=headers)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, refused with 413 as soon as it passes `limit` (chunked too)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"request body of {declared} bytes is over the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK):
        body.extend(chunk)
        if len(body) > limit:
            raise BodyTooLarge(f"request body is over the {limit}-byte limit")
    return bytes(body)


async def stream_body(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives, for endpoints the proxy does not read."""
    seen = 0
    async for chunk in request.content.iter_chunked(CHUNK):
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLarge(f"request body is over the {limit}-byte limit")
        yield chunk


def build_request(client: httpx.AsyncClient, request: web.Request, content: Any,
                  extra_headers: Mapping[str, str] | None = None) -> httpx.Request:
    headers = request_headers(request.headers)
    if extra_headers:
        headers.extend(extra_headers.items())
    # raw_path: the query string and its encoding exactly as the client wrote them
    return client.build_request(request.method, request.raw_path, headers=headers,
                                content=content)


async def open_upstream(client: httpx.AsyncClient, req: httpx.Request) -> httpx.Response:
    """Send and wait for the response headers; map transport failures to 502/504."""
    try:
        return await client.send(req, stream=True)
    except httpx.TimeoutException as e:
        raise UpstreamTimeout(f"upstream did not answer in time: {type(e).__name__}") from e
    except httpx.HTTPError as e:
        raise UpstreamError(f"upstream is unreachable: {type(e).__name__}: {e}") from e


async def relay(request: web.Request, upstream: httpx.Response,
                extra_headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """Copy upstream's response to the client as it arrives; closes `upstream`."""
    try:
        resp = web.StreamResponse(status=upstream.status_code, reason=upstream.reason_phrase)
        resp.headers.update(response_headers(upstream.headers))
        if extra_headers:
            resp.headers.update(extra_headers)
        length = upstream.headers.get("content-length")
        if length is not None and "transfer-encoding" not in upstream.headers:
            resp.content_length = int(length)
        await resp.prepare(request)
        if _has_body(request.method, upstream.status_code):
            await _copy_body(resp, upstream)
        await resp.write_eof()
        return resp
    finally:
        await close_upstream(upstream)


async def close_upstream(upstream: httpx.Response) -> None:
    """Close upstream's response, and so its connection, even inside a cancelled task.

    A client that disconnects cancels the handler; the close must still reach the socket, or
    llama-server goes on generating into a connection nobody reads. A second cancellation
    (aiohttp may deliver one) must not interrupt it, hence the shield.
    """
    await asyncio.shield(upstream.aclose())


def _has_body(method: str, status: int) -> bool:
    return method != "HEAD" and status not in (204, 304) and not 100 <= status < 200


async def _copy_body(resp: web.StreamResponse, upstream: httpx.Response) -> None:
    try:
        async for chunk in upstream.aiter_raw():
            await resp.write(chunk)
    except httpx.HTTPError as e:
        # headers are gone: all that is left is to say so in the stream, or to cut it
        log.warning("upstream broke off mid-response: %s: %s", type(e).__name__, e)
        if "text/event-stream" in upstream.headers.get("content-type", ""):
            err = UpstreamError(f"upstream broke off mid-stream: {type(e).__name__}")
            await resp.write(b"data: " + orjson.dumps(err.body()) + b"\n\n")
        else:
            raise ConnectionResetError("upstream broke off mid-response") from e
