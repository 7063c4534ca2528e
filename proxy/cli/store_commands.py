"""Store commands for the `vcache` CLI: ls, names, stats, rm, pin, unpin, gc, verify.

Each takes the store as every command does (`--store DIR`, else $VCACHE_STORE, else the
`store` of the config file's [serve] table, else ~/.cache/vcache/store: proxy.cli.config), or
the store of a running proxy (`--proxy URL`: proxy.cli.store_access), and `--json`: full keys
and exact numbers for scripts; without it, a table that fits 80 columns, sizes in KiB/MiB/GiB.
Entries are named by a full key or any unique prefix of it, or vcache://NAME.

Exit status: 0 on success, 1 when `verify` found problems or an operation failed, 2 for a
mistake in the command line (a store that is not there included).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any

from proxy.cli.config import StoreCommandSettings, add_arguments, settings_from
from proxy.cli.failure import CommandError
from proxy.cli.output import (
    ago,
    console,
    human_bytes,
    human_time,
    key_value_table,
    new_table,
    print_json,
)
from proxy.cli.progress import progress
from proxy.cli.store_access import find_key, find_namespace, open_store

if TYPE_CHECKING:
    from vision_cache.keys import CacheKey, Namespace
    from vision_cache.store import Store
    from vision_cache.store.check import CheckReport
    from vision_cache.store.entry import EntryInfo

Handler = Callable[[argparse.Namespace, "Store", StoreCommandSettings], int]
Subparsers = Any  # argparse's private _SubParsersAction
KEY_HELP = "a key, a unique prefix of its digest (or NAMESPACE:DIGEST prefixes), or vcache://NAME"


def add_store_commands(subparsers: Subparsers) -> None:
    """Register the store commands on an argparse subparsers object."""
    ls = _command(subparsers, "ls", "list entries: key, name, model, pinned, size, last use", _ls)
    ls.add_argument("--namespace", help="only this namespace id (or a unique prefix of it)")
    ls.add_argument("--limit", type=int, default=100, help="at most this many (0: all)")
    _command(subparsers, "names", "list the names (vcache://NAME) and what they point at", _names)
    _command(subparsers, "stats", "entries, bytes per tier, counters, ages", _stats)
    for name, what, handler in (
        ("rm", "delete entries", _rm),
        ("pin", "pin entries: no budget evicts them", _pin),
        ("unpin", "unpin entries: they can be evicted again", _unpin),
    ):
        cmd = _command(subparsers, name, what, handler)
        cmd.add_argument("keys", nargs="+", metavar="KEY", help=KEY_HELP)
    gc = _command(subparsers, "gc", "expire, evict to budget, reclaim space", _gc)
    gc.add_argument(
        "--min-dead-ratio",
        type=float,
        default=0.5,
        help="compact segments at least this dead (default 0.5)",
    )
    gc.add_argument(
        "--abandoned-after",
        type=float,
        default=60.0,
        help="seconds before an unlocked writer's segment counts as abandoned (default 60)",
    )
    verify = _command(subparsers, "verify", "check index and payloads", _verify)
    verify.add_argument("--fix", action="store_true", help="quarantine and remove bad entries")
    verify.add_argument("--quick", action="store_true", help="skip reading payload bytes")


def _command(subparsers: Subparsers, name: str, help_: str, handler: Handler) -> Any:
    from proxy.cli.main import add_command

    parser = add_command(subparsers, name, help=help_, description=help_ + ".")
    add_arguments(parser, StoreCommandSettings)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=lambda args: _run(args, handler))
    return parser


def _run(args: argparse.Namespace, handler: Handler) -> int:
    settings = settings_from(args, StoreCommandSettings)
    with open_store(settings) as store:
        return handler(args, store, settings)


# --- listing -----------------------------------------------------------------------------------


def _ls(args: argparse.Namespace, store: Store, settings: StoreCommandSettings) -> int:
    namespace = find_namespace(store, args.namespace) if args.namespace else None
    entries: Iterator[EntryInfo] = store.iter_entries(namespace)
    if args.limit > 0:
        entries = islice(entries, args.limit)
    infos = list(entries)
    models = _models(store)
    names = _names_by_key(store)
    if args.json:
        print_json([_entry_dict(i, models, names) for i in infos])
        return 0
    table = new_table("KEY", "NAME", "MODEL", "PINNED", "SIZE", "LAST USED")
    for column, width in zip(table.columns, (12, 14, 16, 6, 9, 12), strict=True):
        column.max_width = width
    shown = _short_keys([info.key for info in infos])
    for info in infos:
        named = names.get(info.key, [])
        table.add_row(
            shown[info.key],
            named[0] + (f" +{len(named) - 1}" if len(named) > 1 else "") if named else "",
            models.get(info.key.namespace_id, info.key.namespace_id[:8]),
            "yes" if info.pinned else "",
            human_bytes(info.ref.length),
            ago(info.last_access),
        )
    console().print(table)
    return 0


def _short_keys(keys: list[CacheKey]) -> dict[CacheKey, str]:
    """12 characters per key, like docker's image ids: the digest's first 12, or, for an image
    cached for two models, NAMESPACE:DIGEST prefixes (both forms name the entry everywhere)."""
    seen: dict[str, int] = {}
    for k in keys:
        seen[k.digest[:12]] = seen.get(k.digest[:12], 0) + 1
    return {
        k: k.digest[:12] if seen[k.digest[:12]] == 1 else f"{k.namespace_id[:4]}:{k.digest[:7]}"
        for k in keys
    }


def _names(args: argparse.Namespace, store: Store, settings: StoreCommandSettings) -> int:
    models = _models(store)
    rows = [
        {"name": name, "ref": f"vcache://{name}", "key": key.text, "model": models[info.id]}
        for info in store.namespaces()
        for name, key in sorted(store.names(info.id).items())
    ]
    if args.json:
        print_json(rows)
        return 0
    table = new_table("NAME", "KEY", "MODEL")
    for row in rows:
        table.add_row(row["name"], row["key"].split(":")[2][:12], row["model"])
    console().print(table)
    return 0


def _stats(args: argparse.Namespace, store: Store, settings: StoreCommandSettings) -> int:
    stats = store.stats()
    document = dataclasses.asdict(stats) | {"dead_bytes": stats.dead_bytes, "path": str(store.path)}
    if args.json:
        print_json(document)
        return 0
    rows = {name.replace("_", " "): _shown(name, value) for name, value in document.items()}
    console().print(key_value_table(rows))
    return 0


def _shown(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v:,}" for k, v in value.items()) or "-"
    if name in ("oldest", "newest"):
        return human_time(value)
    if isinstance(value, int) and ("bytes" in name or name.endswith("budget")):
        return human_bytes(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# --- changes: every KEY is resolved first, so a bad one changes nothing -----------------------


def _keys(store: Store, texts: list[str]) -> list[CacheKey]:
    return [find_key(store, text) for text in texts]


def _rm(args: argparse.Namespace, store: Store, settings: StoreCommandSettings) -> int:
    keys = _keys(store, args.keys)
    if settings.proxy is not None:
        # through the proxy: it forgets its in-memory copies too, or it would go on serving them
        from vision_cache.client.admin_client import delete_entries

        api_key = settings.api_key.get_secret_value() if settings.api_key else None
        deleted = delete_entries(settings.proxy, keys, api_key)
    else:
        deleted = {key.text: store.delete(key) for key in keys}
    return _outcome(args, deleted, "deleted", "already gone")


def _pin(args: argparse.Namespace, store: Store, settings: StoreCommandSettings) -> int:
    keys = _keys(store, args.keys)
    return _outcome(args, {k.text: store.pin(k) for k in keys}, "pinned", "gone meanwhile")


def _unpin(args: argparse.Namespace, store: Store, settings: StoreCommandSettings) -> int:
    keys = _keys(store, args.keys)
    return _outcome(args, {k.text: store.unpin(k) for k in keys}, "unpinned", "gone meanwhile")


def _outcome(args: argparse.Namespace, done: dict[str, bool], yes: str, no: str) -> int:
    if args.json:
        print_json({key: yes if ok else no for key, ok in done.items()})
    else:
        for key, ok in done.items():
            print(f"{yes if ok else no}: {key}")
    if not all(done.values()):
        raise CommandError(f"{sum(not ok for ok in done.values())} of {len(done)} were {no}")
    return 0


# --- maintenance -------------------------------------------------------------------------------


def _gc(args: argparse.Namespace, store: Store, settings: StoreCommandSettings) -> int:
    with progress("collecting", unit="segments") as bar:
        report = store.gc(
            min_dead_ratio=args.min_dead_ratio,
            abandoned_after=args.abandoned_after,
            progress=bar.callback,
        )
    _print_report(args, dataclasses.asdict(report))
    return 0


def _verify(args: argparse.Namespace, store: Store, settings: StoreCommandSettings) -> int:
    with progress("verifying", unit="entries") as bar:
        report = store.check(fix=args.fix, deep=not args.quick, progress=bar.callback)
    _print_report(args, _check_dict(report))
    if not (report.ok or args.fix):
        raise CommandError(
            f"{len(report.problems)} problem(s) in the store", "`vcache verify --fix` repairs it"
        )
    return 0


def _check_dict(report: CheckReport) -> dict[str, Any]:
    document = dataclasses.asdict(report) | {"ok": report.ok}
    document["problems"] = [dataclasses.asdict(problem) for problem in report.problems]
    return document


def _print_report(args: argparse.Namespace, document: dict[str, Any]) -> None:
    if args.json:
        print_json(document)
        return
    rows = {}
    for name, value in document.items():
        if name == "problems":
            value = "\n".join(f"{p['kind']}: {p['detail']}" for p in value) or "none"
        rows[name.replace("_", " ")] = _shown(name, value)
    console().print(key_value_table(rows))


# --- what an entry is, for people and for scripts ----------------------------------------------


def _models(store: Store) -> dict[str, str]:
    """Namespace id -> a short model label: the router's model name, else the mmproj's hash."""
    return {info.id: _model_label(info.id, info.namespace) for info in store.namespaces()}


def _model_label(namespace_id: str, namespace: Namespace | None) -> str:
    if namespace is None:
        return namespace_id[:8]
    components = namespace.components
    model = components.get("model")
    if isinstance(model, str) and model:
        label = model
    else:
        mmproj = str(components.get("mmproj", ""))
        digest = next((p for p in mmproj.split(":") if len(p) >= 8), namespace_id)
        label = f"mmproj {digest[:8]}"
    encoder = components.get("encoder")
    audio = isinstance(encoder, dict) and encoder.get("modality") == "audio"
    return f"{label} (audio)" if audio else label


def _names_by_key(store: Store) -> dict[CacheKey, list[str]]:
    names: dict[CacheKey, list[str]] = {}
    for info in store.namespaces():
        for name, key in sorted(store.names(info.id).items()):
            names.setdefault(key, []).append(name)
    return names


def _entry_dict(
    info: EntryInfo, models: dict[str, str], names: dict[CacheKey, list[str]]
) -> dict[str, Any]:
    return {
        "key": info.key.text,
        "namespace": info.key.namespace_id,
        "digest": info.key.digest,
        "names": names.get(info.key, []),
        "model": models.get(info.key.namespace_id),
        **dataclasses.asdict(info.ref),
        "meta_bytes": info.meta_bytes,
        "pinned": info.pinned,
        "created_at": info.created_at,
        "last_access": info.last_access,
        "expires_at": info.expires_at,
    }
