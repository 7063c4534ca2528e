"""`vcache export` and `vcache import`: reference packs on the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from proxy.cli.config import (
    ImportSettings,
    StoreSettings,
    add_arguments,
    settings_error,
    settings_from,
)
from vision_cache.client.pack import PackError, export_pack, import_pack, running_namespace
from vision_cache.errors import VisionCacheError
from vision_cache.store import Store

if TYPE_CHECKING:
    from proxy.cli.store_commands import Subparsers


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
    add_arguments(exp, StoreSettings)
    exp.set_defaults(handler=run_export)

    imp = subparsers.add_parser(
        "import",
        help="load a pack into the store",
        description="Load a pack; refuses packages of another model "
        "than the running proxy's unless --keep-unmatched.",
    )
    imp.add_argument("file", type=Path, help="pack file to read")
    add_arguments(imp, ImportSettings)
    imp.add_argument("--model", default="", help="model name (router mode)")
    imp.add_argument(
        "--keep-unmatched",
        action="store_true",
        help="store packages of other namespaces anyway, for later",
    )
    imp.set_defaults(handler=run_import)


def run_export(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args, StoreSettings)
    except (ValidationError, ValueError) as e:
        print(f"vcache export: {settings_error(e)}", file=sys.stderr)
        return 2
    try:
        with Store.open(settings.store, create=False) as store:
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
    try:
        settings = settings_from(args, ImportSettings)
    except (ValidationError, ValueError) as e:
        print(f"vcache import: {settings_error(e)}", file=sys.stderr)
        return 2
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    expected = running_namespace(settings.proxy, args.model, api_key)
    if expected is None and not args.keep_unmatched:
        print(
            f"vcache import: cannot learn the running model's namespace from {settings.proxy}; "
            "start the proxy or pass --keep-unmatched"
        )
        return 2
    try:
        with Store.open(settings.store) as store:
            s = import_pack(store, args.file, expected=expected, keep_unmatched=args.keep_unmatched)
    except (PackError, VisionCacheError, OSError) as e:
        print(f"vcache import: {e}")
        return 1
    print(f"imported {s.entries} entries ({s.bytes / 2**20:.1f} MiB, {s.names} names)")
    return 0
