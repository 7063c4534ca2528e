"""The side that faces clients: an aiohttp application that looks like llama-server.

Every request goes to upstream as it came, except POSTs to the endpoints that take images
(proxy.images.slots): their images are swapped for cached packages where upstream can take them,
and images named by URL or path are fetched here, under the SSRF policy, and sent as bytes:
upstream never fetches anything a client named. The proxy's own endpoints live under /vcache/.
What the proxy trusts and why: THREAT_MODEL.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from aiohttp import web

from proxy.errors import AuthError, BodyTooLarge, ClientError, ProxyError, UpstreamError
from proxy.images.inspection import inspect
from proxy.images.modality import audio_mime, sniff
from proxy.images.slots import IMAGE_PATHS, ImageSlot, data_uri, find_images
from proxy.lookup.package_lookup import RequestTally
from proxy.lookup.result_cache import (
    Recorder,
    decide,
    determined,
    image_digests,
    result_key,
)
from proxy.lookup.result_cache import namespace as result_namespace
from proxy.upstream.client import Capabilities
from proxy.upstream.relay import (
    RESPONSE_STARTED,
    build_request,
    error_response,
    open_upstream,
    relay,
)
from proxy.web import admin
from proxy.web.body import (
    check_declared_length,
    decode_body,
    dump_body,
    parse_body,
    read_body,
    stream_body,
)
from proxy.web.budget import Reservation
from proxy.web.state import PROXY_KEY, Proxy
from vision_cache.keys import CacheKey, Namespace

log = logging.getLogger("vcache.proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # base64 has no ':', so never matches


def create_app(proxy: Proxy) -> web.Application:
    # the proxy enforces its own limit while streaming; aiohttp's would answer in plain text
    app = web.Application(client_max_size=2**62, middlewares=[_request_context])
    app[PROXY_KEY] = proxy
    admin.add_routes(app)
    app.router.add_route("*", "/{tail:.*}", _forward)
    return app


# --- middleware ------------------------------------------------------------------------------


@web.middleware
async def _request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, the proxy key on /vcache/, one log line, and no traceback to any client."""
    rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
    started = time.perf_counter()
    proxy = request.app[PROXY_KEY]
    try:
        if request.path.startswith("/vcache/"):
            check_key(request, proxy.api_key)
        resp = await handler(request)
    except web.HTTPException:
        raise
    except asyncio.CancelledError:
        log.info("rid=%s %s %s cancelled (client gone)", rid, request.method, request.path)
        raise
    except Exception as e:
        resp = _failed(request, rid, e)
    if not resp.prepared:
        resp.headers["X-Request-Id"] = rid
    elapsed = (time.perf_counter() - started) * 1000
    proxy.metrics.requests.labels(_endpoint_label(request.path), f"{resp.status // 100}xx").inc()
    log.info(
        "rid=%s %s %s %d %.1fms %s",
        rid,
        request.method,
        request.path,
        resp.status,
        elapsed,
        resp.headers.get("X-Vcache", ""),
    )
    return resp


def _failed(request: web.Request, rid: str, e: Exception) -> web.StreamResponse:
    started: web.StreamResponse | None = request.get(RESPONSE_STARTED)
    if started is not None:
        # Headers (and maybe part of the body) are out: no error answer can follow them, and
        # a second response written into the stream would desynchronise the connection.
        # Cutting it is the one signal left: the client sees a response that ends short.
        log.warning(
            "rid=%s %s %s broken off after the headers: %s", rid, request.method, request.path, e
        )
        if request.transport is not None:
            request.transport.close()
        return started
    if isinstance(e, ProxyError):
        return error_response(e)
    log.exception("rid=%s %s %s failed", rid, request.method, request.path)
    return error_response(ProxyError("internal error in the proxy"))


def check_key(request: web.Request, key: str | None) -> None:
    if not key:
        return
    given = request.headers.get("X-Vcache-Key", "")
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        given = given or auth[7:]
    # constant time: the comparison must not tell how much of a guess was right
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise AuthError("missing or wrong proxy key (X-Vcache-Key or Authorization: Bearer)")


def _endpoint_label(path: str) -> str:
    return path if path in IMAGE_PATHS or path.startswith("/vcache/") else "other"


# --- forwarding ------------------------------------------------------------------------------


async def _forward(request: web.Request) -> web.StreamResponse:
    proxy = request.app[PROXY_KEY]
    if request.method == "POST" and request.path in IMAGE_PATHS:
        return await _forward_with_images(request, proxy)
    extra = {"Connection": "close"} if request.path == "/cors-proxy" else None
    content = None
    if request.can_read_body:
        check_declared_length(request, proxy.limits.max_body_bytes)
        content = stream_body(request, proxy.limits.max_body_bytes)
    return await _send(request, proxy, _upstream_request(proxy, request, content, extra))


def _upstream_request(
    proxy: Proxy, request: web.Request, content: Any, extra: dict[str, str] | None = None
) -> httpx.Request:
    return build_request(
        proxy.upstream.client, request, content, extra, proxy.limits.upstream_idle_s
    )


