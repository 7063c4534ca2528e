"""Subprocess bodies for the multi-process store tests.

    python -m tests.support.store_worker stress DIR SEED OPS THREADS KEYS
    python -m tests.support.store_worker crash DIR SEED [KILL_POINT KILL_AFTER]

(from the repository root: `COMMAND`, run with ``cwd=ROOT``).

`stress` runs OPS mixed get/put/delete/gc operations on THREADS threads and
prints one JSON line of counts; any get that returns bytes other than those
put counts as a mismatch. `crash` prints "ready" and mutates the store until
it is killed: from outside at a random moment, or, given KILL_POINT, by
itself at the KILL_AFTER-th call of that function (before or after it runs).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.store_helpers import key, meta_for, payload_for
from vision_cache import Store
from vision_cache.store import index as index_module

ROOT = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "tests.support.store_worker"]


def stress(root: str, seed: int, ops: int, threads: int, keys: int) -> dict[str, int]:
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    with Store.open(root, hot_bytes=256 * 1024, segment_bytes=512 * 1024) as store:
        workers = [
            threading.Thread(
                target=_stress_thread,
                args=(
                    store,
                    seed * 100 + t,
                    ops // threads + (t < ops % threads),
                    keys,
                    counts,
                    lock,
                ),
            )
            for t in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    return dict(counts)


def _stress_thread(
    store: Store, seed: int, ops: int, keys: int, counts: Counter[str], lock: threading.Lock
) -> None:
    rng = random.Random(seed)
    local: Counter[str] = Counter()
    for _ in range(ops):
        try:
            _stress_op(store, rng, keys, local)
        except Exception as exc:  # counted, so the parent sees it
            local["errors"] += 1
            print(f"error: {exc!r}", file=sys.stderr)
        local["ops"] += 1
    with lock:
        counts.update(local)


def _stress_op(store: Store, rng: random.Random, keys: int, counts: Counter[str]) -> None:
    k = key(rng.randrange(keys))
    roll = rng.random()
    if roll < 0.6:
        entry = store.get(k)
        counts["hits" if entry is not None else "misses"] += 1
        if entry is not None and (
            bytes(entry.payload) != payload_for(k) or entry.meta != meta_for(k)
        ):
            counts["mismatches"] += 1
    elif roll < 0.9:
        counts["puts"] += 1
        if store.put(k, meta_for(k), payload_for(k)) is None:
            counts["put_failures"] += 1
    elif roll < 0.998:
        counts["deletes"] += 1
        store.delete(k)
    else:
        counts["gcs"] += 1
        store.gc(min_dead_ratio=0.3)


# -- crash writer ----------------------------------------------------------------------

KILL_POINTS: dict[str, tuple[object, str]] = {
    "pwrite": (os, "pwrite"),
    "fdatasync": (os, "fdatasync"),
    "fsync": (os, "fsync"),
    "unlink": (Path, "unlink"),
    "transaction": (index_module.Index, "_transaction"),
    "move": (index_module.Index, "move"),
    "flock": (fcntl, "flock"),
}
CRASH_SPREAD = 64 * 1024  # payload size spread of the crash writer


def arm(point: str, after: int, before: bool) -> None:
    """SIGKILL ourselves at the `after`-th call of `point`."""
    target, name = KILL_POINTS[point]
    real: Callable[..., Any] = getattr(target, name)
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == after and before:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if calls["n"] == after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(target, name, wrapper)


def crash(root: str, seed: int) -> None:
    rng = random.Random(seed)
    with Store.open(
        root, hot_bytes=64 * 1024, disk_bytes=2 * 1024 * 1024, segment_bytes=256 * 1024
    ) as store:
        print("ready", flush=True)
        while True:
            _crash_op(store, rng)


def _crash_op(store: Store, rng: random.Random) -> None:
    k = key(rng.randrange(400))
    roll = rng.random()
    if roll < 0.6:
        store.put(k, meta_for(k), payload_for(k, spread=CRASH_SPREAD), pin=rng.random() < 0.05)
    elif roll < 0.8:
        store.delete(k)
    elif roll < 0.9:
        store.get(k)
    elif roll < 0.95:
        store.unpin(k)
    else:
        store.gc(min_dead_ratio=rng.choice([0.0, 0.3, 0.5]), abandoned_after=0)


def main(argv: list[str]) -> int:
    command, root, seed = argv[0], argv[1], int(argv[2])
    if command == "stress":
        ops, threads, keys = (int(a) for a in argv[3:6])
        print(json.dumps(stress(root, seed, ops, threads, keys)), flush=True)
        return 0
    if len(argv) > 3:
        arm(argv[3], int(argv[4]), before=seed % 2 == 0)
    crash(root, seed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
