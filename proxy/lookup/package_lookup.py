"""From one image in a request to the package that replaces it: store, else upstream's encoder.

The contract with the rest of the proxy: `resolve()` returns a package object to put in the
request, or None to leave the image as the client sent it (the fallback). It raises only for
what would fail direct too, or must not reach upstream: a URL refused by the fetch policy, an
image that cannot be fetched, an unknown ``vcache://`` reference. Everything that goes wrong on
the cache path itself (store, encode endpoint, a bad package) is a fallback, counted.

The lookup chain: the local store (hot RAM, then disk); then, with a shared tier configured,
the fleet's copy in Redis, written through to the local store; then upstream's encoder, under
a best-effort fleet lock so that two proxies do not encode the same image at once, and the
result published to the fleet. Names resolve locally first, then fleet-wide (docs/scaling.md).
The shared tier never raises: Redis trouble is a miss there, never a fallback here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import xxhash

from proxy.errors import (
    ClientError,
    MediaError,
    MediaFetchFailed,
    MediaNotAllowed,
    MediaTooLarge,
    UnknownReference,
    UpstreamError,
)
from proxy.images.image_bytes import ImageBytes
from proxy.images.inspection import inspect
from proxy.images.media import MediaLoader, is_locator
from proxy.images.modality import Modality, sniff
from proxy.images.slots import ImageSlot, InlinePayload, Package
from proxy.lookup.admission import Admission, Declined
from proxy.lookup.exports import (
    ExportBatch,
    ExportTicket,
    export_name,
    read_export,
    remove_export,
    shares_dir,
    sweep_exports,
)
from proxy.upstream.client import Capabilities, EmbeddingDir, Encoded, Upstream
from proxy.web.metrics import Metrics
from vision_cache.errors import PackageError, VisionCacheError
from vision_cache.keys import CacheKey, Namespace
from vision_cache.package import EmbeddingFileRef, PackageHeader, StoredPackage
from vision_cache.shared.tier import NullSharedTier, SharedEntry, SharedTier
from vision_cache.singleflight import SingleFlight
from vision_cache.store import Store
from vision_cache.store.entry import Entry

if TYPE_CHECKING:  # workers of their own, imported only by `--encoder local`
    from proxy.lookup.local_encoder import LocalEncoder

log = logging.getLogger("vcache.lookup")

Transport = Literal["auto", "file", "inline"]
SWEEP_EVERY_S = 300.0  # how often exports nobody adopted are looked for ...
SWEEP_AFTER_S = 600.0  # ... and how old they must be to go
UNSHARED_RECHECK_S = 10.0  # how long an upstream directory found not shared is taken as such
REFERENCE_PREFIX = "vcache://"
_DIGEST_REF = re.compile(r"sha256:([0-9a-f]{64})")


@dataclasses.dataclass(frozen=True)
class WarmResult:
    key: CacheKey
    namespace: Namespace
    status: Literal["cached", "encoded"]
    encode_ms: float
    nbytes: int


@dataclasses.dataclass
class RequestTally:
    """What the cache did for one request (the X-Vcache header).

    ``hits``, ``misses`` and ``fallbacks`` count every medium; the ``audio_*`` fields count the
    audio clips among them, and appear in the header when the request had any.
    """

    hits: int = 0
    misses: int = 0
    fallbacks: int = 0
    encode_ms_saved: float = 0.0
    audio_hits: int = 0
    audio_misses: int = 0
    audio_fallbacks: int = 0
    bypassed: int = 0  # sent as they came: the request said Cache-Control: no-store/no-cache
    result: str = ""  # the result cache: hit, miss, refresh or skip (empty: not asked)

    def count(self, outcome: Literal["hit", "miss", "fallback"], modality: Modality) -> None:
        audio = modality == "audio"
        if outcome == "hit":
            self.hits += 1
            self.audio_hits += audio
        elif outcome == "miss":
            self.misses += 1
            self.audio_misses += audio
        else:
            self.fallbacks += 1
            self.audio_fallbacks += audio

    def all_fallback(self) -> None:
        """Upstream refused the packages: every hit and miss went out as sent after all."""
        self.fallbacks += self.hits + self.misses
        self.audio_fallbacks += self.audio_hits + self.audio_misses
        self.hits = self.misses = self.audio_hits = self.audio_misses = 0

    def unexported(self) -> int:
        """Upstream answered an error to a request whose misses went as sent for their export:
        nothing was exported, so they count as media that went out as sent. Returns how many."""
        moved = self.misses
        self.fallbacks += self.misses
        self.audio_fallbacks += self.audio_misses
        self.misses = self.audio_misses = 0
        return moved

    def header(self) -> str:
        text = (
            f"hits={self.hits} misses={self.misses} fallback={self.fallbacks} "
            f"encode_ms_saved={self.encode_ms_saved:.0f}"
        )
        if self.audio_hits or self.audio_misses or self.audio_fallbacks:
            text += (
                f" audio_hits={self.audio_hits} audio_misses={self.audio_misses} "
                f"audio_fallback={self.audio_fallbacks}"
            )
        if self.bypassed:
            text = f"{text} bypass={self.bypassed}"
        return f"{text} result={self.result}" if self.result else text


@dataclasses.dataclass(frozen=True)
class _Filled:
    """A package that was missing here: the fleet's copy, or fresh from upstream's encoder."""

    header: PackageHeader
    payload: bytes | memoryview
    encode_ms: float
    from_fleet: bool


class PackageLookup:
    def __init__(
        self,
        store: Store,
        upstream: Upstream,
        media: MediaLoader,
        metrics: Metrics,
        *,
        transport: Transport,
        pin_new: bool = False,
        shared: SharedTier | None = None,
        encoder: LocalEncoder | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._store = store
        self._encoder = encoder
        self._shared = shared or NullSharedTier()
        self._upstream = upstream
        self._media = media
        self._metrics = metrics
        self._transport = transport
        # file references: forced, or (auto) while upstream shares the store's directory
        self._by_file = transport == "file"
        self._dir_shared = False  # upstream's embedding directory is the store's (by its token)
        self._shared_dirs: set[str] = set()  # tokens of upstream directories found shared
        self._unshared: dict[str | None, float] = {}  # ... and when others were last looked for
        self._admission = admission or Admission()
        self._declined = Declined()
        # misses being exported, by key: the leading request's export, which later requests
        # for the same image wait for (see proxy.lookup.exports)
        self._exporting: dict[str, asyncio.Task[_Filled | None]] = {}
        self._chores: set[asyncio.Task[None]] = set()
        self._last_sweep = 0.0
        self._flight: SingleFlight[_Filled] = SingleFlight()
        self._fetches: SingleFlight[_Filled | None] = SingleFlight()  # vcache:// from the fleet
        # store calls block (SQLite, fsync): never on the event loop
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vcache-store")
        self._registered: set[str] = set()

    @property
    def encoder(self) -> Literal["local", "server"]:
        """Who encodes on a miss: the local encoder's workers, or upstream's server."""
        return "server" if self._encoder is None else "local"

    async def capabilities(self, model: str = "") -> Capabilities:
        """Upstream's capabilities, with the namespace of whoever encodes on a miss.

        With a local encoder the packages are its own: its build and settings name the
        namespace, so they never mix with the server's unless they are the same build.
        """
        caps = await self._upstream.capabilities(model)
        if caps.embedding_dir is not None and await self._shares_dir(caps.embedding_dir):
            caps = dataclasses.replace(caps, shares_dir=True)
        self._dir_shared = caps.shares_dir
        self._by_file = self._transport == "file" or (self._transport == "auto" and caps.shares_dir)
        if self._encoder is None or caps.namespace is None:
            return caps
        return dataclasses.replace(caps, namespace=self._encoder.namespace())

    @property
    def transport(self) -> Literal["file", "inline"]:
        """How packages travel now: by file reference, or inline (see `capabilities`)."""
        return "file" if self._by_file else "inline"

    async def _shares_dir(self, theirs: EmbeddingDir) -> bool:
        """Whether upstream's embedding directory is the store's (checked by its token)."""
        if theirs.token in self._shared_dirs:
            return True
        now = time.monotonic()
        if now - self._unshared.get(theirs.token, -UNSHARED_RECHECK_S) < UNSHARED_RECHECK_S:
            return False  # looked for lately: not a file read per request
        if not await asyncio.to_thread(shares_dir, self._store.segments_dir, theirs):
            # looked for again later: the token file may come after the capabilities
            self._unshared = {theirs.token: now}
            return False
        assert theirs.token is not None
        self._shared_dirs.add(theirs.token)
        log.info("upstream shares the store's directory: packages travel as file references")
        return True

    async def _encode(self, image: ImageBytes, model: str, modality: Modality) -> Encoded:
        # the local encoder (llama-cpp-python) has no audio path: clips go to upstream's
        if self._encoder is not None and modality == "image":
            return await self._encoder.encode(await asyncio.to_thread(image.data), image.mime)
        caps = await self._upstream.capabilities(model)
        return await self._upstream.encode(caps, image, model, modality)

    async def resolve(
        self,
        slot: ImageSlot,
        caps: Capabilities,
        model: str,
        tally: RequestTally,
        exports: ExportBatch | None = None,
    ) -> Package | None:
        """The package for `slot`, or None to leave its image as the client sent it.

        With `exports` (one per request), a miss on an upstream that exports is left as sent
        too, and its ticket in `exports` asks upstream for its package (`settle_exports`)."""
        once = _Once(exports.classified if exports is not None else None)
        try:
            return await self._resolve(slot, caps, model, tally, exports, once)
        finally:
            once()

    async def _resolve(
        self,
        slot: ImageSlot,
        caps: Capabilities,
        model: str,
        tally: RequestTally,
        exports: ExportBatch | None,
        classified: Callable[[], None],
    ) -> Package | None:
        if caps.namespace is None and caps.audio_namespace is None:
            return None
        if slot.ref.startswith(REFERENCE_PREFIX):
            return await self._named(slot.ref, caps, tally)
        if self._media.leaves_to_upstream(slot.ref):
            # unread, so of unknown kind: counted where every forwarded medium is, as an image
            return self._fallback(tally, "image")
        try:
            image = await self._image(slot)
        except (MediaNotAllowed, MediaTooLarge, MediaFetchFailed):
            raise
        except MediaError as e:
            if is_locator(slot.ref):
                # upstream would fetch or read it under its own, weaker rules: never forward
                raise
            # inline bytes undecodable here; upstream's more lenient decoder has the last word
            log.info("media left to upstream: %s", e)
            return self._fallback(tally, "image")
        modality = sniff(image.head)
        namespace = caps.namespace_for(modality)
        if modality == "audio" and (namespace is None or not slot.takes_audio):
            # no audio packages upstream, or no form for one here: the clip goes as sent
            return self._fallback(tally, "audio")
        if namespace is None:
            # upstream takes no image packages (its projector type is not verified)
            return self._fallback(tally, "image")
        if modality == "image":
            # a bomb or a broken file must never reach upstream's decoder: 400 here
            await asyncio.to_thread(_check_header, image)
        # a clip upstream cannot decode fails its encode, and goes out as sent: the client gets
        # upstream's own answer to it, and nothing is stored
        assert namespace is not None
        key = namespace.key(image.digest)
        if exports is not None and self._exports_misses(caps, modality):
            return await self._by_export(key, namespace, caps, tally, modality, exports, classified)
        classified()
        return await self._by_key(key, namespace, image, model, tally, modality)

    def _exports_misses(self, caps: Capabilities, modality: Modality) -> bool:
        """Whether a miss goes upstream raw and comes back exported (else it is encoded first,
        by the local encoder or upstream's encode endpoint)."""
        return caps.export and (self._encoder is None or modality == "audio")

    async def _image(self, slot: ImageSlot) -> ImageBytes:
        """The slot's media, read and hashed on a worker thread: a 10 MB image costs tens of
        milliseconds, which the event loop owes everyone else."""
        if slot.span is not None or not is_locator(slot.ref):
            image = await asyncio.to_thread(self._media.inline, slot.span or slot.ref)
        else:
            media = await self._media.load(slot.ref)
            image = await asyncio.to_thread(ImageBytes.of, media.data, media.mime or slot.mime)
        if image.mime is None and slot.mime is not None:
            image = dataclasses.replace(image, mime=slot.mime)
        return image

    async def _by_key(
        self,
        key: CacheKey,
        namespace: Namespace,
        image: ImageBytes,
        model: str,
        tally: RequestTally,
        modality: Modality = "image",
    ) -> Package | None:
        try:
            entry = await self._run(self._store.get, key)
            if entry is not None:
                return self._hit(entry, tally)
            filled = await self._flight.run(
                key.text, lambda: self._fill(key, namespace, image, model, modality=modality)
            )
            entry = await self._run(self._store.get, key)
            if filled.from_fleet:
                return self._fleet_hit(filled, entry, tally)
            self._count_miss(tally, modality)
            if entry is not None:
                return self._part(entry)
            # not stored (not admitted, disk full): still spares upstream a second encode
            return _inline(filled.header, filled.payload)
        except (UpstreamError, VisionCacheError, OSError) as e:
            log.warning("cache path failed, forwarding the %s: %s", modality, e)
            return self._fallback(tally, modality)

    def _count_miss(self, tally: RequestTally, modality: Modality) -> None:
        tally.count("miss", modality)
        self._metrics.misses.inc()
        if modality == "audio":
            self._metrics.audio_misses.inc()

    # --- misses exported by upstream --------------------------------------------------------

    async def _by_export(
        self,
        key: CacheKey,
        namespace: Namespace,
        caps: Capabilities,
        tally: RequestTally,
        modality: Modality,
        exports: ExportBatch,
        classified: Callable[[], None],
    ) -> Package | None:
        """A miss upstream will export: this request leads the key's export (its image goes
        as sent), or waits for the request that does and goes as a hit."""
        try:
            entry = await self._run(self._store.get, key)
            if entry is not None:
                classified()
                return self._hit(entry, tally)
        except (VisionCacheError, OSError) as e:
            log.warning("cache path failed, forwarding the %s: %s", modality, e)
            return self._fallback(tally, modality)
        task = self._exporting.get(key.text)
        ticket = exports.ticket(key, namespace, modality, caps)
        if key.text in self._declined or ticket is None:
            # not worth keeping (upstream encodes it, as without a cache), or the same image
            # earlier in this request (upstream exports it once)
            classified()
            self._count_miss(tally, modality)
            return None
        if task is None:
            return await self._lead(ticket, tally, classified)
        classified()
        if not await exports.may_wait():
            # this request leads an export itself: waiting here could wait for a request that
            # waits for this one; upstream encodes the image again instead
            self._count_miss(tally, modality)
            return None
        return await self._joined(key, await asyncio.shield(task), tally, modality)

    async def _lead(
        self, ticket: ExportTicket, tally: RequestTally, classified: Callable[[], None]
    ) -> Package | None:
        key = ticket.key
        leading: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._fill_by_export(ticket, leading))
        self._exporting[key.text] = task
        task.add_done_callback(functools.partial(self._export_done, key.text))
        either: set[asyncio.Future[Any]] = {task, leading}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        classified()
        if leading.done() and not leading.cancelled():
            ticket.leading = True
            self._count_miss(tally, ticket.modality)
            return None
        # the fleet had it (or the lead failed before the request could carry the image)
        return await self._joined(key, task.result(), tally, ticket.modality)

    def _export_done(self, key: str, task: asyncio.Task[_Filled | None]) -> None:
        if self._exporting.get(key) is task:
            del self._exporting[key]
        if not task.cancelled():
            task.exception()  # retrieved: an error is logged where it happens

    async def _joined(
        self, key: CacheKey, filled: _Filled | None, tally: RequestTally, modality: Modality
    ) -> Package | None:
        """After another request's export (or the fleet's copy): a hit, or the image as sent
        when there is no package (the export failed, or was not admitted)."""
        if filled is None:
            self._count_miss(tally, modality)
            return None
        try:
            entry = await self._run(self._store.get, key)
        except (VisionCacheError, OSError):
            entry = None
        if filled.from_fleet:
            return self._fleet_hit(filled, entry, tally)
        self._count_hit(filled.encode_ms, tally, modality)
        if entry is not None:
            return self._part(entry)
        self._metrics.package_bytes.inc(memoryview(filled.payload).nbytes)
        return _inline(filled.header, filled.payload)

    async def _fill_by_export(
        self, ticket: ExportTicket, leading: asyncio.Future[None]
    ) -> _Filled | None:
        """The fleet's copy if there is one; else `leading` is set (the request carries the
        image raw and asks for its export) and the export, once named, is adopted."""
        key, namespace = ticket.key, ticket.namespace
        try:
            found = await self._fetch(key, namespace)
            if found is not None:
                return found
            async with self._shared.claim(key) as claim:
                if claim.elsewhere:
                    found = await self._fetch_waiting(key, namespace)
                    if found is not None:
                        return found
                leading.set_result(None)
                name = await self._export_named(ticket)
                if name is None:
                    return None
                return await self._adopt(ticket, name)
        except (UpstreamError, VisionCacheError, OSError) as e:
            log.warning("export of %s not adopted: %s", key.text, e)
            return None
        finally:
            if not leading.done():
                leading.cancel()

    async def _fetch_waiting(self, key: CacheKey, namespace: Namespace) -> _Filled | None:
        found = await self._shared.wait_for(key)
        return await self._from_fleet(key, namespace, found, pin=False, ttl=None)

    async def _export_named(self, ticket: ExportTicket) -> str | None:
        """The export's name once upstream has written it: from the answer's header, or, where
        the proxy shares upstream's directory, as soon as its file appears (upstream writes it
        right after the encode, before the request's prompt is done: requests waiting for the
        package need not wait for the whole answer)."""
        caps = ticket.caps
        if not caps.shares_dir or caps.encoder_id is None:
            return await ticket.exported
        name = export_name(ticket.key.digest, caps.encoder_id)
        path = self._store.segments_dir / name
        delay = 0.005
        while not ticket.exported.done():
            if path.exists():  # written atomically, the payload before the .json
                return name
            await asyncio.wait({ticket.exported}, timeout=delay)
            delay = min(delay * 2, 0.1)
        return ticket.exported.result() or (name if path.exists() else None)

    async def _adopt(self, ticket: ExportTicket, name: str) -> _Filled | None:
        """Take upstream's export of `ticket`'s medium into the store, if it is worth keeping."""
        key = ticket.key
        if ticket.caps.shares_dir:
            encoded = await self._run(read_export, self._store.segments_dir, name)
            await self._run(remove_export, self._store.segments_dir, name)
            self._sweep_now_and_then()
        else:
            encoded = await self._upstream.take_export(name)
        if encoded.header.image_id != key.digest:
            raise PackageError(f"export {name} holds the package of another medium")
        self._metrics.encode_ms.inc(encoded.encode_ms)
        if not await self._keep(key, ticket.namespace, encoded):
            return None
        return _Filled(encoded.header, encoded.payload, encoded.encode_ms, from_fleet=False)

    async def _keep(
        self,
        key: CacheKey,
        namespace: Namespace,
        encoded: Encoded,
        *,
        pin: bool = False,
        ttl: float | None = None,
        warming: bool = False,
    ) -> bool:
        """Store a fresh package here and in the fleet, if admitted (`Admission`; what is
        warmed is kept whatever it cost)."""
        nbytes = len(encoded.payload)
        if not warming and not self._admission.admits(encoded.encode_ms, nbytes, self._by_file):
            self._declined.add(key.text)
            self._metrics.not_admitted.inc()
            log.info(
                "not cached: %s encoded in %.1f ms, under the %.1f ms a hit of %d bytes costs",
                key.text,
                encoded.encode_ms,
                self._admission.threshold_ms(nbytes, self._by_file),
                nbytes,
            )
            return False
        stored = StoredPackage(encoded.header, encoded.encode_ms)
        await self._register(namespace)
        put = functools.partial(self._store.put, pin=pin, ttl=ttl)
        meta = stored.to_meta()
        if await self._run(put, key, meta, encoded.payload) is None:
            log.warning("store refused %s (disk full or unwritable): serving uncached", key.text)
        await self._shared.put(key, meta, encoded.payload, pin=pin, ttl=ttl)
        return True

    def settle_exports(self, exports: ExportBatch, exported: str | None) -> None:
        """Hand a request's tickets upstream's answer (`EXPORTED_HEADER`'s value; None: the
        request failed); exports nobody asked for (an image that went raw for another reason)
        are deleted."""
        exports.settle(exported)
        unknown, exports.unknown = exports.unknown, []
        if unknown:
            self._chore(self._discard_exports(unknown))

    async def _discard_exports(self, names: list[str]) -> None:
        for name in names:
            try:
                if self._dir_shared:  # else only upstream can reach them, whatever the transport
                    await self._run(remove_export, self._store.segments_dir, name)
                else:
                    await self._upstream.take_export(name)  # taken, so removed; dropped here
            except (UpstreamError, OSError) as e:
                log.info("could not delete upstream's export %s: %s", name, e)

    def _sweep_now_and_then(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep >= SWEEP_EVERY_S:
            self._last_sweep = now
            self._chore(self._sweep())

    async def _sweep(self) -> None:
        removed = await self._run(sweep_exports, self._store.segments_dir, SWEEP_AFTER_S)
        if removed:
            log.info("deleted %d stale export file(s) nobody adopted", removed)

    def _chore(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background, holding on to it until it ends."""
        task = asyncio.create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _encode_and_store(
        self,
        key: CacheKey,
        namespace: Namespace,
        image: ImageBytes,
        model: str,
        *,
        pin: bool = False,
        ttl: float | None = None,
        modality: Modality = "image",
        warming: bool = False,
    ) -> Encoded:
        with self._metrics.encode_seconds.time():
            encoded = await self._encode(image, model, modality)
        self._metrics.encode_ms.inc(encoded.encode_ms)
        await self._keep(key, namespace, encoded, pin=pin, ttl=ttl, warming=warming)
        return encoded

    async def _fill(
        self,
        key: CacheKey,
        namespace: Namespace,
        image: ImageBytes,
        model: str,
        *,
        pin: bool = False,
        ttl: float | None = None,
        modality: Modality = "image",
        warming: bool = False,
    ) -> _Filled:
        """A key missing here: the fleet's copy if there is one (or once the proxy holding the
        key's fleet lock has published it), else upstream's encode. Stored here either way."""
        found = await self._fetch(key, namespace, pin=pin, ttl=ttl)
        if found is not None:
            return found
        async with self._shared.claim(key) as claim:
            if claim.elsewhere:
                found = await self._from_fleet(
                    key, namespace, await self._shared.wait_for(key), pin=pin, ttl=ttl
                )
                if found is not None:
                    return found
            # the lock is best effort: past the wait's bound, or without Redis, encode anyway
            encoded = await self._encode_and_store(
                key, namespace, image, model, pin=pin, ttl=ttl, modality=modality, warming=warming
            )
        return _Filled(encoded.header, encoded.payload, encoded.encode_ms, from_fleet=False)

    async def _fetch(
        self, key: CacheKey, namespace: Namespace, *, pin: bool = False, ttl: float | None = None
    ) -> _Filled | None:
        return await self._from_fleet(key, namespace, await self._shared.get(key), pin=pin, ttl=ttl)

    async def _from_fleet(
        self,
        key: CacheKey,
        namespace: Namespace,
        found: SharedEntry | None,
        *,
        pin: bool,
        ttl: float | None,
    ) -> _Filled | None:
        """Write a shared-tier hit through to the local store, pinned if the fleet pinned it."""
        if found is None:
            return None
        try:
            stored = _fleet_package(key, found)
        except PackageError as e:
            log.warning(
                "shared tier holds an unusable package for %s, replacing it: %s", key.text, e
            )
            await self._shared.discard(key)
            return None
        await self._register(namespace)
        put = functools.partial(self._store.put, pin=pin or found.pinned, ttl=ttl)
        if await self._run(put, key, found.meta, found.payload) is None:
            log.warning("store refused %s (disk full or unwritable): serving uncached", key.text)
        return _Filled(stored.header, found.payload, stored.encode_ms, from_fleet=True)

    async def warm(
        self,
        image: bytes,
        mime: str | None,
        model: str,
        *,
        pin: bool,
        name: str | None,
        ttl: float | None,
    ) -> WarmResult:
        """Make sure one image or clip is cached (encoding it if needed), pinned and named."""
        modality = sniff(image)
        namespace = (await self.capabilities(model)).namespace_for(modality)
        if namespace is None:
            raise ClientError(
                f"upstream takes no {modality} packages: nothing to warm "
                "(a patched llama-server started with --image-embedding?)"
            )
        held = await asyncio.to_thread(ImageBytes.of, image, mime)
        key = namespace.key(held.digest)
        entry = await self._run(self._store.get, key)
        encode_ms = 0.0
        status_: Literal["cached", "encoded"] = "cached"
        if entry is None:
            filled = await self._flight.run(
                key.text,
                lambda: self._fill(
                    key, namespace, held, model, pin=pin, ttl=ttl, modality=modality, warming=True
                ),
            )
            if not filled.from_fleet:
                encode_ms, status_ = filled.encode_ms, "encoded"
            entry = await self._run(self._store.get, key)
            if entry is None:
                raise UpstreamError("encoded, but the cache could not store it (disk full?)")
        if pin and not entry.pinned:
            await self._run(self._store.pin, key)
        if name:
            await self._run(self._store.set_name, key, name)
        await self._publish(entry, pin=pin, ttl=ttl, name=name)
        return WarmResult(key, namespace, status_, encode_ms, entry.nbytes)

    async def _publish(
        self, entry: Entry, *, pin: bool, ttl: float | None, name: str | None
    ) -> None:
        """Make a warmed entry the fleet's too: it may predate the shared tier, or Redis may
        have lost it. Where the fleet has it already, this only pins it (if asked)."""
        await self._shared.put(entry.key, entry.meta, entry.payload, pin=pin, ttl=ttl)
        if name:
            await self._shared.set_name(entry.key, name)

    def leaves_to_upstream(self, ref: str) -> bool:
        """A file URL only upstream can read (see `MediaLoader.leaves_to_upstream`)."""
        if not self._media.leaves_to_upstream(ref):
            return False
        log.info(
            "file URL forwarded as it came, not cached: upstream reads it under its own "
            "--media-path (start vcache with the same --media-path to cache it)"
        )
        return True

    async def load_media(self, ref: str) -> tuple[bytes, str | None]:
        media = await self._media.load(ref)
        if sniff(media.data) == "image":
            await asyncio.to_thread(inspect, media.data)
        return media.data, media.mime

    async def present(self, namespace: Namespace, digests: list[str]) -> dict[str, bool]:
        """Cached, readable, unexpired `digests` of `namespace`, each with its pinned flag."""

        def check() -> dict[str, bool]:
            found = {}
            for d in digests:
                entry = self._store.get(namespace.key(d))
                if entry is not None:
                    found[d] = entry.pinned
            return found

        result: dict[str, bool] = await self._run(check)
        return result

    async def _named(self, ref: str, caps: Capabilities, tally: RequestTally) -> Package:
        """A vcache:// reference: an image's package, else a clip's (names are per namespace)."""
        spaces = [ns for ns in (caps.namespace, caps.audio_namespace) if ns is not None]
        for namespace in spaces:
            part = await self._named_in(ref, namespace, tally)
            if part is not None:
                return part
        return self._unknown(ref, spaces[0])

    async def _named_in(
        self, ref: str, namespace: Namespace, tally: RequestTally
    ) -> Package | None:
        target = ref[len(REFERENCE_PREFIX) :]
        m = _DIGEST_REF.fullmatch(target)
        try:
            key = namespace.key(m.group(1)) if m else await self._resolve_name(namespace, target)
        except VisionCacheError as e:
            raise UnknownReference(f"bad reference {ref!r}: {e}") from e
        entry = await self._run(self._store.get, key) if key else None
        try:
            if entry is not None:
                return self._hit(entry, tally)
            return await self._named_from_fleet(key, namespace, tally) if key else None
        except PackageError as e:
            raise UnknownReference(f"{ref} is stored but unreadable ({e}); warm it again") from e

    async def image_digest(self, slot: ImageSlot, namespace: Namespace | None) -> str | None:
        """The SHA-256 of the image in `slot` (its bytes, or what a ``vcache://`` reference
        names); None for one this lookup cannot tell: an unknown name, a file URL left to
        upstream, inline bytes only upstream's decoder may read (the request path then
        decides what happens to them)."""
        if slot.span is None and slot.ref.startswith(REFERENCE_PREFIX):
            return await self.reference_digest(slot.ref, namespace)
        if slot.span is None and self._media.leaves_to_upstream(slot.ref):
            return None
        try:
            return (await self._image(slot)).digest
        except (MediaNotAllowed, MediaTooLarge, MediaFetchFailed):
            raise
        except MediaError:
            return None

    async def reference_digest(self, ref: str, namespace: Namespace | None) -> str | None:
        """The SHA-256 a ``vcache://`` reference names; None for a name not known here."""
        m = _DIGEST_REF.fullmatch(ref[len(REFERENCE_PREFIX) :])
        if m:
            return m.group(1)
        if namespace is None:
            return None
        try:
            key = await self._resolve_name(namespace, ref[len(REFERENCE_PREFIX) :])
        except VisionCacheError:
            return None
        return key.digest if key else None

    async def run(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` on the store's threads (store calls block: never on the event loop)."""
        return await self._run(fn, *args)

    async def _resolve_name(self, namespace: Namespace, name: str) -> CacheKey | None:
        """Local names first, then the fleet's; a fleet name is remembered here."""
        key: CacheKey | None = await self._run(self._store.resolve_name, namespace, name)
        if key is None:
            key = await self._shared.resolve_name(namespace.id, name)
            if key is not None:
                await self._run(self._store.set_name, key, name)
        return key

    async def _named_from_fleet(
        self, key: CacheKey, namespace: Namespace, tally: RequestTally
    ) -> Package | None:
        filled = await self._fetches.run(key.text, lambda: self._fetch(key, namespace))
        if filled is None:
            return None
        return self._fleet_hit(filled, await self._run(self._store.get, key), tally)

    def _unknown(self, ref: str, namespace: Namespace) -> Package:
        raise UnknownReference(
            f"{ref} is not in the cache for namespace {namespace.id[:16]} "
            "(never warmed for this model and settings, or evicted)"
        )

    def _hit(self, entry: Entry, tally: RequestTally) -> Package:
        stored = StoredPackage.from_meta(entry.meta)
        part = self._part(entry, stored)
        self._count_hit(stored.encode_ms, tally, stored.header.modality)
        return part

    def _fleet_hit(self, filled: _Filled, entry: Entry | None, tally: RequestTally) -> Package:
        """Another proxy's encode: a hit here, served from the local copy when the
        write-through stored one."""
        self._count_hit(filled.encode_ms, tally, filled.header.modality)
        if entry is not None:
            return self._part(entry)
        self._metrics.package_bytes.inc(memoryview(filled.payload).nbytes)
        return _inline(filled.header, filled.payload)

    def _count_hit(self, encode_ms: float, tally: RequestTally, modality: Modality) -> None:
        tally.count("hit", modality)
        tally.encode_ms_saved += encode_ms
        self._metrics.hits.inc()
        self._metrics.encode_ms_saved.inc(encode_ms)
        if modality == "audio":
            self._metrics.audio_hits.inc()

    def _part(self, entry: Entry, stored: StoredPackage | None = None) -> Package:
        header = (stored or StoredPackage.from_meta(entry.meta)).header
        self._metrics.package_bytes.inc(entry.nbytes)
        if self._by_file:
            ref = entry.ref
            return header.by_reference(
                EmbeddingFileRef(ref.segment, ref.offset, ref.length, ref.checksum)
            )
        # The store checks a payload once per process; bytes changed under its mapping since
        # (a disk error, a stray write) must not become embeddings. A file reference upstream
        # checks itself; inline ones are ours to check (cheap beside the base64 encoding).
        if xxhash.xxh3_64_hexdigest(entry.payload) != entry.ref.checksum:
            raise PackageError(f"payload of {entry.key.text} changed since it was stored")
        return _inline(header, entry.payload)

    def _fallback(self, tally: RequestTally, modality: Modality) -> Package | None:
        """Count a fallback; the medium stays as the client sent it (hence None)."""
        tally.count("fallback", modality)
        self._metrics.fallbacks.inc()
        if modality == "audio":
            self._metrics.audio_fallbacks.inc()
        return None

    async def _register(self, namespace: Namespace) -> None:
        if namespace.id not in self._registered:
            await self._run(self._store.register_namespace, namespace)
            self._registered.add(namespace.id)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _Once:
    """Calls `fn` the first time it is called, never again (None: does nothing)."""

    def __init__(self, fn: Callable[[], None] | None) -> None:
        self._fn = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


def _fleet_package(key: CacheKey, found: SharedEntry) -> StoredPackage:
    """The package header of a shared-tier hit, checked against its key and payload."""
    stored = StoredPackage.from_meta(found.meta)
    if stored.header.image_id != key.digest:
        raise PackageError(f"package of image {stored.header.image_id[:16]} under another key")
    if stored.header.payload_size != found.payload.nbytes:
        raise PackageError(
            f"payload of {found.payload.nbytes} bytes, its header says {stored.header.payload_size}"
        )
    return stored


def _inline(header: PackageHeader, payload: bytes | memoryview) -> Package:
    """An inline package whose payload is base64'd only as the request is written out: an
    18.6 MB payload in a Python string would then be scanned again by the JSON encoder."""
    return {**header.to_wire(), "data": InlinePayload(payload)}


def _check_header(image: ImageBytes) -> None:
    try:
        inspect(image.head)
    except MediaTooLarge:
        raise
    except MediaError:
        if image.complete():
            raise
        inspect(image.data())  # a header longer than the first piece (a huge EXIF block)