async def _send(
    request: web.Request,
    proxy: Proxy,
    req: Any,
    extra_headers: dict[str, str] | None = None,
    tap: Recorder | None = None,
) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        upstream = await open_upstream(proxy.upstream.client, req)
    except UpstreamError:
        proxy.metrics.upstream_errors.inc()
        proxy.upstream.forget_capabilities()
        raise
    proxy.metrics.upstream_seconds.labels(_endpoint_label(request.path)).observe(
        time.perf_counter() - started
    )
    return await relay(request, upstream, extra_headers, tap)


class _Original:
    """The body as the client sent it, held in one place: `take` hands it over and lets go.

    A body may be 100 MB, and every name that keeps one form of it alive while the next is
    made costs that much again: the bytes read become text (nothing keeps the bytes), the
    text is parsed, and whatever is forwarded as sent is encoded from the text here, which
    drops it. After the images named by URL are fetched, "as sent" means with their bytes.
    """

    def __init__(self, text: str) -> None:
        self._data: str | bytes = text

    def text(self) -> str:
        assert isinstance(self._data, str), "read before anything replaced it"
        return self._data

    def replace(self, data: bytes) -> None:
        self._data = data

    def has_vcache_refs(self) -> bool:
        # a named reference has no image to fall back to: upstream's answer stands
        data = self._data
        return "vcache://" in data if isinstance(data, str) else b"vcache://" in data

    def take(self) -> bytes:
        data, self._data = self._data, b""
        return data.encode() if isinstance(data, str) else data


async def _forward_with_images(request: web.Request, proxy: Proxy) -> web.StreamResponse:
    # the body's bytes count against the budget until the response is over: they live that long
    async with proxy.budget.reservation() as held:
        body = await read_body(request, proxy.limits.max_body_bytes, held)
        original = _Original(decode_body(body))
        del body
        return await _with_images(request, proxy, original, held)


async def _with_images(
    request: web.Request, proxy: Proxy, original: _Original, held: Reservation
) -> web.StreamResponse:
    body = parse_body(original.text())
    slots = find_images(
        request.path,
        body,
        max_images=proxy.limits.max_images,
        allow_client_packages=proxy.accept_client_packages,
    )
    if any(_is_locator(s.ref) for s in slots):
        slots = await _fetch_locators(proxy, slots, held)
        original.replace(dump_body(body))
    model = _model_of(body)
    tally = RequestTally()
    pending = await _result_lookup(request, proxy, body, slots, model, tally)
    if isinstance(pending, web.StreamResponse):
        return pending
    if not slots:
        del body  # a second copy of what may be 100 MB, and forwarding needs only the first
        headers = {"X-Vcache": tally.header()} if tally.result else None
        req = _upstream_request(proxy, request, original.take())
        return await _finish(
            proxy, pending, await _send(request, proxy, req, headers, _tap(pending))
        )
    caps = await proxy.lookup.capabilities(model)
    rewritten = await _rewrite(proxy, slots, caps, model, tally) if caps.packages else False
    if not caps.packages:
        _no_packages(slots, tally, proxy)
    headers = {"X-Vcache": tally.header()}
    if not rewritten:
        del body, slots
        req = _upstream_request(proxy, request, original.take())
        return await _finish(
            proxy, pending, await _send(request, proxy, req, headers, _tap(pending))
        )
    new_body = dump_body(body)
    del body, slots
    resp = await _send_with_fallback(request, proxy, new_body, original, tally, _tap(pending))
    return await _finish(proxy, pending, resp)


# --- the result cache ------------------------------------------------------------------------


@dataclasses.dataclass
class _Pending:
    """A request the result cache missed: its answer is recorded, then stored."""

    key: CacheKey
    namespace: Namespace
    recorder: Recorder


async def _result_lookup(
    request: web.Request,
    proxy: Proxy,
    body: Any,
    slots: list[ImageSlot],
    model: str,
    tally: RequestTally,
) -> web.StreamResponse | _Pending | None:
    """A replayed answer on a hit; what to record on a miss; None when the cache stays out."""
    decision = decide(request.headers, proxy.result_cache.default_on)
    if not decision.active or request.path.endswith(("/input_tokens", "/count_tokens")):
        return None
    if not isinstance(body, dict):
        return None  # not a request llama-server answers: nothing to keep
    caps = await proxy.lookup.capabilities(model)
    if caps.identity is None or not determined(request.path, body, caps.identity.defaults):
        tally.result = "skip"
        return None
    images = await image_digests(proxy.lookup, slots, caps.namespace)
    if images is None:
        return None  # an unknown reference: the image path answers it
    ns = result_namespace(caps.identity.components)
    key = result_key(ns, request.path, body, images, request.headers.get("Authorization", ""))
    found = await proxy.result_cache.get(key) if decision.lookup else None
    if found is not None:
        tally.result = "hit"
        proxy.metrics.result_hits.inc()
        return await found.replay(request, {"X-Vcache": tally.header()})
    tally.result = "miss" if decision.lookup else "refresh"
    proxy.metrics.result_misses.inc()
    return _Pending(key, ns, Recorder()) if decision.store else None


