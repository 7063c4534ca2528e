"""Logging for every `vcache` command: text or JSON lines on stderr, other libraries kept quiet.

    configure("info", "json")     # --log-level info --log-format json

JSON lines carry `ts`, `level`, `logger`, `msg`, and the fields a record brings: the access
log's `rid`, `method`, `path`, `status`, `ms`, `note` (proxy.web.site). httpx's, httpcore's and
aiohttp's own per-request lines stay out below debug: vcache writes one line per request itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from typing import Literal

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# their INFO lines repeat, per request, what vcache's access line already says
QUIET_BELOW_DEBUG = ("httpx", "httpcore", "aiohttp.access", "aiohttp.client", "asyncio")


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        line: dict[str, object] = {
            "ts": moment.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            line.update(access)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def chosen_format(args: argparse.Namespace) -> LogFormat:
    """--log-format, else VCACHE_LOG_FORMAT, else text."""
    value = getattr(args, "log_format", None) or os.environ.get("VCACHE_LOG_FORMAT", "text")
    return "json" if value == "json" else "text"


def configure(level: str = "info", fmt: LogFormat = "text") -> None:
    """Set up the root logger once for this process (a second call replaces the first)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    for name in QUIET_BELOW_DEBUG:
        logging.getLogger(name).setLevel(quiet)
