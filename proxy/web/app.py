"""The side that faces clients: an aiohttp application that looks like llama-server.

Every request goes to upstream as it came, except POSTs to the endpoints that take images
(proxy.images.slots): their images are swapped for cached packages where upstream can take them,
and images named by URL or path are fetched here, under the SSRF policy, and sent as bytes:
upstream never fetches anything a client named. The proxy's own endpoints live under /vcache/.
What the proxy trusts and why: THREAT_MODEL.md.

A request that says ``Cache-Control: no-store`` or ``no-cache`` has its images sent as they
came: nothing is read from the cache for it, nothing stored (its images are encoded by upstream,
as without the proxy). `cache_bypassed` reads the header, for anything else that caches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import web

from proxy.errors import AuthError, BodyTooLarge, ClientError, UpstreamError
from proxy.images import json_body
from proxy.images.inspection import inspect
from proxy.images.json_body import JsonBody
from proxy.images.media import is_locator
from proxy.images.modality import audio_mime, sniff
from proxy.images.slots import IMAGE_PATHS, ImageSlot, InlinePayload, find_images
from proxy.lookup.exports import DTYPE, ExportBatch
from proxy.lookup.package_lookup import RequestTally
from proxy.lookup.result_cache import (
    Recorder,
    cache_directives,
    decide,
    determined,
    image_digests,
    result_key,
)
from proxy.lookup.result_cache import namespace as result_namespace
from proxy.upstream.client import EXPORT_HEADER, EXPORTED_HEADER, Capabilities
from proxy.upstream.relay import (
    Body,
    UpstreamRequest,
    build_request,
    close_upstream,
    open_upstream,
    relay,
)
from proxy.web import admin
from proxy.web.body import check_declared_length, read_body, stream_body
from proxy.web.budget import Reservation
from proxy.web.site import request_middleware
from proxy.web.state import PROXY_KEY, Proxy
from vision_cache.keys import CacheKey, Namespace

log = logging.getLogger("vcache.proxy")

T = TypeVar("T")
# why a request's images went upstream raw (an unverified projector type, packages off)
FALLBACK_HEADER = "X-Vcache-Fallback"


def create_app(proxy: Proxy) -> web.Application:
    # the proxy enforces its own limit while streaming; aiohttp's would answer in plain text
    middleware = request_middleware(check=_check, record=_record)
    app = web.Application(client_max_size=2**62, middlewares=[middleware])
    app[PROXY_KEY] = proxy
    admin.add_routes(app)
    app.router.add_route("*", "/{tail:.*}", _forward)
    return app


# --- middleware ------------------------------------------------------------------------------


def _check(request: web.Request) -> None:
    if request.path.startswith("/vcache/"):
        check_key(request, request.app[PROXY_KEY].api_key)


def _record(request: web.Request, outcome: str) -> None:
    metrics = request.app[PROXY_KEY].metrics
    metrics.requests.labels(_endpoint_label(request.path), outcome).inc()


def cache_bypassed(request: web.Request) -> bool:
    """Whether the client asked for no cache: `Cache-Control: no-store` (store nothing from
    this request) or `no-cache` (answer nothing from the cache). Either way its images go to
    upstream as sent."""
    return bool(cache_directives(request.headers) & {"no-store", "no-cache"})


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
    proxy: Proxy, request: web.Request, content: Body, extra: dict[str, str] | None = None
) -> UpstreamRequest:
    return build_request(proxy.upstream, request, content, extra, proxy.limits.upstream_idle_s)


async def _send(
    request: web.Request,
    proxy: Proxy,
    req: UpstreamRequest,
    extra_headers: dict[str, str] | None = None,
    tap: Recorder | None = None,
) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        upstream = await open_upstream(proxy.upstream, req)
    except UpstreamError:
        proxy.metrics.upstream_errors.inc()
        proxy.upstream.forget_capabilities()
        raise
    proxy.metrics.upstream_seconds.labels(_endpoint_label(request.path)).observe(
        time.perf_counter() - started
    )
    return await relay(request, upstream, extra_headers, tap)


async def _forward_with_images(request: web.Request, proxy: Proxy) -> web.StreamResponse:
    # the body's bytes count against the budget until the response is over: they live that long
    async with proxy.budget.reservation() as held:
        raw = await read_body(request, proxy.limits.max_body_bytes, held)
        # read even when it holds no image: what the proxy cannot read it refuses, for a body
        # forwarded unread could reach a more lenient parser upstream (THREAT_MODEL.md)
        body = await _off_loop(len(raw), json_body.parse, raw)
        return await _with_images(request, proxy, raw, body, held)


async def _off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a worker thread when it deals with a big body, so that no client waits
    for another's: small ones are quicker done here than handed over."""
    if size < json_body.MIN_SPAN:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


