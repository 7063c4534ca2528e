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

import dataclasses
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import ProxyError, UpstreamError, UpstreamTimeout
from proxy.upstream.client import Upstream

# what a request body may be: nothing, bytes, views of bytes in order (sent as they are, with
# their total length), or an async stream of chunks (sent chunked)
Piece = bytes | bytearray | memoryview
Body = Piece | Iterable[Piece] | AsyncIterable[Piece] | None

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
# what upstream answers the proxy alone: the names of the packages it exported for it
UPSTREAM_ONLY = frozenset({"x-image-embedding-exported"})
CHUNK = 64 * 1024
# the response whose headers the handler has sent, for the middleware in proxy.web.app
RESPONSE_STARTED: web.RequestKey[web.StreamResponse] = web.RequestKey(
    "vcache_response_started", web.StreamResponse
)
# set once the client has been sent the whole response: a cancellation after it (the client
# closing its connection as soon as it has read it) does not make the request a failure
RESPONSE_COMPLETE: web.RequestKey[bool] = web.RequestKey("vcache_response_complete", bool)
# an event held back this long without its end is passed on as it is
MAX_HELD_EVENT = 1024 * 1024


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("connection", "")
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def request_headers(incoming: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    drop = HOP_BY_HOP | FRAMING | PROXY_ONLY | _connection_tokens(incoming)
    return [(k, v) for k, v in incoming.items() if k.lower() not in drop]


def response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    """Upstream's end-to-end response headers, names spelt as upstream spelt them.

    HTTP says names are case-insensitive, but clients that read headers into a plain dict
    (llama.cpp's own server tests among them) look for `Access-Control-Allow-Origin`, not
    `access-control-allow-origin`: `raw_headers` keeps the case that `headers` folds.
    """
    drop = HOP_BY_HOP | UPSTREAM_ONLY | _connection_tokens(upstream.headers) | {"content-length"}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.raw_headers:
        text = name.decode("latin-1")
        if text.lower() not in drop:
            out.add(text, value.decode("latin-1"))
    return out


def error_response(err: ProxyError, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=err.status,
        body=orjson.dumps(err.body()),
        content_type="application/json",
        headers=headers,
    )


@dataclasses.dataclass(frozen=True)
class UpstreamRequest:
    """One request for upstream, ready to send."""

    method: str
    url: Any  # yarl.URL
    headers: list[tuple[str, str]]
    body: Any
    timeout: aiohttp.ClientTimeout


def build_request(
    upstream: Upstream,
    request: web.Request,
    body: Body,
    extra_headers: Mapping[str, str] | None = None,
    idle_s: float | None = None,
) -> UpstreamRequest:
    """The request for upstream; `idle_s` bounds each wait for upstream (None: no bound).

    The bound is on every read from upstream's socket, so `idle_s` is the longest silence
    before the headers and between two chunks of the body, not a limit on the whole response.
    A body in bytes or pieces goes out in slices of CHUNK with its length declared: handed
    over whole, 100 MB would be copied again into the socket's buffer."""
    headers = request_headers(request.headers)
    if extra_headers:
        headers.extend(extra_headers.items())
    if isinstance(body, bytes | bytearray | memoryview):
        body = [body]
    if isinstance(body, list | tuple):
        headers.append(("Content-Length", str(sum(memoryview(b).nbytes for b in body))))
        body = _slices(body)
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=upstream.connect_timeout_s, sock_read=idle_s
    )
    # raw_path: the query string and its encoding exactly as the client wrote them
    return UpstreamRequest(request.method, upstream.url(request.raw_path), headers, body, timeout)


async def _slices(parts: Iterable[Piece]) -> AsyncIterator[memoryview]:
    for part in parts:
        view = memoryview(part)
        for start in range(0, view.nbytes, CHUNK):
            yield view[start : start + CHUNK]


