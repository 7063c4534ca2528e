"""Run a real redis-server for tests: loopback, a free port, no persistence, clean stop.

    with RedisServer(tmp_path) as server:
        tier = RedisTier(SharedTierConfig(server.url))
        server.kill()       # SIGKILL: clients see a dead Redis
        server.start()      # the same port again, empty

redis-server cannot bind port 0 and report it, so a free port is found by binding one and
letting it go; the small race with another process is handled by trying another port.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import redis
from child_process import StartStop

START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: `make system-deps` installs it")
    return binary


class RedisServer(StartStop):
    """One redis-server process on 127.0.0.1; `url` is valid once started."""

    def __init__(self, workdir: Path, *, port: int = 0, extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.extra = extra
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start on the port given or used before (a restart), else on a free one."""
        fixed = self.port != 0
        for _ in range(1 if fixed else 5):
            self.port = self.port or free_port()
            if self._start_once():
                return
            if not fixed:
                self.port = 0  # taken meanwhile: another one
        raise RuntimeError(f"redis-server did not start:\n{self.log_text()[-2000:]}")

    def _start_once(self) -> bool:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = (self.workdir / "redis.log").open("ab")
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--dir", str(self.workdir), *self.extra]
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._close_log()
                self._proc = None
                return False
            if self._answers():
                return True
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer:\n{self.log_text()[-2000:]}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def client(self) -> redis.Redis:
        """A synchronous client for tests to look inside; the caller closes it."""
        return redis.Redis.from_url(self.url)

    def freeze(self) -> None:
        """SIGSTOP: the port stays open and nothing answers, as with a stalled Redis."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is saved (there is nothing to save)."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
            proc.send_signal(sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return (self.workdir / "redis.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


class RedisClusterNodes:
    """Three redis-server processes joined into one Redis Cluster (masters only)."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.nodes = [
            RedisServer(workdir / f"node{i}", extra=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                # the bus port defaults to port + 10000, which a high free port cannot have
                "--cluster-port", str(free_port())))
            for i in range(size)]

    @property
    def url(self) -> str:
        """Any one node: a cluster client learns the others from it."""
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(self._ready(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become ready")
            time.sleep(0.05)

    @staticmethod
    def _ready(node: RedisServer) -> bool:
        with node.client() as client:
            return bool(client.cluster("info").get("cluster_state") == "ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
