"""What every serve mode's HTTP side shares: the request middleware, the site on its port, and
running until SIGINT or SIGTERM.

The proxy in front of llama-server (`proxy.web.app`) and the in-process llama-cpp-python
backend (`proxy.backends.llama_cpp`) answer alike: a request id on every response, one log line
per request, and every error in llama-server's shape, never a traceback::

    app = web.Application(middlewares=[request_middleware()])
    async with running_site(app, ("127.0.0.1",), 0) as url:  # port 0: the kernel picks one
        ...
    await run_until_signalled(running_proxy(settings))       # `vcache serve`
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from aiohttp import web

from proxy.errors import BodyTooLarge, ProxyError
from proxy.upstream.relay import RESPONSE_STARTED, error_response
from proxy.web.listen import url_of

log = logging.getLogger("vcache.proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# before the handler: may raise a ProxyError (the proxy key check)
Check = Callable[[web.Request], None]
# after it, with the answer (metrics)
Record = Callable[[web.Request, web.StreamResponse], None]
REQUEST_ID = "X-Request-Id"
# how long requests in flight may go on after SIGTERM (see running_site); not 0, which
# aiohttp reads as "no limit"
SHUTDOWN_GRACE_S = 0.1


def request_middleware(*, check: Check | None = None, record: Record | None = None) -> Any:
    """Request id, `check`, one log line, `record`, and no traceback to any client."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get(REQUEST_ID) or uuid.uuid4().hex[:16]
        started = time.perf_counter()
        resp = await _answer(request, handler, rid, check)
        if not resp.prepared:
            resp.headers[REQUEST_ID] = rid
        if record is not None:
            record(request, resp)
        elapsed = (time.perf_counter() - started) * 1000
        log.info(
            "rid=%s %s %s %d %.1fms %s",
            rid,
            request.method,
            request.path,
            resp.status,
            elapsed,
            resp.headers.get("X-Vcache", ""),
        )
        return resp

    return middleware


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
    except asyncio.CancelledError:
        log.info("rid=%s %s %s cancelled (client gone)", rid, request.method, request.path)
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


@contextlib.asynccontextmanager
async def running_site(
    app: web.Application, hosts: tuple[str, ...], port: int
) -> AsyncIterator[str]:
    """`app` listening on every one of `hosts` (`proxy.web.listen.parse_hosts`) at `port`;
    yields the first address's URL (the real port, for port 0)."""
    # handler_cancellation: a client that disconnects cancels its handler, and with it the
    # upstream request or the generation (llama-server then stops generating for it).
    # shutdown_timeout: on SIGTERM, requests in flight are cut at once, as llama-server cuts
    # its own (it closes its sockets and exits); aiohttp's default waits up to 60 s for them,
    # which a supervisor that kills after a few seconds (or llama.cpp's server tests: 5 s,
    # expecting under 3) reads as a hung process.
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S
    )
    await runner.setup()
    try:
        for host in hosts:
            await web.TCPSite(runner, host, port).start()
            # with port 0 the kernel chose: read the real one back, and use it for the rest
            port = runner.addresses[0][1]
        yield url_of(hosts[0], port)
    finally:
        await runner.cleanup()


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
