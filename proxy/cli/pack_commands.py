"""`vcache export` and `vcache import`: reference packs on the command line.

`import` loads a pack into the store of the running proxy it names (`--proxy`, default
http://127.0.0.1:8081), which also says which model the packages must be for: what it reports
imported, that proxy serves. Without a running proxy, `--keep-unmatched` imports into
`--store` for later.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.cli.config import ImportSettings, StoreCommandSettings, add_arguments, settings_from
from proxy.cli.failure import CommandError
from proxy.cli.output import human_bytes
from proxy.cli.progress import progress
from proxy.cli.store_access import find_namespace, open_proxy_store, open_store

if TYPE_CHECKING:
    from vision_cache.store import Store


def add_pack_commands(subparsers: Any) -> None:
    from proxy.cli.main import add_command

    exp = add_command(
        subparsers,
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
    exp.add_argument("--namespace", help="only this namespace id (or a unique prefix of it)")
    add_arguments(exp, StoreCommandSettings)
    exp.set_defaults(handler=run_export)

    imp = add_command(
        subparsers,
        "import",
        help="load a pack into a running proxy's store",
        description="Load a pack into the store of the running proxy (--proxy); refuses "
        "packages of another model than the proxy's unless --keep-unmatched.",
    )
    imp.add_argument("file", type=Path, help="pack file to read")
    add_arguments(imp, ImportSettings)
    imp.add_argument("--model", default="", help="model name (router mode)")
    imp.add_argument(
        "--keep-unmatched",
        action="store_true",
        help="store packages of other namespaces anyway, for later (with no proxy running: "
        "into --store)",
    )
    imp.set_defaults(handler=run_import)


def run_export(args: argparse.Namespace) -> int:
    from vision_cache.client.pack import export_pack

    settings = settings_from(args, StoreCommandSettings)
    target: Path = args.file
    if not target.parent.is_dir():
        raise CommandError(
            f"cannot write {target}: the directory {target.parent} does not exist",
            "create it first, or give a pack file in an existing directory",
        )
    with open_store(settings) as store, progress("exporting", unit="entries") as bar:
        namespace = find_namespace(store, args.namespace) if args.namespace else None
        s = export_pack(
            store, target, pinned_only=args.pinned, namespace_id=namespace, progress=bar.callback
        )
    print(
        f"exported {s.entries} entries ({human_bytes(s.bytes)}, {s.names} names, "
        f"{len(s.namespaces)} namespaces) from {store.path} to {target}"
    )
    return 0


def run_import(args: argparse.Namespace) -> int:
    from vision_cache.client.admin_client import ProxyUnreachable, store_of
    from vision_cache.client.pack import running_namespace

    settings = settings_from(args, ImportSettings)
    if not args.file.is_file():
        raise CommandError(f"{args.file}: no such file")
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    try:
        store_of(settings.proxy, api_key)
    except ProxyUnreachable as e:
        if not args.keep_unmatched:
            raise CommandError(
                f"{e}: it says which model the pack must be for, and where its store is",
                "start the proxy, or import for later with --keep-unmatched --store DIR",
            ) from e
        return _import_offline(args, settings)
    expected = running_namespace(settings.proxy, args.model, api_key)
    if expected is None and not args.keep_unmatched:
        raise CommandError(
            f"the proxy at {settings.proxy} takes no packages (see its /vcache/health), so "
            "no pack matches its model",
            "fix the proxy's upstream, or import for later with --keep-unmatched",
        )
    chosen = settings.store if "store" in settings.model_fields_set else None
    with open_proxy_store(settings.proxy, api_key, chosen, create=True) as store:
        summary = _load(args, store, expected)
    print(f"{summary} into the store of the proxy at {settings.proxy} ({store.path})")
    return 0


def _import_offline(args: argparse.Namespace, settings: ImportSettings) -> int:
    from vision_cache.store import Store

    with Store.open(settings.store, hot_bytes=0) as store:
        summary = _load(args, store, None)
    print(f"{summary} into {store.path}, for later: no proxy runs at {settings.proxy}")
    return 0


def _load(args: argparse.Namespace, store: Store, expected: Any) -> str:
    from vision_cache.client.pack import import_pack

    with progress("importing", unit="steps") as bar:
        s = import_pack(
            store,
            args.file,
            expected=expected,
            keep_unmatched=args.keep_unmatched,
            progress=bar.callback,
        )
    return f"imported {s.entries} entries ({human_bytes(s.bytes)}, {s.names} names)"
