"""Single-flight: concurrent requests for the same missing key share one
computation.

    flight: SingleFlight[Entry | None] = SingleFlight()
    entry = await flight.run(key.text, lambda: encode_and_store(image))

The first caller starts the computation as a task; later callers with the
same key await that task. A caller that is cancelled stops waiting without
cancelling the others; the task itself is cancelled only when every caller
has gone. Results and errors are not remembered: once the task finishes,
the next call for the key starts afresh.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class _Flight(Generic[T]):
    task: asyncio.Task[T]
    waiters: int = 0


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}

    def __len__(self) -> int:
        """Computations in progress."""
        return len(self._flights)

    async def run(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        """Return the result of `factory()`, computed once per concurrent key."""
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight(asyncio.ensure_future(factory()))
            self._flights[key] = flight
            flight.task.add_done_callback(lambda _: self._finish(key, flight))
        flight.waiters += 1
        try:
            # shield: cancelling one waiter must not cancel the shared task.
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            if flight.waiters == 1 and not flight.task.done():
                flight.task.cancel()
            raise
        finally:
            flight.waiters -= 1

    def _finish(self, key: str, flight: _Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        # Retrieve the outcome so an error nobody awaited any more is not
        # reported as "never retrieved".
        if not flight.task.cancelled():
            flight.task.exception()
