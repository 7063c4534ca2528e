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
import time
from typing import Any

import httpx
import orjson
from aiohttp import web

from proxy.errors import AuthError, BodyTooLarge, ClientError, UpstreamError
from proxy.images.inspection import inspect
from proxy.images.media import is_locator
from proxy.images.modality import audio_mime, sniff
from proxy.images.slots import IMAGE_PATHS, ImageSlot, find_images
from proxy.lookup.package_lookup import RequestTally
from proxy.upstream.client import Capabilities
from proxy.upstream.relay import (
    build_request,
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
from proxy.web.site import request_middleware
from proxy.web.state import PROXY_KEY, Proxy
from vision_cache.data_uri import data_uri

log = logging.getLogger("vcache.proxy")

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


def _record(request: web.Request, resp: web.StreamResponse) -> None:
    metrics = request.app[PROXY_KEY].metrics
    metrics.requests.labels(_endpoint_label(request.path), f"{resp.status // 100}xx").inc()


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
    request: web.Request, proxy: Proxy, req: Any, extra_headers: dict[str, str] | None = None
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
    return await relay(request, upstream, extra_headers)


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
    if not slots:
        del body  # a second copy of what may be 100 MB, and forwarding needs only the first
        return await _send(request, proxy, _upstream_request(proxy, request, original.take()))
    if any(is_locator(s.ref) for s in slots):
        slots = await _fetch_locators(proxy, slots, held)
        original.replace(dump_body(body))
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    caps = await proxy.lookup.capabilities(model)
    tally = RequestTally()
    rewritten = await _rewrite(proxy, slots, caps, model, tally) if caps.packages else False
    if not caps.packages:
        _no_packages(slots, tally, proxy)
    headers = {"X-Vcache": tally.header()}
    if caps.reason and tally.fallbacks:
        # X-Vcache stays numbers (clients parse it); the why goes in a header of its own
        headers[FALLBACK_HEADER] = caps.reason
    if not rewritten:
        del body, slots
        return await _send(
            request, proxy, _upstream_request(proxy, request, original.take()), headers
        )
    new_body = dump_body(body)
    del body, slots
    return await _send_with_fallback(request, proxy, new_body, original, tally, headers)


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
    if not is_locator(slot.ref):
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
    headers: dict[str, str],
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
            headers[FALLBACK_HEADER] = _refusal(detail)
            # a refusal, not a processed request: the one path that sends a request twice
            upstream = await _open(proxy, _upstream_request(proxy, request, original.take()))
        else:
            return _replay(upstream.status_code, upstream.headers, detail, tally)
    return await relay(request, upstream, {**headers, "X-Vcache": tally.header()})


def _refusal(detail: bytes) -> str:
    """Upstream's 400 message about a package, as one printable header line."""
    try:
        message = str(orjson.loads(detail)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = detail[:300].decode(errors="replace")
    line = "".join(c if c.isprintable() and c.isascii() else " " for c in message)
    return f"upstream refused the packages: {line}"[:500]


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
