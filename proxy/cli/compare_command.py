"""`vcache compare`: a candidate against warmed references, with progress and a ranked table."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from proxy.cli.config import ClientSettings, add_arguments, settings_from
from proxy.cli.failure import USAGE, CommandError
from proxy.cli.warm_command import read_describe
from vision_cache.client.compare import compare, conditions, references_in
from vision_cache.client.compare_api import CompareReply, Event, References
from vision_cache.errors import VisionCacheError

if TYPE_CHECKING:
    from proxy.cli.store_commands import Subparsers


def add_compare_command(subparsers: Subparsers) -> None:
    from proxy.cli.main import add_command

    p = add_command(
        subparsers,
        "compare",
        help="rank warmed references against a new image under a rubric",
        description="Shortlist the references most similar to CANDIDATE by their cached "
        "embeddings, then have the VLM judge each finalist under the rubric (answers "
        "constrained to JSON: a score and a verdict per criterion). Only the candidate is "
        "encoded; references must have been warmed (vcache warm).",
        epilog="Example: vcache compare new.jpg --tag cats --rubric 'short fur; green eyes'",
    )
    p.add_argument("candidate", help="the new image: a file, an image URL or vcache://NAME")
    refs = p.add_mutually_exclusive_group(required=True)
    refs.add_argument("--tag", help="the references warmed with --tag TAG")
    refs.add_argument("--refs", nargs="+", metavar="NAME", help="references by name")
    refs.add_argument("--folder", help="a folder of references warmed earlier")
    p.add_argument("--rubric", required=True, help='criteria, e.g. "short fur; green eyes"')
    p.add_argument(
        "--criterion",
        action="append",
        default=[],
        help="one criterion (repeatable; default: the rubric split at ';', newlines, else ',')",
    )
    p.add_argument("--top-k", type=int, default=5, help="finalists the VLM judges (default: 5)")
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COND",
        help="keep references whose description passes COND (FIELD=VALUE, FIELD>=N, "
        "FIELD~TEXT; repeatable); needs --describe as given to vcache warm",
    )
    p.add_argument("--describe", metavar="PROMPT_OR_SCHEMA", help="as given to vcache warm")
    p.add_argument("--instruction", help="the embedding instruction (default: a fixed one)")
    p.add_argument("--parallel", type=int, help="judge questions at once (default: 2)")
    p.add_argument("--summary", action="store_true", help="ask the judge for a sentence too")
    p.add_argument("--model", default="", help="model name (router mode)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    add_arguments(p, ClientSettings)
    p.set_defaults(handler=run_compare)


def _references(args: argparse.Namespace) -> References:
    if args.folder:
        return references_in(args.folder)
    if args.refs:
        return References(names=args.refs)
    return References(tag=args.tag)


def run_compare(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    settings = settings_from(args, ClientSettings)
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    try:  # what the options say, checked before anything is sent
        options = {
            "criteria": args.criterion or None,
            "where": conditions(args.where),
            "describe": read_describe(args.describe),
            "instruction": args.instruction,
            "parallel": args.parallel,
            "summary": args.summary,
            "model": args.model,
        }
        references = _references(args)
    except (VisionCacheError, ValueError) as e:
        raise CommandError(str(e), code=USAGE) from e
    with _Progress(err) as progress:
        reply = compare(
            args.candidate,
            rubric=args.rubric,
            references=references,
            top_k=args.top_k,
            proxy=settings.proxy,
            api_key=api_key,
            on_event=progress.on_event,
            **options,
        )
    if args.json:
        print(reply.model_dump_json(indent=2))
    else:
        _table(Console(), reply)
    return 0


class _Progress:
    """A bar per stage: vectors computed (only when some are missing), finalists judged."""

    def __init__(self, console: Console) -> None:
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> _Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(None, None, None)

    def on_event(self, event: Event) -> None:
        if event.event == "embedded":
            self._update("embedding references", event.done, event.total)
        elif event.event == "judged":
            self._update("judging finalists", event.done, event.total)
        elif event.event == "stage" and event.cost is not None:
            self._bar.console.print(
                f"{event.stage}: {event.cost.items_in} -> {event.cost.items_out} in "
                f"{event.cost.ms / 1000:.1f} s, {event.cost.model_calls} model call(s)"
            )

    def _update(self, what: str, done: int | None, total: int | None) -> None:
        if what not in self._tasks:
            self._tasks[what] = self._bar.add_task(what, total=total or 0)
        self._bar.update(self._tasks[what], completed=done or 0, total=total or 0)


def _table(console: Console, reply: CompareReply) -> None:
    table = Table(title=f"rubric: {reply.rubric}")
    for col in ("rank", "reference", "score", *reply.criteria, "similarity", "time"):
        table.add_column(col)
    for f in reply.ranking:
        marks = [f.criteria.get(c, "") for c in reply.criteria]
        score = str(f.score) if f.score is not None else f"[red]{f.error or 'no answer'}[/red]"
        cached = " (cached)" if f.cached else ""
        table.add_row(
            str(f.rank),
            f.reference,
            score,
            *marks,
            f"{f.similarity:.3f}",
            f"{f.judge_ms / 1000:.2f} s{cached}",
        )
    console.print(table)
    stages = ", ".join(
        f"{name} {c.ms / 1000:.1f} s / {c.model_calls} call(s)" for name, c in reply.stages.items()
    )
    console.print(
        f"shortlist by {reply.recall}; {stages}; total {reply.total_ms / 1000:.1f} s, "
        f"{reply.model_calls} model call(s)"
    )
