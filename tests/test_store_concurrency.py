"""Concurrency: single-flight within a process, threads sharing one Store,
and several processes sharing one store directory."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.store_helpers import integrity, key, meta_for, payload_for
from tests.support.store_worker import COMMAND as WORKER
from tests.support.store_worker import ROOT as WORKER_ROOT
from vision_cache import SingleFlight, Store

# -- single flight ------------------------------------------------------------------


async def test_concurrent_calls_for_one_key_share_one_computation() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = 0

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return 42

    results = await asyncio.gather(*(flight.run("k", compute) for _ in range(20)))
    assert results == [42] * 20 and calls == 1
    assert len(flight) == 0


async def test_different_keys_compute_separately() -> None:
    flight: SingleFlight[str] = SingleFlight()

    async def compute(value: str) -> str:
        await asyncio.sleep(0.001)
        return value

    results = await asyncio.gather(
        flight.run("a", lambda: compute("a")), flight.run("b", lambda: compute("b"))
    )
    assert list(results) == ["a", "b"]


async def test_an_error_reaches_every_waiter_and_is_not_remembered() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = 0

    async def fail() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise RuntimeError("encode failed")

    results = await asyncio.gather(
        *(flight.run("k", fail) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results) and calls == 1

    async def succeed() -> int:
        return 7

    assert await flight.run("k", succeed) == 7  # a failure is not cached


async def test_one_cancelled_waiter_does_not_cancel_the_others() -> None:
    flight: SingleFlight[int] = SingleFlight()
    release = asyncio.Event()

    async def compute() -> int:
        await release.wait()
        return 1

    first = asyncio.create_task(flight.run("k", compute))
    second = asyncio.create_task(flight.run("k", compute))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await second == 1
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_the_computation_stops_when_every_waiter_is_gone() -> None:
    flight: SingleFlight[int] = SingleFlight()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def compute() -> int:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    waiter = asyncio.create_task(flight.run("k", compute))
    await started.wait()
    waiter.cancel()
    await asyncio.wait_for(cancelled.wait(), 1)
    await asyncio.sleep(0)
    assert len(flight) == 0


# -- threads in one process ------------------------------------------------------------


def test_threads_sharing_a_store(tmp_path: Path) -> None:
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def work(seed: int) -> None:
        rng = random.Random(seed)
        local: Counter[str] = Counter()
        for _ in range(400):
            k = key(rng.randrange(50))
            roll = rng.random()
            if roll < 0.5:
                entry = store.get(k)
                if entry is not None and bytes(entry.payload) != payload_for(k):
                    local["mismatches"] += 1
            elif roll < 0.9:
                local["failed"] += store.put(k, meta_for(k), payload_for(k)) is None
            else:
                store.delete(k)
        with lock:
            counts.update(local)

    with Store.open(
        tmp_path / "s", hot_bytes=64 * 1024, disk_bytes=256 * 1024, segment_bytes=128 * 1024
    ) as store:
        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert counts["mismatches"] == 0 and counts["failed"] == 0
        assert store.check().ok


# -- processes sharing a directory ---------------------------------------------------------


# docs/reliability.md reports a run of 3,200,000 (100,000 per thread)
STRESS_OPS = int(os.environ.get("VCACHE_STRESS_OPS", "100000"))


@pytest.mark.slow
def test_four_processes_hammering_one_store(tmp_path: Path) -> None:
    """4 processes x 8 threads, 100,000 mixed operations in total (VCACHE_STRESS_OPS for a
    longer run), with a budget small enough that eviction and gc run throughout."""
    root = tmp_path / "store"
    processes, threads, total, keys = 4, 8, STRESS_OPS, 300
    with Store.open(root, disk_bytes=1_500_000):
        pass
    started = time.monotonic()
    workers = [
        subprocess.Popen(
            [
                *WORKER,
                "stress",
                str(root),
                str(seed),
                str(total // processes),
                str(threads),
                str(keys),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=WORKER_ROOT,
        )
        for seed in range(processes)
    ]
    counts: Counter[str] = Counter()
    for worker in workers:
        out, err = worker.communicate(timeout=300 + total // 1000)
        assert worker.returncode == 0, err
        counts.update(json.loads(out.strip().splitlines()[-1]))
    elapsed = time.monotonic() - started
    assert counts["ops"] == total, counts
    assert counts["mismatches"] == 0 and counts["errors"] == 0, counts
    assert counts["put_failures"] == 0, counts
    assert counts["hits"] > 0 and counts["deletes"] > 0 and counts["gcs"] > 0
    with Store.open(root, hot_bytes=0) as store:
        report = store.check()
        assert report.ok, report.problems
        assert integrity(root) == "ok"
        for i in range(keys):
            entry = store.get(key(i))
            if entry is not None:
                assert bytes(entry.payload) == payload_for(key(i))
                assert entry.meta == meta_for(key(i))
        assert store.stats().live_bytes <= 1_500_000
    print(f"stress: {dict(counts)} in {elapsed:.1f}s")
