"""Reference packs: warmed packages, their names and namespaces, in one file for another machine.

A pack is a tar file::

    manifest.json                      format, namespaces (id -> canonical text), entries
    entries/<namespace id>/<digest>.meta
    entries/<namespace id>/<digest>.bin

Import checks every payload against the checksum in the manifest, and refuses a pack whose
namespace is not the one the receiving proxy's model uses (packages from another model, mmproj,
build or setting would never be looked up, or worse, be decoded by the wrong model), unless asked
to keep them for later. Nothing is half done: export writes a temporary file and renames it
into place (removed on failure), and import checks the whole pack before it stores anything.
Both report their progress as `(done, total)` to a callback, if given.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import xxhash
from pydantic import ValidationError

from vision_cache.client import admin_api as api
from vision_cache.client.admin_api import NamespaceResponse, key_headers
from vision_cache.errors import VisionCacheError
from vision_cache.keys import CacheKey, Namespace, validate_digest, validate_name
from vision_cache.store import Store

PACK_FORMAT = "vcache-pack/1"
Progress = Callable[[int, int | None], None]


class PackError(VisionCacheError):
    """A pack cannot be written, read, or imported here."""


@dataclasses.dataclass(frozen=True)
class PackSummary:
    entries: int
    bytes: int
    namespaces: tuple[str, ...]
    names: int


def export_pack(
    store: Store,
    path: Path,
    *,
    pinned_only: bool = True,
    namespace_id: str | None = None,
    progress: Progress | None = None,
) -> PackSummary:
    """Write the (pinned) entries of `store`, optionally of one namespace, to `path`."""
    namespaces = {
        info.id: info.namespace
        for info in store.namespaces()
        if info.namespace is not None and namespace_id in (None, info.id)
    }
    chosen = [
        info
        for nsid in namespaces
        for info in store.iter_entries(nsid)
        if info.pinned or not pinned_only
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tarfile.open(tmp, "w") as tar:
            entries = _export_entries(store, tar, namespaces, chosen, progress)
            manifest = {
                "format": PACK_FORMAT,
                "created_at": time.time(),
                "namespaces": {k: v.text for k, v in namespaces.items()},
                "entries": entries,
            }
            _add(tar, "manifest.json", json.dumps(manifest, indent=1).encode())
        tmp.rename(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written pack left behind
        raise
    n_names = sum(len(e["names"]) for e in entries)
    total = sum(e["length"] for e in entries)
    return PackSummary(len(entries), total, tuple(namespaces), n_names)


def _export_entries(
    store: Store,
    tar: tarfile.TarFile,
    namespaces: dict[str, Namespace],
    chosen: list[Any],
    progress: Progress | None,
) -> list[dict[str, Any]]:
    names = {nsid: _names_by_digest(store, ns) for nsid, ns in namespaces.items()}
    entries: list[dict[str, Any]] = []
    for done, info in enumerate(chosen, 1):
        nsid = info.key.namespace_id
        entry = store.get(info.key)
        if entry is not None:  # else evicted or corrupt since listing: not worth exporting
            _add(tar, f"entries/{nsid}/{info.key.digest}.meta", entry.meta)
            _add(tar, f"entries/{nsid}/{info.key.digest}.bin", bytes(entry.payload))
            entries.append(
                {
                    "namespace": nsid,
                    "digest": info.key.digest,
                    "xxh3": entry.ref.checksum,
                    "length": entry.nbytes,
                    "pinned": entry.pinned,
                    "names": sorted(names[nsid].get(info.key.digest, [])),
                }
            )
        if progress is not None:
            progress(done, len(chosen))
    return entries


def _names_by_digest(store: Store, ns: Namespace) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, key in store.names(ns).items():
        out.setdefault(key.digest, []).append(name)
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def import_pack(
    store: Store,
    path: Path,
    *,
    expected: Namespace | None,
    keep_unmatched: bool = False,
    progress: Progress | None = None,
) -> PackSummary:
    """Load a pack into `store`; see the module docstring for what is refused.

    The whole pack is read and checked first (every entry's checksum), and only then stored:
    a pack that is corrupt anywhere changes nothing."""
    try:
        with tarfile.open(path, "r") as tar:
            manifest = _manifest(tar)
            namespaces = _check_namespaces(manifest, expected, keep_unmatched)
            steps = 2 * len(manifest["entries"])
            for done, e in enumerate(manifest["entries"], 1):
                _checked_entry(tar, e, namespaces)
                if progress is not None:
                    progress(done, steps)
            for ns in namespaces.values():
                store.register_namespace(ns)
            total = 0
            for done, e in enumerate(manifest["entries"], len(manifest["entries"]) + 1):
                total += _import_entry(store, tar, e, namespaces)
                if progress is not None:
                    progress(done, steps)
    except tarfile.TarError:
        raise PackError(f"{path} is not a vcache pack (not a tar archive)") from None
    n_names = sum(len(e.get("names", [])) for e in manifest["entries"])
    return PackSummary(len(manifest["entries"]), total, tuple(namespaces), n_names)


def _manifest(tar: tarfile.TarFile) -> dict[str, Any]:
    try:
        raw = _read(tar, "manifest.json")
        manifest: dict[str, Any] = json.loads(raw)
    except (KeyError, ValueError) as e:
        raise PackError(f"not a vcache pack: {e}") from e
    if manifest.get("format") != PACK_FORMAT:
        raise PackError(f"unsupported pack format {manifest.get('format')!r}")
    return manifest


def _check_namespaces(
    manifest: dict[str, Any], expected: Namespace | None, keep_unmatched: bool
) -> dict[str, Namespace]:
    namespaces = {nsid: Namespace.parse(text) for nsid, text in manifest["namespaces"].items()}
    for nsid, ns in namespaces.items():
        if ns.id != nsid:
            raise PackError(f"namespace id {nsid} does not match its text")
    foreign = [nsid for nsid in namespaces if expected is None or nsid != expected.id]
    if foreign and not keep_unmatched:
        want = expected.id if expected else "(unknown: no proxy given)"
        raise PackError(
            f"pack namespace(s) {', '.join(n[:16] for n in foreign)} do not match the running "
            f"model's namespace {want[:16]}; use --keep-unmatched to store them for later"
        )
    return namespaces


def _checked_entry(
    tar: tarfile.TarFile, e: dict[str, Any], namespaces: dict[str, Namespace]
) -> tuple[CacheKey, bytes, bytes]:
    """One entry's key, meta and payload, once its checksum and names are checked."""
    try:
        nsid, digest = e["namespace"], validate_digest(e["digest"])
        for name in e.get("names", []):
            validate_name(name)
        if nsid not in namespaces:
            raise PackError(f"entry {digest[:16]} names an undeclared namespace")
        meta = _read(tar, f"entries/{nsid}/{digest}.meta")
        payload = _read(tar, f"entries/{nsid}/{digest}.bin")
    except (KeyError, TypeError) as exc:
        raise PackError(f"a manifest entry is malformed: {exc!r}") from None
    if xxhash.xxh3_64_hexdigest(payload) != e["xxh3"]:
        raise PackError(f"entry {digest[:16]} is corrupt (checksum mismatch)")
    return CacheKey(nsid, digest), meta, payload


def _import_entry(
    store: Store, tar: tarfile.TarFile, e: dict[str, Any], namespaces: dict[str, Namespace]
) -> int:
    key, meta, payload = _checked_entry(tar, e, namespaces)
    if store.put(key, meta, payload, pin=bool(e.get("pinned", True))) is None:
        raise PackError(f"could not store entry {key.digest[:16]} (disk full or budget?)")
    for name in e.get("names", []):
        store.set_name(key, name)
    return len(payload)


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.getmember(name)
    f = tar.extractfile(member)
    if f is None:
        raise PackError(f"{name} is not a file in the pack")
    return f.read()


def running_namespace(proxy: str, model: str, api_key: str | None) -> Namespace | None:
    """The namespace the proxy at `proxy` uses for `model`; None if it cannot tell (not
    running, or its upstream takes no packages)."""
    try:
        r = httpx.get(
            f"{proxy.rstrip('/')}{api.NAMESPACE}",
            params={"model": model},
            headers=key_headers(api_key),
            timeout=30,
        )
        answer = NamespaceResponse.model_validate_json(r.content) if r.status_code == 200 else None
    except (httpx.HTTPError, ValidationError):
        return None
    return Namespace.parse(answer.text) if answer is not None and answer.text else None
