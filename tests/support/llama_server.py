"""Run a real llama-server for tests: free port, log file, health wait, clean stop.

    server = LlamaServer(binary, ["-m", "model.gguf", "--mmproj", "mmproj.gguf"], log_path)
    with server:
        httpx.get(f"{server.base_url}/health")

The server binds port 0 (the kernel picks a free port; no race between choosing and
binding) and the real port is read back from its log. A server that dies or does not become
healthy in time raises `ServerExited` / `ServerTimeout` (tests.support.child_process).

`built_binary(variant)` finds the binary to run: the one $VCACHE_LLAMA_SERVER_PATCHED / _STOCK
names, else this checkout's build (`vcache build-server --cpu` into $VCACHE_LLAMA_CACHE,
default .build/llama), built if missing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from tests.support.child_process import ChildProcess, ServerStartError

ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"listening on (https?://[^\s]+?:\d+)\s")


def built_binary(variant: str) -> Path:
    """The llama-server binary for `variant` (patched or stock), building it if needed."""
    given = os.environ.get(f"VCACHE_LLAMA_SERVER_{variant.upper()}")
    if given:
        return Path(given)
    env = {**os.environ}
    env.setdefault("VCACHE_LLAMA_CACHE", str(ROOT / ".build" / "llama"))
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "build-server", "--cpu", "--variant", variant],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    return Path(out.stdout.strip())


class LlamaServer(ChildProcess):
    """One llama-server process, started on a free port on 127.0.0.1."""

    name = "llama-server"

    def __init__(
        self,
        binary: Path | str,
        args: Sequence[str],
        log_path: Path,
        *,
        startup_timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(log_path, startup_timeout=startup_timeout, env=env)
        self.binary = Path(binary)
        self.args = list(args)
        self.host = host
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``; only valid once ``start`` has returned."""
        if self._base_url is None:
            raise ServerStartError("llama-server is not running")
        return self._base_url

    def command(self) -> list[str]:
        return [str(self.binary), *self.args, "--host", self.host, "--port", "0"]

    def wait_ready(self, deadline: float) -> None:
        """The port from the log, then ``/health`` answering 200 (503 while loading)."""
        self._base_url = self.wait_until(self._reported_url, deadline, "did not report its port")
        with httpx.Client(base_url=self._base_url, timeout=5.0) as client:
            self.wait_until(lambda: _healthy(client), deadline, "did not become healthy")

    def _reported_url(self) -> str | None:
        match = _LISTENING.search(self.log_text())
        return match.group(1) if match else None

    def forget(self) -> None:
        self._base_url = None


def _healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/health").status_code == 200
    except httpx.TransportError:
        return False  # not accepting connections yet
