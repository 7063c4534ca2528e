"""Run `vcache serve` as a real process for tests, on a free port, and stop it cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx
from child_process import StartStop, terminate

_SERVING = re.compile(r"vcache: serving on (http://\S+)")


class ProxyProcess(StartStop):
    """`vcache serve ARGS --port 0`, its log in a file; `base_url` once it is up."""

    def __init__(self, args: list[str], log_path: Path, *, startup_timeout: float = 120.0,
                 env: dict[str, str] | None = None, health_path: str = "/vcache/health") -> None:
        self.health_path = health_path
        self.args = args
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.base_url = ""

    def start(self) -> None:
        self._log = self.log_path.open("wb")
        cmd = [sys.executable, "-m", "proxy", "serve", "--port", "0", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + self.startup_timeout
        try:
            while not self.base_url:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vcache exited with {self.proc.returncode}:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vcache did not start:\n{self.log()}")
                m = _SERVING.search(self.log())
                if m:
                    self.base_url = m.group(1)
                else:
                    time.sleep(0.05)
            httpx.get(f"{self.base_url}{self.health_path}", timeout=10)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        terminate(proc, 30)
        if self._log is not None:
            self._log.close()
            self._log = None
