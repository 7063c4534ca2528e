"""The embedding cache: one pooled vector per (embedding model, image, instruction), stored once.

Vectors are ordinary store entries (so they share its tiers, budget, TTL and pins): the
namespace names where they come from, the digest is the image's SHA-256. Two sources:

* `EmbeddingModel`: a second llama-server started with ``--embeddings`` and an mmproj (say
  ``--pooling mean``), asked ``POST /v1/embeddings`` with the instruction and the image as an
  OpenAI content array. Its namespace is the model's identity from ``GET /props`` plus the
  instruction. It needs the image's bytes on a miss: warm-up keeps each reference's source
  image in the store for that (`SOURCE_NAMESPACE`).
* `PooledPackages`: without an embedding model, the mean over tokens of each image's visual
  package, which the cache holds already. No model runs, but nothing trained these vectors
  for similarity: a weaker recall, and the reply says so.

A second run over the same references under the same instruction reads every vector back and
calls no model.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol

import httpx
import numpy as np
import numpy.typing as npt

from proxy.errors import ClientError, ProxyError, UpstreamError
from proxy.upstream.client import CAPS_TTL_S, ModelIdentity
from proxy.web.state import Proxy
from vision_cache.data_uri import data_uri
from vision_cache.keys import CacheKey, Namespace
from vision_cache.package import StoredPackage

F32 = npt.NDArray[np.float32]
VECTOR_FORMAT = 1
DEFAULT_INSTRUCTION = "Represent this image for finding similar images."
EMBED_BATCH = 8
SOURCE_NAMESPACE = Namespace.from_components({"kind": "source-image", "format": 1})
Recall = Literal["embedding-model", "pooled-packages"]
Progress = Callable[[int, int], Awaitable[None]]


class VectorError(ProxyError):
    """A stored vector, or a package to pool, that cannot be used."""


@dataclasses.dataclass
class VectorCost:
    """What getting the vectors cost: computed here (model calls) or read back."""

    computed: int = 0
    cached: int = 0
    model_calls: int = 0

    def plus(self, other: VectorCost) -> VectorCost:
        return VectorCost(
            self.computed + other.computed,
            self.cached + other.cached,
            self.model_calls + other.model_calls,
        )


class Source(Protocol):
    recall: Recall

    async def namespace(self, instruction: str) -> Namespace: ...

    async def compute(
        self, digests: Sequence[str], instruction: str, cost: VectorCost
    ) -> list[F32 | None]: ...


class VectorCache:
    """Vectors of images by digest, from the store or from `source` (then stored)."""

    def __init__(self, proxy: Proxy, source: Source) -> None:
        self._proxy = proxy
        self.source = source
        self._registered: set[str] = set()

    async def vectors(
        self,
        digests: Sequence[str],
        instruction: str,
        *,
        pin: bool = False,
        progress: Progress | None = None,
    ) -> tuple[dict[str, F32], VectorCost]:
        """The vector of each digest that has one (a digest missing from the result had
        neither a stored vector nor what computing one needs)."""
        ns = await self.source.namespace(instruction)
        cost = VectorCost()
        found: dict[str, F32] = await self._proxy.lookup.run(self._read_all, ns, digests)
        cost.cached = len(found)
        todo = [d for d in digests if d not in found]
        for start in range(0, len(todo), EMBED_BATCH):
            batch = todo[start : start + EMBED_BATCH]
            for digest, vector in zip(
                batch, await self.source.compute(batch, instruction, cost), strict=True
            ):
                if vector is not None:
                    found[digest] = vector
                    await self._put(ns, digest, vector, pin)
            if progress:
                await progress(min(start + EMBED_BATCH, len(todo)), len(todo))
        return found, cost

    def _read_all(self, ns: Namespace, digests: Sequence[str]) -> dict[str, F32]:
        store = self._proxy.store
        out: dict[str, F32] = {}
        for digest in digests:
            entry = store.get(ns.key(digest))
            if entry is None:
                continue
            try:
                out[digest] = from_payload(entry.meta, entry.payload)
            except VectorError:
                store.delete(entry.key)
        return out

    async def _put(self, ns: Namespace, digest: str, vector: F32, pin: bool) -> None:
        if ns.id not in self._registered:
            await self._proxy.lookup.run(self._proxy.store.register_namespace, ns)
            self._registered.add(ns.id)
        put = functools.partial(self._proxy.store.put, pin=pin)
        await self._proxy.lookup.run(
            put, ns.key(digest), vector_meta(len(vector)), to_payload(vector)
        )


class PooledPackages:
    """Vectors from the visual packages the cache holds: the mean over each image's tokens."""

    recall: Recall = "pooled-packages"

    def __init__(self, proxy: Proxy, model: str) -> None:
        self._proxy = proxy
        self._model = model

    async def _packages(self) -> Namespace:
        ns = (await self._proxy.lookup.capabilities(self._model)).namespace
        if ns is None:
            raise ClientError("upstream takes no packages: nothing to compare with")
        return ns

    async def namespace(self, instruction: str) -> Namespace:
        # the instruction plays no part: packages are the encoder's, before any text
        return Namespace.from_components(
            {
                "kind": "pooled-package",
                "format": VECTOR_FORMAT,
                "packages": (await self._packages()).id,
            }
        )

    async def compute(
        self, digests: Sequence[str], instruction: str, cost: VectorCost
    ) -> list[F32 | None]:
        ns = await self._packages()
        out: list[F32 | None] = await self._proxy.lookup.run(self._pool_all, ns, digests)
        cost.computed += sum(v is not None for v in out)
        return out

    def _pool_all(self, ns: Namespace, digests: Sequence[str]) -> list[F32 | None]:
        out: list[F32 | None] = []
        for digest in digests:
            entry = self._proxy.store.get(ns.key(digest))
            if entry is None:
                out.append(None)
                continue
            header = StoredPackage.from_meta(entry.meta).header
            out.append(mean_pool(entry.payload, header.n_embd, header.dtype))
        return out


