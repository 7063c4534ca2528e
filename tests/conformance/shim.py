#!/usr/bin/env python3
"""Stands in for llama-server in llama.cpp's server tests: straight, or with vcache in front.

The suite starts `$LLAMA_SERVER_BIN_PATH ARGS...` per test, talks to `--host`/`--port`, watches
the process (a test passes when a bad configuration makes it exit) and stops it with SIGTERM.
CONFORMANCE_FRONT says what answers there:

* ``none``: llama-server itself (this process becomes it);
* ``upstream``: `vcache serve --upstream` on the test's address, in front of llama-server on a
  free loopback port with the test's arguments. This process stays the parent of both, as a
  service manager would: SIGTERM and SIGINT go to both, and when either exits the other is
  stopped and this process exits with the status of the one that exited first. So a
  llama-server that dies at start (a bad flag, a bad MCP configuration) ends the "server" the
  test watches, with llama-server's status, as it would without vcache;
* ``managed``: `vcache serve --llama-server` with the test's arguments after `--` (vcache
  starts, watches and stops llama-server itself).

Standard library only: it runs under the suite's own interpreter.
"""

from __future__ import annotations

import contextlib
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


def spawn(argv: list[str], env: dict[str, str]) -> int:
    """Start `argv` as a child that gets SIGTERM if this process dies (even by SIGKILL)."""
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        os.execve(argv[0], argv, env)
    return pid


def exit_status(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + the signal."""
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def forward_signals(children: list[int]) -> None:
    """SIGTERM and SIGINT to this process go to every child in `children` (as it grows)."""

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)


def supervise(children: list[int]) -> int:
    """Wait for the first child to exit, stop the others; the first one's status."""
    pid, status = os.wait()
    first = exit_status(status)
    rest = [c for c in children if c != pid]
    for other in rest:
        with contextlib.suppress(ProcessLookupError):
            os.kill(other, signal.SIGTERM)
    for other in rest:
        os.waitpid(other, 0)
    return first


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
    upstream = [server, *args, "--host", "127.0.0.1", "--port", str(upstream_port)]
    children: list[int] = []
    forward_signals(children)
    children.append(spawn(upstream, env))
    children.append(spawn([*serve, "--upstream", f"http://127.0.0.1:{upstream_port}"], env))
    sys.exit(supervise(children))


if __name__ == "__main__":
    main()
