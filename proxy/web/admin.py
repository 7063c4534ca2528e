"""The proxy's own endpoints, under /vcache/ (behind the proxy key when one is set).

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
import re
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proxy.errors import ClientError
from proxy.web.body import read_body
from proxy.web.state import PROXY_KEY, Proxy

MAX_LOOKUP = 100_000


class WarmRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, description="data URI, base64, http(s) or file:// URL")
    model: str = ""
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    pin: bool = True
    ttl: float | None = Field(None, gt=0)


class LookupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = ""
    digests: list[str] = Field(max_length=MAX_LOOKUP)


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def add_routes(app: web.Application) -> None:
    def bind(fn: Any) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await fn(request, request.app[PROXY_KEY])  # type: ignore[no-any-return]

        return handler

    app.router.add_get("/vcache/health", bind(health))
    app.router.add_get("/vcache/metrics", bind(metrics))
    app.router.add_get("/vcache/stats", bind(stats))
    app.router.add_get("/vcache/namespace", bind(namespace))
    app.router.add_post("/vcache/lookup", bind(lookup))
    app.router.add_post("/vcache/warm", bind(warm))


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, default=str), status=status, content_type="application/json"
    )


async def _model(request: web.Request, proxy: Proxy, cls: type[BaseModel]) -> Any:
    # under the body limit and budget like any request: aiohttp's own limit is off (proxy.web.app)
    async with proxy.budget.reservation() as held:
        raw = await read_body(request, proxy.limits.max_body_bytes, held)
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        raise ClientError(f"invalid request: {e.errors(include_url=False)}") from e


async def health(request: web.Request, proxy: Proxy) -> web.Response:
    caps = await proxy.upstream.capabilities()
    body: dict[str, Any] = {
        "status": "ok",
        "upstream": proxy.upstream.base_url,
        "packages": caps.packages,
        "encoder": proxy.lookup.encoder,
        "process": _process_stats(),
    }
    if proxy.health_extra:
        body.update(proxy.health_extra())
    return _json(body)


def _process_stats() -> dict[str, int]:
    """What a leak would show: asyncio tasks, open file descriptors, resident memory (Linux)."""
    fd_dir = Path("/proc/self/fd")
    fds = len(list(fd_dir.iterdir())) if fd_dir.is_dir() else -1
    try:
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = -1
    return {"tasks": len(asyncio.all_tasks()), "open_fds": fds, "rss_bytes": rss}


async def metrics(request: web.Request, proxy: Proxy) -> web.Response:
    return web.Response(body=proxy.metrics.render(), content_type="text/plain", charset="utf-8")


async def stats(request: web.Request, proxy: Proxy) -> web.Response:
    result = await asyncio.to_thread(proxy.store.stats)
    return _json(dataclasses.asdict(result))


async def namespace(request: web.Request, proxy: Proxy) -> web.Response:
    caps = await proxy.lookup.capabilities(request.query.get("model", ""))
    ns = caps.namespace
    return _json(
        {"packages": caps.packages, "id": ns.id if ns else None, "text": ns.text if ns else None}
    )


async def lookup(request: web.Request, proxy: Proxy) -> web.Response:
    req: LookupRequest = await _model(request, proxy, LookupRequest)
    if not all(_HEX64.match(d) for d in req.digests):
        raise ClientError("digests must be SHA-256 values as 64 lowercase hex digits")
    caps = await proxy.lookup.capabilities(req.model)
    ns = caps.namespace
    if ns is None:
        raise ClientError("upstream takes no packages")
    present = await proxy.lookup.present(ns, req.digests)
    if caps.audio_namespace is not None:
        # a digest names an image or a clip: clips are keyed in the audio namespace
        present.update(await proxy.lookup.present(caps.audio_namespace, req.digests))
    return _json(
        {
            "namespace": ns.id,
            "present": sorted(present),
            "pinned": sorted(d for d, pinned in present.items() if pinned),
        }
    )


async def warm(request: web.Request, proxy: Proxy) -> web.Response:
    req: WarmRequest = await _model(request, proxy, WarmRequest)
    image, mime = await proxy.lookup.load_media(req.image)
    result = await proxy.lookup.warm(
        image, mime, req.model, pin=req.pin, name=req.name, ttl=req.ttl
    )
    ref = f"vcache://{req.name}" if req.name else f"vcache://sha256:{result.key.digest}"
    return _json(
        {
            "key": result.key.text,
            "digest": result.key.digest,
            "namespace": result.namespace.id,
            "status": result.status,
            "encode_ms": result.encode_ms,
            "bytes": result.nbytes,
            "ref": ref,
        }
    )