class EmbeddingModel:
    """A llama-server with --embeddings: vectors of (instruction, image) content arrays."""

    recall: Recall = "embedding-model"

    def __init__(self, proxy: Proxy, base_url: str, *, timeout_s: float = 600.0) -> None:
        self._proxy = proxy
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(
            base_url=self.base_url, timeout=httpx.Timeout(timeout_s, connect=5.0)
        )
        self._identity: tuple[float, dict[str, Any]] | None = None

    async def identity(self) -> dict[str, Any]:
        """The model's identity from /props, asked again after CAPS_TTL_S. While the server
        cannot say, the last identity it gave stands: stored vectors stay readable, and only
        computing new ones fails."""
        if self._identity and time.monotonic() - self._identity[0] < CAPS_TTL_S:
            return self._identity[1]
        try:
            r = await self.client.get("/props", timeout=10.0)
            props = r.json() if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError) as e:
            if self._identity:
                return self._identity[1]
            raise UpstreamError(f"the embedding upstream is unreachable: {e!r}") from e
        identity = ModelIdentity.from_props(props if isinstance(props, dict) else {}, "")
        if identity is None:
            raise UpstreamError("the embedding upstream does not describe its model (/props)")
        self._identity = (time.monotonic(), identity.components)
        return identity.components

    async def namespace(self, instruction: str) -> Namespace:
        return Namespace.from_components(
            {
                "kind": "embedding",
                "format": VECTOR_FORMAT,
                "model": await self.identity(),
                "instruction": instruction,
            }
        )

    async def compute(
        self, digests: Sequence[str], instruction: str, cost: VectorCost
    ) -> list[F32 | None]:
        images = await self._proxy.lookup.run(self._sources, digests)
        present = [(i, data) for i, data in enumerate(images) if data is not None]
        out: list[F32 | None] = [None] * len(digests)
        if not present:
            return out
        for (i, _), vector in zip(
            present, await self.embed([d for _, d in present], instruction), strict=True
        ):
            out[i] = vector
        cost.model_calls += 1
        cost.computed += len(present)
        return out

    def _sources(self, digests: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for digest in digests:
            entry = self._proxy.store.get(SOURCE_NAMESPACE.key(digest))
            out.append(bytes(entry.payload) if entry is not None else None)
        return out

    async def embed(self, images: Sequence[bytes], instruction: str) -> list[F32]:
        """One request for all `images` (each with the instruction before it)."""
        inputs = [
            {
                "content": [
                    {"type": "text", "text": instruction},
                    # the media type does not matter to llama-server, which sniffs the bytes
                    {"type": "image_url", "image_url": {"url": data_uri(data, "image/png")}},
                ]
            }
            for data in images
        ]
        try:
            r = await self.client.post(
                "/v1/embeddings", json={"input": inputs, "encoding_format": "base64"}
            )
        except httpx.HTTPError as e:
            raise UpstreamError(f"the embedding upstream failed: {e!r}") from e
        if r.status_code != 200:
            raise UpstreamError(f"the embedding upstream answered {r.status_code}: {r.text[:300]}")
        return _vectors(r.json(), len(images))

    async def aclose(self) -> None:
        await self.client.aclose()


def _vectors(body: Any, n: int) -> list[F32]:
    try:
        rows = sorted(body["data"], key=lambda d: d["index"])
        vectors = [
            np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").astype(np.float32)
            for d in rows
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise UpstreamError(f"the embedding upstream answered no vectors: {e!r}") from e
    if len(vectors) != n:
        raise UpstreamError(f"the embedding upstream answered {len(vectors)} vectors for {n}")
    return vectors


def keep_source(proxy: Proxy, data: bytes, *, pin: bool, ttl: float | None) -> CacheKey:
    """Keep a reference's image itself, so an embedding model can read it later (blocking)."""
    proxy.store.register_namespace(SOURCE_NAMESPACE)
    key = SOURCE_NAMESPACE.key_for_image(data)
    if proxy.store.get(key) is None:
        proxy.store.put(key, b"{}", data, pin=pin, ttl=ttl)
    elif pin:
        proxy.store.pin(key)
    return key


def vector_meta(dim: int) -> bytes:
    return json.dumps(
        {"dim": dim, "dtype": "f32", "format": VECTOR_FORMAT}, separators=(",", ":"), sort_keys=True
    ).encode()


def to_payload(vector: F32) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def from_payload(meta: bytes, payload: bytes | memoryview) -> F32:
    try:
        dim = int(json.loads(meta)["dim"])
    except (ValueError, KeyError, TypeError) as e:
        raise VectorError(f"stored vector header is invalid: {e}") from e
    if memoryview(payload).nbytes != dim * 4:
        raise VectorError(f"stored vector of {memoryview(payload).nbytes} bytes, not {dim * 4}")
    return np.frombuffer(payload, dtype="<f4").astype(np.float32)


def mean_pool(payload: bytes | memoryview, n_embd: int, dtype: str) -> F32:
    """The mean over tokens of a package's embeddings (n_tokens x n_embd, f32 or f16)."""
    raw = np.frombuffer(payload, dtype="<f4" if dtype == "f32" else "<f2")
    if raw.size % n_embd:
        raise VectorError(f"package payload of {raw.size} values is not a multiple of {n_embd}")
    pooled: F32 = raw.reshape(-1, n_embd).astype(np.float32).mean(axis=0)
    return pooled