async def _with_images(
    request: web.Request, proxy: Proxy, raw: bytearray, body: JsonBody, held: Reservation
) -> web.StreamResponse:
    """Images swapped for packages where upstream takes them; the body otherwise as sent.

    "As sent" is the client's bytes, or, once the images named by URL are fetched, the body
    with their bytes in their place. Either way the big strings of the body (an image's
    base64, a long document) go out as they came in, never parsed or written again."""
    slots = find_images(
        request.path,
        body,
        max_images=proxy.limits.max_images,
        allow_client_packages=proxy.accept_client_packages,
    )
    original: Body = raw
    if any(s.span is None and is_locator(s.ref) for s in slots):
        slots = await _fetch_locators(proxy, body, slots, held)
        original = (await _off_loop(len(raw), body.dumps)).parts
    model = _model_of(body.tree)
    tally = RequestTally()
    pending = await _result_lookup(request, proxy, body, slots, model, tally)
    if isinstance(pending, web.StreamResponse):
        return pending
    if not slots:
        headers = {"X-Vcache": tally.header()} if tally.result else None
        req = _upstream_request(proxy, request, original)
        return await _finish(
            proxy, pending, await _send(request, proxy, req, headers, _tap(pending))
        )
    if cache_bypassed(request):
        _bypass(slots, tally, proxy)
        caps = Capabilities(packages=False)
    else:
        caps = await proxy.lookup.capabilities(model)
    exports = ExportBatch(len(slots))
    try:
        rewritten = caps.packages and await _rewrite(
            proxy, body, slots, caps, model, tally, exports
        )
        if not caps.packages and not tally.bypassed:
            _no_packages(slots, tally, proxy)
        headers = {"X-Vcache": tally.header()}
        if caps.reason and tally.fallbacks:
            # X-Vcache stays numbers (clients parse it); the why goes in a header of its own
            headers[FALLBACK_HEADER] = caps.reason
        if not rewritten and not exports.leads:
            req = _upstream_request(proxy, request, original)
            return await _finish(
                proxy, pending, await _send(request, proxy, req, headers, _tap(pending))
            )
        named = any(s.ref.startswith("vcache://") for s in slots)
        new_body = (await _off_loop(len(raw), body.dumps)).parts if rewritten else original
        sent = _Sent(new_body, original, named, tally, exports)
        resp = await _send_with_fallback(request, proxy, sent, headers, _tap(pending))
        return await _finish(proxy, pending, resp)
    finally:
        proxy.lookup.settle_exports(exports, None)  # a request that failed exported nothing


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
    body: JsonBody,
    slots: list[ImageSlot],
    model: str,
    tally: RequestTally,
) -> web.StreamResponse | _Pending | None:
    """A replayed answer on a hit; what to record on a miss; None when the cache stays out."""
    decision = decide(request.headers, proxy.result_cache.default_on)
    if not decision.active or request.path.endswith(("/input_tokens", "/count_tokens")):
        return None
    if not isinstance(body.tree, dict):
        return None  # not a request llama-server answers: nothing to keep
    caps = await proxy.lookup.capabilities(model)
    if caps.identity is None or not determined(request.path, body.tree, caps.identity.defaults):
        tally.result = "skip"
        return None
    images = await image_digests(proxy.lookup, slots, caps.namespace)
    if images is None:
        return None  # an unknown reference: the image path answers it
    ns = result_namespace(caps.identity.components)
    auth = request.headers.get("Authorization", "")
    key = result_key(ns, request.path, body, images, auth)
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
    proxy: Proxy, body: JsonBody, slots: list[ImageSlot], held: Reservation
) -> list[ImageSlot]:
    """Fetch the images named by URL or path, under the SSRF policy, into the request.

    Upstream must never fetch them, on any path (a stock server, a fallback, a refused
    package): its fetcher has no SSRF guard, and its own DNS lookup could answer otherwise
    than the one the guard vetted (rebinding). An image that cannot be fetched is a 400.
    The one exception is a file URL when the proxy has no media directory: only upstream
    knows its ``--media-path``, so the URL goes on as it came and upstream's rule decides.
    """
    fetched = await asyncio.gather(*(_fetch(proxy, body, s) for s in slots))
    added = sum(
        len(new.span)
        for new, old in zip(fetched, slots, strict=True)
        if new is not old and new.span is not None
    )
    if held.held + added > proxy.limits.max_body_bytes:
        raise BodyTooLarge(
            "the request with its fetched images is over the "
            f"{proxy.limits.max_body_bytes}-byte body limit"
        )
    await held.take(added)
    return fetched


async def _fetch(proxy: Proxy, body: JsonBody, slot: ImageSlot) -> ImageSlot:
    if (
        slot.span is not None
        or not is_locator(slot.ref)
        or proxy.lookup.leaves_to_upstream(slot.ref)
    ):
        return slot
    data, _ = await proxy.lookup.load_media(slot.ref)
    # the media type from the bytes (already checked), never from a remote Content-Type
    mime = (
        audio_mime(data)
        if sniff(data) == "audio"
        else ("image/" + (await asyncio.to_thread(inspect, data)).format.lower())
    )
    placed: list[str] = []

    def insert(text: bytes) -> str:
        placed.append(body.insert(text))
        return placed[-1]

    await asyncio.to_thread(slot.put_image, data, mime, insert)
    span = body.span(placed[0])
    assert span is not None  # just inserted
    return dataclasses.replace(slot, ref=span.head(), mime=mime, span=span, placeholder=placed[0])


