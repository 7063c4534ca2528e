"""How `vcache` commands print: JSON for machines, 80-column tables and human units for people.

    print_json({"key": key.text})              # --json: full values, one document, stdout
    human_bytes(21_474_836_480)                # "20.0 GiB"
    ago(time.time() - 90)                      # "2 min ago"
    table = new_table("KEY", "SIZE"); table.add_row(...); console().print(table)

Results go to stdout, everything else (progress, errors, hints) to stderr, so that
`vcache ls --json | jq` and `vcache export ... > log` stay clean.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported by the commands that print tables, not at start-up
    from rich.console import Console
    from rich.table import Table

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: int | float) -> str:
    """`n` bytes in binary units, three significant digits: 512 B, 1.5 MiB, 20.0 GiB."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def ago(timestamp: float | None, now: float | None = None) -> str:
    """How long ago `timestamp` was, coarsely: "just now", "5 min ago", "3 days ago" ("-": None)."""
    if timestamp is None:
        return "-"
    seconds = (time.time() if now is None else now) - timestamp
    if seconds < 0:
        return "in " + _span(-seconds)
    return "just now" if seconds < 5 else _span(seconds) + " ago"


def _span(seconds: float) -> str:
    for size, unit in ((86400 * 365, "year"), (86400, "day"), (3600, "h"), (60, "min")):
        if seconds >= size:
            count = int(seconds // size)
            plural = "s" if count > 1 and unit in ("year", "day") else ""
            return f"{count} {unit}{plural}"
    return f"{int(seconds)} s"


def human_time(timestamp: float | None) -> str:
    """A UTC timestamp as `2026-12-04 18:05:00`; "-" if None."""
    if timestamp is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def print_json(document: object) -> None:
    """One JSON document on stdout, keys sorted, values complete (never shortened)."""
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")


def console() -> Console:
    """stdout, for results; at most 80 columns when it is not a terminal (pipes, logs)."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 80)


def err_console() -> Console:
    """stderr, for progress and messages."""
    from rich.console import Console

    return Console(stderr=True)


def new_table(*columns: str) -> Table:
    """A plain table, headers in capitals like `docker ls`, no box: fits 80 columns."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=True, overflow="ellipsis")
    return table


def key_value_table(rows: dict[str, str]) -> Table:
    """Two columns, names kept whole and long values folded onto more lines."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, show_header=False)
    table.add_column(no_wrap=True, min_width=max((len(k) for k in rows), default=0))
    table.add_column(overflow="fold")
    for name, value in rows.items():
        table.add_row(name, value)
    return table
