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
from typing import Self

import redis

from tests.support.child_process import ChildProcess, ServerExited, ServerStartError

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


class RedisServer(ChildProcess):
    """One redis-server process on 127.0.0.1; `url` is valid once started."""

    name = "redis-server"
    poll_interval = 0.02

    def __init__(self, workdir: Path, *, port: int = 0, extra: tuple[str, ...] = ()) -> None:
        # one log across restarts: a test that restarts Redis reads both runs
        super().__init__(workdir / "redis.log", startup_timeout=START_TIMEOUT_S, append_log=True)
        self.workdir = workdir
        self.extra = extra
        self.port = port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            *self.extra,
        ]

    def start(self) -> None:
        """Start on the port given or used before (a restart), else on a free one."""
        fixed = self.port != 0
        for _ in range(1 if fixed else 5):
            self.port = self.port or free_port()
            try:
                super().start()
                return
            except ServerExited:
                if not fixed:
                    self.port = 0  # taken meanwhile: another one
        raise ServerStartError(f"redis-server did not start:\n{self.log_tail()}")

    def wait_ready(self, deadline: float) -> None:
        self.wait_until(self._answers, deadline, "did not answer")

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
        self.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is saved (there is nothing to save)."""
        self.stop(sig=signal.SIGKILL)


class RedisClusterNodes:
    """Three redis-server processes joined into one Redis Cluster (masters only)."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.nodes = [
            RedisServer(
                workdir / f"node{i}",
                extra=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    # the bus port defaults to port + 10000, which a high free port cannot have
                    "--cluster-port",
                    str(free_port()),
                ),
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """Any one node: a cluster client learns the others from it."""
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
