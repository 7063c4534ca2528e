"""Which store a command acts on, and which entries its KEY arguments name.

A command that names a running proxy (``--proxy URL`` or ``VCACHE_PROXY``) acts on that
proxy's store: it asks the proxy where the store is (``GET /vcache/store``) and opens it here,
after checking that the directory here is that very store (the id the proxy reports). When it
is not (the proxy runs on another machine, or a different store sits at the same path), the
command says so and changes nothing: no command reports success for data the proxy cannot see.

Entries are named like git's commits: a full key, or any unique prefix of it::

    vc1:<namespace id>:<digest>     the full key, as `vcache ls --json` prints it
    3f9a0c6e12ab                    a digest prefix (4 hex digits at least)
    9c1f07:3f9a0c6e                 a namespace id prefix, a colon, a digest prefix
    vcache://cat                    a name (`vcache names`)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.cli.failure import USAGE, CommandError

if TYPE_CHECKING:
    from proxy.cli.config import StoreCommandSettings
    from vision_cache.keys import CacheKey
    from vision_cache.store import Store

MIN_PREFIX = 4
_PREFIX = re.compile(r"^(?:([0-9a-f]+):)?([0-9a-f]+)$")


def open_store(settings: StoreCommandSettings, *, create: bool = False) -> Store:
    """The store the command acts on: the named proxy's, else `settings.store`."""
    from vision_cache.errors import StoreNotFoundError
    from vision_cache.store import Store

    if settings.proxy is not None:
        api_key = settings.api_key.get_secret_value() if settings.api_key else None
        chosen = settings.store if "store" in settings.model_fields_set else None
        return open_proxy_store(settings.proxy, api_key, chosen, create=create)
    try:
        return Store.open(settings.store, hot_bytes=0, create=create)
    except StoreNotFoundError as e:
        raise CommandError(
            str(e),
            "give --store the proxy's store directory, or --proxy URL of a running proxy",
            USAGE,
        ) from e


def open_proxy_store(
    proxy: str, api_key: str | None, chosen: Path | None, *, create: bool = False
) -> Store:
    """The store of the proxy at `proxy`, opened here once it is sure to be that very store;
    `chosen` is a store the user named too, which must then be the same."""
    from vision_cache.store import Store

    path, store_id = where_is_the_store(proxy, api_key)
    if chosen is not None and chosen.resolve() != path:
        raise CommandError(
            f"--store {chosen} is not the store of the proxy at {proxy}, which uses {path}",
            "drop --store (the proxy's store is used), or drop --proxy",
            USAGE,
        )
    elsewhere = CommandError(
        f"the proxy at {proxy} keeps its store at {path} on its own machine, and "
        f"{path} here is not that store",
        "run the command on the proxy's machine",
    )
    if not path.is_dir():
        raise elsewhere
    store = Store.open(path, hot_bytes=0, create=create)
    if store.id != store_id:
        store.close()
        raise elsewhere
    return store


def where_is_the_store(proxy: str, api_key: str | None) -> tuple[Path, str]:
    """The running proxy's store: its path (on the proxy's machine) and its id."""
    from vision_cache.client.admin_client import ProxyUnreachable, store_of

    try:
        return store_of(proxy, api_key)
    except ProxyUnreachable as e:
        raise CommandError(
            f"{e}: it was asked where its store is",
            "start it, or drop --proxy (and VCACHE_PROXY) to use --store directly",
        ) from e


def find_key(store: Store, text: str) -> CacheKey:
    """The one entry `text` names (see the module docstring); raises CommandError otherwise."""
    from vision_cache.errors import InvalidKeyError
    from vision_cache.keys import CacheKey

    if text.startswith("vc1:"):
        try:
            key = CacheKey.parse(text)
        except InvalidKeyError as e:
            raise CommandError(f"{text!r} is not a key: {e}", code=USAGE) from None
        return _one(text, store.find_keys(key.namespace_id, key.digest))
    if text.startswith("vcache://"):
        return _named(store, text.removeprefix("vcache://"))
    match = _PREFIX.match(text)
    if match is None or len(match.group(2)) < MIN_PREFIX:
        raise CommandError(
            f"{text!r} names no entry: give a key, a prefix of its digest ({MIN_PREFIX} hex "
            "digits at least), NAMESPACE:DIGEST prefixes, or vcache://NAME",
            code=USAGE,
        )
    found = store.find_keys(match.group(1) or "", match.group(2), limit=3)
    return _one(text, found)


def find_namespace(store: Store, text: str) -> str:
    """The one namespace id that `text` (a unique prefix of it) names."""
    found = [info.id for info in store.namespaces() if info.id.startswith(text.lower())]
    if len(found) != 1:
        what = "no namespace" if not found else f"{len(found)} namespaces"
        raise CommandError(f"{what} match {text!r}", "`vcache ls --json` shows each entry's")
    return found[0]


def _named(store: Store, name: str) -> CacheKey:
    found = []
    for info in store.namespaces():
        key = store.resolve_name(info.id, name)
        if key is not None:
            found.append(key)
    return _one(f"vcache://{name}", found)


def _one(text: str, found: list[CacheKey]) -> CacheKey:
    if not found:
        raise CommandError(f"no entry matches {text!r}", "`vcache ls` lists the entries")
    if len(found) > 1:
        shown = ", ".join(key.text[:30] + "…" for key in found[:2])
        raise CommandError(
            f"{text!r} is ambiguous: it matches {shown}{' and more' if len(found) > 2 else ''}",
            "give more of the key (NAMESPACE:DIGEST prefixes tell namespaces apart)",
        )
    return found[0]
