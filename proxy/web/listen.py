"""Where the app listens: one or several addresses, as llama-server's `--host` takes them.

`--host 127.0.0.1,::1` makes llama-server listen on both loopbacks; a drop-in front must take
the same value. Every address gets the same port; with port 0 the first address's port,
chosen by the kernel, is used for the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line parses --host without loading aiohttp
    from aiohttp import web


def parse_hosts(value: str) -> tuple[str, ...]:
    """`127.0.0.1,::1` -> ("127.0.0.1", "::1"); brackets around IPv6 addresses are dropped."""
    hosts = tuple(h.strip().removeprefix("[").removesuffix("]") for h in value.split(","))
    if not hosts or any(not h for h in hosts):
        raise ValueError(f"--host {value!r}: give one address, or several separated by commas")
    return hosts


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def listening(
    app: web.Application,
    hosts: tuple[str, ...],
    port: int,
) -> AsyncIterator[str]:
    """Serve `app` on every host; yields the first address's URL. Stops serving on exit."""
    from aiohttp import web

    # handler_cancellation: a client that disconnects cancels its handler, and with it the
    # upstream request (llama-server then stops generating for it)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        for host in hosts:
            await web.TCPSite(runner, host, port).start()
            # with port 0 the kernel chose: read the real one back, and use it for the rest
            port = runner.addresses[0][1]
        yield url_of(hosts[0], port)
    finally:
        await runner.cleanup()
