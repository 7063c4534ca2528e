"""Progress bars for the commands that take a while (verify, gc, export, import, warm, ...).

    with progress("verifying", total=store_entries, unit="entries") as bar:
        for entry in entries:
            ...
            bar.advance()

The bar goes to stderr (stdout keeps the result). On a terminal it redraws in place; elsewhere
(a pipe, a log file, CI) it is silent, so logs hold results rather than a thousand redraws.
`bar.callback` is the `(done, total)` form the store and pack functions take.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


class Bar:
    """One running bar; every method is safe to call from the command's own thread."""

    def __init__(self, progress: Any, task: Any) -> None:
        self._progress = progress
        self._task = task

    def advance(self, amount: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def update(self, done: float, total: float | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total)

    def callback(self, done: int, total: int | None) -> None:
        """`(done, total)`, as `Store.check`, `Store.gc` and the pack functions report it."""
        self.update(done, total)


@contextlib.contextmanager
def progress(label: str, total: float | None = None, unit: str = "") -> Iterator[Bar]:
    """A bar with `label`, `total` steps (None: unknown yet) counted in `unit`."""
    if not sys.stderr.isatty():
        yield Bar(None, None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from proxy.cli.output import err_console

    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console(), transient=True) as bar:
        yield Bar(bar, bar.add_task(label, total=total))