async def _rewrite(
    proxy: Proxy,
    body: JsonBody,
    slots: list[ImageSlot],
    caps: Capabilities,
    model: str,
    tally: RequestTally,
    exports: ExportBatch,
) -> bool:
    packages = await asyncio.gather(
        *(proxy.lookup.resolve(s, caps, model, tally, exports) for s in slots)
    )
    for slot, pkg in zip(slots, packages, strict=True):
        if pkg is not None:
            data = pkg.get("data")
            if isinstance(data, InlinePayload):
                # base64 written into the body as it is: the JSON encoder never scans it
                pkg["data"] = body.insert(await _off_loop(len(data.payload), data.base64))
            slot.put_package(pkg)
    return any(p is not None for p in packages)


def _bypass(slots: list[ImageSlot], tally: RequestTally, proxy: Proxy) -> None:
    if any(s.ref.startswith("vcache://") for s in slots):
        raise ClientError(
            "vcache:// references are served from the cache: they cannot go with "
            "Cache-Control: no-store or no-cache"
        )
    tally.bypassed += len(slots)
    proxy.metrics.bypassed.inc(len(slots))


def _no_packages(slots: list[ImageSlot], tally: RequestTally, proxy: Proxy) -> None:
    if any(s.ref.startswith("vcache://") for s in slots):
        raise ClientError(
            "vcache:// references need an upstream that takes packages "
            "(a patched llama-server started with --image-embedding)"
        )
    tally.fallbacks += len(slots)
    proxy.metrics.fallbacks.inc(len(slots))


@dataclasses.dataclass(frozen=True)
class _Sent:
    """A request with images, as it goes upstream: `body` with packages where there are any,
    `original` with every image as the client sent it."""

    body: Body
    original: Body
    named: bool  # it names images by vcache:// reference: no original to fall back to
    tally: RequestTally
    exports: ExportBatch  # its misses, whose packages upstream is asked to export


async def _send_with_fallback(
    request: web.Request,
    proxy: Proxy,
    sent: _Sent,
    headers: dict[str, str],
    tap: Recorder | None = None,
) -> web.StreamResponse:
    """Send the rewritten request; if upstream refuses its packages, send the original.

    Not when the request names images by reference: a vcache:// name has no image to fall
    back to, and upstream's answer stands. Misses go as sent, with the export header when
    this request leads their export; the answer's header names what upstream exported."""
    tally, exports = sent.tally, sent.exports
    export = {EXPORT_HEADER: DTYPE} if exports.leads else None
    upstream = await _open(proxy, _upstream_request(proxy, request, sent.body, export))
    if upstream.status == 400 and not sent.named:
        try:
            detail = await upstream.read()
        finally:
            close_upstream(upstream)
        if b"image_embedding" in detail:
            log.warning(
                "upstream refused packages or exports (%s); forwarding the images instead",
                detail[:200].decode(errors="replace"),
            )
            proxy.upstream.forget_capabilities()
            proxy.lookup.settle_exports(exports, None)
            tally.all_fallback()
            headers[FALLBACK_HEADER] = _refusal(detail)
            # a refusal, not a processed request: the one path that sends a request twice
            upstream = await _open(proxy, _upstream_request(proxy, request, sent.original))
        else:
            _settle(proxy, exports, upstream, tally)
            return _replay(upstream.status, upstream.headers, detail, tally)
    _settle(proxy, exports, upstream, tally)
    return await relay(request, upstream, {**headers, "X-Vcache": tally.header()}, tap)


def _settle(
    proxy: Proxy, exports: ExportBatch, upstream: aiohttp.ClientResponse, tally: RequestTally
) -> None:
    """Hand the request's exports upstream's answer; an error answer exported nothing, and
    the misses that went as sent for their export count as fallbacks."""
    proxy.lookup.settle_exports(exports, upstream.headers.get(EXPORTED_HEADER))
    if exports.leads and upstream.status >= 400:
        proxy.metrics.fallbacks.inc(tally.unexported())


def _refusal(detail: bytes) -> str:
    """Upstream's 400 message about a package, as one printable header line."""
    try:
        message = str(orjson.loads(detail)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = detail[:300].decode(errors="replace")
    line = "".join(c if c.isprintable() and c.isascii() else " " for c in message)
    return f"upstream refused the packages: {line}"[:500]


async def _open(proxy: Proxy, req: UpstreamRequest) -> aiohttp.ClientResponse:
    try:
        return await open_upstream(proxy.upstream, req)
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
