"""Run `vcache serve` as a real process for tests, on a free port, and stop it cleanly."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx

from tests.support.child_process import ChildProcess

_SERVING = re.compile(r"vcache: serving on (http://\S+)")


class ProxyProcess(ChildProcess):
    """`vcache serve ARGS --port 0`, its log in a file; `base_url` once it is up."""

    name = "vcache"
    stop_timeout = 30.0

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        *,
        startup_timeout: float = 120.0,
        env: dict[str, str] | None = None,
        health_path: str = "/vcache/health",
        vcache: list[str] | None = None,
    ) -> None:
        """`vcache`: the command to run (default: this Python's ``-m proxy``)."""
        super().__init__(log_path, startup_timeout=startup_timeout, env=env or {})
        self.vcache = vcache or [sys.executable, "-m", "proxy"]
        self.args = args
        self.health_path = health_path
        self.base_url = ""

    def command(self) -> list[str]:
        return [*self.vcache, "serve", "--port", "0", *self.args]

    def wait_ready(self, deadline: float) -> None:
        self.base_url = self.wait_until(self._serving_url, deadline, "did not start serving")
        httpx.get(f"{self.base_url}{self.health_path}", timeout=10)

    def _serving_url(self) -> str | None:
        match = _SERVING.search(self.log_text())
        return match.group(1) if match else None

    def log(self) -> str:
        return self.log_text()

    def forget(self) -> None:
        self.base_url = ""
