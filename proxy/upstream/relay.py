"""Relaying one request to upstream and its response back, unchanged and unbuffered.

Hop-by-hop headers are dropped both ways (RFC 9110 section 7.6.1), everything else passes:
status, headers, and the body byte for byte, chunk by chunk as upstream sends it, which keeps
server-sent event streams live. A client that goes away cancels the handler (the app runs with
handler cancellation), which closes the upstream response and so cancels the generation there.

When upstream fails after the response headers are out, no error answer can follow them:
an event stream ends with an error event (after the last complete event: a half-sent one is
dropped, so every event the client parses is whole), anything else is cut short, so the client
sees a response shorter than announced (never one that looks complete). The middleware in
proxy.web.app cuts the connection for any other failure past that point (`RESPONSE_STARTED`).
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

from proxy.errors import ProxyError, UpstreamError, UpstreamTimeout

log = logging.getLogger("vcache.forwarding")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# recomputed by whoever frames the body next
FRAMING = frozenset({"content-length", "host"})
# the proxy's own key stays with the proxy: upstream is not the proxy's to authenticate to;
# and only the proxy asks upstream to write packages into the directory it shares with the store
PROXY_ONLY = frozenset({"x-vcache-key", "x-image-embedding-export"})
CHUNK = 64 * 1024
# the response whose headers the handler has sent, for the middleware in proxy.web.app
RESPONSE_STARTED: web.RequestKey[web.StreamResponse] = web.RequestKey(
    "vcache_response_started", web.StreamResponse
)
# an event held back this long without its end is passed on as it is
MAX_HELD_EVENT = 1024 * 1024


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("connection", "")
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def request_headers(incoming: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    drop = HOP_BY_HOP | FRAMING | PROXY_ONLY | _connection_tokens(incoming)
    return [(k, v) for k, v in incoming.items() if k.lower() not in drop]


def response_headers(upstream: httpx.Headers) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | _connection_tokens(upstream) | {"content-length"}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in upstream.multi_items():
        if k.lower() not in drop:
            out.add(k, v)
    return out


def error_response(err: ProxyError, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=err.status,
        body=orjson.dumps(err.body()),
        content_type="application/json",
        headers=headers,
    )


def build_request(
    client: httpx.AsyncClient,
    request: web.Request,
    content: Any,
    extra_headers: Mapping[str, str] | None = None,
    idle_s: float | None = None,
) -> httpx.Request:
    """The request for upstream; `idle_s` bounds each wait for upstream (None: no bound).

    httpx applies the read timeout to every read, so `idle_s` is the longest silence before
    the headers and between two chunks of the body, not a limit on the whole response."""
    headers = request_headers(request.headers)
    if extra_headers:
        headers.extend(extra_headers.items())
    if isinstance(content, bytes) and len(content) > CHUNK:
        # in slices, its length declared (so httpx does not chunk it): handed over whole, a
        # 100 MB body is copied twice more on its way out (h11 joins what it sends, asyncio
        # buffers what the socket does not take at once)
        headers.append(("Content-Length", str(len(content))))
        content = _slices(content)
    timeout = httpx.Timeout(idle_s, connect=client.timeout.connect)
    # raw_path: the query string and its encoding exactly as the client wrote them
    return client.build_request(
        request.method, request.raw_path, headers=headers, content=content, timeout=timeout
    )


async def _slices(data: bytes) -> AsyncIterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        yield bytes(view[start : start + CHUNK])


async def open_upstream(client: httpx.AsyncClient, req: httpx.Request) -> httpx.Response:
    """Send and wait for the response headers; map transport failures to 502/504."""
    try:
        return await client.send(req, stream=True)
    except httpx.TimeoutException as e:
        raise UpstreamTimeout(f"upstream did not answer in time: {type(e).__name__}") from e
    except httpx.HTTPError as e:
        raise UpstreamError(f"upstream is unreachable: {type(e).__name__}: {e}") from e


async def relay(
    request: web.Request, upstream: httpx.Response, extra_headers: Mapping[str, str] | None = None
) -> web.StreamResponse:
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
        request[RESPONSE_STARTED] = resp
        if not _has_body(request.method, upstream.status_code):
            await _drop_connection(upstream)
        else:
            await _copy_body(resp, upstream)
            if "text/event-stream" in upstream.headers.get("content-type", ""):
                await _drop_connection(upstream)
        await resp.write_eof()
        return resp
    finally:
        await close_upstream(upstream)


async def _drop_connection(upstream: httpx.Response) -> None:
    """Never pool the connection of a bodiless response or of an event stream.

    A 204, a 304 or an answer to HEAD ends with its headers, whatever they say; bytes a broken
    server sends after them (llama-server's /cors-proxy answers 204 with a chunked body) would
    be read as the response to the next request on the connection, someone else's. And
    llama-server closes the connection after every event stream (its stream provider ends by
    returning false, which cpp-httplib takes for an error) while announcing keep-alive: a
    request sent on it before the FIN arrives fails unsent, a 502 nobody caused. Closing the
    socket makes the pool discard the connection (a closed socket reads as expired).
    """
    stream = upstream.extensions.get("network_stream")
    if stream is not None:
        await asyncio.shield(stream.aclose())


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
    events = _EventFramer() if _is_event_stream(upstream.headers) else None
    try:
        async for chunk in upstream.aiter_raw():
            out = events.feed(chunk) if events else chunk
            if out:
                await resp.write(out)
        if events and events.tail:
            await resp.write(events.tail)  # upstream's last bytes, complete or not: its stream
    except httpx.HTTPError as e:
        # headers are gone: all that is left is to say so in the stream, or to cut it
        log.warning("upstream broke off mid-response: %s: %s", type(e).__name__, e)
        if events is None:
            raise ConnectionResetError("upstream broke off mid-response") from e
        await resp.write(events.broken_off() + _error_event(e))


def _is_event_stream(headers: httpx.Headers) -> bool:
    # compressed bytes have no event boundaries to find: such a stream is passed as it comes
    encoding = headers.get("content-encoding", "identity").lower()
    return "text/event-stream" in headers.get("content-type", "") and encoding == "identity"


def _error_event(e: httpx.HTTPError) -> bytes:
    err: UpstreamError
    if isinstance(e, httpx.TimeoutException):
        err = UpstreamTimeout(f"upstream went silent mid-stream: {type(e).__name__}")
    else:
        err = UpstreamError(f"upstream broke off mid-stream: {type(e).__name__}")
    return b"data: " + orjson.dumps(err.body()) + b"\n\n"


class _EventFramer:
    """Passes a server-sent event stream on in whole events, holding back a partial one.

    llama-server writes one event per chunk, so nothing waits in practice; what this buys is
    that a stream broken off mid-event ends with an error event the client can parse, instead
    of the error glued onto half an event. An event longer than MAX_HELD_EVENT is passed on
    unfinished (memory stays bounded); a break inside it then ends it with a blank line.
    """

    def __init__(self) -> None:
        self.tail = b""
        self._mid_event = False

    def feed(self, chunk: bytes) -> bytes:
        data = self.tail + chunk
        cut = _last_boundary(data)
        if cut == 0 and len(data) <= MAX_HELD_EVENT:
            self.tail = data
            return b""
        if cut == 0:
            self.tail, self._mid_event = b"", True
            return data
        self.tail, self._mid_event = data[cut:], False
        return data[:cut]

    def broken_off(self) -> bytes:
        """What to send before an error event: the held partial event is dropped."""
        self.tail = b""
        return b"\n\n" if self._mid_event else b""


def _last_boundary(data: bytes) -> int:
    """Where the last complete event ends (0: none), for any of SSE's line endings."""
    ends = (
        data.rfind(sep) + len(sep)
        for sep in (b"\n\n", b"\r\r", b"\r\n\r\n")
        if data.rfind(sep) >= 0
    )
    return max(ends, default=0)
