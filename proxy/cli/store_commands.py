"""Store commands for the `vcache` CLI: ls, stats, rm, gc, verify.

Each takes the store as every command does (`--store DIR`, else $VCACHE_STORE, else the
`store` of the config file's [serve] table, else ~/.cache/vcache/store: proxy.cli.config)
and `--json`; without it, output is a human-readable table. Exit status is 0
on success, 1 when `rm` missed a key or `verify` found problems, 2 when the
store cannot be opened.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any, TypeAlias

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from proxy.cli.config import StoreSettings, add_arguments, settings_error, settings_from
from vision_cache.errors import InvalidKeyError, VisionCacheError
from vision_cache.keys import CacheKey
from vision_cache.store import Store
from vision_cache.store.check import CheckReport
from vision_cache.store.entry import EntryInfo

Handler = Callable[[argparse.Namespace, Store], int]
# A string: argparse's class is only subscriptable for type checkers.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_store_commands(subparsers: Subparsers) -> None:
    """Register the store commands on an argparse subparsers object."""
    ls = _command(subparsers, "ls", "list entries", _ls)
    ls.add_argument("--namespace", help="only this namespace id")
    ls.add_argument("--limit", type=int, default=100, help="at most this many (0: all)")
    _command(subparsers, "stats", "entries, bytes per tier, counters, ages", _stats)
    rm = _command(subparsers, "rm", "delete entries by key", _rm)
    rm.add_argument("keys", nargs="+", metavar="KEY", help="vc1:<namespace id>:<digest>")
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
        help="seconds before an unlocked writer's segment counts as abandoned",
    )
    verify = _command(subparsers, "verify", "check index and payloads", _verify)
    verify.add_argument("--fix", action="store_true", help="quarantine and remove bad entries")
    verify.add_argument("--quick", action="store_true", help="skip reading payload bytes")


def _command(subparsers: Subparsers, name: str, help_: str, handler: Handler) -> Any:
    parser = subparsers.add_parser(name, help=help_, description=help_)
    add_arguments(parser, StoreSettings)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=lambda args: _run(args, handler))
    return parser


def _run(args: argparse.Namespace, handler: Handler) -> int:
    try:
        settings = settings_from(args, StoreSettings)
    except (ValidationError, ValueError) as exc:
        print(f"vcache: {settings_error(exc)}", file=sys.stderr)
        return 2
    try:
        # hot_bytes=0: a one-shot command has no use for an in-memory tier.
        with Store.open(settings.store, hot_bytes=0, create=False) as store:
            return handler(args, store)
    except VisionCacheError as exc:
        print(f"vcache: {exc}", file=sys.stderr)
        return 2


def _ls(args: argparse.Namespace, store: Store) -> int:
    entries: Iterator[EntryInfo] = store.iter_entries(args.namespace)
    if args.limit > 0:
        entries = islice(entries, args.limit)
    rows = [_entry_dict(info) for info in entries]
    if args.json:
        return _print_json(rows)
    table = Table("key", "bytes", "meta", "pinned", "created", "last access", "expires")
    for row in rows:
        table.add_row(
            _short_key(row["key"]),
            f"{row['length']:,}",
            str(row["meta_bytes"]),
            "yes" if row["pinned"] else "",
            _when(row["created_at"]),
            _when(row["last_access"]),
            _when(row["expires_at"]),
        )
    Console().print(table)
    return 0


def _stats(args: argparse.Namespace, store: Store) -> int:
    stats = store.stats()
    document = dataclasses.asdict(stats) | {"dead_bytes": stats.dead_bytes}
    if args.json:
        return _print_json(document)
    table = Table("", "value")
    for name, value in document.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v:,}" for k, v in value.items()) or "-"
        elif name in ("oldest", "newest"):
            value = _when(value)
        elif isinstance(value, int):
            value = f"{value:,}"
        table.add_row(name.replace("_", " "), str(value))
    Console().print(table)
    return 0


def _rm(args: argparse.Namespace, store: Store) -> int:
    results: dict[str, str] = {}
    for text in args.keys:
        try:
            results[text] = "deleted" if store.delete(CacheKey.parse(text)) else "not found"
        except InvalidKeyError as exc:
            results[text] = f"invalid: {exc}"
    if args.json:
        _print_json(results)
    else:
        for text, outcome in results.items():
            print(f"{text}\t{outcome}")
    return 0 if all(outcome == "deleted" for outcome in results.values()) else 1


def _gc(args: argparse.Namespace, store: Store) -> int:
    report = store.gc(min_dead_ratio=args.min_dead_ratio, abandoned_after=args.abandoned_after)
    return _print_report(args, dataclasses.asdict(report))


def _verify(args: argparse.Namespace, store: Store) -> int:
    report = store.check(fix=args.fix, deep=not args.quick)
    _print_report(args, _check_dict(report))
    return 0 if report.ok or args.fix else 1


def _check_dict(report: CheckReport) -> dict[str, Any]:
    document = dataclasses.asdict(report) | {"ok": report.ok}
    document["problems"] = [dataclasses.asdict(problem) for problem in report.problems]
    return document


def _print_report(args: argparse.Namespace, document: dict[str, Any]) -> int:
    if args.json:
        return _print_json(document)
    table = Table("", "value")
    for name, value in document.items():
        if name == "problems":
            value = "\n".join(f"{p['kind']}: {p['detail']}" for p in value) or "none"
        table.add_row(name.replace("_", " "), str(value))
    Console().print(table)
    return 0


def _entry_dict(info: EntryInfo) -> dict[str, Any]:
    return {
        "key": info.key.text,
        **dataclasses.asdict(info.ref),
        "meta_bytes": info.meta_bytes,
        "pinned": info.pinned,
        "created_at": info.created_at,
        "last_access": info.last_access,
        "expires_at": info.expires_at,
    }


def _print_json(document: object) -> int:
    print(json.dumps(document, indent=2, sort_keys=True))
    return 0


def _short_key(text: str) -> str:
    _, namespace_id, digest = text.split(":")
    return f"{namespace_id[:12]}…:{digest[:16]}…"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")
