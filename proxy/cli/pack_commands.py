"""`vcache export` and `vcache import`: reference packs on the command line."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vision_cache.client.pack import PackError, export_pack, import_pack, running_namespace
from vision_cache.client.warmup import DEFAULT_PROXY
from vision_cache.errors import VisionCacheError
from vision_cache.store import Store

if TYPE_CHECKING:
    from proxy.cli.store_commands import Subparsers

DEFAULT_STORE = "~/.cache/vcache/store"


def add_pack_commands(subparsers: Subparsers) -> None:
    exp = subparsers.add_parser(
        "export",
        help="write warmed references to a pack file",
        description="Write pinned entries, their names and namespaces "
        "to a pack file for `vcache import` on another machine.",
    )
    exp.add_argument("file", type=Path, help="pack file to write")
    exp.add_argument(
        "--pinned",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="only pinned entries (default: on)",
    )
    exp.add_argument("--namespace", help="only this namespace id")
    _store_arg(exp)
    exp.set_defaults(handler=run_export)

    imp = subparsers.add_parser(
        "import",
        help="load a pack into the store",
        description="Load a pack; refuses packages of another model "
        "than the running proxy's unless --keep-unmatched.",
    )
    imp.add_argument("file", type=Path, help="pack file to read")
    imp.add_argument(
        "--proxy",
        default=os.environ.get("VCACHE_PROXY", DEFAULT_PROXY),
        help="running proxy whose model the pack must match",
    )
    imp.add_argument("--model", default="", help="model name (router mode)")
    imp.add_argument(
        "--keep-unmatched",
        action="store_true",
        help="store packages of other namespaces anyway, for later",
    )
    imp.add_argument("--api-key", default=os.environ.get("VCACHE_API_KEY"))
    _store_arg(imp)
    imp.set_defaults(handler=run_import)


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=os.environ.get("VCACHE_STORE") or DEFAULT_STORE,
        metavar="DIR",
        help=f"cache directory (default: $VCACHE_STORE or {DEFAULT_STORE})",
    )


def run_export(args: argparse.Namespace) -> int:
    try:
        with Store.open(Path(args.store), create=False) as store:
            s = export_pack(store, args.file, pinned_only=args.pinned, namespace_id=args.namespace)
    except VisionCacheError as e:
        print(f"vcache export: {e}")
        return 2
    print(
        f"exported {s.entries} entries ({s.bytes / 2**20:.1f} MiB, {s.names} names, "
        f"{len(s.namespaces)} namespaces) to {args.file}"
    )
    return 0


def run_import(args: argparse.Namespace) -> int:
    expected = running_namespace(args.proxy, args.model, args.api_key)
    if expected is None and not args.keep_unmatched:
        print(
            f"vcache import: cannot learn the running model's namespace from {args.proxy}; "
            "start the proxy or pass --keep-unmatched"
        )
        return 2
    try:
        with Store.open(Path(args.store)) as store:
            s = import_pack(store, args.file, expected=expected, keep_unmatched=args.keep_unmatched)
    except (PackError, VisionCacheError, OSError) as e:
        print(f"vcache import: {e}")
        return 1
    print(f"imported {s.entries} entries ({s.bytes / 2**20:.1f} MiB, {s.names} names)")
    return 0
