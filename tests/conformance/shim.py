#!/usr/bin/env python3
"""Stands in for llama-server in llama.cpp's server tests: straight, or with vcache in front.

The suite starts `$LLAMA_SERVER_BIN_PATH ARGS...` per test and talks to `--host`/`--port`.
CONFORMANCE_FRONT says what answers there:

* ``none``: llama-server itself (this process becomes it);
* ``upstream``: vcache (this process becomes `vcache serve --upstream`), in front of
  llama-server started on a free loopback port with the same arguments; llama-server gets
  SIGTERM when vcache exits (PR_SET_PDEATHSIG), so the suite's stop() stops both;
* ``managed``: `vcache serve --llama-server` with the suite's arguments after `--`.

Standard library only: it runs under the suite's own interpreter.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import tempfile

PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def take(args: list[str], name: str) -> str | None:
    """Remove `name VALUE` from `args`; the value, or None."""
    if name not in args:
        return None
    i = args.index(name)
    value = args[i + 1]
    del args[i : i + 2]
    return value


def die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def main() -> None:
    server = os.environ["CONFORMANCE_SERVER"]
    front = os.environ.get("CONFORMANCE_FRONT", "none")
    args = sys.argv[1:] + os.environ.get("CONFORMANCE_SERVER_ARGS", "").split()
    if front == "none":
        os.execv(server, [server, *args])
    host = take(args, "--host") or os.environ.get("LLAMA_ARG_HOST", "127.0.0.1")
    port = take(args, "--port") or os.environ.get("LLAMA_ARG_PORT", "8080")
    vcache = os.environ["CONFORMANCE_VCACHE"]
    store = tempfile.mkdtemp(prefix="vcache-store-", dir=os.environ.get("CONFORMANCE_TMP"))
    serve = [vcache, "serve", "--host", host, "--port", port, "--store", store]
    if front == "managed":
        os.execv(vcache, [*serve, "--llama-server", server, "--", *args])
    upstream_port = free_port()
    env = dict(os.environ)
    if "AIP_HTTP_PORT" in env:  # Vertex AI mode: llama-server takes its port from here
        env["AIP_HTTP_PORT"] = str(upstream_port)
    if os.fork() == 0:
        die_with_parent()
        os.execve(server, [server, *args, "--host", "127.0.0.1", "--port", str(upstream_port)], env)
    os.execv(vcache, [*serve, "--upstream", f"http://127.0.0.1:{upstream_port}"])


if __name__ == "__main__":
    main()
