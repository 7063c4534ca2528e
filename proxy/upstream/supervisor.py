"""Managed mode: the proxy starts llama-server itself, keeps it running and stops it on exit.

    config = ManagedServerConfig(binary=Path("llama-server"), args=("-m", "model.gguf"),
                                 embedding_dir=store_dir)
    async with ManagedServer(config) as server:
        ...  # send requests to server.base_url; server.wait_healthy() during a restart

What it promises:

* llama-server listens on a loopback port we choose; user arguments that set the host or the
  port are refused (`ReservedArgumentError`, a ValueError), as is `--image-embedding-dir`,
  which we set to the cache's directory when the binary has the flag (a patched build).
* `start()` returns once GET /health answers 200 (503 "loading model" is waited out). It
  raises `ManagedStartError` (with llama-server's exit status) when the process exits first
  or does not become healthy in time, quoting the tail of its output.
* An unexpected exit is followed by a restart after an exponential backoff (capped, and reset
  after a stable run); restart listeners are awaited once the new process is healthy.
* `stop()` sends SIGTERM, waits, then SIGKILL, and reaps the process: no zombie. Cancelling
  the task that owns the server still stops it.
* No orphan even when the proxy is SIGKILLed: on Linux the child asks the kernel, through
  prctl(PR_SET_PDEATHSIG), to SIGKILL it when its parent dies. We chose this over
  `start_new_session` plus a watchdog process because the kernel delivers it in every case
  (SIGKILL, OOM kill, segfault of the proxy) with no extra process to supervise. Its limits:
  Linux only, and "parent" is the thread that forked, here the event loop's thread, so the
  loop must live as long as the server does (it does: stopping the loop stops the proxy).

Errors (besides `proxy.errors.UpstreamError`):

* ProxyError
  x ReservedArgumentError (also ValueError): a user argument or environment variable sets
    what managed mode sets itself.
  x UpstreamError
    + ManagedStartError: llama-server exited while it started, or did not become healthy
      (`returncode` says how it exited; `vcache serve` then exits with llama-server's own
      status, as llama-server would have: a bad flag or configuration ends the process a
      supervisor or a test watches).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import functools
import ipaddress
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import httpx

from proxy.errors import ProxyError, UpstreamError

log = logging.getLogger(__name__)
# llama-server's own output, when no log file is configured.
child_log = logging.getLogger(__name__ + ".llama_server")

EMBEDDING_DIR_FLAG = "--image-embedding-dir"
_RESERVED_FLAGS = ("--host", "--port", EMBEDDING_DIR_FLAG)
_RESERVED_ENV = ("LLAMA_ARG_HOST", "LLAMA_ARG_PORT")
# Whole-word match, so that a future `--image-embedding-dirs` is not taken for our flag.
_EMBEDDING_DIR_IN_HELP = re.compile(r"(?<![\w-])--image-embedding-dir(?![\w-])")
# llama-server's message, and the OS's, when the port was taken before it could bind.
_BIND_FAILURE = re.compile(r"couldn't bind|address already in use", re.IGNORECASE)

_HELP_TIMEOUT_S = 30.0  # a GPU build's --help may initialise its backends first
_POLL_INTERVAL_S = 0.1
_PROBE_TIMEOUT = httpx.Timeout(2.0)
_BIND_ATTEMPTS = 3
_TAIL_LINES = 20
_MAX_LINE_BYTES = 64 * 1024
_DRAIN_TIMEOUT_S = 2.0
_PR_SET_PDEATHSIG = 1

RestartListener = Callable[[], Awaitable[None]]


class ReservedArgumentError(ProxyError, ValueError):
    """A llama-server argument or environment variable that managed mode sets itself."""


@dataclasses.dataclass(frozen=True)
class ManagedServerConfig:
    """How to run llama-server in managed mode.

    ManagedServerConfig(binary=Path("/opt/llama/llama-server"),
                        args=("-m", "qwen2-vl.gguf", "--mmproj", "mmproj.gguf"),
                        embedding_dir=Path("~/.cache/vcache/store").expanduser(),
                        log_path=Path("llama-server.log"))
    """

    binary: Path
    args: tuple[str, ...] = ()  # the user's llama-server arguments (after `--`)
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free loopback port
    embedding_dir: Path | None = None  # passed as --image-embedding-dir if the binary has it
    log_path: Path | None = None  # llama-server's stdout+stderr (appended), else our logger
    start_timeout_s: float = 600.0  # model loading can take minutes
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    stable_after_s: float = 60.0  # healthy this long, and the backoff starts over
    stop_grace_s: float = 10.0  # between SIGTERM and SIGKILL

    def __post_init__(self) -> None:
        _refuse_reserved_args(self.args)
        _require_loopback(self.host)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, not {self.port}")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")
        if min(self.start_timeout_s, self.stable_after_s, self.stop_grace_s) < 0:
            raise ValueError("timeouts must not be negative")


def refuse_reserved(args: Sequence[str], environ: Mapping[str, str]) -> None:
    """Raise `ReservedArgumentError` for what managed mode would refuse at start, before it runs."""
    _refuse_reserved_args(args)
    _refuse_reserved_env(environ)


def _refuse_reserved_args(args: Sequence[str]) -> None:
    for arg in args:
        flag = arg.split("=", 1)[0]  # `--port=8080` sets the port as well as `--port 8080`
        if flag in _RESERVED_FLAGS:
            raise ReservedArgumentError(
                f"remove {flag} from the llama-server arguments (after `--`): managed mode sets "
                "it (llama-server listens on a private loopback port and reads the cache's "
                "directory); vcache's own --host and --port say where clients connect"
            )


def _refuse_reserved_env(environ: Mapping[str, str]) -> None:
    # llama-server reads these too; refusing them keeps one source of truth for the address.
    for name in _RESERVED_ENV:
        if name in environ:
            raise ReservedArgumentError(
                f"unset {name}: managed mode chooses llama-server's host and port itself "
                "(vcache's own --host and --port say where clients connect)"
            )


def _require_loopback(host: str) -> None:
    # llama-server has no authentication of its own by default: reachable from elsewhere, it
    # would let anyone bypass the proxy's.
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"host must be a loopback address such as 127.0.0.1, not {host!r}")


class ManagedServer:
    """One llama-server child: started, watched, restarted and stopped by us."""

    def __init__(self, config: ManagedServerConfig) -> None:
        _refuse_reserved_env(os.environ)
        self._config = config
        self._port = config.port
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: _OutputPump | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._healthy = asyncio.Event()
        self._healthy_since: float | None = None
        self._restarts = 0
        self._listeners: list[RestartListener] = []
        self._supports_embedding_dir = False
        self._started = False
        self._stopping = False

    @property
    def base_url(self) -> str:
        """Where llama-server listens; the port changes only if a restart lost it to a race."""
        host = f"[{self._config.host}]" if ":" in self._config.host else self._config.host
        return f"http://{host}:{self._port}"

    @property
    def healthy(self) -> bool:
        return self._healthy.is_set() and self.pid is not None

    @property
    def restarts(self) -> int:
        """Successful restarts after unexpected exits."""
        return self._restarts

    @property
    def pid(self) -> int | None:
        """The running llama-server's process id, None when none runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def supports_embedding_dir(self) -> bool:
        """Whether the binary has --image-embedding-dir; known once start() has run."""
        return self._supports_embedding_dir

    def add_restart_listener(self, cb: RestartListener) -> None:
        """`cb` is awaited after each successful restart (the proxy re-reads /props then)."""
        self._listeners.append(cb)

    async def wait_healthy(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for llama-server to be healthy (for requests during a restart)."""
        if self._stopping:
            return False
        try:
            await asyncio.wait_for(self._healthy.wait(), timeout_s)
        except TimeoutError:
            return False
        return self.healthy

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Spawn llama-server and return once it is healthy; then watch it until stop()."""
        if self._started:
            raise RuntimeError("a ManagedServer starts once")
        self._started = True
        self._supports_embedding_dir = await _has_embedding_dir_flag(self._config.binary)
        if self._config.embedding_dir is not None and not self._supports_embedding_dir:
            log.warning(
                "%s has no %s (a stock build): the proxy will forward images to it "
                "instead of cached embeddings",
                self._config.binary,
                EMBEDDING_DIR_FLAG,
            )
        await self._launch()
        if self._stopping:  # stop() ran while we were starting, maybe before this process existed
            await self._stop_process(self._proc, self._pump)
            raise UpstreamError("llama-server was stopped while it was starting")
        self._monitor_task = asyncio.create_task(self._monitor(), name="llama-server monitor")

    async def stop(self) -> None:
        """Stop watching and terminate llama-server (SIGTERM, then SIGKILL). Idempotent."""
        self._stopping = True
        self._healthy.clear()
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            # asyncio.wait, unlike awaiting the task, does not swallow our own cancellation.
            await asyncio.wait([self._monitor_task])
        await self._stop_process(self._proc, self._pump)

    def _command(self) -> list[str]:
        argv = [
            str(self._config.binary),
            *self._config.args,
            "--host",
            self._config.host,
            "--port",
            str(self._port),
        ]
        if self._config.embedding_dir is not None and self._supports_embedding_dir:
            argv += [EMBEDDING_DIR_FLAG, str(self._config.embedding_dir.resolve())]
        return argv

    async def _launch(self) -> None:
        """Spawn and wait until healthy; on failure nothing is left running."""
        for attempt in range(1, _BIND_ATTEMPTS + 1):
            if self._config.port == 0 and (self._port == 0 or attempt > 1):
                self._port = pick_free_port(self._config.host)
            try:
                await self._spawn_and_wait()
                return
            except _EarlyExit as exc:
                if not (exc.bind_failed and self._config.port == 0 and attempt < _BIND_ATTEMPTS):
                    raise ManagedStartError(exc.summary, exc.tail, exc.returncode) from None
                log.warning(
                    "port %d was taken before llama-server could bind it; trying another",
                    self._port,
                )
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _spawn_and_wait(self) -> None:
        proc = await _spawn(self._command())
        self._proc, self._pump = proc, _OutputPump(proc, self._config.log_path)
        log.info("started llama-server (pid %d) on %s", proc.pid, self.base_url)
        try:
            await self._wait_until_healthy(proc, self._pump)
        except BaseException:
            # Timed out, cancelled, or already exited: never leave a process behind.
            await self._stop_process(proc, self._pump)
            raise
        self._healthy_since = time.monotonic()
        self._healthy.set()
        log.info("llama-server (pid %d) is healthy", proc.pid)

    async def _wait_until_healthy(
        self,
        proc: asyncio.subprocess.Process,
        pump: _OutputPump,
    ) -> None:
        # Race the health polls against the exit: a poll can hang for its whole timeout (say,
        # on a port someone else took), and an exit must fail the start at once.
        polling = asyncio.create_task(_poll_health(self.base_url + "/health"))
        exiting = asyncio.create_task(proc.wait())
        try:
            await asyncio.wait(
                [polling, exiting],
                timeout=self._config.start_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            polling.cancel()
            exiting.cancel()
            await asyncio.wait([polling, exiting])
        # The exit first: an exited process is not healthy, whoever answered 200.
        if proc.returncode is not None:
            await pump.drain()
            raise _EarlyExit(proc.returncode, pump.tail())
        if polling.cancelled():  # by us, at the time limit
            raise ManagedStartError(
                f"llama-server did not become healthy within {self._config.start_timeout_s:g} s",
                pump.tail(),
            )
        polling.result()  # re-raises a bug in the polling, if any

    async def _stop_process(
        self,
        proc: asyncio.subprocess.Process | None,
        pump: _OutputPump | None,
    ) -> None:
        if proc is not None:
            await _terminate(proc, self._config.stop_grace_s)
        if pump is not None:
            await pump.drain()

    async def _monitor(self) -> None:
        """Restart llama-server whenever it exits, until stop() cancels us."""
        backoff = Backoff(self._config)
        while True:
            uptime = await self._wait_for_exit()
            while not await self._restart_after(backoff.next_delay(uptime)):
                uptime = 0.0  # a failed restart was never healthy

    async def _wait_for_exit(self) -> float:
        """Wait for the running process to exit, log it, and return how long it was healthy."""
        proc, pump = self._proc, self._pump
        assert proc is not None and pump is not None  # _launch set them
        returncode = await proc.wait()
        await pump.drain()
        self._healthy.clear()
        uptime = 0.0 if self._healthy_since is None else time.monotonic() - self._healthy_since
        self._healthy_since = None
        log.error(
            "llama-server (pid %d) %s after %.1f s healthy; its last output:\n%s",
            proc.pid,
            describe_exit(returncode),
            uptime,
            pump.tail(),
        )
        return uptime

    async def _restart_after(self, delay_s: float) -> bool:
        log.warning("restarting llama-server in %.1f s", delay_s)
        await asyncio.sleep(delay_s)
        try:
            await self._launch()
        except Exception:
            # Nothing is left running; the monitor backs off longer and tries again.
            log.exception("restarting llama-server failed")
            return False
        self._restarts += 1
        log.warning("llama-server restarted (pid %s, restart %d)", self.pid, self._restarts)
        await self._notify_restart()
        return True

    async def _notify_restart(self) -> None:
        for listener in list(self._listeners):
            try:
                await listener()
            except Exception:
                # One broken listener must not stop the supervision or the other listeners.
                log.exception("restart listener %r failed", listener)


class ManagedStartError(UpstreamError):
    """llama-server did not come up: it exited first, or stayed unhealthy too long.

    `summary` says which in one line, `tail` holds its last lines of output, and
    `last_error()` the line of it most likely to say why. `returncode` is its exit status as
    asyncio reports it (negative: killed by that signal), None when it did not exit.
    """

    def __init__(self, summary: str, tail: str, returncode: int | None = None) -> None:
        super().__init__(f"{summary}; its last output:\n{tail}")
        self.summary = summary
        self.tail = tail
        self.returncode = returncode

    @property
    def exit_status(self) -> int:
        """The status to exit with in its place: its code, 128 + the signal that killed it (a
        shell's convention), or 1 when it did not exit."""
        if self.returncode is None:
            return 1
        return self.returncode if self.returncode >= 0 else 128 - self.returncode

    def last_error(self) -> str | None:
        """The first error line of the tail (the cause; later ones tend to be consequences),
        else its last line, without llama-server's timestamp and level prefix."""
        lines = [ln.strip() for ln in self.tail.splitlines() if ln.strip()]
        if not lines:
            return None
        marked = [ln for ln in lines if _ERROR_LEVEL.match(ln)]
        worded = [ln for ln in lines if _ERROR_WORDS.search(ln)]
        return _ERROR_LEVEL.sub("", (marked or worded or lines[-1:])[0]).strip()


# llama-server's log prefix: "0.00.012.692 E " (time, then the level: E for errors)
_ERROR_LEVEL = re.compile(r"^(?:[\d.]+\s+)?E\s+")
_ERROR_WORDS = re.compile(r"error|failed|cannot|unable|invalid", re.IGNORECASE)


class _EarlyExit(Exception):
    """llama-server exited before it became healthy."""

    def __init__(self, returncode: int, tail: str) -> None:
        self.summary = f"llama-server {describe_exit(returncode)} before it became healthy"
        super().__init__(f"{self.summary}; its last output:\n{tail}")
        self.tail = tail
        self.returncode = returncode
        self.bind_failed = _BIND_FAILURE.search(tail) is not None


class Backoff:
    """Delays before restarts: initial, then doubling up to the cap; back to initial after
    a process stayed healthy for `stable_after_s` (a crash a day is not a crash loop)."""

    def __init__(self, config: ManagedServerConfig) -> None:
        self._initial = config.backoff_initial_s
        self._max = config.backoff_max_s
        self._stable_after = config.stable_after_s
        self._next = self._initial

    def next_delay(self, uptime_s: float) -> float:
        if uptime_s >= self._stable_after:
            self._next = self._initial
        delay = self._next
        self._next = min(self._next * 2, self._max)
        return delay


class _OutputPump:
    """Copies llama-server's stdout+stderr to the log file, or to our logger, and keeps the
    last lines so that a failure can quote them.

    One pipe for both streams keeps their lines in order. The file is written by us rather than
    by the child so that the tail is at hand either way; the child dies with us (see the module
    docstring), so nothing it prints after our death is lost that would have mattered.
    """

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path | None) -> None:
        assert proc.stdout is not None  # _spawn pipes stdout
        self._stream = proc.stdout
        self._log_path = log_path
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._partial = b""
        self._to_logger = True  # until the log file is open
        self._task = asyncio.create_task(self._run(), name=f"llama-server {proc.pid} output")

    def tail(self) -> str:
        return "\n".join(self._tail) or "(no output)"

    async def drain(self) -> None:
        """Wait for the end of the output, which follows the process's exit."""
        # asyncio.wait (no exception from the task) with a limit: a grandchild that inherited
        # the pipe could keep it open after llama-server exited.
        await asyncio.wait([self._task], timeout=_DRAIN_TIMEOUT_S)
        self._task.cancel()

    async def _run(self) -> None:
        sink = self._open_sink()
        try:
            while chunk := await self._stream.read(_MAX_LINE_BYTES):
                sink = self._write(sink, chunk)
                self._feed(chunk)
            if self._partial:
                self._line(self._partial)
        finally:
            if sink is not None:
                with contextlib.suppress(OSError):  # best effort, as every write
                    sink.close()

    def _feed(self, chunk: bytes) -> None:
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        if len(self._partial) > _MAX_LINE_BYTES:  # no newline in sight: bound our memory
            lines.append(self._partial)
            self._partial = b""
        for raw in lines:
            self._line(raw)

    def _line(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r")
        self._tail.append(text)
        if self._to_logger:
            child_log.info("%s", text)

    def _write(self, sink: IO[bytes] | None, chunk: bytes) -> IO[bytes] | None:
        """Append to the log file; on failure (a full disk) go on with our logger instead,
        because a pump that stopped reading would block llama-server on its next write."""
        if sink is None:
            return None
        try:
            # Small appends to a local file: cheap enough to do on the event loop.
            sink.write(chunk)
            sink.flush()
        except OSError as exc:
            log.error(
                "cannot append llama-server's output to %s (%s); logging it here instead",
                self._log_path,
                exc,
            )
            with contextlib.suppress(OSError):
                sink.close()
            self._to_logger = True
            return None
        return sink

    def _open_sink(self) -> IO[bytes] | None:
        if self._log_path is None:
            return None
        try:
            sink = self._log_path.open("ab")
        except OSError as exc:
            # Logging is best effort: an unwritable log file must not take llama-server down.
            log.error(
                "cannot append llama-server's output to %s (%s); logging it here instead",
                self._log_path,
                exc,
            )
            return None
        self._to_logger = False
        return sink


def pick_free_port(host: str) -> int:
    """A port that is free on `host` now.

    Race: another process may take the port between our close() and llama-server's bind().
    llama-server then exits with "couldn't bind", and `_launch` tries again on a new port.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.bind(address)
        return int(sock.getsockname()[1])


async def _poll_health(url: str) -> None:
    """Return once GET `url` answers 200.

    A 200 could, in theory, come from whoever took our port in the race described at
    `pick_free_port`; llama-server then exits at once and the monitor notices.
    """
    # trust_env=False: an HTTP_PROXY in the environment must not route loopback traffic.
    async with httpx.AsyncClient(timeout=_PROBE_TIMEOUT, trust_env=False) as client:
        while True:
            if await _answers_ok(client, url):
                return
            await asyncio.sleep(_POLL_INTERVAL_S)


async def _answers_ok(client: httpx.AsyncClient, url: str) -> bool:
    """GET /health is 200; 503 means "loading model", and no answer means not listening yet."""
    try:
        response = await client.get(url)
    except httpx.TransportError:
        return False
    return response.status_code == 200


async def _has_embedding_dir_flag(binary: Path) -> bool:
    """Whether `binary --help` lists --image-embedding-dir (a patched build)."""
    proc = await _spawn([str(binary), "--help"])
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), _HELP_TIMEOUT_S)
    except TimeoutError:
        log.warning(
            "`%s --help` did not finish in %g s; assuming no %s",
            binary,
            _HELP_TIMEOUT_S,
            EMBEDDING_DIR_FLAG,
        )
        return False
    finally:
        await _terminate(proc, grace_s=1.0)
    return _EMBEDDING_DIR_IN_HELP.search(output.decode(errors="replace")) is not None


async def _spawn(argv: list[str]) -> asyncio.subprocess.Process:
    """Start `argv` with its stdout+stderr on one pipe, set to die with us."""
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup(),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise UpstreamError(f"cannot run llama-server ({argv[0]}): {exc}") from exc


def _child_setup() -> Callable[[], None]:
    """The preexec_fn of every child: its own process group, and dying with us.

    Its own process group: a Ctrl-C in the terminal reaches only the proxy, which then stops
    llama-server itself, instead of racing the monitor to restart it. (Set here rather than
    with ``process_group=0``, which uvloop's subprocess support does not take.)

    Dying with us (Linux only): the kernel SIGKILLs the child when we die. SIGKILL rather than
    SIGTERM: with the proxy gone there is nobody left to escalate, and llama-server holds
    nothing that a clean shutdown would save.
    """
    if not sys.platform.startswith("linux"):
        return lambda: os.setpgid(0, 0)
    prctl = _prctl()  # looked up here, before fork, not in the child
    parent = os.getpid()

    def hook() -> None:
        os.setpgid(0, 0)
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            # We died between fork and prctl, so the signal will never come.
            os._exit(1)

    return hook


@functools.cache
def _prctl() -> Any:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


async def _terminate(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM, wait up to `grace_s`, SIGKILL; returns once the process is reaped."""
    try:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it exited on its own meanwhile
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                log.warning(
                    "llama-server (pid %d) ignored SIGTERM for %g s; killing it", proc.pid, grace_s
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        await proc.wait()
    finally:
        if proc.returncode is None:
            # Cancelled while waiting: kill it now. asyncio's child watcher still reaps it.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"
