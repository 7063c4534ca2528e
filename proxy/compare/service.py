"""One comparison: a candidate against a reference set, in stages, each one cheaper to skip.

1. prefilter (only with ``where``): references whose description (sidecar) fails a condition
   drop out; no model runs, descriptions come from the result cache.
2. shortlist: the candidate's vector against the references' (`proxy.compare.vectors`), the
   `top_k` most similar become finalists (`proxy.compare.index`). Vectors are read from the
   store; only those never computed cost a model call.
3. judge: the VLM judges each finalist against the candidate under the rubric
   (`vision_cache.judging`), up to `parallel` at once. The candidate is encoded once, before
   the first question; every image in every question is then a cache hit.

The reply ranks the finalists by the judge's score (then criteria met, then similarity) and
says what each stage cost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from proxy.compare.index import VectorSet
from proxy.compare.internal import post_json
from proxy.compare.sidecars import describe_request, description, passes
from proxy.compare.vectors import DEFAULT_INSTRUCTION, F32, VectorCache, keep_source
from proxy.errors import ClientError, UnknownReference
from proxy.images.json_body import JsonBody
from proxy.images.slots import find_images
from proxy.lookup.result_cache import Decision, image_digests, namespace, result_key
from proxy.web.state import Proxy
from vision_cache.client.compare_api import (
    CompareReply,
    CompareRequest,
    Event,
    Finalist,
    StageCost,
)
from vision_cache.judging import (
    Rubric,
    RubricError,
    VerdictError,
    judge_request,
    message_content,
    parse_verdict,
)
from vision_cache.keys import Namespace, content_digest

CHAT = "/v1/chat/completions"
DEFAULT_PARALLEL = 2
Emit = Callable[[Event], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class Reference:
    label: str
    digest: str
    pinned: bool = False  # its package is: so is its vector


async def _quiet(_: Event) -> None:
    return None


class Comparison:
    """Runs comparisons for one proxy; `vectors` gives the shortlist's vectors."""

    def __init__(self, proxy: Proxy, vectors: VectorCache) -> None:
        self._proxy = proxy
        self._vectors = vectors
        self._sets: dict[tuple[str, int], VectorSet] = {}

    async def aclose(self) -> None:
        close = getattr(self._vectors.source, "aclose", None)
        if close is not None:
            await close()

    async def run(self, req: CompareRequest, emit: Emit = _quiet) -> CompareReply:
        started = time.perf_counter()
        try:
            rubric = Rubric.parse(req.rubric, req.criteria)
        except RubricError as e:
            raise ClientError(str(e)) from e
        ns = await self._packages(req.model)
        refs = await self._references(req, ns)
        candidate = await self._candidate(req)
        stages: dict[str, StageCost] = {}
        if req.where:
            refs, stages["prefilter"] = await self._prefilter(req, refs)
            await emit(Event(event="stage", stage="prefilter", cost=stages["prefilter"]))
        shortlist, stages["shortlist"] = await self._shortlist(req, refs, candidate, emit)
        await emit(Event(event="stage", stage="shortlist", cost=stages["shortlist"]))
        finalists, stages["judge"] = await self._judge(req, rubric, shortlist, candidate, emit)
        await emit(Event(event="stage", stage="judge", cost=stages["judge"]))
        return CompareReply(
            candidate=candidate,
            rubric=rubric.text,
            criteria=list(rubric.criteria),
            recall=self._vectors.source.recall,
            ranking=_ranked(finalists),
            stages=stages,
            total_ms=_ms(started),
            model_calls=sum(s.model_calls for s in stages.values()),
        )

    async def _packages(self, model: str) -> Namespace:
        ns = (await self._proxy.lookup.capabilities(model)).namespace
        if ns is None:
            raise ClientError(
                "upstream takes no packages: compare needs a patched "
                "llama-server started with --image-embedding"
            )
        return ns

    async def _references(self, req: CompareRequest, ns: Namespace) -> list[Reference]:
        refs: list[Reference] = await self._proxy.lookup.run(_reference_set, self._proxy, req, ns)
        if not refs:
            raise ClientError("the reference set is empty")
        present = await self._proxy.lookup.present(ns, [r.digest for r in refs])
        missing = [r.label for r in refs if r.digest not in present]
        if missing:
            raise UnknownReference(
                f"{len(missing)} reference(s) not in the cache (never warmed for this model, or "
                f"evicted): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        return [dataclasses.replace(r, pinned=present[r.digest]) for r in refs]

    async def _candidate(self, req: CompareRequest) -> str:
        """The candidate's digest, its package cached (encoded once, here) and its image
        kept for the embedding model."""
        if req.candidate.startswith("vcache://"):
            ns = await self._packages(req.model)
            digest = await self._proxy.lookup.reference_digest(req.candidate, ns)
            if digest is None:
                raise UnknownReference(f"{req.candidate} is not in the cache")
            return digest
        image, mime = await self._proxy.lookup.load_media(req.candidate)
        await self._proxy.lookup.warm(image, mime, req.model, pin=False, name=None, ttl=None)
        if self._proxy.embedding_upstream:
            await self._proxy.lookup.run(
                lambda: keep_source(self._proxy, image, pin=False, ttl=None)
            )
        return content_digest(image)

    async def _prefilter(
        self, req: CompareRequest, refs: list[Reference]
    ) -> tuple[list[Reference], StageCost]:
        started = time.perf_counter()
        assert req.describe is not None
        kept, undescribed = [], 0
        for ref in refs:
            body = describe_request(f"vcache://sha256:{ref.digest}", req.describe, req.model)
            doc = await self._sidecar(body)
            if doc is None:
                undescribed += 1
            elif passes(doc, req.where):
                kept.append(ref)
        return kept, StageCost(
            ms=_ms(started),
            items_in=len(refs),
            items_out=len(kept),
            cached=len(refs) - undescribed,
            detail={"undescribed": undescribed},
        )

    async def _sidecar(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The description a warm-up stored; never a model call (None if there is none)."""
        caps = await self._proxy.lookup.capabilities(str(body.get("model", "")))
        if caps.identity is None:
            return None
        parsed = JsonBody.of(body)
        slots = find_images(CHAT, parsed, max_images=2)
        images = await image_digests(self._proxy.lookup, slots, caps.namespace)
        if images is None:
            return None
        key = result_key(namespace(caps.identity.components), CHAT, parsed, images)
        found = await self._proxy.result_cache.get(key)
        if found is None:
            return None
        return description(json.loads(found.body))

    async def _shortlist(
        self, req: CompareRequest, refs: list[Reference], candidate: str, emit: Emit
    ) -> tuple[list[tuple[Reference, float]], StageCost]:
        started = time.perf_counter()
        instruction = req.instruction or DEFAULT_INSTRUCTION

        async def progress(done: int, total: int) -> None:
            await emit(Event(event="embedded", done=done, total=total))

        # vectors are kept as their packages are: pinned references' pinned, the rest not
        pinned = [r.digest for r in refs if r.pinned]
        found, cost = await self._vectors.vectors(pinned, instruction, pin=True, progress=progress)
        rest = [candidate, *(r.digest for r in refs if not r.pinned)]
        more, more_cost = await self._vectors.vectors(rest, instruction, progress=progress)
        found.update(more)
        cost = cost.plus(more_cost)
        if candidate not in found:
            raise ClientError("no vector for the candidate image")
        usable = [r for r in refs if r.digest in found]
        if len(usable) < len(refs):
            lost = [r.label for r in refs if r.digest not in found][:5]
            raise ClientError(
                f"{len(refs) - len(usable)} reference(s) have no vector and no "
                f"kept image to compute one (warm them again): {', '.join(lost)}"
            )
        vectors = self._vector_set(usable, found)
        top = vectors.nearest(found[candidate], req.top_k)
        by_digest = {r.digest: r for r in usable}
        shortlist = [(by_digest[n.label], n.similarity) for n in top]
        return shortlist, StageCost(
            ms=_ms(started),
            model_calls=cost.model_calls,
            items_in=len(refs),
            items_out=len(shortlist),
            cached=cost.cached,
            detail={
                "computed": cost.computed,
                "search": vectors.method,
                "recall": self._vectors.source.recall,
            },
        )

    def _vector_set(self, refs: Sequence[Reference], found: dict[str, F32]) -> VectorSet:
        digests = [r.digest for r in refs]
        key = (digests[0] if digests else "", hash(tuple(digests)))
        cached = self._sets.get(key)
        if cached is None:
            # an HNSW graph costs far more to build than one search: keep the last few sets
            cached = VectorSet(digests, np.stack([found[d] for d in digests]))
            if len(self._sets) >= 4:
                self._sets.pop(next(iter(self._sets)))
            self._sets[key] = cached
        return cached

    async def _judge(
        self,
        req: CompareRequest,
        rubric: Rubric,
        shortlist: list[tuple[Reference, float]],
        candidate: str,
        emit: Emit,
    ) -> tuple[list[Finalist], StageCost]:
        started = time.perf_counter()
        limit = asyncio.Semaphore(req.parallel or DEFAULT_PARALLEL)
        results = Decision(self._proxy.result_cache.default_on, self._proxy.result_cache.default_on)
        done = 0

        async def one(ref: Reference, similarity: float) -> Finalist:
            nonlocal done
            body = judge_request(
                rubric,
                reference=f"vcache://sha256:{ref.digest}",
                candidate=f"vcache://sha256:{candidate}",
                model=req.model,
                summary=req.summary,
            )
            async with limit:
                answer = await post_json(self._proxy, CHAT, body, results=results)
            finalist = _finalist(
                ref,
                similarity,
                answer.body if answer.status == 200 else None,
                rubric,
                answer.ms,
                answer.cached,
                answer.error(),
            )
            done += 1
            await emit(
                Event(
                    event="judged",
                    reference=ref.label,
                    done=done,
                    total=len(shortlist),
                    score=finalist.score,
                )
            )
            return finalist

        finalists = await asyncio.gather(*(one(r, s) for r, s in shortlist))
        calls = sum(not f.cached for f in finalists)
        return list(finalists), StageCost(
            ms=_ms(started),
            model_calls=calls,
            items_in=len(shortlist),
            items_out=len(finalists),
            cached=len(finalists) - calls,
        )


def _finalist(
    ref: Reference,
    similarity: float,
    body: Any,
    rubric: Rubric,
    ms: float,
    cached: bool,
    error: str,
) -> Finalist:
    base = {
        "rank": 0,
        "reference": ref.label,
        "digest": ref.digest,
        "similarity": round(similarity, 6),
        "judge_ms": round(ms, 1),
        "cached": cached,
    }
    if body is None:
        return Finalist(**base, error=error)
    try:
        verdict = parse_verdict(message_content(body), rubric)
    except VerdictError as e:
        return Finalist(**base, error=str(e))
    return Finalist(
        **base, score=verdict.score, criteria=dict(verdict.criteria), summary=verdict.summary
    )


def rank_key(f: Finalist) -> tuple[Any, ...]:
    """Best first: judged before failed, then score, criteria met (yes, then partly),
    similarity, and the reference's label for a stable order."""
    marks = list(f.criteria.values())
    return (
        f.score is None,
        -(f.score or 0),
        -marks.count("yes"),
        -marks.count("partly"),
        -f.similarity,
        f.reference,
    )


def _ranked(finalists: list[Finalist]) -> list[Finalist]:
    ordered = sorted(finalists, key=rank_key)
    return [f.model_copy(update={"rank": i + 1}) for i, f in enumerate(ordered)]


def _reference_set(proxy: Proxy, req: CompareRequest, ns: Namespace) -> list[Reference]:
    """The references a request names, labelled (blocking: store reads)."""
    refs = req.references
    names = {key.digest: name for name, key in proxy.store.names(ns).items()}
    if refs.names is not None:
        out = []
        for name in refs.names:
            key = proxy.store.resolve_name(ns, name)
            if key is None:
                raise UnknownReference(f"vcache://{name} is not a reference of this model")
            out.append(Reference(name, key.digest))
        return out
    digests = (
        [k.digest for k in proxy.store.tagged(ns, refs.tag)]
        if refs.tag is not None
        else list(dict.fromkeys(refs.digests or []))
    )
    return [Reference(refs.labels.get(d) or names.get(d) or f"sha256:{d[:12]}", d) for d in digests]


async def describe(
    proxy: Proxy,
    digest: str,
    spec: str | dict[str, Any],
    model: str,
) -> tuple[dict[str, Any] | None, bool]:
    """The description of one warmed image: stored once as a result-cache entry.
    Returns (description or None, whether it came from the cache)."""
    body = describe_request(f"vcache://sha256:{digest}", spec, model)
    answer = await post_json(proxy, CHAT, body, results=Decision(lookup=True, store=True))
    if answer.status != 200:
        raise ClientError(f"describing the image failed: {answer.error()}")
    return description(answer.body), answer.cached


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
