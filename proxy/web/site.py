"""What every serve mode's HTTP side shares: the request middleware, the site on its port, and
running until SIGINT or SIGTERM.

The proxy in front of llama-server (`proxy.web.app`) and the in-process llama-cpp-python
backend (`proxy.backends.llama_cpp`) answer alike: a request id on every response, one log line
per request, and every error in llama-server's shape, never a traceback::

    app = web.Application(middlewares=[request_middleware()])
    async with running_site(app, ("127.0.0.1",), 0) as url:  # port 0: the kernel picks one
        ...
    await run_until_signalled(running_proxy(settings))       # `vcache serve`

`bind_listeners` takes the address before anything else starts, so that an address this
machine does not have, or a port in use, fails `vcache serve` at once: not after a managed
llama-server has spent minutes loading its model.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from aiohttp import web

from proxy.errors import BodyTooLarge, ProxyError, StartupError
from proxy.upstream.relay import RESPONSE_COMPLETE, RESPONSE_STARTED, error_response
from proxy.web.listen import url_of

log = logging.getLogger("vcache.proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# before the handler: may raise a ProxyError (the proxy key check)
Check = Callable[[web.Request], None]
# after it, with the outcome: "2xx" .. "5xx", or CANCELLED (metrics)
Record = Callable[[web.Request, str], None]
REQUEST_ID = "X-Request-Id"
CANCELLED = "cancelled"  # the client went away before the whole response was sent
# how long requests in flight may go on after SIGTERM (see running_site); not 0, which
# aiohttp reads as "no limit"
SHUTDOWN_GRACE_S = 0.1


def request_middleware(*, check: Check | None = None, record: Record | None = None) -> Any:
    """Request id, `check`, one log line, `record`, and no traceback to any client."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get(REQUEST_ID) or uuid.uuid4().hex[:16]
        started = time.perf_counter()
        try:
            resp = await _answer(request, handler, rid, check)
        except asyncio.CancelledError:
            _cancelled(request, rid, started, record)
            raise
        if not resp.prepared:
            resp.headers[REQUEST_ID] = rid
        _finished(request, resp, rid, started, record)
        return resp

    return middleware


def _finished(
    request: web.Request,
    resp: web.StreamResponse,
    rid: str,
    started: float,
    record: Record | None,
    note: str = "",
) -> None:
    """Count and log one request that was answered."""
    if record is not None:
        record(request, f"{resp.status // 100}xx")
    vcache = resp.headers.get("X-Vcache", "")
    _access_line(request, rid, resp.status, started, f"{vcache} {note}".strip())


def _cancelled(request: web.Request, rid: str, started: float, record: Record | None) -> None:
    """A handler cancelled because its client's connection closed.

    A client that reads the whole response and then closes its connection (one connection per
    request, or an upstream answer with `Connection: close`) may do so while the handler is
    still tidying up (closing upstream's response): the request was served, and counts as such.
    """
    resp = request.get(RESPONSE_STARTED)
    if resp is not None and request.get(RESPONSE_COMPLETE):
        _finished(request, resp, rid, started, record, "(client closed after the response)")
        return
    if record is not None:
        record(request, CANCELLED)
    _access_line(request, rid, None, started, "cancelled (client gone)")


def _access_line(
    request: web.Request, rid: str, status: int | None, started: float, note: str
) -> None:
    elapsed = (time.perf_counter() - started) * 1000
    fields = {
        "rid": rid,
        "method": request.method,
        "path": request.path,
        "status": status,
        "ms": round(elapsed, 1),
        "note": note,
    }
    shown = "-" if status is None else str(status)
    log.info(
        "rid=%s %s %s %s %.1fms %s",
        rid,
        request.method,
        request.path,
        shown,
        elapsed,
        note,
        extra={"access": fields},
    )


async def _answer(
    request: web.Request, handler: Handler, rid: str, check: Check | None
) -> web.StreamResponse:
    try:
        if check is not None:
            check(request)
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as e:  # aiohttp's own body limit, where it is on
        return error_response(BodyTooLarge(e.text or "request body too large"))
    except web.HTTPException:
        raise
    except Exception as e:
        return failed(request, rid, e)


