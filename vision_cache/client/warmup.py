"""Warm-up: encode reference images (and audio clips) ahead of time, pin them, and name them.

Warming goes through a running proxy (``vcache serve``), so images are encoded by exactly the
encoder that will later serve them, and land in the cache that proxy reads. Images already
cached are found by their SHA-256 in one lookup and skipped without being uploaded, which makes
warming idempotent and resumable: after Ctrl-C, run it again and only what is missing is encoded.

    import vision_cache

    report = vision_cache.warm(["refs/"], proxy="http://127.0.0.1:8081", names={"cat": "cat.jpg"})
    print(report.refs["cat"])            # vcache://cat, usable wherever an image URL goes
                                         # (a clip's: wherever input_audio data goes)
    for item in report.failed:
        print(item.source, item.error)
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import hashlib
import json
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from vision_cache.client import admin_api as api
from vision_cache.client.admin_api import (
    DEFAULT_PROXY,
    LookupRequest,
    LookupResponse,
    WarmRequest,
    WarmResponse,
    error_message,
    key_headers,
)
from vision_cache.data_uri import file_data_uri
from vision_cache.errors import VisionCacheError
from vision_cache.keys import validate_name

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
# what llama-server decodes as audio (miniaudio: WAV, MP3, FLAC)
AUDIO_SUFFIXES = frozenset({".wav", ".mp3", ".flac"})
LIST_SUFFIXES = frozenset({".txt", ".list", ".lst"})

Status = Literal["encoded", "cached", "skipped", "failed"]
AnswerT = TypeVar("AnswerT", bound=BaseModel)
_JSON = {"Content-Type": "application/json"}


class WarmError(VisionCacheError):
    """Warm-up could not start (no proxy, bad manifest, nothing to warm)."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One image to warm: a local file or a URL, with an optional name and TTL."""

    location: str
    name: str | None = None
    ttl: float | None = None

    @property
    def is_url(self) -> bool:
        return self.location.startswith(("http://", "https://"))


@dataclasses.dataclass(frozen=True)
class Item:
    source: Source
    status: Status
    ref: str = ""
    encode_ms: float = 0.0
    error: str = ""
    description: dict[str, Any] | None = None


@dataclasses.dataclass
class WarmReport:
    items: list[Item] = dataclasses.field(default_factory=list)
    elapsed_s: float = 0.0

    def count(self, status: Status) -> int:
        return sum(1 for i in self.items if i.status == status)

    @property
    def failed(self) -> list[Item]:
        return [i for i in self.items if i.status == "failed"]

    @property
    def refs(self) -> dict[str, str]:
        """name -> vcache://name for every named image that is now cached."""
        return {i.source.name: i.ref for i in self.items if i.source.name and i.status != "failed"}

    @property
    def encode_ms(self) -> float:
        return sum(i.encode_ms for i in self.items)


# --- what to warm ----------------------------------------------------------------------------


def expand(paths: Sequence[str], *, recursive: bool = False) -> list[Source]:
    """Files, folders, globs, URL and list files (one path or URL per line) -> sources."""
    out: list[Source] = []
    for p in paths:
        out.extend(_expand_one(p, recursive))
    if not out:
        raise WarmError(f"no images or audio files found in {', '.join(paths)}")
    return out


def _expand_one(p: str, recursive: bool) -> list[Source]:
    if p.startswith(("http://", "https://")):
        return [Source(p)]
    if any(c in p for c in "*?["):
        return [Source(m) for m in sorted(glob.glob(p, recursive=recursive)) if _is_media(Path(m))]
    path = Path(p).expanduser()
    if path.is_dir():
        found = path.rglob("*") if recursive else path.iterdir()
        return [Source(str(f)) for f in sorted(found) if f.is_file() and _is_media(f)]
    if path.suffix.lower() in LIST_SUFFIXES:
        return _list_file(path, recursive)
    if not path.is_file():
        raise WarmError(f"not found: {p}")
    return [Source(str(path))]


def _list_file(path: Path, recursive: bool) -> list[Source]:
    lines = path.read_text().splitlines()
    entries = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    base = path.parent
    out: list[Source] = []
    for entry in entries:
        is_url = entry.startswith(("http://", "https://"))
        out.extend(_expand_one(entry if is_url else str(base / entry), recursive))
    return out


