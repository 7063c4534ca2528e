"""The result cache: responses to fully determined requests, kept in the store and replayed.

Off unless the proxy runs with ``--result-cache`` or a request asks for it with the header
``X-Vcache-Result-Cache: on`` (``off`` opts one request out). A request qualifies when its
answer is fully determined: greedy sampling (temperature <= 0, and no XTC, whose dice roll
before the temperature) or a fixed seed, as llama-server would apply the request (the server's
defaults fill in what the request leaves out). Embedding requests always qualify.

The key is everything that changes the answer:

* the generating model, as upstream's ``GET /props`` describes it (model file, build, chat
  templates, default sampling settings and context, the mmproj's identity: see
  `proxy.upstream.client.ModelIdentity`);
* the endpoint, and every field of the body in canonical JSON, each image replaced by the
  SHA-256 of its bytes (a data URI, a URL and a ``vcache://`` name of one image share an
  entry; a name pointed at another image does not);
* a digest of the ``Authorization`` header: an answer paid for with one upstream key is not
  served to a request that does not carry it.

A hit replays status, headers and body as they were first relayed: a stream as the same event
sequence, chunk by chunk, so the client cannot tell it from the first answer except by speed
and by ``X-Vcache: ... result=hit``. Only complete 200 answers are stored, as ordinary store
entries (tiers, budget, TTL). ``Cache-Control: no-cache`` skips the lookup (the fresh answer
replaces the entry), ``no-store`` skips both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import MultiMapping

from proxy.errors import ProxyError
from proxy.images.slots import EMBEDDING_PATHS
from vision_cache.keys import CacheKey, Namespace
from vision_cache.store import Store

if TYPE_CHECKING:
    from proxy.images.json_body import JsonBody
    from proxy.images.slots import ImageSlot
    from proxy.lookup.package_lookup import PackageLookup

RESULT_FORMAT = 1
MAX_RESULT_BYTES = 64 * 1024 * 1024
HEADER = "X-Vcache-Result-Cache"
_UNSEEDED = (-1, 0xFFFFFFFF)  # llama-server's "pick a random seed"
_NOT_KEPT = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "x-vcache",
        "x-request-id",
        "date",
    }
)

Run = Callable[..., Awaitable[Any]]


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the result cache does for one request: look it up, store the fresh answer."""

    lookup: bool
    store: bool

    @property
    def active(self) -> bool:
        return self.lookup or self.store


OFF = Decision(False, False)


def cache_directives(headers: MultiMapping[str]) -> frozenset[str]:
    """The names of a request's Cache-Control directives, lower case, from every such header
    (``max-age=0`` counts as ``max-age``). The image cache reads them too
    (`proxy.web.app.cache_bypassed`)."""
    return frozenset(
        d.strip().split("=")[0].lower()
        for value in headers.getall("Cache-Control", ())
        for d in value.split(",")
    )


def decide(headers: MultiMapping[str], default_on: bool) -> Decision:
    """From the proxy's default and the request's headers (a case-insensitive mapping)."""
    asked = headers.get(HEADER, "").strip().lower()
    if asked in ("on", "1", "true", "yes"):
        on = True
    elif asked in ("off", "0", "false", "no"):
        on = False
    else:
        on = default_on
    if not on:
        return OFF
    directives = cache_directives(headers)
    no_store = "no-store" in directives
    return Decision(lookup="no-cache" not in directives and not no_store, store=not no_store)


def determined(path: str, body: Mapping[str, Any], defaults: Mapping[str, Any]) -> bool:
    """Whether llama-server's answer to `body` on `path` is fully determined by the request."""
    if path in EMBEDDING_PATHS:
        return True
    seed = _number(body.get("seed", defaults.get("seed", -1)))
    if seed is not None and seed.is_integer() and int(seed) not in _UNSEEDED:
        return True
    temperature = _number(body.get("temperature", defaults.get("temperature", 0.8)))
    xtc = _number(body.get("xtc_probability", defaults.get("xtc_probability", 0.0)))
    return temperature is not None and temperature <= 0 and xtc is not None and xtc <= 0


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def namespace(identity: Mapping[str, Any]) -> Namespace:
    """The namespace of one model's results."""
    return Namespace.from_components(
        {"kind": "result", "format": RESULT_FORMAT, "model": dict(identity)}
    )


def result_key(
    ns: Namespace, path: str, body: JsonBody, images: Mapping[str, str], authorization: str = ""
) -> CacheKey:
    """The key of `body` posted to `path`; `images` maps each image as it stands in the parsed
    body (data URI, bare base64, URL, ``vcache://NAME``, or the placeholder of one left in
    the raw body) to the SHA-256 of its bytes."""
    auth = hashlib.sha256(authorization.encode()).hexdigest() if authorization else ""
    doc = {"path": path, "body": _substituted(body.tree, images, body), "auth": auth}
    # allow_nan: the body was parsed with NaN allowed, and must key as it was sent
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return ns.key(hashlib.sha256(text.encode()).hexdigest())