async def open_upstream(upstream: Upstream, req: UpstreamRequest) -> aiohttp.ClientResponse:
    """Send and wait for the response headers; map transport failures to 502/504."""
    try:
        return await upstream.session.request(
            req.method,
            req.url,
            headers=req.headers,
            data=req.body,
            timeout=req.timeout,
            allow_redirects=False,
            compress=None,
        )
    except TimeoutError as e:  # before ClientError: aiohttp's timeouts are both
        raise UpstreamTimeout(f"upstream did not answer in time: {type(e).__name__}") from e
    except (aiohttp.ClientError, OSError) as e:
        ours = _own_error(e)
        if ours is not None:  # the body failed on our side (over the limit, say): not upstream
            raise ours from None
        raise UpstreamError(f"upstream is unreachable: {type(e).__name__}: {e}") from e


def _own_error(e: BaseException) -> ProxyError | None:
    """The proxy's own error behind a client error (aiohttp wraps what a body stream raises)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ProxyError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class Tap(Protocol):
    """Sees a relayed response go by (the result cache records answers through one)."""

    def start(self, status: int, headers: list[tuple[str, str]]) -> None: ...

    def feed(self, data: bytes) -> None: ...

    def fail(self) -> None: ...


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    extra_headers: Mapping[str, str] | None = None,
    tap: Tap | None = None,
) -> web.StreamResponse:
    """Copy upstream's response to the client as it arrives; closes `upstream`. `tap`, if
    given, sees the status, the headers and exactly the bytes written to the client."""
    try:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        resp.headers.update(response_headers(upstream))
        if tap is not None:
            tap.start(upstream.status, list(resp.headers.items()))
        if extra_headers:
            resp.headers.update(extra_headers)
        length = upstream.headers.get("content-length")
        if length is not None and "transfer-encoding" not in upstream.headers:
            resp.content_length = int(length)
        await resp.prepare(request)
        request[RESPONSE_STARTED] = resp
        if not _has_body(request.method, upstream.status):
            request[RESPONSE_COMPLETE] = True
        else:
            await _copy_body(resp, upstream, tap)
            # with a length the client knows the end when the last byte arrives; chunked, at
            # the terminating chunk that write_eof sends
            request[RESPONSE_COMPLETE] = resp.content_length is not None
        await resp.write_eof()
        request[RESPONSE_COMPLETE] = True
        return resp
    finally:
        close_upstream(upstream)


def close_upstream(upstream: aiohttp.ClientResponse) -> None:
    """Let go of upstream's response: its connection goes back to the pool if the body was
    read to its end, and is closed otherwise.

    A client that disconnects cancels the handler mid-body; the close must reach the socket
    (it does: closing is synchronous here), or llama-server goes on generating into a
    connection nobody reads.
    """
    if upstream.content.at_eof() and not upstream.closed:
        upstream.release()
    else:
        upstream.close()


def _has_body(method: str, status: int) -> bool:
    return method != "HEAD" and status not in (204, 304) and not 100 <= status < 200


async def _copy_body(
    resp: web.StreamResponse, upstream: aiohttp.ClientResponse, tap: Tap | None = None
) -> None:
    events = _EventFramer() if _is_event_stream(upstream.headers) else None
    try:
        async for chunk in upstream.content.iter_any():
            out = events.feed(chunk) if events else chunk
            if out:
                await resp.write(out)
                if tap is not None:
                    tap.feed(out)
        if events and events.tail:
            await resp.write(events.tail)  # upstream's last bytes, complete or not: its stream
            if tap is not None:
                tap.feed(events.tail)
    except (aiohttp.ClientError, TimeoutError) as e:
        # headers are gone: all that is left is to say so in the stream, or to cut it
        log.warning("upstream broke off mid-response: %s: %s", type(e).__name__, e)
        if tap is not None:
            tap.fail()
        if events is None:
            raise ConnectionResetError("upstream broke off mid-response") from e
        await resp.write(events.broken_off() + _error_event(e))


def _is_event_stream(headers: Mapping[str, str]) -> bool:
    # compressed bytes have no event boundaries to find: such a stream is passed as it comes
    encoding = headers.get("content-encoding", "identity").lower()
    return "text/event-stream" in headers.get("content-type", "") and encoding == "identity"


def _error_event(e: Exception) -> bytes:
    err: UpstreamError
    if isinstance(e, TimeoutError):
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