def _is_media(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES | AUDIO_SUFFIXES


def read_manifest(path: Path) -> list[Source]:
    """TOML or JSON: ``name = "path"`` or ``name = {path = "...", ttl = 3600}``."""
    text = path.read_text()
    try:
        doc = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise WarmError(f"cannot read manifest {path}: {e}") from e
    return [_manifest_entry(path.parent, name, value) for name, value in doc.items()]


def _manifest_entry(base: Path, name: str, value: Any) -> Source:
    validate_name(name)
    spec = value if isinstance(value, dict) else {"path": value}
    location = spec.get("path") or spec.get("url")
    if not isinstance(location, str):
        raise WarmError(f"manifest entry {name!r} needs a path or url")
    ttl = spec.get("ttl")
    if ttl is not None and (not isinstance(ttl, int | float) or ttl <= 0):
        raise WarmError(f"manifest entry {name!r}: ttl must be a positive number of seconds")
    if not location.startswith(("http://", "https://")):
        location = str((base / location).expanduser())
    return Source(location, name, float(ttl) if ttl is not None else None)


# --- warming ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
    proxy: str
    pin: bool
    model: str
    jobs: int
    headers: dict[str, str]
    tags: tuple[str, ...] = ()
    describe: str | dict[str, Any] | None = None


Progress = Callable[[Item], None]


def warm(
    sources: Iterable[str | Path | Source],
    *,
    proxy: str = DEFAULT_PROXY,
    pin: bool = True,
    names: Mapping[str, str | Path] | None = None,
    recursive: bool = False,
    model: str = "",
    jobs: int = 2,
    api_key: str | None = None,
    on_item: Progress | None = None,
    tags: Sequence[str] = (),
    describe: str | dict[str, Any] | None = None,
) -> WarmReport:
    """Warm images through the proxy at `proxy`; see the module docstring.

    `tags` groups the images (``vcache compare --tag``); `describe` (a prompt, or a JSON
    schema) has the VLM describe each image once, for compare's ``where`` filters."""
    plain = [s for s in sources if not isinstance(s, Source)]
    given = [s for s in sources if isinstance(s, Source)]
    todo = given + (expand([str(s) for s in plain], recursive=recursive) if plain else [])
    todo += [Source(str(Path(p).expanduser()), validate_name(n)) for n, p in (names or {}).items()]
    headers = key_headers(api_key)
    opts = _Options(
        proxy.rstrip("/"),
        pin,
        model,
        max(1, jobs),
        headers,
        tuple(validate_name(t) for t in tags),
        describe,
    )
    return asyncio.run(warm_async(todo, opts, on_item))


async def warm_async(
    sources: list[Source], opts: _Options, on_item: Progress | None = None
) -> WarmReport:
    started = time.monotonic()
    report = WarmReport()
    async with httpx.AsyncClient(
        base_url=opts.proxy, headers=opts.headers, timeout=httpx.Timeout(900, connect=10)
    ) as client:
        digests = await _local_digests(sources)
        present, pinned = await _lookup(client, opts, set(digests.values()))
        # when pinning, only what is already pinned may be skipped: the rest needs its pin
        skippable = pinned if opts.pin else present
        sem = asyncio.Semaphore(opts.jobs)

        async def one(src: Source) -> None:
            async with sem:
                item = await _warm_one(client, opts, src, digests.get(src.location), skippable)
            report.items.append(item)
            if on_item:
                on_item(item)

        await asyncio.gather(*(one(s) for s in sources))
    report.elapsed_s = time.monotonic() - started
    return report


async def _local_digests(sources: list[Source]) -> dict[str, str]:
    def digest_all() -> dict[str, str]:
        out = {}
        for s in sources:
            if not s.is_url:
                try:
                    out[s.location] = hashlib.sha256(Path(s.location).read_bytes()).hexdigest()
                except OSError:
                    continue  # reported as a failure when it is warmed
        return out

    return await asyncio.to_thread(digest_all)


async def _lookup(
    client: httpx.AsyncClient, opts: _Options, digests: set[str]
) -> tuple[set[str], set[str]]:
    """(cached, cached and pinned) among `digests`."""
    if not digests:
        return set(), set()
    request = LookupRequest(model=opts.model, digests=sorted(digests))
    try:
        r = await client.post(api.LOOKUP, content=request.model_dump_json(), headers=_JSON)
    except httpx.HTTPError as e:
        raise WarmError(f"cannot reach the proxy at {opts.proxy}: {e}") from e
    if r.status_code != 200:
        message = error_message(r.status_code, r.content)
        raise WarmError(f"the proxy refused the lookup ({r.status_code}): {message}")
    answer = _parse(LookupResponse, r)
    return set(answer.present), set(answer.pinned)


async def _warm_one(
    client: httpx.AsyncClient, opts: _Options, src: Source, digest: str | None, skippable: set[str]
) -> Item:
    # cached (and pinned, if asked) needs no upload, unless it must be named, given a TTL,
    # tagged or described
    extra = src.name is not None or src.ttl is not None or opts.tags or opts.describe
    if digest in skippable and not extra:
        return Item(src, "skipped", f"vcache://sha256:{digest}")
    try:
        image = src.location if src.is_url else file_data_uri(Path(src.location))
        request = WarmRequest(
            image=image,
            model=opts.model,
            pin=opts.pin,
            name=src.name,
            ttl=src.ttl,
            tags=list(opts.tags),
            describe=opts.describe,
        )
        r = await client.post(api.WARM, content=request.model_dump_json(), headers=_JSON)
    except (OSError, httpx.HTTPError, ValidationError) as e:
        return Item(src, "failed", error=f"{type(e).__name__}: {e}")
    if r.status_code != 200:
        return Item(src, "failed", error=error_message(r.status_code, r.content))
    try:
        answer = _parse(WarmResponse, r)
    except WarmError as e:
        return Item(src, "failed", error=str(e))
    return Item(src, answer.status, answer.ref, answer.encode_ms, description=answer.description)


def _parse(cls: type[AnswerT], r: httpx.Response) -> AnswerT:
    try:
        return cls.model_validate_json(r.content)
    except ValidationError as e:
        raise WarmError(f"the proxy's answer to {r.request.url.path} is not one: {e}") from e