def _model_of(body: Any) -> str:
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else ""


def _tap(pending: _Pending | None) -> Recorder | None:
    return pending.recorder if pending is not None else None


async def _finish(
    proxy: Proxy, pending: _Pending | None, resp: web.StreamResponse
) -> web.StreamResponse:
    if pending is not None:
        recorded = pending.recorder.recorded()
        if recorded is not None and await proxy.result_cache.put(
            pending.key, pending.namespace, recorded
        ):
            proxy.metrics.result_stores.inc()
    return resp


async def _fetch_locators(
    proxy: Proxy, slots: list[ImageSlot], held: Reservation
) -> list[ImageSlot]:
    """Fetch the images named by URL or path, under the SSRF policy, into the request.

    Upstream must never fetch them, on any path (a stock server, a fallback, a refused
    package): its fetcher has no SSRF guard, and its own DNS lookup could answer otherwise
    than the one the guard vetted (rebinding). An image that cannot be fetched is a 400.
    """
    fetched = await asyncio.gather(*(_fetch(proxy, s) for s in slots))
    added = sum(len(new.ref) for new, old in zip(fetched, slots, strict=True) if new is not old)
    if held.held + added > proxy.limits.max_body_bytes:
        raise BodyTooLarge(
            "the request with its fetched images is over the "
            f"{proxy.limits.max_body_bytes}-byte body limit"
        )
    await held.take(added)
    return fetched


async def _fetch(proxy: Proxy, slot: ImageSlot) -> ImageSlot:
    if not _is_locator(slot.ref):
        return slot
    data, _ = await proxy.lookup.load_media(slot.ref)
    # the media type from the bytes (already checked), never from a remote Content-Type
    mime = (
        audio_mime(data)
        if sniff(data) == "audio"
        else ("image/" + (await asyncio.to_thread(inspect, data)).format.lower())
    )
    slot.put_image(data, mime)
    return dataclasses.replace(slot, ref=data_uri(data, mime), mime=mime)


def _is_locator(ref: str) -> bool:
    """Anything but inline bytes (a data URI, base64) and vcache:// names: a URL or a path.

    These are loaded here, under the fetch policy, which refuses every scheme but http(s) and
    file (and, like llama-server, takes whatever starts with "http" for a URL)."""
    scheme = _SCHEME.match(ref)
    return ref[:4].lower() == "http" or (
        scheme is not None and scheme.group(1).lower() not in ("data", "vcache")
    )


async def _rewrite(
    proxy: Proxy, slots: list[ImageSlot], caps: Capabilities, model: str, tally: RequestTally
) -> bool:
    packages = await asyncio.gather(*(proxy.lookup.resolve(s, caps, model, tally) for s in slots))
    for slot, pkg in zip(slots, packages, strict=True):
        if pkg is not None:
            slot.put_package(pkg)
    return any(p is not None for p in packages)


def _no_packages(slots: list[ImageSlot], tally: RequestTally, proxy: Proxy) -> None:
    if any(s.ref.startswith("vcache://") for s in slots):
        raise ClientError(
            "vcache:// references need an upstream that takes packages "
            "(a patched llama-server started with --image-embedding)"
        )
    tally.fallbacks += len(slots)
    proxy.metrics.fallbacks.inc(len(slots))


async def _send_with_fallback(
    request: web.Request,
    proxy: Proxy,
    new_body: bytes,
    original: _Original,
    tally: RequestTally,
    tap: Recorder | None = None,
) -> web.StreamResponse:
    """Send the rewritten request; if upstream refuses its packages, send the original."""
    upstream = await _open(proxy, _upstream_request(proxy, request, new_body))
    if upstream.status_code == 400 and not original.has_vcache_refs():
        detail = await upstream.aread()
        await upstream.aclose()
        if b"image_embedding" in detail:
            log.warning(
                "upstream refused packages (%s); forwarding the images instead",
                detail[:200].decode(errors="replace"),
            )
            proxy.upstream.forget_capabilities()
            tally.all_fallback()
            # a refusal, not a processed request: the one path that sends a request twice
            upstream = await _open(proxy, _upstream_request(proxy, request, original.take()))
        else:
            return _replay(upstream.status_code, upstream.headers, detail, tally)
    return await relay(request, upstream, {"X-Vcache": tally.header()}, tap)


async def _open(proxy: Proxy, req: Any) -> Any:
    try:
        return await open_upstream(proxy.upstream.client, req)
    except UpstreamError:
        proxy.metrics.upstream_errors.inc()
        proxy.upstream.forget_capabilities()
        raise


def _replay(status: int, headers: Any, body: bytes, tally: RequestTally) -> web.Response:
    resp = web.Response(status=status, body=body)
    ctype = headers.get("content-type")
    if ctype:
        resp.headers["Content-Type"] = ctype
    resp.headers["X-Vcache"] = tally.header()
    return resp
