"""The circuit breaker in front of the shared tier (issue 9), on a fake clock."""

from __future__ import annotations

from vision_cache.shared.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_failures_in_a_row_only() -> None:
    breaker = CircuitBreaker(failures=3, cooldown_s=5, clock=Clock())
    assert not breaker.record_failure()
    assert not breaker.record_failure()
    breaker.record_success()  # a success in between starts the count again
    assert not breaker.record_failure()
    assert not breaker.record_failure()
    assert breaker.allows()
    assert breaker.record_failure()
    assert not breaker.allows()
    assert breaker.trips == 1


def test_one_timeout_opens_it() -> None:
    breaker = CircuitBreaker(failures=3, cooldown_s=5, clock=Clock())
    assert breaker.record_timeout()
    assert breaker.is_open


def test_failures_while_open_are_one_trip() -> None:
    breaker = CircuitBreaker(failures=1, cooldown_s=5, clock=Clock())
    assert breaker.record_failure()
    assert not breaker.record_failure()
    assert not breaker.record_timeout()
    assert breaker.trips == 1


def test_cool_down_then_probe_closes_or_reopens() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown_s=5, clock=clock)
    breaker.record_failure()
    assert breaker.retry_in() == 5
    clock.now += 4
    assert breaker.retry_in() == 1
    clock.now += 2
    assert breaker.retry_in() == 0
    assert not breaker.allows()  # only the owner's probe decides
    breaker.reopen()
    assert breaker.retry_in() == 5
    breaker.close()
    assert breaker.allows()
    assert breaker.retry_in() == 0
    assert breaker.record_failure()
    assert breaker.trips == 2
