"""A circuit breaker, so a dependency that is down or slow costs its callers nothing.

    breaker = CircuitBreaker(failures=3, cooldown_s=5.0)
    if breaker.allows():
        try:
            reply = await call()
        except TimeoutError:
            breaker.record_timeout()     # opens at once: slowness costs every caller
        except ConnectionError:
            breaker.record_failure()     # opens after `failures` in a row
        else:
            breaker.record_success()

While open, `allows()` is False and callers skip the dependency without touching it. Probing is
the owner's job, off the request path: once `retry_in()` reaches 0 it tries the dependency
itself, then calls `close()` (it answered) or `reopen()` (another cool-down). Not thread-safe:
one event loop owns it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


class CircuitBreaker:
    def __init__(
        self, *, failures: int = 3, cooldown_s: float = 5.0, clock: Clock = time.monotonic
    ) -> None:
        self._threshold = failures
        self._cooldown = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self.trips = 0

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allows(self) -> bool:
        return self._opened_at is None

    def retry_in(self) -> float:
        """Seconds until the owner should probe; 0 when closed or due."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self._cooldown - self._clock())

    def record_success(self) -> None:
        self._failures = 0

    def record_failure(self) -> bool:
        """Count a failed call; True if this one opened the breaker."""
        self._failures += 1
        return self._failures >= self._threshold and self._trip()

    def record_timeout(self) -> bool:
        """A call that ran out of time; True if this one opened the breaker."""
        return self._trip()

    def reopen(self) -> None:
        """A probe failed: another full cool-down."""
        self._opened_at = self._clock()

    def close(self) -> None:
        """A probe succeeded: let calls through again."""
        self._opened_at = None
        self._failures = 0

    def _trip(self) -> bool:
        if self._opened_at is not None:
            return False  # calls already in flight when it opened fail too: one trip
        self._opened_at = self._clock()
        self.trips += 1
        return True
