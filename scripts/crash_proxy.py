"""Crash test: a proxy process SIGKILLed at random points while its cache writes are in flight.

Each seed starts `vcache serve` on one store directory (a small disk budget, so it evicts
throughout) in front of the fault upstream playing a patched server
(tests/support/fault_upstream.py: its packages are a function of the image, so any byte can
be checked). First the restart: REHITS chat requests for images the store held after the
previous kill, each of which must be a hit that hands upstream an intact package (the fake
counts corrupt ones). Then WRITES
concurrent /vcache/warm requests, each with an image never seen before (an encode and a store
put), and a SIGKILL once a random number of them (0..WRITES) has been answered, plus a random
0-10 ms. Then, with the proxy dead:

* the store opens, `check()` is clean and SQLite's `PRAGMA integrity_check` says ok;
* every entry left is byte-exact (the payload the fake encodes for that image);
* after the last seed, `gc()` reclaims what the kills left behind (orphaned payloads,
  segments of dead writers): what stays is alignment padding only.

    python -m scripts.crash_proxy --seeds 200              # the figure in docs/reliability.md
    python -m scripts.crash_proxy --seeds 3 --writes 300   # what tests/test_crash_proxy.py runs

Exit status 1 if any check failed. The client is aiohttp: httpx's connection pool costs time
in proportion to its connections for every request, and at a thousand connections the
client, not the proxy, would set the pace.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import dataclasses
import hashlib
import io
import json
import random
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image

from tests.support.fault_upstream import FaultUpstream, expected_payload
from tests.support.proxy_process import ProxyProcess
from tests.support.store_helpers import integrity
from vision_cache import Store

ROOT = Path(__file__).resolve().parent.parent

CHAT = "/v1/chat/completions"


@dataclasses.dataclass
class Tally:
    seeds: int = 0
    requests_sent: int = 0
    writes_in_flight_at_kill: int = 0  # sent, not yet answered, summed over the seeds
    encoded_not_answered_at_kill: int = 0  # upstream had encoded them: the put was pending
    rehits_as_hits: int = 0
    rehit_errors: int = 0
    writes_before_kill: dict[str, int] = dataclasses.field(default_factory=dict)  # by status
    entries_checked: int = 0
    corrupt_entries: int = 0
    corrupt_served: int = 0
    intact_served: int = 0
    check_failures: int = 0
    integrity_failures: int = 0
    dead_bytes_before_gc: int = 0
    dead_bytes_after_gc: int = 0
    padding_bound: int = 0  # (entries + segment files) x 4096
    orphan_files_left: int = 0
    seconds: float = 0.0


def image(n: int) -> bytes:
    """A PNG unique to `n` (4x4 pixels from its hash)."""
    pixels = hashlib.sha256(n.to_bytes(8, "little")).digest() * 2
    buf = io.BytesIO()
    Image.frombytes("RGB", (4, 4), pixels[:48]).save(buf, format="PNG")
    return buf.getvalue()


def body(n: int) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(image(n)).decode()
    return {
        "max_tokens": 1,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
        ],
    }


async def one_seed(
    seed: int,
    store: Path,
    fake: FaultUpstream,
    writes: int,
    rehits: int,
    tally: Tally,
    log_dir: Path,
    stored: list[int],
) -> None:
    rng = random.Random(seed)
    # a small disk budget: the store evicts throughout, and stays small enough to verify whole
    proxy = ProxyProcess(
        [
            "--upstream",
            fake.url,
            "--store",
            str(store),
            "--transport",
            "inline",
            "--disk-gb",
            "0.002",
            "--hot-mb",
            "16",
            "--log-level",
            "warning",
        ],
        log_dir / f"proxy-{seed}.log",
    )
    await asyncio.to_thread(proxy.start)
    try:
        await _restart_then_writes(seed, rng, proxy, fake, writes, rehits, tally, stored)
    finally:
        proxy.stop()  # already killed, unless something above failed


async def _restart_then_writes(
    seed: int,
    rng: random.Random,
    proxy: ProxyProcess,
    fake: FaultUpstream,
    writes: int,
    rehits: int,
    tally: Tally,
    stored: list[int],
) -> None:
    connector = aiohttp.TCPConnector(limit=writes + rehits)
    async with aiohttp.ClientSession(
        proxy.base_url, connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as client:
        # the restart: images the store held after the last kill come back intact (hits)
        again = rng.sample(stored, min(rehits, len(stored)))
        await asyncio.gather(*(_send(client, n, tally, hit=True) for n in again))
        # then the writes (each an encode and a put: /vcache/warm, unpinned), and the kill
        # once a random share of them is through
        kill_after = rng.randint(0, writes)
        encodes_at_start, written = fake.encodes, Progress()
        fresh = [seed * 1_000_000 + i for i in range(writes)]
        tasks = [asyncio.create_task(_write(client, n, written)) for n in fresh]
        await written.wait_for(kill_after, tasks)
        await asyncio.sleep(rng.uniform(0, 0.01))
        encoded, done, ok = fake.encodes - encodes_at_start, written.done, written.statuses["200"]
        for status, n in written.statuses.items():
            tally.writes_before_kill[status] = tally.writes_before_kill.get(status, 0) + n
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proxy.proc.wait)
        await asyncio.gather(*tasks, return_exceptions=True)
    tally.requests_sent += len(again) + len(fresh)
    tally.writes_in_flight_at_kill += writes - done
    tally.encoded_not_answered_at_kill += encoded - ok


class Progress:
    """Writes completed so far, and a way to wait for a number of them."""

    def __init__(self) -> None:
        self.done = 0
        self.statuses: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Event()

    def add(self) -> None:
        self.done += 1
        self._changed.set()

    async def wait_for(self, n: int, tasks: list[asyncio.Task[None]]) -> None:
        while self.done < n and not all(t.done() for t in tasks):
            self._changed.clear()
            await self._changed.wait()


async def _write(client: aiohttp.ClientSession, n: int, written: Progress) -> None:
    url = "data:image/png;base64," + base64.b64encode(image(n)).decode()
    try:
        async with client.post("/vcache/warm", json={"image": url, "pin": False}) as r:
            await r.read()
        written.statuses[str(r.status)] += 1
    finally:
        written.add()  # a failed one too: the kill must not wait for it


async def _send(client: aiohttp.ClientSession, n: int, tally: Tally, hit: bool = False) -> None:
    try:
        async with client.post(CHAT, json=body(n)) as r:
            answer = await r.json() if r.status == 200 else None
            header = r.headers.get("x-vcache", "")
    except (aiohttp.ClientError, TimeoutError):
        answer = None
    if answer is None:
        tally.rehit_errors += 1
        return
    verdict = answer["vcache_fake"]
    tally.corrupt_served += verdict["corrupt"]
    tally.intact_served += verdict["intact"]
    if hit:
        tally.rehits_as_hits += header.startswith("hits=1")


def verify(store: Path, tally: Tally, sent: dict[str, int]) -> list[int]:
    """The store after a kill: opens, checks clean, every entry exact. Returns the images
    it holds."""
    held = []
    with Store.open(store, hot_bytes=0) as opened:
        report = opened.check()
        tally.check_failures += not report.ok
        for info in list(opened.iter_entries()):
            entry = opened.get(info.key)
            if entry is None:
                continue
            tally.entries_checked += 1
            if bytes(entry.payload) != expected_payload(info.key.digest):
                tally.corrupt_entries += 1
            elif info.key.digest in sent:
                held.append(sent[info.key.digest])
    tally.integrity_failures += integrity(store) != "ok"
    return held


def reclaim(store: Path, tally: Tally) -> None:
    """gc after the last kill: what the crashes left behind (orphaned payloads, segments of
    dead writers) goes; left over is alignment padding only."""
    with Store.open(store, hot_bytes=0) as opened:
        before = opened.stats()
        opened.gc(min_dead_ratio=0.0, abandoned_after=0)
        after, report = opened.stats(), opened.check()
    tally.dead_bytes_before_gc = before.dead_bytes
    tally.dead_bytes_after_gc = after.dead_bytes
    tally.padding_bound = (after.entries + after.segment_files) * 4096
    tally.orphan_files_left = report.orphan_files
    tally.check_failures += not report.ok


async def run(
    seeds: int, writes: int = 1000, rehits: int = 100, workdir: Path | None = None
) -> Tally:
    _raise_fd_limit()
    tally = Tally()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vcache-crash-") as tmp:
        root = workdir or Path(tmp)
        store = root / "store"
        sent: dict[str, int] = {}  # image SHA-256 -> its number
        stored: list[int] = []
        async with FaultUpstream(packages=True) as fake:
            for seed in range(seeds):
                sent.update(
                    (hashlib.sha256(image(seed * 1_000_000 + i)).hexdigest(), seed * 1_000_000 + i)
                    for i in range(writes)
                )
                await one_seed(seed, store, fake, writes, rehits, tally, root, stored)
                stored = verify(store, tally, sent)
                tally.seeds += 1
        reclaim(store, tally)
    tally.seconds = time.monotonic() - started
    return tally


def _raise_fd_limit() -> None:
    # a thousand client connections, and as many on the proxy's side (inherited by it)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument(
        "--writes", type=int, default=1000, help="concurrent requests with new images per seed"
    )
    parser.add_argument(
        "--rehits", type=int, default=100, help="requests per seed for images earlier seeds stored"
    )
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    tally = asyncio.run(run(args.seeds, args.writes, args.rehits))
    figures = dataclasses.asdict(tally)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    bad = (
        tally.corrupt_entries
        or tally.rehit_errors
        or tally.corrupt_served
        or tally.check_failures
        or tally.integrity_failures
        or tally.orphan_files_left
        or tally.dead_bytes_after_gc > tally.padding_bound
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
