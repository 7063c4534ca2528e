"""The side that faces clients: an aiohttp application that looks like llama-server.

Every request goes to upstream as it came, except POSTs to the endpoints that take images
(proxy.image_slots): their images are swapped for cached packages where upstream can take them.
The proxy's own endpoints live under /vcache/.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy import admin
from proxy.errors import AuthError, ClientError, ProxyError, UpstreamError
from proxy.forwarding import (
    build_request,
    error_response,
    open_upstream,
    read_body,
    relay,
    stream_body,
)
from proxy.image_slots import IMAGE_PATHS, ImageSlot, find_images
from proxy.metrics import Metrics
from proxy.resolver import RequestTally, Resolver
from proxy.upstream import Capabilities, Upstream
from vision_cache.store import Store

log = logging.getLogger("vcache.proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 100 * 1024 * 1024
    max_images: int = 32


@dataclasses.dataclass
class Proxy:
    """Everything a request handler needs."""

    upstream: Upstream
    resolver: Resolver
    store: Store
    metrics: Metrics
    limits: Limits = dataclasses.field(default_factory=Limits)
    api_key: str | None = None
    accept_client_packages: bool = False
    health_extra: Callable[[], dict[str, Any]] | None = None


PROXY_KEY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)


def create_app(proxy: Proxy) -> web.Application:
    # the proxy enforces its own limit while streaming; aiohttp's would answer in plain text
    app = web.Application(client_max_size=2**62, middlewares=[_request_context])
    app[PROXY_KEY] = proxy
    admin.add_routes(app, PROXY_KEY)
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
            _check_key(request, proxy.api_key)
        resp = await handler(request)
    except ProxyError as e:
        resp = error_response(e)
    except web.HTTPException:
        raise
    except asyncio.CancelledError:
        log.info("rid=%s %s %s cancelled (client gone)", rid, request.method, request.path)
        raise
    except Exception:
        log.exception("rid=%s %s %s failed", rid, request.method, request.path)
        resp = error_response(ProxyError("internal error in the proxy"))
    if not resp.prepared:
        resp.headers["X-Request-Id"] = rid
    elapsed = (time.perf_counter() - started) * 1000
    proxy.metrics.requests.labels(_endpoint_label(request.path), f"{resp.status // 100}xx").inc()
    log.info("rid=%s %s %s %d %.1fms %s", rid, request.method, request.path, resp.status,
             elapsed, resp.headers.get("X-Vcache", ""))
    return resp


def _check_key(request: web.Request, key: str | None) -> None:
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
    content = stream_body(request, proxy.limits.max_body_bytes) if request.can_read_body else None
    req = build_request(proxy.upstream.client, request, content, extra)
    return await _send(request, proxy, req)


async def _send(request: web.Request, proxy: Proxy, req: Any,
                extra_headers: dict[str, str] | None = None) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        upstream = await open_upstream(proxy.upstream.client, req)
    except UpstreamError:
        proxy.metrics.upstream_errors.inc()
        proxy.upstream.forget_capabilities()
        raise
    proxy.metrics.upstream_seconds.labels(_endpoint_label(request.path)).observe(
        time.perf_counter() - started)
    return await relay(request, upstream, extra_headers)


async def _forward_with_images(request: web.Request, proxy: Proxy) -> web.StreamResponse:
    raw = await read_body(request, proxy.limits.max_body_bytes)
    body = _parse_json(raw)
    slots = find_images(request.path, body, max_images=proxy.limits.max_images,
                        allow_client_packages=proxy.accept_client_packages)
    if not slots:
        return await _send(request, proxy, build_request(proxy.upstream.client, request, raw))
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    caps = await proxy.resolver.capabilities(model)
    tally = RequestTally()
    rewritten = await _rewrite(proxy, slots, caps, model, tally) if caps.packages else False
    if not caps.packages:
        _no_packages(slots, tally, proxy)
    headers = {"X-Vcache": tally.header()}
    if not rewritten:
        return await _send(request, proxy, build_request(proxy.upstream.client, request, raw),
                           headers)
    new_body = orjson.dumps(body)
    return await _send_with_fallback(request, proxy, new_body, raw, tally)


async def _rewrite(proxy: Proxy, slots: list[ImageSlot], caps: Capabilities, model: str,
                   tally: RequestTally) -> bool:
    packages = await asyncio.gather(*(proxy.resolver.resolve(s, caps, model, tally) for s in slots))
    for slot, pkg in zip(slots, packages, strict=True):
        if pkg is not None:
            slot.put_package(pkg)
    return any(p is not None for p in packages)


def _no_packages(slots: list[ImageSlot], tally: RequestTally, proxy: Proxy) -> None:
    if any(s.ref.startswith("vcache://") for s in slots):
        raise ClientError("vcache:// references need an upstream that takes packages "
                          "(a patched llama-server started with --image-embedding)")
    tally.fallbacks += len(slots)
    proxy.metrics.fallbacks.inc(len(slots))


async def _send_with_fallback(request: web.Request, proxy: Proxy, new_body: bytes, raw: bytes,
                              tally: RequestTally) -> web.StreamResponse:
    """Send the rewritten request; if upstream refuses its packages, send the original."""
    client = proxy.upstream.client
    upstream = await _open(proxy, build_request(client, request, new_body))
    if upstream.status_code == 400 and not _has_vcache_refs(raw):
        detail = await upstream.aread()
        await upstream.aclose()
        if b"image_embedding" in detail:
            log.warning("upstream refused packages (%s); forwarding the images instead",
                        detail[:200].decode(errors="replace"))
            proxy.upstream.forget_capabilities()
            tally.fallbacks += tally.hits + tally.misses
            tally.hits = tally.misses = 0
            upstream = await _open(proxy, build_request(client, request, raw))
        else:
            return _replay(upstream.status_code, upstream.headers, detail, tally)
    return await relay(request, upstream, {"X-Vcache": tally.header()})


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


def _has_vcache_refs(raw: bytes) -> bool:
    # a named reference has no image to fall back to: upstream's answer stands
    return b"vcache://" in raw


def _parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # not ours to judge: upstream answers malformed JSON its own way
        return None
