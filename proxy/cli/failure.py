"""The one error path of the `vcache` command: what went wrong, in one or two lines, then exit.

Every subcommand handler raises instead of printing; `proxy.cli.main` catches what reaches it
and `explain` turns it into a `CommandError`, printed on stderr as::

    vcache serve: error: cannot listen on 127.0.0.1:8081: the address is already in use
    hint: stop what listens there, or give another --port

The exit status is 2 for a usage or configuration mistake, 1 for anything else (an operation
that failed, or a bug: that one asks for a report). ``--debug`` (or ``VCACHE_DEBUG=1``) prints
the traceback as well. Known failures are translated where they are understood best:

* CommandError              raised by handlers with their own message and hint
  x UsageError              a bad combination of options: the subcommand's usage line first
* pydantic ValidationError  settings: which option, variable or config file, and why
* proxy.errors.StartupError `vcache serve` could not start (address, port, store, llama-server)
* ProxyError, VisionCacheError   their own messages
* OSError                   the file and the OS's words ("No such file or directory")
* httpx errors              the proxy a command talks to could not be reached
* KeyboardInterrupt         "interrupted", status 130
"""

from __future__ import annotations

import dataclasses
import sys
import traceback
from typing import TextIO

USAGE = 2  # exit status for a mistake in how the command was called or configured
FAILED = 1  # exit status for an operation that failed
INTERRUPTED = 130


class CommandError(Exception):
    """A failure a handler explains itself: `message` says what is wrong, `hint` what to do."""

    def __init__(
        self, message: str, hint: str | None = None, code: int = FAILED, *, usage: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code
        self.usage = usage  # print the subcommand's usage line above the message


class UsageError(CommandError):
    """The command was called wrongly: shown under the subcommand's usage line, status 2."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint, USAGE, usage=True)


@dataclasses.dataclass(frozen=True)
class Report:
    """What is printed for one failure."""

    message: str
    hint: str | None
    code: int
    expected: bool  # False: a bug, worth a traceback and a report


def explain(exc: BaseException) -> Report:
    """The report for `exc`, whatever raised it."""
    if isinstance(exc, CommandError):
        return Report(exc.message, exc.hint, exc.code, True)
    if isinstance(exc, KeyboardInterrupt):
        return Report("interrupted", None, INTERRUPTED, True)
    for translate in _TRANSLATORS:
        report = translate(exc)
        if report is not None:
            return report
    return Report(
        f"internal error: {type(exc).__name__}: {exc}",
        "run again with --debug for the traceback, and please report it",
        FAILED,
        False,
    )


def report(
    command: str, exc: BaseException, *, debug: bool, usage: str | None, out: TextIO | None = None
) -> int:
    """Print `exc` for the user of `vcache command`; returns the exit status."""
    stream = out or sys.stderr
    what = explain(exc)
    if debug:
        traceback.print_exception(exc, file=stream)
    if usage and isinstance(exc, CommandError) and exc.usage:
        stream.write(usage.rstrip("\n") + "\n")
    prefix = f"vcache {command}" if command else "vcache"
    stream.write(f"{prefix}: error: {what.message}\n")
    if what.hint:
        stream.write(f"hint: {what.hint}\n")
    stream.flush()
    return what.code


# --- translators: each knows one family of exceptions, imported only if already loaded -------


def _settings(exc: BaseException) -> Report | None:
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return None
    from proxy.cli.config import settings_error

    return Report(settings_error(exc), None, USAGE, True)


def _startup(exc: BaseException) -> Report | None:
    if "proxy.errors" not in sys.modules:
        return None
    from proxy.errors import ProxyError, StartupError

    if isinstance(exc, StartupError):
        return Report(exc.message, exc.hint, exc.code, True)
    if isinstance(exc, ProxyError):
        return Report(exc.message, None, FAILED, True)
    return None


def _cache(exc: BaseException) -> Report | None:
    if "vision_cache.errors" not in sys.modules:
        return None
    from vision_cache.errors import VisionCacheError

    if isinstance(exc, VisionCacheError):
        return Report(str(exc), None, FAILED, True)
    return None


def _network(exc: BaseException) -> Report | None:
    if "httpx" not in sys.modules:
        return None
    import httpx

    if isinstance(exc, httpx.TransportError):
        where = _request_url(exc)
        return Report(
            f"cannot reach {where}: {type(exc).__name__}: {exc}".rstrip(": "),
            "is `vcache serve` running there? (--proxy / VCACHE_PROXY say where)",
            FAILED,
            True,
        )
    if isinstance(exc, httpx.HTTPError):
        return Report(f"{type(exc).__name__}: {exc}", None, FAILED, True)
    return None


def _request_url(exc: BaseException) -> str:
    try:
        request = exc.request  # type: ignore[attr-defined]
    except RuntimeError:  # httpx raises when the error has no request
        return "the server"
    return f"{request.url.scheme}://{request.url.netloc.decode()}"


def _os(exc: BaseException) -> Report | None:
    if not isinstance(exc, OSError):
        return None
    words = exc.strerror or str(exc)
    if exc.filename is not None:
        return Report(f"{exc.filename}: {words}", None, FAILED, True)
    return Report(words, None, FAILED, True)


# order matters: specific before general (a StartupError is no OSError, an httpx error is none)
_TRANSLATORS = (_settings, _startup, _cache, _network, _os)