async def image_digests(
    lookup: PackageLookup, slots: Sequence[ImageSlot], ns: Namespace | None
) -> dict[str, str] | None:
    """Each image of a request as it stands in the parsed body -> its SHA-256; None if one
    cannot be told (an unknown ``vcache://`` name: the image path answers that with its own
    error; a file URL or bytes left to upstream)."""
    digests = await asyncio.gather(*(lookup.image_digest(s, ns) for s in slots))
    images: dict[str, str] = {}
    for slot, digest in zip(slots, digests, strict=True):
        if digest is None:
            return None
        if slot.placeholder is not None:
            images[slot.placeholder] = digest
            continue
        images[slot.ref] = digest
        if slot.ref.startswith("data:") and "," in slot.ref:
            # multimodal_data holds bare base64 where the slot's reference is a data URI
            images[slot.ref.split(",", 1)[1]] = digest
    return images


def _substituted(value: Any, images: Mapping[str, str], body: JsonBody) -> Any:
    # a copy in which each image is its digest: the big strings are dropped, never copied;
    # any other string left in the raw body (a long document) keys by its value
    if isinstance(value, str):
        digest = images.get(value)
        if digest is not None:
            return {"vcache-image": digest}
        span = body.span(value)
        return value if span is None else span.text()
    if isinstance(value, dict):
        return {k: _substituted(v, images, body) for k, v in value.items()}
    if isinstance(value, list):
        return [_substituted(v, images, body) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class Recorded:
    """One answer as it was relayed: status, headers, and the body in the chunks it came in."""

    status: int
    headers: tuple[tuple[str, str], ...]
    chunks: tuple[int, ...]
    body: bytes

    def to_meta(self) -> bytes:
        doc = {
            "format": RESULT_FORMAT,
            "status": self.status,
            "headers": [list(h) for h in self.headers],
            "chunks": list(self.chunks),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_entry(cls, meta: bytes, payload: bytes | memoryview) -> Recorded:
        try:
            doc = json.loads(meta)
            headers = tuple((str(k), str(v)) for k, v in doc["headers"])
            chunks = tuple(int(n) for n in doc["chunks"])
            status = int(doc["status"])
        except (ValueError, KeyError, TypeError) as e:
            raise ResultError(f"stored result header is invalid: {e}") from e
        body = bytes(payload)
        if sum(chunks) != len(body) or any(n <= 0 for n in chunks):
            raise ResultError("stored result's chunks do not add up to its body")
        return cls(status, headers, chunks, body)

    async def replay(
        self, request: web.Request, extra_headers: Mapping[str, str]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=self.status)
        for name, value in self.headers:
            resp.headers.add(name, value)
        resp.headers.update(extra_headers)
        if len(self.chunks) <= 1:
            resp.content_length = len(self.body)
        await resp.prepare(request)
        view, pos = memoryview(self.body), 0
        for n in self.chunks:
            await resp.write(view[pos : pos + n])
            pos += n
        await resp.write_eof()
        return resp


class ResultError(ProxyError):
    """A stored result that cannot be replayed (it is then a miss, and replaced)."""


class Recorder:
    """Taps a relayed answer; `recorded()` is the answer if it came whole and may be kept."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: tuple[tuple[str, str], ...] = ()
        self._chunks: list[bytes] = []
        self._size = 0
        self._ok = True

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.headers = tuple((k, v) for k, v in headers if k.lower() not in _NOT_KEPT)
        self._ok = status == 200

    def feed(self, data: bytes) -> None:
        if not self._ok or not data:
            return
        self._size += len(data)
        if self._size > MAX_RESULT_BYTES:
            self._ok, self._chunks = False, []
            return
        self._chunks.append(bytes(data))

    def fail(self) -> None:
        """The answer broke off (or ended in an error event): nothing of it is kept."""
        self._ok, self._chunks = False, []

    def recorded(self) -> Recorded | None:
        if not self._ok or not self._chunks:
            return None
        return Recorded(
            self.status, self.headers, tuple(len(c) for c in self._chunks), b"".join(self._chunks)
        )


class ResultCache:
    """Results in the store; `run` calls a blocking store method off the event loop."""

    def __init__(
        self, store: Store, run: Run, *, default_on: bool = False, ttl_s: float | None = None
    ) -> None:
        self._store = store
        self._run = run
        self.default_on = default_on
        self._ttl = ttl_s
        self._registered: set[str] = set()

    async def get(self, key: CacheKey) -> Recorded | None:
        entry = await self._run(self._store.get, key)
        if entry is None:
            return None
        try:
            return Recorded.from_entry(entry.meta, entry.payload)
        except ResultError:
            await self._run(self._store.delete, key)
            return None

    async def put(
        self, key: CacheKey, ns: Namespace, recorded: Recorded, *, pin: bool = False
    ) -> bool:
        if ns.id not in self._registered:
            await self._run(self._store.register_namespace, ns)
            self._registered.add(ns.id)
        # a refreshed answer (no-cache) replaces the old one: first put wins otherwise
        await self._run(self._store.delete, key)
        put = functools.partial(self._store.put, pin=pin, ttl=self._ttl)
        stored = await self._run(put, key, recorded.to_meta(), recorded.body)
        return stored is not None
