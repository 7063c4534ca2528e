"""The proxy's own endpoints, under /vcache/ (behind the proxy key when one is set).

The messages are `vision_cache.client.admin_api`'s, which the clients use too:

| endpoint | what |
|---|---|
| GET /vcache/health | readiness: 200 when upstream is up, its model loaded; else 503 in |
| | llama-server's error shape. Whether images are cached (and why not), version, managed state |
| GET /vcache/live | liveness: 200 while the proxy answers at all (asks nothing of upstream) |
| GET /vcache/store | where the proxy's store is (the store commands act on it through this) |
| POST /vcache/delete | delete entries, from the index and from this process's memory |
| GET /vcache/metrics | Prometheus metrics |
| GET /vcache/stats | the store's statistics |
| GET /vcache/namespace?model=M | the cache namespace requests for model M use |
| POST /vcache/lookup | which of a list of image digests are cached (warm-up skips them) |
| POST /vcache/warm | encode (if needed), pin, name, tag and describe one image |
| POST /vcache/compare | rank references against a candidate: shortlist, then the VLM judges |
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

from proxy.compare.service import Comparison, describe
from proxy.compare.vectors import (
    EmbeddingModel,
    PooledPackages,
    Source,
    VectorCache,
    keep_source,
)
from proxy.errors import ClientError, ProxyError
from proxy.upstream.client import Readiness
from proxy.version import VERSION
from proxy.web.body import read_body
from proxy.web.state import PROXY_KEY, Proxy
from vision_cache.client import admin_api as api
from vision_cache.client.admin_api import (
    DeleteRequest,
    DeleteResponse,
    ErrorDetail,
    HealthResponse,
    LiveResponse,
    LookupRequest,
    LookupResponse,
    NamespaceResponse,
    ProcessStats,
    StoreResponse,
    WarmRequest,
    WarmResponse,
)
from vision_cache.client.compare_api import CompareRequest, Event
from vision_cache.errors import InvalidKeyError
from vision_cache.keys import CacheKey

RequestT = TypeVar("RequestT", bound=BaseModel)


def add_routes(app: web.Application) -> None:
    def bind(fn: Any) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await fn(request, request.app[PROXY_KEY])  # type: ignore[no-any-return]

        return handler

    app.router.add_get(api.HEALTH, bind(health))
    app.router.add_get(api.LIVE, bind(live))
    app.router.add_get(api.STORE, bind(store))
    app.router.add_post(api.DELETE, bind(delete))
    app.router.add_get(api.METRICS, bind(metrics))
    app.router.add_get(api.STATS, bind(stats))
    app.router.add_get(api.NAMESPACE, bind(namespace))
    app.router.add_post(api.LOOKUP, bind(lookup))
    app.router.add_post(api.WARM, bind(warm))
    app.router.add_post(api.COMPARE, bind(compare))
    app[COMPARISONS] = _Comparisons()
    app.on_cleanup.append(_close_comparison)


def _json(body: Any) -> web.Response:
    return web.Response(body=orjson.dumps(body, default=str), content_type="application/json")


def _answer(message: BaseModel, *, exclude_none: bool = False, status: int = 200) -> web.Response:
    body = message.model_dump_json(exclude_none=exclude_none)
    return web.Response(status=status, body=body, content_type="application/json")


async def _request(request: web.Request, proxy: Proxy, cls: type[RequestT]) -> RequestT:
    # under the body limit and budget like any request: aiohttp's own limit is off (proxy.web.app)
    async with proxy.budget.reservation() as held:
        raw = await read_body(request, proxy.limits.max_body_bytes, held)
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        raise ClientError(f"invalid request: {e.errors(include_url=False)}") from e


async def health(request: web.Request, proxy: Proxy) -> web.Response:
    managed = proxy.managed_state() if proxy.managed_state else None
    if managed is not None and not managed.healthy:
        readiness = Readiness("restarting", "the managed llama-server is (re)starting")
    else:
        readiness = await proxy.upstream.probe()
    caps = await proxy.lookup.capabilities()
    answer = HealthResponse(
        status="ok" if readiness.ready else "unavailable",
        ready=readiness.ready,
        version=VERSION,
        upstream=proxy.upstream.base_url,
        upstream_state=readiness.state,
        upstream_detail=readiness.detail or None,
        packages=caps.packages,
        # why images go upstream raw: the operator's first question when hits stay at zero
        packages_reason=caps.reason,
        encoder=proxy.lookup.encoder,
        transport=proxy.lookup.transport,
        exports=caps.export and proxy.lookup.encoder == "server",
        process=_process_stats(),
        managed=managed,
        error=None if readiness.ready else _not_ready(proxy, readiness),
    )
    # no "managed" unless managed, no "error" unless not ready
    return _answer(answer, exclude_none=True, status=200 if readiness.ready else 503)


def _not_ready(proxy: Proxy, readiness: Readiness) -> ErrorDetail:
    what = {
        "loading": "is loading its model",
        "unreachable": "is unreachable",
        "error": "answers its health check with an error",
        "restarting": "is restarting",
    }[readiness.state]
    detail = f": {readiness.detail}" if readiness.detail else ""
    message = f"upstream llama-server at {proxy.upstream.base_url} {what}{detail}"
    return ErrorDetail(code=503, message=message, type="unavailable_error")


async def live(request: web.Request, proxy: Proxy) -> web.Response:
    return _answer(LiveResponse(version=VERSION))


async def store(request: web.Request, proxy: Proxy) -> web.Response:
    store_id = await asyncio.to_thread(lambda: proxy.store.id)
    return _answer(StoreResponse(path=str(proxy.store.path.resolve()), id=store_id))


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


async def delete(request: web.Request, proxy: Proxy) -> web.Response:
    req = await _request(request, proxy, DeleteRequest)
    try:
        keys = [CacheKey.parse(text) for text in req.keys]
    except InvalidKeyError as e:
        raise ClientError(f"invalid request: {e}") from e
    deleted = await asyncio.to_thread(lambda: [k.text for k in keys if proxy.store.delete(k)])
    return _answer(DeleteResponse(deleted=deleted))


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
    if proxy.embedding_upstream:
        # the image itself too: the embedding model reads it when compare needs its vector
        await proxy.lookup.run(lambda: keep_source(proxy, image, pin=req.pin, ttl=req.ttl))
    for tag in req.tags:
        await proxy.lookup.run(proxy.store.add_tag, result.key, tag)
    description, described = None, None
    if req.describe is not None:
        description, described = await describe(proxy, result.key.digest, req.describe, req.model)
    answer = WarmResponse(
        key=result.key.text,
        digest=result.key.digest,
        namespace=result.namespace.id,
        status=result.status,
        encode_ms=result.encode_ms,
        bytes=result.nbytes,
        ref=ref,
        description=description,
        described=described,
    )
    return _answer(answer, exclude_none=True)  # no "description" unless asked for


class _Comparisons:
    """The app's `Comparison`, made on first use (it holds the embedding upstream's
    connections, which a proxy that never compares should not open)."""

    def __init__(self) -> None:
        self.made: Comparison | None = None

    def get(self, proxy: Proxy) -> Comparison:
        if self.made is None:
            source: Source = (
                EmbeddingModel(proxy, proxy.embedding_upstream)
                if proxy.embedding_upstream
                else PooledPackages(proxy, "")
            )
            self.made = Comparison(proxy, VectorCache(proxy, source))
        return self.made


COMPARISONS: web.AppKey[_Comparisons] = web.AppKey("comparisons", _Comparisons)


def _comparison(request: web.Request, proxy: Proxy) -> Comparison:
    return request.app[COMPARISONS].get(proxy)


async def _close_comparison(app: web.Application) -> None:
    made = app[COMPARISONS].made
    if made is not None:
        await made.aclose()


async def compare(request: web.Request, proxy: Proxy) -> web.StreamResponse:
    """Shortlist references by embedding similarity, then have the VLM judge the finalists."""
    req = await _request(request, proxy, CompareRequest)
    comparison = _comparison(request, proxy)
    if not req.stream:
        return _answer(await comparison.run(req))
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)

    async def emit(event: Event) -> None:
        await resp.write(event.model_dump_json(exclude_none=True).encode() + b"\n")

    try:
        reply = await comparison.run(req, emit)
        await emit(Event(event="result", result=reply))
    except ProxyError as e:
        # the status line is out: the error travels as the last event
        await emit(Event(event="error", error=e.body()["error"]))
    await resp.write_eof()
    return resp
