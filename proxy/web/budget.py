"""How many bytes of request bodies the proxy holds in memory at once, all requests together.

A body sent to an image endpoint is read whole (its JSON must be parsed to find the images), so
without a bound 50 clients sending 100 MB each would cost 5 GB. `BodyBudget` bounds the sum of
the bodies being held to ``total`` bytes (the proxy uses its body limit, ``--max-body-mb``):

    budget = BodyBudget(100 * 1024 * 1024)
    async with budget.reservation() as held:
        await held.take(len(chunk))     # waits its turn; ProxyBusy (503) after ``wait_s``
        ...                             # everything taken is given back when the block ends

A body with a Content-Length takes all of it before its first byte is read, and waiters are
served in arrival order, so a large body is not starved by a stream of small ones. A chunked
body takes its bytes as they arrive, so it may wait for more while holding some: one such
body at a time (`streaming`), or several could each hold a part and all wait for the rest,
for ever. With one, the holders it waits for are bodies that already have all they need. No
wait is unbounded all the same: a request that waits ``wait_s`` gets 503 (ProxyBusy), gives
back what it held, and the others go on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxy.errors import ProxyBusy

DEFAULT_WAIT_S = 30.0


class BodyBudget:
    """Bytes of request bodies held at once, shared by every request of one proxy."""

    def __init__(self, total: int, *, wait_s: float = DEFAULT_WAIT_S) -> None:
        if total <= 0:
            raise ValueError(f"a body budget must be positive, not {total}")
        self.total = total
        self.held = 0
        self._wait_s = wait_s
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._streaming = asyncio.Lock()

    async def acquire(self, n: int) -> None:
        """Hold `n` more bytes; raises ProxyBusy if they are not free within ``wait_s``."""
        if n > self.total:
            raise ValueError(f"{n} bytes can never fit a budget of {self.total}")
        if not self._waiters and self.held + n <= self.total:
            self.held += n
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, granted)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self._wait_s):
                await granted
        except BaseException as e:
            self._withdraw(entry)
            if isinstance(e, TimeoutError):
                raise ProxyBusy(
                    f"the proxy holds {self.held} bytes of request bodies, its "
                    f"limit; {n} more did not free up in {self._wait_s:g} s"
                ) from e
            raise

    def release(self, n: int) -> None:
        self.held -= n
        self._grant()

    def _withdraw(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        n, granted = entry
        if granted.done() and not granted.cancelled():
            self.release(n)  # granted just as its waiter gave up: hand it on
            return
        granted.cancel()
        if entry in self._waiters:
            self._waiters.remove(entry)
            self._grant()  # it may have been the head that blocked smaller waiters

    def _grant(self) -> None:
        # strictly in order: the head waits until it fits, and so does everyone behind it
        while self._waiters and self.held + self._waiters[0][0] <= self.total:
            n, granted = self._waiters.popleft()
            if not granted.done():
                self.held += n
                granted.set_result(None)

    @asynccontextmanager
    async def streaming(self) -> AsyncIterator[None]:
        """The turn of one body that takes its bytes as they arrive (no Content-Length)."""
        try:
            async with asyncio.timeout(self._wait_s):
                await self._streaming.acquire()
        except TimeoutError as e:
            raise ProxyBusy(
                f"another body without a length is being read; this one waited {self._wait_s:g} s"
            ) from e
        try:
            yield
        finally:
            self._streaming.release()

    @asynccontextmanager
    async def reservation(self) -> AsyncIterator[Reservation]:
        held = Reservation(self)
        try:
            yield held
        finally:
            held.close()


class Reservation:
    """What one request holds of a `BodyBudget`; given back whole when it closes."""

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.held = 0

    async def take(self, n: int) -> None:
        await self._budget.acquire(n)
        self.held += n

    def streaming(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._budget.streaming()

    def close(self) -> None:
        held, self.held = self.held, 0
        if held:
            self._budget.release(held)
