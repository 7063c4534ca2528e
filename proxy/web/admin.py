"""The proxy's own endpoints, under /vcache/ (behind the proxy key when one is set).

The messages are `vision_cache.client.admin_api`'s, which the clients use too:

| endpoint | what |
|---|---|
| GET /vcache/health | the proxy is up; whether upstream takes packages; managed server state |
| GET /vcache/metrics | Prometheus metrics |
| GET /vcache/stats | the store's statistics |
| GET /vcache/namespace?model=M | the cache namespace requests for model M use |
| POST /vcache/lookup | which of a list of image digests are cached (warm-up skips them) |
| POST /vcache/warm | encode (if needed), pin and name one image |
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from proxy.errors import ClientError
from proxy.web.body import read_body
from proxy.web.state import PROXY_KEY, Proxy
from vision_cache.client import admin_api as api
from vision_cache.client.admin_api import (
    HealthResponse,
    LookupRequest,
    LookupResponse,
    NamespaceResponse,
    ProcessStats,
    WarmRequest,
    WarmResponse,
)

RequestT = TypeVar("RequestT", bound=BaseModel)


def add_routes(app: web.Application) -> None:
    def bind(fn: Any) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await fn(request, request.app[PROXY_KEY])  # type: ignore[no-any-return]

        return handler

    app.router.add_get(api.HEALTH, bind(health))
    app.router.add_get(api.METRICS, bind(metrics))
    app.router.add_get(api.STATS, bind(stats))
    app.router.add_get(api.NAMESPACE, bind(namespace))
    app.router.add_post(api.LOOKUP, bind(lookup))
    app.router.add_post(api.WARM, bind(warm))


def _json(body: Any) -> web.Response:
    return web.Response(body=orjson.dumps(body, default=str), content_type="application/json")


def _answer(message: BaseModel, *, exclude_none: bool = False) -> web.Response:
    body = message.model_dump_json(exclude_none=exclude_none)
    return web.Response(body=body, content_type="application/json")


async def _request(request: web.Request, proxy: Proxy, cls: type[RequestT]) -> RequestT:
    # under the body limit and budget like any request: aiohttp's own limit is off (proxy.web.app)
    async with proxy.budget.reservation() as held:
        raw = await read_body(request, proxy.limits.max_body_bytes, held)
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        raise ClientError(f"invalid request: {e.errors(include_url=False)}") from e


async def health(request: web.Request, proxy: Proxy) -> web.Response:
    caps = await proxy.upstream.capabilities()
    managed = proxy.managed_state() if proxy.managed_state else None
    answer = HealthResponse(
        upstream=proxy.upstream.base_url,
        packages=caps.packages,
        # why images go upstream raw: the operator's first question when hits stay at zero
        packages_reason=caps.reason,
        process=_process_stats(),
        managed=managed,
    )
    return _answer(answer, exclude_none=True)  # no "managed" unless managed


def _process_stats() -> ProcessStats:
    """What a leak would show: asyncio tasks, open file descriptors, resident memory (Linux)."""
    fd_dir = Path("/proc/self/fd")
    fds = len(list(fd_dir.iterdir())) if fd_dir.is_dir() else -1
    try:
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = -1
    return ProcessStats(tasks=len(asyncio.all_tasks()), open_fds=fds, rss_bytes=rss)


async def metrics(request: web.Request, proxy: Proxy) -> web.Response:
    return web.Response(body=proxy.metrics.render(), content_type="text/plain", charset="utf-8")


async def stats(request: web.Request, proxy: Proxy) -> web.Response:
    result = await asyncio.to_thread(proxy.store.stats)
    return _json(dataclasses.asdict(result))


async def namespace(request: web.Request, proxy: Proxy) -> web.Response:
    caps = await proxy.lookup.capabilities(request.query.get("model", ""))
    ns = caps.namespace
    return _answer(
        NamespaceResponse(
            packages=caps.packages, id=ns.id if ns else None, text=ns.text if ns else None
        )
    )


async def lookup(request: web.Request, proxy: Proxy) -> web.Response:
    req = await _request(request, proxy, LookupRequest)
    caps = await proxy.lookup.capabilities(req.model)
    # a digest names an image or a clip (keyed in the audio namespace); a model may take
    # packages for one of them only (an audio model, or an unverified image projector)
    spaces = [ns for ns in (caps.namespace, caps.audio_namespace) if ns is not None]
    if not spaces:
        raise ClientError("upstream takes no packages")
    present: dict[str, bool] = {}
    for ns in spaces:
        present.update(await proxy.lookup.present(ns, req.digests))
    pinned = sorted(d for d, is_pinned in present.items() if is_pinned)
    return _answer(LookupResponse(namespace=spaces[0].id, present=sorted(present), pinned=pinned))


async def warm(request: web.Request, proxy: Proxy) -> web.Response:
    req = await _request(request, proxy, WarmRequest)
    image, mime = await proxy.lookup.load_media(req.image)
    result = await proxy.lookup.warm(
        image, mime, req.model, pin=req.pin, name=req.name, ttl=req.ttl
    )
    ref = f"vcache://{req.name}" if req.name else f"vcache://sha256:{result.key.digest}"
    return _answer(
        WarmResponse(
            key=result.key.text,
            digest=result.key.digest,
            namespace=result.namespace.id,
            status=result.status,
            encode_ms=result.encode_ms,
            bytes=result.nbytes,
            ref=ref,
        )
    )
