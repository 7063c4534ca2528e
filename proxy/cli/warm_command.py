"""`vcache warm`: the command-line face of vision_cache.warm, with a progress bar and a summary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from proxy.cli.config import ClientSettings, add_arguments, settings_from
from proxy.cli.failure import USAGE, CommandError
from vision_cache.client.warmup import (
    Item,
    Source,
    WarmReport,
    expand,
    read_manifest,
    warm,
)
from vision_cache.errors import VisionCacheError

if TYPE_CHECKING:
    from proxy.cli.store_commands import Subparsers


def add_warm_command(subparsers: Subparsers) -> None:
    from proxy.cli.main import add_command

    p = add_command(
        subparsers,
        "warm",
        help="encode, pin and name reference images ahead of time",
        description="Encode images through a running proxy so the first real request hits. "
        "Already-cached images are skipped without being uploaded; after Ctrl-C, run it again "
        "to finish.",
    )
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="image files, folders, globs, URLs, or .txt files listing them",
    )
    add_arguments(p, ClientSettings)
    p.add_argument("--recursive", "-r", action="store_true", help="descend into folders")
    p.add_argument("--name", help="name for the single image given (use as vcache://NAME)")
    p.add_argument(
        "--manifest", type=Path, help="TOML/JSON file: name = path or {path = ..., ttl = seconds}"
    )
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pin warmed images so budgets never evict them (default: on)",
    )
    p.add_argument("--ttl", type=float, help="expire unpinned images after this many seconds")
    p.add_argument("--model", default="", help="model name (router mode)")
    p.add_argument("--jobs", "-j", type=int, default=2, help="images in flight at once")
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="TAG",
        help="tag the images (repeatable): `vcache compare --tag TAG` compares against them",
    )
    p.add_argument(
        "--describe",
        metavar="PROMPT_OR_SCHEMA",
        help="have the VLM describe each image once, as JSON: a prompt, a JSON schema, or "
        "@FILE holding either (compare --where filters on the fields)",
    )
    p.set_defaults(handler=run_warm)


def _sources(args: argparse.Namespace) -> list[Source]:
    sources: list[Source] = []
    if args.paths:
        sources = expand(args.paths, recursive=args.recursive)
    if args.name:
        if len(sources) != 1:
            raise CommandError("--name names one image: give exactly one file or URL", code=USAGE)
        sources = [Source(sources[0].location, args.name, args.ttl)]
    elif args.ttl is not None:
        sources = [Source(s.location, s.name, args.ttl) for s in sources]
    if args.manifest:
        sources += read_manifest(args.manifest)
    if not sources:
        raise CommandError("nothing to warm: give paths or --manifest", code=USAGE)
    return sources


def run_warm(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    settings = settings_from(args, ClientSettings)
    try:
        sources = _sources(args)
        describe = read_describe(args.describe)
    except (VisionCacheError, ValueError) as e:
        raise CommandError(str(e), code=USAGE) from e
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    columns = (
        TextColumn("warming"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} img/s"),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("warm", total=len(sources), rate=0.0)

            def advance(_: Item) -> None:
                progress.advance(task)
                done = progress.tasks[task].completed
                elapsed = progress.tasks[task].elapsed or 1e-9
                progress.update(task, rate=done / elapsed)

            report = warm(
                sources,
                proxy=settings.proxy,
                pin=args.pin,
                model=args.model,
                jobs=args.jobs,
                api_key=api_key,
                on_item=advance,
                tags=args.tag,
                describe=describe,
            )
    except KeyboardInterrupt:
        raise CommandError(
            "interrupted", "what finished is cached; run the same command to resume", 130
        ) from None
    _summary(Console(), report)
    if report.failed:
        raise CommandError(f"{len(report.failed)} of {len(sources)} images failed (listed above)")
    return 0


def read_describe(value: str | None) -> str | dict[str, Any] | None:
    """A prompt, a JSON schema, or @FILE holding either."""
    if value is None:
        return None
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    if text.lstrip().startswith("{"):
        try:
            schema = json.loads(text)
        except ValueError as e:
            raise VisionCacheError(
                f"--describe looks like a JSON schema but is not JSON: {e}"
            ) from e
        return schema if isinstance(schema, dict) else text
    return text


def _summary(console: Console, report: WarmReport) -> None:
    table = Table(title="warm-up")
    for col in ("encoded", "already cached", "failed", "encoder time", "wall time"):
        table.add_column(col, justify="right")
    table.add_row(
        str(report.count("encoded")),
        str(report.count("cached") + report.count("skipped")),
        str(report.count("failed")),
        f"{report.encode_ms / 1000:.1f} s",
        f"{report.elapsed_s:.1f} s",
    )
    console.print(table)
    named = report.refs
    if named:
        console.print("named: " + ", ".join(sorted(named.values())))
    for item in report.failed:
        print(f"failed: {item.source.location}: {item.error}", file=sys.stderr)
