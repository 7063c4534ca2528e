"""What the helpers that run a server process for tests (llama-server, vcache, redis) share.

A `ChildProcess` subclass says how to start its process (`command`) and how to tell that it
is ready (`wait_ready`); the base class starts it with its output in a log file, waits under
one deadline while checking that it is still alive, and stops it (SIGTERM, then SIGKILL) and
closes the log however the test ends::

    class EchoServer(ChildProcess):
        name = "echo-server"

        def command(self) -> list[str]:
            return ["echo-server", "--port", "0"]

        def wait_ready(self, deadline: float) -> None:
            self.wait_until(lambda: "ready" in self.log_text(), deadline, "did not get ready")

    with EchoServer(tmp_path / "echo.log") as server:
        ...

Errors, each ending with the tail of the process's log:

* ServerStartError (a RuntimeError): the process could not be started
  - ServerExited: it died before it was ready
  - ServerTimeout (also a TimeoutError): it was not ready in time
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Self, TypeVar

T = TypeVar("T")
_LOG_TAIL_CHARS = 4000


class ServerStartError(RuntimeError):
    """A server process could not be started; the message ends with its log's tail."""


class ServerExited(ServerStartError):
    pass


class ServerTimeout(ServerStartError, TimeoutError):
    pass


def terminate(
    proc: subprocess.Popen[bytes] | None, timeout: float, sig: signal.Signals = signal.SIGTERM
) -> None:
    """`sig` (SIGTERM), then SIGKILL after `timeout` seconds; always reaped."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ChildProcess:
    """One server process with its output in `log_path`; `with` starts it and always stops it."""

    name: ClassVar[str] = "server"
    stop_timeout: ClassVar[float] = 15.0
    poll_interval: ClassVar[float] = 0.05

    def __init__(
        self,
        log_path: Path,
        *,
        startup_timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        append_log: bool = False,
    ) -> None:
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.env = dict(env) if env is not None else None
        self._append_log = append_log
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # --- what a subclass says ------------------------------------------------------------------

    def command(self) -> list[str]:
        raise NotImplementedError

    def wait_ready(self, deadline: float) -> None:
        """Return once the process serves; the base class stops it if this raises."""

    def forget(self) -> None:
        """Drop what only a running process has (its address); called by `stop`."""

    # --- running it ----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the process and wait until it is ready (`wait_ready`)."""
        if self.proc is not None:
            raise ServerStartError(f"{self.name} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab" if self._append_log else "wb")
        env = {**os.environ, **self.env} if self.env is not None else None
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
            self.wait_ready(time.monotonic() + self.startup_timeout)
        except BaseException:
            self.stop()
            raise

    def check_alive(self) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            raise ServerExited(f"{self.name} exited with code {code}\n{self.log_tail()}")

    def wait_until(self, ready: Callable[[], T | None], deadline: float, what: str) -> T:
        """Poll `ready` until it gives a true value, while the process lives, until `deadline`."""
        while True:
            self.check_alive()
            value = ready()
            if value:
                return value
            if time.monotonic() > deadline:
                raise ServerTimeout(
                    f"{self.name} {what} within {self.startup_timeout:.0f} s\n{self.log_tail()}"
                )
            time.sleep(self.poll_interval)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self) -> str:
        return f"--- {self.log_path} (tail) ---\n{self.log_text()[-_LOG_TAIL_CHARS:]}"

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None, f"{self.name} is not running"
        self.proc.send_signal(sig)

    def stop(self, timeout: float | None = None, sig: signal.Signals = signal.SIGTERM) -> None:
        """`sig` (SIGTERM), then SIGKILL after `timeout` seconds; closes the log. Idempotent."""
        proc, self.proc = self.proc, None
        terminate(proc, self.stop_timeout if timeout is None else timeout, sig)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.forget()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
