"""Exports: the package of a miss, from the very request that sends the image upstream.

Encoding a miss first (``POST /media/embedding``) and then sending the request with its package
costs two round trips and the package through HTTP twice. A patched llama-server that says
``"export": true`` in ``GET /props`` does better (docs/wire-format.md, "Exports"): the request
goes upstream with its raw media and one header, `EXPORT_HEADER`; the server encodes each raw
medium once, for that request, writes its package under its embedding directory, and names the
files in the answer's `EXPORTED_HEADER`. The proxy then adopts them into its store, reading the
files where it shares the directory (`shares_dir`), else over HTTP (`Upstream.take_export`).

One request's misses are an `ExportBatch`; each miss in it is an `ExportTicket`::

    batch = ExportBatch(len(slots))              # one per request, before its slots resolve
    ...                                          # each slot: batch.ticket(key), batch.classified()
    headers = {EXPORT_HEADER: "f32"} if batch.leads else {}
    try:
        resp = await send(request, headers)
        batch.settle(resp.headers.get(EXPORTED_HEADER))
    finally:
        batch.settle(None)                       # whatever was not settled failed

Concurrent requests for the same new image encode it once: the first to miss it leads (its
request carries the image raw, with the header), the others wait for its package and go as
hits. A request that leads an export never waits for another's, so two requests that each
lead one image and want the other's cannot wait for each other: it sends the image raw.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import time
from pathlib import Path

import orjson
import xxhash

from proxy.images.modality import Modality
from proxy.upstream.client import Capabilities, EmbeddingDir, Encoded
from vision_cache.errors import PackageError
from vision_cache.keys import CacheKey, Namespace
from vision_cache.package import parse_reference

log = logging.getLogger("vcache.exports")

DTYPE = "f32"  # what the proxy asks for: exact, like the packages it encodes itself
_NAME = re.compile(r"encoded/([0-9a-f]{64})-([0-9a-f]{16})\.json")
_FILES = re.compile(r"[0-9a-f]{64}-[0-9a-f]{16}\.(json|f32|f16)|.*\.tmp-.*")
_TOKEN_FILE = re.compile(r"encoded/server-[0-9a-f]{32}\.id")


def export_name(digest: str, encoder_id: str) -> str:
    """The name upstream gives the export of the medium whose SHA-256 is `digest`."""
    return f"encoded/{digest}-{encoder_id}.json"


def exported_names(value: str | None) -> dict[str, str]:
    """`EXPORTED_HEADER`'s names by the digest they carry; names of any other shape are
    ignored (the header is upstream's, but nothing outside ``encoded/`` is ever opened)."""
    names = {}
    for name in (value or "").split():
        m = _NAME.fullmatch(name)
        if m:
            names[m.group(1)] = name
    return names


def shares_dir(own: Path, theirs: EmbeddingDir | None) -> bool:
    """Whether `own` (the store's segments directory) is upstream's embedding directory: the
    token upstream wrote there at start-up is in the same file under the proxy's view of it
    (same host and path, or the same mount). A path alone could name another machine's."""
    if theirs is None or theirs.token is None or theirs.token_file is None:
        return False
    if not _TOKEN_FILE.fullmatch(theirs.token_file):
        return False
    try:
        found = (own / theirs.token_file).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return found == theirs.token


def read_export(directory: Path, name: str) -> Encoded:
    """The package exported as `name`, read from `directory` (upstream's, shared with the
    proxy), its payload checked against the checksum upstream wrote. Raises PackageError for
    anything missing, unreadable or inconsistent."""
    if not _NAME.fullmatch(name):
        raise PackageError(f"not an export name: {name!r}")
    try:
        doc = orjson.loads((directory / name).read_bytes())
        header, ref = parse_reference(doc["media_embedding"])
        timings = doc.get("timings") or {}
        encode_ms = float(timings.get("encode_ms", 0.0))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise PackageError(f"export {name} is unreadable: {e}") from e
    if not ref.path.startswith("encoded/") or ".." in ref.path.split("/"):
        raise PackageError(f"export {name} points outside encoded/: {ref.path!r}")
    try:
        with open(directory / ref.path, "rb") as f:
            f.seek(ref.offset)
            payload = f.read(ref.length)
    except OSError as e:
        raise PackageError(f"payload of export {name} is unreadable: {e}") from e
    if len(payload) != ref.length or xxhash.xxh3_64_hexdigest(payload) != ref.xxh3:
        raise PackageError(f"payload of export {name} is short or does not match its checksum")
    return Encoded(header, payload, encode_ms)


def remove_export(directory: Path, name: str) -> None:
    """Delete an export's files (its ``.json`` and its payload), whatever is left of them."""
    if not _NAME.fullmatch(name):
        return
    stem = directory / name[: -len(".json")]
    for suffix in (".json", ".f32", ".f16"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stem.with_suffix(suffix))


def sweep_exports(directory: Path, older_than_s: float) -> int:
    """Delete exports nobody adopted (a proxy stopped between a request and its adoption, a
    request cancelled) and temporary files older than `older_than_s`; returns how many."""
    cutoff = time.time() - older_than_s
    removed = 0
    try:
        entries = list(os.scandir(directory / "encoded"))
    except OSError:
        return 0
    for entry in entries:
        if not _FILES.fullmatch(entry.name):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
    return removed


@dataclasses.dataclass(eq=False)
class ExportTicket:
    """One miss of one request: the key, and what its export comes to.

    `leading` once this request carries the image raw and asks for its export (the key's
    first miss here); `exported` then gets the export's name, or None when there is none (the
    request failed, upstream wrote nothing for it)."""

    key: CacheKey
    namespace: Namespace
    modality: Modality
    caps: Capabilities
    leading: bool = False
    exported: asyncio.Future[str | None] = dataclasses.field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def settle(self, name: str | None) -> None:
        if not self.exported.done():
            self.exported.set_result(name)


class ExportBatch:
    """The misses of one request, and whether it may wait for other requests' exports.

    Each of the request's `slots` says once that it is classified (a hit, a miss it leads, a
    miss someone else leads, or nothing to do with the cache). A slot whose image another
    request is exporting waits for that export only when the whole request leads none."""

    def __init__(self, slots: int) -> None:
        self._tickets: dict[str, ExportTicket] = {}
        self._pending = slots
        self._all_classified = asyncio.Event()
        if slots == 0:
            self._all_classified.set()
        self.unknown: list[str] = []  # exports upstream named that no ticket asked for

    def ticket(
        self, key: CacheKey, namespace: Namespace, modality: Modality, caps: Capabilities
    ) -> ExportTicket | None:
        """A new ticket for `key`; None if this request has one already (the same image twice
        in one request: upstream encodes and exports it once)."""
        if key.text in self._tickets:
            return None
        ticket = ExportTicket(key, namespace, modality, caps)
        self._tickets[key.text] = ticket
        return ticket

    def classified(self) -> None:
        self._pending -= 1
        if self._pending <= 0:
            self._all_classified.set()

    async def may_wait(self) -> bool:
        """Whether this request may wait for another's export (it leads none itself)."""
        await self._all_classified.wait()
        return not self.leads

    @property
    def leads(self) -> bool:
        return any(t.leading for t in self._tickets.values())

    def settle(self, exported: str | None) -> None:
        """Hand each ticket its export's name from upstream's `EXPORTED_HEADER` value (None:
        the request failed, or never went out); names no leading ticket asked for are kept in
        `unknown`. A ticket keeps the first answer it gets."""
        names = exported_names(exported)
        leading = {t.key.digest for t in self._tickets.values() if t.leading}
        for ticket in self._tickets.values():
            ticket.settle(names.get(ticket.key.digest) if ticket.leading else None)
        if exported is not None:
            self.unknown = [n for d, n in names.items() if d not in leading]