def failed(request: web.Request, rid: str, e: Exception) -> web.StreamResponse:
    """The answer to a request whose handler raised `e`."""
    started: web.StreamResponse | None = request.get(RESPONSE_STARTED)
    if started is not None:
        # Headers (and maybe part of the body) are out: no error answer can follow them, and
        # a second response written into the stream would desynchronise the connection.
        # Cutting it is the one signal left: the client sees a response that ends short.
        log.warning(
            "rid=%s %s %s broken off after the headers: %s", rid, request.method, request.path, e
        )
        if request.transport is not None:
            request.transport.close()
        return started
    if isinstance(e, ProxyError):
        return error_response(e)
    log.exception("rid=%s %s %s failed", rid, request.method, request.path)
    return error_response(ProxyError("internal error in the proxy"))


def bind_listeners(hosts: Sequence[str], port: int) -> list[socket.socket]:
    """Sockets bound to `port` on every address of `hosts` (not listening yet).

    Raises `StartupError` saying what is wrong with the address or the port. With port 0 the
    kernel picks one for the first address, and the others get the same.
    """
    sockets: list[socket.socket] = []
    try:
        for host in hosts:
            for family, kind, proto, address in _addresses(host, port):
                sockets.append(_bind(family, kind, proto, address, host))
                port = port or sockets[0].getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _addresses(host: str, port: int) -> list[tuple[int, int, int, Any]]:
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise StartupError(
            f"cannot listen on {host!r}: not an address of this machine, nor a name that "
            f"resolves ({getattr(e, 'strerror', None) or e})",
            "give --host an address such as 127.0.0.1, 0.0.0.0 or ::",
            code=2,
        ) from None
    unique = {(f, k, p, a): None for f, k, p, _, a in found}  # in order, without repeats
    return list(unique)


def _bind(family: int, kind: int, proto: int, address: Any, host: str) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers do
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise _bind_error(e, host, address[1]) from None
    return sock


def _bind_error(e: OSError, host: str, port: int) -> StartupError:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if e.errno == errno.EADDRINUSE:
        return StartupError(
            f"cannot listen on {where}: the address is already in use",
            f"stop what listens there (`ss -ltnp 'sport = :{port}'` shows it), or give "
            "another --port",
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return StartupError(
            f"cannot listen on {where}: {host} is not an address of this machine",
            "give --host one of this machine's addresses, or 0.0.0.0 for all of them",
            code=2,
        )
    if e.errno == errno.EACCES:
        return StartupError(
            f"cannot listen on {where}: permission denied",
            "ports below 1024 need privileges: give a --port of 1024 or above",
        )
    return StartupError(f"cannot listen on {where}: {e.strerror or e}")


@contextlib.asynccontextmanager
async def running_site(
    app: web.Application,
    hosts: Sequence[str],
    port: int,
    *,
    sockets: Sequence[socket.socket] = (),
) -> AsyncIterator[str]:
    """`app` listening on every one of `hosts` (`proxy.web.listen.parse_hosts`) at `port`, or
    on `sockets` bound beforehand for them (`bind_listeners`); yields the first address's URL
    (the real port, for port 0). The sockets are closed on exit."""
    owned = list(sockets) or bind_listeners(hosts, port)
    # handler_cancellation: a client that disconnects cancels its handler, and with it the
    # upstream request or the generation (llama-server then stops generating for it).
    # shutdown_timeout: on SIGTERM, requests in flight are cut at once, as llama-server cuts
    # its own (it closes its sockets and exits); aiohttp's default waits up to 60 s for them,
    # which a supervisor that kills after a few seconds (or llama.cpp's server tests: 5 s,
    # expecting under 3) reads as a hung process.
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S
    )
    try:
        await runner.setup()
        for sock in owned:
            await web.SockSite(runner, sock).start()
        yield url_of(hosts[0], owned[0].getsockname()[1])
    finally:
        await runner.cleanup()
        for sock in owned:
            sock.close()


async def run_until_signalled(
    running: AbstractAsyncContextManager[tuple[str, Any]], what: str = ""
) -> None:
    """Start what `running` starts, say where it serves, and stop it on SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running as (url, _):
        # tests and scripts wait for this line: "vcache: serving on URL"
        print(f"vcache: serving on {url}{f' ({what})' if what else ''}", flush=True)
        await stop.wait()
        log.info("shutting down")
