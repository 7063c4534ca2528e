"""Requests the proxy makes to its own upstream, through its own cache.

A comparison's judge questions and a warm-up's descriptions are ordinary llama-server requests
that the proxy builds itself. They take the same path a client's would, short of HTTP: each
image (``vcache://`` references, data URIs) becomes its cached package, and a fully determined
request is answered by the result cache when one is asked for (`Decision`), and stored there,
so a later client sending the same request gets the same answer without the model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import aiohttp

from proxy.errors import ClientError, UpstreamError, UpstreamTimeout
from proxy.images.json_body import JsonBody
from proxy.images.slots import ImageSlot, InlinePayload, find_images
from proxy.lookup.package_lookup import RequestTally
from proxy.lookup.result_cache import (
    OFF,
    Decision,
    Recorded,
    determined,
    image_digests,
    namespace,
    result_key,
)
from proxy.upstream.client import Capabilities
from proxy.web.state import Proxy

JSON_HEADERS = (("Content-Type", "application/json; charset=utf-8"),)


@dataclasses.dataclass(frozen=True)
class Answer:
    """Upstream's answer to one internal request, and what it cost."""

    status: int
    body: Any
    tally: RequestTally
    ms: float
    cached: bool  # from the result cache: no model call

    def error(self) -> str:
        try:
            return str(self.body["error"]["message"])
        except (KeyError, TypeError):
            return f"upstream answered {self.status}"


async def post_json(
    proxy: Proxy, path: str, body: dict[str, Any], *, results: Decision = OFF
) -> Answer:
    """POST `body` to upstream's `path` through the cache path; `body` is changed in place."""
    started = time.perf_counter()
    model = str(body.get("model") or "")
    caps = await proxy.lookup.capabilities(model)
    parsed = JsonBody.of(body)
    slots = find_images(path, parsed, max_images=proxy.limits.max_images)
    tally = RequestTally()
    stored = await _stored_key(proxy, caps, path, parsed, slots, results)
    if stored is not None and results.lookup:
        found = await proxy.result_cache.get(stored[0])
        if found is not None:
            tally.result = "hit"
            proxy.metrics.result_hits.inc()
            return Answer(found.status, json.loads(found.body), tally, _ms(started), True)
    if caps.packages:
        packages = await asyncio.gather(
            *(proxy.lookup.resolve(s, caps, model, tally) for s in slots)
        )
        for slot, pkg in zip(slots, packages, strict=True):
            if pkg is not None:
                data = pkg.get("data")
                if isinstance(data, InlinePayload):
                    # base64 written into the body as it is (proxy.web.app does the same)
                    pkg["data"] = parsed.insert(await asyncio.to_thread(data.base64))
                slot.put_package(pkg)
    elif any(s.ref.startswith("vcache://") for s in slots):
        raise ClientError("vcache:// references need an upstream that takes packages")
    raw = await _post(proxy, path, parsed.dumps().join())
    answer = Answer(raw.status, _json(raw), tally, _ms(started), False)
    if stored is not None and results.store and raw.status == 200:
        tally.result = "miss"
        recorded = Recorded(200, raw.kept_headers(), (len(raw.body),), raw.body)
        if await proxy.result_cache.put(stored[0], stored[1], recorded):
            proxy.metrics.result_stores.inc()
    return answer


async def _stored_key(
    proxy: Proxy,
    caps: Capabilities,
    path: str,
    body: JsonBody,
    slots: list[ImageSlot],
    results: Decision,
) -> Any:
    if not results.active or caps.identity is None:
        return None
    if not determined(path, body.tree, caps.identity.defaults):
        return None
    images = await image_digests(proxy.lookup, slots, caps.namespace)
    if images is None:
        return None
    ns = namespace(caps.identity.components)
    return result_key(ns, path, body, images), ns


@dataclasses.dataclass(frozen=True)
class _Raw:
    """Upstream's whole answer."""

    status: int
    headers: tuple[tuple[str, str], ...]  # as upstream spelt them
    body: bytes

    def kept_headers(self) -> tuple[tuple[str, str], ...]:
        keep = {"content-type", "access-control-allow-origin", "server"}
        return tuple((k, v) for k, v in self.headers if k.lower() in keep)


async def _post(proxy: Proxy, path: str, content: bytes) -> _Raw:
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=proxy.upstream.connect_timeout_s,
        sock_read=proxy.limits.upstream_idle_s,
    )
    try:
        async with proxy.upstream.session.post(
            proxy.upstream.url(path), data=content, headers=dict(JSON_HEADERS), timeout=timeout
        ) as r:
            headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in r.raw_headers)
            return _Raw(r.status, headers, await r.read())
    except TimeoutError as e:  # before ClientError: aiohttp's timeouts are both
        raise UpstreamTimeout(f"upstream did not answer in time: {type(e).__name__}") from e
    except (aiohttp.ClientError, OSError) as e:
        raise UpstreamError(f"upstream is unreachable: {type(e).__name__}: {e}") from e


def _json(raw: _Raw) -> Any:
    try:
        return json.loads(raw.body)
    except ValueError:
        return {"error": {"message": raw.body[:300].decode(errors="replace")}}


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
