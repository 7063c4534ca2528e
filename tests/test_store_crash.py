"""Crash safety: a writer SIGKILLed at random moments and at chosen calls
(mid-write, between write and fsync, around commits, during compaction)
never leaves a store that fails to open, fails check(), fails SQLite's
integrity_check or serves a torn entry; gc then reclaims the orphans."""

from __future__ import annotations

import random
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.store_helpers import integrity, meta_for, payload_for
from tests.support.store_worker import COMMAND as WORKER
from tests.support.store_worker import CRASH_SPREAD
from tests.support.store_worker import ROOT as WORKER_ROOT
from vision_cache import Store

SEEDS = 60
# Calls the writer may kill itself at (see store_worker.KILL_POINTS), with
# how many calls in the kill may come (rarer calls get a smaller range).
KILL_POINTS = {
    "pwrite": 60,
    "fdatasync": 60,
    "unlink": 6,
    "transaction": 60,
    "flock": 20,
    "move": 40,
    "fsync": 8,
}


def run_writer(root: Path, seed: int, rng: random.Random) -> str:
    """Start a writer and see it killed; returns how it died."""
    args = [*WORKER, "crash", str(root), str(seed)]
    injected = seed % 2 == 1
    if injected:
        point = sorted(KILL_POINTS)[(seed // 2) % len(KILL_POINTS)]
        args += [point, str(rng.randint(1, KILL_POINTS[point]))]
    with subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=WORKER_ROOT
    ) as writer:
        assert writer.stdout is not None
        ready = writer.stdout.readline().strip() == "ready"
        if ready:
            try:
                writer.wait(timeout=1.5 if injected else rng.uniform(0.02, 0.6))
            except subprocess.TimeoutExpired:
                writer.send_signal(signal.SIGKILL)
        _, err = writer.communicate(timeout=30)
    assert writer.returncode == -signal.SIGKILL, err
    return "injected" if injected else "timed"


def verify(root: Path) -> int:
    """The store opens, checks clean and serves only exact bytes; returns
    how many entries it served."""
    with Store.open(root, hot_bytes=0) as store:
        report = store.check()
        assert report.ok, report.problems
        served = 0
        for info in list(store.iter_entries()):
            entry = store.get(info.key)
            if entry is None:
                continue
            assert bytes(entry.payload) == payload_for(info.key, spread=CRASH_SPREAD)
            assert entry.meta == meta_for(info.key)
            served += 1
    assert integrity(root) == "ok"
    return served


@pytest.mark.slow
def test_sigkill_at_random_points(tmp_path: Path) -> None:
    root = tmp_path / "store"
    rng = random.Random(20240611)
    served = 0
    for seed in range(SEEDS):
        run_writer(root, seed, rng)
        served += verify(root)
    assert served > 0
    with Store.open(root, hot_bytes=0) as store:
        before = store.check()
        store.gc(min_dead_ratio=0.0, abandoned_after=0)
        after = store.check()
        stats = store.stats()
    assert after.ok and after.orphan_files == 0
    # Left over: alignment padding only (at most a page per entry and file).
    # Compaction relocates live entries, which can add a little padding of
    # its own, so "after" is bounded by the padding allowance, not by "before".
    assert after.reclaimable_bytes <= (stats.entries + stats.segment_files) * 4096
    print(
        f"crash: {SEEDS} kills, {served} entries served intact, "
        f"{before.reclaimable_bytes} reclaimable bytes before gc, "
        f"{after.reclaimable_bytes} after"
    )


def test_a_writer_killed_mid_put_leaves_no_row(tmp_path: Path) -> None:
    """Killed after its payload write but before the row commits: the
    bytes are orphans, the key is a miss, and check() is clean."""
    root = tmp_path / "store"
    with Store.open(root):
        pass
    args = [*WORKER, "crash", str(root), "1", "fdatasync", "3"]
    completed = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=WORKER_ROOT)
    assert completed.returncode == -signal.SIGKILL
    with Store.open(root, hot_bytes=0) as store:
        report = store.check()
        assert report.ok and report.reclaimable_bytes > 0
    assert integrity(root) == "ok"
