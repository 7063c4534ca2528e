"""Benchmark the shared Redis tier and write its section of docs/benchmarks.md.

    python scripts/bench_redis.py                 # starts its own redis-server on loopback
    python scripts/bench_redis.py --quick         # fewer rounds, to check the script works
    python scripts/bench_redis.py --url redis://127.0.0.1:6379/0   # a Redis of yours

Everything is measured in one run and written between the `bench_redis` markers of
docs/benchmarks.md (other sections are left alone):

* hit latency of the shared tier (`RedisTier.get`: every byte read, checksums verified) for
  2.6 MB and 18.6 MB packages, as a ratio to a local disk-tier hit (`Store.get` with the hot
  tier off) in the same run: median and p90; and the shared hit with its write-through to the
  local disk tier, which a proxy does before it answers;
* the layout choice: for an 18.6 MB value, the longest single command Redis ran (SLOWLOG,
  server-side time: while it runs, every other client of that Redis waits) and the client's
  latency, for reads (one GET, 1 MiB GETRANGE pieces, 1 MiB chunk keys) and writes (one SET,
  chunk keys in MULTI, SETRANGE pieces).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import redis
import redis.asyncio as aredis

from scripts.bench_doc import write_section
from vision_cache import CacheKey, Namespace, Store
from vision_cache.package import Chunk, PackageHeader, StoredPackage
from vision_cache.shared.tier import RedisTier, SharedEntry, SharedTierConfig

MIB = 1024 * 1024
NAMESPACE = Namespace.for_encoder(
    model="bench", mmproj="bench", build="bench", format_version=1, encoder={}
)
# real shapes: Gemma 3 4B (256 tokens x 2560 f32) and Qwen2.5-VL-7B at 1008 px (1296 x 3584)
PACKAGES = {"2.6 MB (Gemma 3 4B)": (256, 2560), "18.6 MB (Qwen2.5-VL-7B @1008px)": (1296, 3584)}


@dataclass(frozen=True)
class Spread:
    median_ms: float
    p90_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Spread:
        ordered = sorted(seconds)
        return cls(statistics.median(ordered) * 1e3, ordered[int(0.9 * (len(ordered) - 1))] * 1e3)


@dataclass(frozen=True)
class HitRow:
    package: str
    nbytes: int
    disk: Spread
    disk_read: Spread
    shared: Spread
    through: Spread


@dataclass(frozen=True)
class LayoutRow:
    operation: str
    client: Spread
    held_ms: float
    held_max_ms: float
    total_ms: float


# -- packages -----------------------------------------------------------------------------------


def package(n_tokens: int, n_embd: int) -> tuple[bytes, bytes]:
    header = PackageHeader(
        mmproj="bench",
        n_embd=n_embd,
        dtype="f32",
        image_id="0" * 64,
        nx=1008,
        ny=1008,
        chunks=(Chunk(n_tokens, os.urandom(96)),),
    )
    return StoredPackage(header, 1234.5).to_meta(), os.urandom(header.payload_size)


def key(i: int) -> CacheKey:
    return NAMESPACE.key_for_image(b"bench image %d" % i)


async def timed(fn: Callable[[], Awaitable[object]], rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - started)
    return samples


# -- hits ----------------------------------------------------------------------------------------


async def bench_hits(url: str, prefix: str, store_dir: Path, rounds: int) -> list[HitRow]:
    tier = RedisTier(SharedTierConfig(url, prefix=prefix, timeout_s=5.0))
    rows = []
    try:
        with Store.open(store_dir, hot_bytes=0) as store:
            for i, (label, shape) in enumerate(PACKAGES.items()):
                rows.append(await _hit_row(tier, store, label, shape, i, rounds))
    finally:
        await tier.aclose()
    return rows


async def _hit_row(
    tier: RedisTier, store: Store, label: str, shape: tuple[int, int], i: int, rounds: int
) -> HitRow:
    meta, payload = package(*shape)
    k = key(i)
    assert store.put(k, meta, payload) is not None
    assert await tier.put(k, meta, payload)
    await _shared_hit(tier, k)  # connections made, checksum of the disk copy verified once
    store.get(k)

    async def disk_hit() -> None:
        assert store.get(k) is not None

    async def disk_read() -> None:
        entry = store.get(k)
        assert entry is not None and len(bytes(entry.payload)) == len(payload)

    async def shared_hit() -> None:
        await _shared_hit(tier, k)

    counter = iter(range(10**9))

    async def hit_and_write_through() -> None:
        found = await _shared_hit(tier, k)
        # a fresh key each time: the store keeps the first put of a key
        fresh = key(1000 + next(counter))
        assert await asyncio.to_thread(store.put, fresh, found.meta, found.payload) is not None
        await asyncio.to_thread(store.delete, fresh)

    disk = await timed(disk_hit, rounds * 10)
    read = await timed(disk_read, rounds)
    shared = await timed(shared_hit, rounds)
    through = await timed(hit_and_write_through, max(3, rounds // 2))
    return HitRow(
        label, len(payload), Spread.of(disk), Spread.of(read), Spread.of(shared), Spread.of(through)
    )


async def _shared_hit(tier: RedisTier, k: CacheKey) -> SharedEntry:
    found = await tier.get(k)
    assert found is not None, "shared tier miss during the benchmark"
    return found


# -- layout ----------------------------------------------------------------------------------

RoundTrip = Callable[[], Awaitable[object]]


async def bench_layout(url: str, prefix: str, rounds: int) -> list[LayoutRow]:
    client = aredis.Redis.from_url(url)
    value = os.urandom(18_579_456)
    big, chunks, fresh = f"{prefix}layout:big", f"{prefix}layout:chunk", f"{prefix}layout:new"
    try:
        await client.set(big, value)
        for trip in _chunk_writes(client, chunks, value):
            await trip()
        ops: dict[str, Callable[[], list[RoundTrip]]] = {
            "read: one GET of the whole value": lambda: [lambda: client.get(big)],
            "read: GETRANGE 1 MiB pieces, 4 per round trip (chosen)": lambda: _getrange_reads(
                client, big, len(value)
            ),
            "read: 1 MiB chunk keys, all in one pipeline": lambda: [
                lambda: _chunk_reads(client, chunks, len(value))
            ],
            "write: one SET of the whole value (chosen)": lambda: [
                lambda: client.set(fresh, value)
            ],
            "write: 1 MiB chunk keys in one MULTI": lambda: _chunk_writes(client, fresh, value),
            "write: SETRANGE 1 MiB pieces, 4 per round trip": lambda: _setrange_writes(
                client, fresh, value
            ),
        }
        rows = []
        for op, trips in ops.items():
            rows.append(await _layout_row(client, op, trips, rounds, fresh))
        return rows
    finally:
        await client.config_set("slowlog-log-slower-than", 10_000)
        await _forget(client, [big, fresh], [chunks, fresh], len(value))
        await client.aclose()


async def _layout_row(
    client: aredis.Redis, op: str, trips: Callable[[], list[RoundTrip]], rounds: int, fresh: str
) -> LayoutRow:
    """Client latency uninstrumented; then Redis's time per round trip from SLOWLOG. The
    commands of one round trip run back to back, so their sum is how long it holds Redis."""
    await client.config_set("slowlog-log-slower-than", -1)
    latencies = []
    for _ in range(rounds):
        started = time.perf_counter()
        for trip in trips():
            await trip()
        latencies.append(time.perf_counter() - started)
        await _forget(client, [fresh], [fresh], 18_579_456)  # writes go to a new key each time
    await client.config_set("slowlog-log-slower-than", 0)
    held, totals = [], []
    for _ in range(rounds):
        per_trip = []
        for trip in trips():
            await client.slowlog_reset()
            await trip()
            per_trip.append(await _redis_ms(client))
        held.append(max(per_trip))
        totals.append(sum(per_trip))
        await _forget(client, [fresh], [fresh], 18_579_456)
    return LayoutRow(
        op, Spread.of(latencies), statistics.median(held), max(held), statistics.median(totals)
    )


async def _redis_ms(client: aredis.Redis) -> float:
    entries = await client.slowlog_get(10_000)
    micros: int = sum(
        e["duration"] for e in entries if not e["command"].upper().startswith(b"SLOWLOG")
    )
    return micros / 1e3


async def _forget(
    client: aredis.Redis,
    keys: list[str],
    chunk_sets: list[str],
    size: int,
) -> None:
    names = [*keys, *(f"{c}:{i}" for c in chunk_sets for i in range(-(-size // MIB)))]
    await client.delete(*names, *(f"{k}:tmp" for k in keys))


def _getrange_reads(client: aredis.Redis, name: str, size: int) -> list[RoundTrip]:
    starts = list(range(0, size, MIB))

    async def trip(batch: list[int]) -> object:
        async with client.pipeline(transaction=False) as pipe:
            for start in batch:
                pipe.getrange(name, start, min(start + MIB, size) - 1)
            return await pipe.execute()

    return [functools.partial(trip, starts[i : i + 4]) for i in range(0, len(starts), 4)]


async def _chunk_reads(client: aredis.Redis, name: str, size: int) -> object:
    async with client.pipeline(transaction=False) as pipe:
        for i in range(-(-size // MIB)):
            pipe.get(f"{name}:{i}")
        return await pipe.execute()


def _chunk_writes(client: aredis.Redis, name: str, value: bytes) -> list[RoundTrip]:
    async def trip() -> object:
        async with client.pipeline(transaction=True) as pipe:
            for i, start in enumerate(range(0, len(value), MIB)):
                pipe.set(f"{name}:{i}", value[start : start + MIB])
            return await pipe.execute()

    return [trip]


def _setrange_writes(client: aredis.Redis, name: str, value: bytes) -> list[RoundTrip]:
    starts = list(range(0, len(value), MIB))

    async def trip(batch: list[int]) -> object:
        async with client.pipeline(transaction=False) as pipe:
            for start in batch:
                pipe.setrange(name + ":tmp", start, value[start : start + MIB])
            return await pipe.execute()

    trips: list[RoundTrip] = [
        functools.partial(trip, starts[i : i + 4]) for i in range(0, len(starts), 4)
    ]
    return [*trips, lambda: client.rename(name + ":tmp", name)]


# -- redis-server, report --------------------------------------------------------------------


class OwnRedis:
    """A redis-server on a free loopback port, no persistence, for the run only."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found: `make system-deps` installs it")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        with redis.Redis.from_url(self.url) as client:
            for _ in range(200):
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.02)
        raise SystemExit("redis-server did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_version(url: str) -> str:
    with redis.Redis.from_url(url) as client:
        return str(client.info("server").get("redis_version"))


def render(hits: list[HitRow], layout: list[LayoutRow], info: dict[str, str]) -> str:
    lines = [
        "## Shared Redis tier",
        "",
        f"`scripts/bench_redis.py`, {info['date']}: {info['machine']}; Redis {info['redis']} on "
        f"loopback, redis-py {redis.__version__} (pure-Python parser, no hiredis). Load average "
        f"(1/5/15 min) at the start {info['load_start']}, at the end {info['load_end']}: "
        "the machine was shared with other work, so absolute figures are noisy; the ratios, "
        "taken in the same run, are what to read.",
        "",
        "Hits, median / p90 in ms. *Disk* is `Store.get` with the hot tier off: index lookup "
        "and mmap (in managed mode the proxy hands upstream a file reference, so no byte is "
        "read). *Disk + read* also copies the payload once, as inline transport does one way or "
        "another. *Shared* is `RedisTier.get`: every byte over the socket, both checksums "
        "verified. *Shared + write-through* adds the local put (with fsync) that a proxy makes "
        "before it answers; it happens once per proxy and package.",
        "",
        "| package | disk | disk + read | shared | shared / disk | shared / disk + read | "
        "shared + write-through |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for h in hits:
        lines.append(
            f"| {h.package} | {_ms(h.disk)} | {_ms(h.disk_read)} | {_ms(h.shared)} | "
            f"{h.shared.median_ms / h.disk.median_ms:,.0f}x | "
            f"{h.shared.median_ms / h.disk_read.median_ms:,.1f}x | {_ms(h.through)} |"
        )
    lines += [
        "",
        "Layout of an 18.6 MB value: the client's latency (median / p90, ms), and Redis's own "
        "time from SLOWLOG (Redis runs one command at a time, and the commands of one round "
        "trip back to back): the longest any one round trip held Redis, which every other "
        "client of that Redis waits out (median and worst of the run), and the whole "
        "operation's time in Redis. Writes go to a new key each time, as a publish does.",
        "",
        "| operation | client | longest hold, median | worst | Redis time in total |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in layout:
        lines.append(
            f"| {r.operation} | {_ms(r.client)} | {r.held_ms:.2f} ms | "
            f"{r.held_max_ms:.2f} ms | {r.total_ms:.2f} ms |"
        )
    return "\n".join(lines)


def _ms(s: Spread) -> str:
    if s.median_ms < 1:
        return f"{s.median_ms:.3f} / {s.p90_ms:.3f}"
    return f"{s.median_ms:.1f} / {s.p90_ms:.1f}"


async def run(args: argparse.Namespace, url: str) -> str:
    load = "{:.1f} / {:.1f} / {:.1f}"
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "redis": redis_version(url),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "load_start": load.format(*os.getloadavg()),
    }
    prefix = f"bench{os.getpid()}:"
    with tempfile.TemporaryDirectory(prefix="bench-redis-store-", dir=args.dir) as tmp:
        hits = await bench_hits(url, prefix, Path(tmp) / "store", args.rounds)
    layout = await bench_layout(url, prefix, args.layout_rounds)
    info["load_end"] = load.format(*os.getloadavg())
    return render(hits, layout, info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a Redis to use (default: start one on loopback)")
    parser.add_argument("--rounds", type=int, default=40, help="timed shared-tier hits per size")
    parser.add_argument("--layout-rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="few rounds (script check only)")
    parser.add_argument("--dir", default=None, help="scratch directory for the local store")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.layout_rounds = 5, 3
    own = None if args.url else OwnRedis()
    try:
        section = asyncio.run(run(args, own.url if own else args.url))
    finally:
        if own is not None:
            own.close()
    print(section)
    write_section("bench_redis", section, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
