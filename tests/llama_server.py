"""Run a real llama-server for tests: free port, log file, health wait, clean stop.

    server = LlamaServer(binary, ["-m", "model.gguf", "--mmproj", "mmproj.gguf"], log_path)
    with server:
        httpx.get(f"{server.base_url}/health")

The server binds port 0 (the kernel picks a free port; no race between choosing and
binding) and the real port is read back from its log. Errors:

* LlamaServerError
  - LlamaServerExited: the process died before it became healthy
  - LlamaServerTimeout: it did not become healthy in time
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx
from child_process import StartStop, terminate

_LISTENING = re.compile(r"listening on (https?://[^\s]+?:\d+)\s")
_LOG_TAIL_BYTES = 4000


class LlamaServerError(RuntimeError):
    """llama-server could not be started; the message ends with the log's tail."""


class LlamaServerExited(LlamaServerError):
    pass


class LlamaServerTimeout(LlamaServerError):
    pass


class LlamaServer(StartStop):
    """One llama-server process, started on a free port on 127.0.0.1."""

    def __init__(self, binary: Path | str, args: Sequence[str], log_path: Path, *,
                 startup_timeout: float = 120.0, env: Mapping[str, str] | None = None,
                 host: str = "127.0.0.1") -> None:
        self.binary = Path(binary)
        self.args = list(args)
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.env = dict(env) if env is not None else None
        self.host = host
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``; only valid once ``start`` has returned."""
        if self._base_url is None:
            raise LlamaServerError("llama-server is not running")
        return self._base_url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        return [str(self.binary), *self.args, "--host", self.host, "--port", "0"]

    def start(self) -> None:
        """Start the server and wait until ``/health`` answers 200."""
        if self._proc is not None:
            raise LlamaServerError("llama-server already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        env = {**os.environ, **self.env} if self.env is not None else None
        self._proc = subprocess.Popen(self.command(), stdout=self._log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env)
        try:
            deadline = time.monotonic() + self.startup_timeout
            self._base_url = self._wait_for_port(deadline)
            self._wait_for_health(deadline)
        except BaseException:
            self.stop()
            raise

    def _wait_for_port(self, deadline: float) -> str:
        while True:
            self._check_alive()
            match = _LISTENING.search(self.log_path.read_text(errors="replace"))
            if match:
                return match.group(1)
            self._sleep_or_time_out(deadline, "did not report its port")

    def _wait_for_health(self, deadline: float) -> None:
        # /health answers 503 while the model is still loading.
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while True:
                self._check_alive()
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not accepting connections yet
                self._sleep_or_time_out(deadline, "did not become healthy")

    def _check_alive(self) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            raise LlamaServerExited(f"llama-server exited with code {code}\n{self.log_tail()}")

    def _sleep_or_time_out(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise LlamaServerTimeout(
                f"llama-server {what} within {self.startup_timeout:.0f} s\n{self.log_tail()}")
        time.sleep(0.05)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self) -> str:
        return f"--- {self.log_path} (tail) ---\n{self.log_text()[-_LOG_TAIL_BYTES:]}"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; closes the log. Idempotent."""
        proc, self._proc, self._base_url = self._proc, None, None
        terminate(proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
