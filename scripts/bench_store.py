"""Benchmark the visual-package store and write its section of docs/benchmarks.md.

    python scripts/bench_store.py                 # full run (about 25 minutes, 30 GB disk)
    python scripts/bench_store.py --quick         # small sizes, to check the script works

Everything is measured in one run on this machine and written between the
`bench_store` markers of docs/benchmarks.md (other sections are left alone):

* key hashing throughput (SHA-256 vs BLAKE2b-256), for docs/cache-keys.md;
* index latency: get p50/p99 on the disk tier at 10k entries and at the
  largest count (default 1M, small payloads: this measures the index and
  mapping path, not the bytes);
* real payload sizes (2.6 / 9.4 / 18.6 MB): put throughput, get latency,
  read throughput as a ratio to memcpy of the same bytes, entry counts
  scaled to a disk allowance;
* peak RSS of a process scanning a disk tier 10x its hot budget.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from vision_cache import CacheKey, Namespace, Store

MB = 1_000_000
MIB = 1024 * 1024
REAL_SIZES = {
    "Gemma 3 4B": int(2.6 * MB),
    "LLaVA 1.5": int(9.4 * MB),
    "Qwen2.5-VL-7B @1008px": int(18.6 * MB),
}
NAMESPACE = Namespace.for_encoder(
    model="bench", mmproj="bench", build="bench", format_version=1, encoder={}
)
START, END = "<!-- bench_store:start -->", "<!-- bench_store:end -->"


@dataclass(frozen=True)
class Latency:
    p50_us: float
    p99_us: float
    p999_us: float
    max_us: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        us = np.array(seconds) * 1e6
        p50, p99, p999 = (float(np.percentile(us, q)) for q in (50, 99, 99.9))
        return cls(p50, p99, p999, float(us.max()))


@dataclass(frozen=True)
class IndexResult:
    entries: int
    puts_per_s: float
    first_get: Latency
    get: Latency
    hot_get: Latency
    index_bytes: int


@dataclass(frozen=True)
class PayloadResult:
    name: str
    size: int
    entries: int
    put_mb_s: float
    puts_per_s: float
    first_get: Latency
    get: Latency
    read_gb_s: float
    memcpy_gb_s: float

    @property
    def read_ratio(self) -> float:
        return self.read_gb_s / self.memcpy_gb_s


@dataclass(frozen=True)
class RssResult:
    hot_bytes: int
    disk_bytes: int
    entries: int
    baseline_rss: int
    peak_rss: int


@dataclass(frozen=True)
class Results:
    date: str
    machine: dict[str, str]
    disk_free_gb: float
    hashes: dict[str, dict[str, float]]
    index: list[IndexResult]
    payloads: list[PayloadResult]
    rss: RssResult
    end_load: str


def keys(count: int, salt: str = "") -> list[CacheKey]:
    return [NAMESPACE.key(hashlib.sha256(f"{salt}{i}".encode()).hexdigest()) for i in range(count)]


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


# -- key hashing --------------------------------------------------------------------


def bench_hashes() -> dict[str, dict[str, float]]:
    """MB/s of each candidate digest over typical image sizes (median of 15)."""
    candidates: dict[str, Callable[[bytes], bytes]] = {
        "sha256": lambda b: hashlib.sha256(b).digest(),
        "blake2b-256": lambda b: hashlib.blake2b(b, digest_size=32).digest(),
    }
    results: dict[str, dict[str, float]] = {}
    for label, size in (("200 KB", 200_000), ("1 MB", MB), ("8 MB", 8 * MB)):
        data = os.urandom(size)
        results[label] = {name: _throughput(f, data) for name, f in candidates.items()}
    return results


def _throughput(digest: Callable[[bytes], bytes], data: bytes) -> float:
    seconds = [timed(functools.partial(digest, data)) for _ in range(15)]
    return len(data) / MB / float(np.median(seconds))


# -- index latency ------------------------------------------------------------------------


def fill(store: Store, entry_keys: list[CacheKey], payload: bytes, meta: bytes) -> float:
    """Put every key; returns puts per second."""
    started = time.perf_counter()
    for number, key in enumerate(entry_keys):
        if store.put(key, meta, payload) is None:
            raise RuntimeError(f"put {number} failed")
        if number and number % 100_000 == 0:
            rate = number / (time.perf_counter() - started)
            print(f"  {number:,} entries ({rate:,.0f} puts/s)", flush=True)
    return len(entry_keys) / (time.perf_counter() - started)


def get_latencies(store: Store, sample: list[CacheKey]) -> list[float]:
    latencies = []
    for key in sample:
        started = time.perf_counter()
        entry = store.get(key)
        latencies.append(time.perf_counter() - started)
        if entry is None:
            raise RuntimeError("bench entry missing")
        del entry  # unmap outside the timed region
    return latencies


def bench_index(root: Path, count: int, samples: int) -> IndexResult:
    """Disk-tier get latency with `count` small entries (1 KiB payloads)."""
    entry_keys = keys(count, salt=f"index{count}")
    payload, meta = os.urandom(1024), json.dumps({"n_tokens": 256}).encode()
    with Store.open(root, hot_bytes=0, disk_bytes=1 << 50, durable=False) as store:
        puts_per_s = fill(store, entry_keys, payload, meta)
    sample = random.Random(count).sample(entry_keys, min(samples, count))
    # Reopened, so that nothing is known verified: the first get of each
    # entry maps it and checks its checksum, later ones only map it.
    with Store.open(root, hot_bytes=0) as store:
        first = Latency.of(get_latencies(store, sample))
        warm = Latency.of(get_latencies(store, sample))
    with Store.open(root, hot_bytes=64 * MIB) as store:
        resident = sample[:1000]  # within the hot tier's entry cap
        get_latencies(store, resident)
        hot = Latency.of(get_latencies(store, resident * 5))
    index_bytes = (root / "index.sqlite").stat().st_size
    shutil.rmtree(root)
    return IndexResult(count, puts_per_s, first, warm, hot, index_bytes)


# -- real payload sizes ---------------------------------------------------------------


def bench_payload(root: Path, name: str, size: int, count: int) -> PayloadResult:
    payloads = [np.random.default_rng(i).bytes(size) for i in range(min(count, 8))]
    entry_keys = keys(count, salt=f"real{size}")
    with Store.open(root, hot_bytes=0, disk_bytes=1 << 50) as store:  # durable puts
        put_times = [
            timed(functools.partial(store.put, k, b"{}", payloads[i % len(payloads)]))
            for i, k in enumerate(entry_keys)
        ]
    # The most recent writes are still in the page cache when the disk tier
    # is larger than memory; the sample mixes them with older entries.
    recent = entry_keys[-min(count, 200) :]
    sample = random.Random(size).sample(entry_keys, min(count, 500))
    with Store.open(root, hot_bytes=0) as store:  # reopened: first gets verify checksums
        first = Latency.of(get_latencies(store, recent))
        get_latencies(store, sample)  # verify (read) the sample once, untimed
        warm = Latency.of(get_latencies(store, sample * 4))
        read_s, copy_s = read_times(store, recent[-40:], size)
    shutil.rmtree(root)
    median_put = float(np.median(put_times))
    return PayloadResult(
        name,
        size,
        count,
        size / MB / median_put,
        1 / median_put,
        first,
        warm,
        size / read_s / 1e9,
        size / copy_s / 1e9,
    )


def read_times(store: Store, sample: list[CacheKey], size: int) -> tuple[float, float]:
    """Median seconds of get() plus copying every payload byte out of a fresh
    mapping, and of memcpy of the same bytes from private memory into the
    same buffer, interleaved."""
    destination = np.empty(size, np.uint8)
    sources = []
    for key in sample:
        entry = store.get(key)
        assert entry is not None
        sources.append(entry.array(np.uint8).copy())
        del entry
    reads, copies = [], []
    for key, source in zip(sample, sources, strict=True):
        copies.append(timed(functools.partial(np.copyto, destination, source)))
        reads.append(timed(functools.partial(_read_into, store, key, destination)))
    return float(np.median(reads)), float(np.median(copies))


def _read_into(store: Store, key: CacheKey, destination: np.ndarray) -> None:
    entry = store.get(key)
    assert entry is not None
    np.copyto(destination, entry.array(np.uint8))


# -- peak RSS -------------------------------------------------------------------------------


def bench_rss(root: Path, hot_bytes: int, size: int) -> RssResult:
    """Fill a disk tier 10x the hot budget, then scan it in a fresh process."""
    count = -(-10 * hot_bytes // size)
    payload = os.urandom(size)
    with Store.open(root, hot_bytes=0, disk_bytes=1 << 50, durable=False) as store:
        for key in keys(count, salt="rss"):
            store.put(key, b"{}", payload)
    child = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(root), str(hot_bytes), str(count)],
        capture_output=True,
        text=True,
        check=True,
    )
    shutil.rmtree(root)
    measured = json.loads(child.stdout)
    return RssResult(hot_bytes, count * size, count, measured["baseline_rss"], measured["peak_rss"])


def rss_child(root: str, hot_bytes: int, count: int) -> None:
    process = psutil.Process()
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with Store.open(root, hot_bytes=hot_bytes) as store:
        baseline = process.memory_info().rss
        peak[0] = baseline
        for _ in range(2):  # the second pass hits the hot tier for its tail
            for key in keys(count, salt="rss"):
                entry = store.get(key)
                assert entry is not None
                entry.array(np.uint8).sum(dtype=np.uint64)  # touch every byte
                del entry
        done.set()
        sampler.join()
    # Sampled, not ru_maxrss: on Linux that keeps the high-water mark of the
    # parent's memory from before exec.
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak[0]}))


# -- report ------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "load": "{:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg()),
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }


def render(results: Results) -> str:
    lines = [START, "## Store (`scripts/bench_store.py`)", ""]
    lines += _render_machine(results)
    lines += _render_index(results.index)
    lines += _render_payloads(results.payloads)
    lines += _render_rss(results.rss)
    lines += _render_hashes(results.hashes)
    return "\n".join([*lines, END]) + "\n"


def _render_machine(results: Results) -> list[str]:
    info = results.machine
    return [
        f"Measured {results.date} in one run on {info['cpu']}, {info['memory']} RAM, "
        f"Python {info['python']}, SQLite {info['sqlite']}; disk free at start: "
        f"{results.disk_free_gb:.0f} GB; load average (1/5/15 min) at start "
        f"{info['load']}, at end {results.end_load}. Page cache warm unless a column "
        "says first; tails (p99.9, max) include whatever else ran on the machine.",
        "",
    ]


def _render_index(rows: list[IndexResult]) -> list[str]:
    lines = [
        "### Get latency by entry count (1 KiB payloads, disk tier, hot tier off)",
        "",
        "| entries | index file | puts/s (no fsync) | first get p50 / p99 (maps, "
        "verifies) | get p50 / p99 / p99.9 | hot-tier hit p50 / p99 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        first, warm, hot = row.first_get, row.get, row.hot_get
        lines.append(
            f"| {row.entries:,} | {row.index_bytes / MB:,.0f} MB | {row.puts_per_s:,.0f} "
            f"| {first.p50_us:.0f} / {first.p99_us:.0f} µs "
            f"| {warm.p50_us:.0f} / {warm.p99_us:.0f} / {warm.p999_us:.0f} µs "
            f"| {hot.p50_us:.1f} / {hot.p99_us:.1f} µs |"
        )
    return [*lines, ""]


def _render_payloads(rows: list[PayloadResult]) -> list[str]:
    lines = [
        "### Real payload sizes (durable puts: payload fdatasync before the row commits)",
        "",
        "Entry counts: 10,000 or what fits a 30 GB allowance per size (the disk is "
        "shared, and larger than memory: the page cache holds the index and the recent "
        "entries). First get: the 200 most recent entries after reopening, each mapped "
        "and its checksum verified. Get: 500 random entries, already verified, 4 passes; "
        "a get maps the payload but does not read it. Read: get() plus a copy of every "
        "byte out of the fresh mapping, against memcpy of the same bytes into the same "
        "buffer, 40 recent entries, medians.",
        "",
        "| model | payload | entries | put MB/s (puts/s) | first get p50 (verifies) "
        "| get p50 / p99 | read GB/s | memcpy GB/s | read / memcpy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.size / MB:.1f} MB | {row.entries:,} "
            f"| {row.put_mb_s:,.0f} ({row.puts_per_s:,.0f}) | {row.first_get.p50_us / 1000:.2f} ms"
            f" | {row.get.p50_us:.0f} / {row.get.p99_us:.0f} µs | {row.read_gb_s:.1f} "
            f"| {row.memcpy_gb_s:.1f} | {row.read_ratio:.0%} |"
        )
    return [*lines, ""]


def _render_rss(row: RssResult) -> list[str]:
    return [
        "### Peak RSS scanning a disk tier 10x the hot budget",
        "",
        f"Hot budget {row.hot_bytes / MIB:.0f} MiB, disk tier {row.disk_bytes / MIB:,.0f} MiB "
        f"({row.entries} entries of 2.6 MB), every byte read, two passes: peak RSS "
        f"{row.peak_rss / MIB:.0f} MiB (after imports and open: "
        f"{row.baseline_rss / MIB:.0f} MiB), i.e. hot budget + "
        f"{(row.peak_rss - row.hot_bytes) / MIB:.0f} MiB.",
        "",
    ]


def _render_hashes(rows: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "### Content digest throughput (MB/s, median of 15)",
        "",
        "| image | SHA-256 | BLAKE2b-256 |",
        "|---:|---:|---:|",
    ]
    lines += [
        f"| {label} | {r['sha256']:,.0f} | {r['blake2b-256']:,.0f} |" for label, r in rows.items()
    ]
    return [*lines, ""]


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        text = before + section + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


# -- main --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Results:
    base = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    try:
        date, info, free = time.strftime("%Y-%m-%d"), machine(), shutil.disk_usage(base).free
        hashes = bench_hashes()
        index = []
        for count in (10_000, args.large_count):
            print(f"index: {count:,} entries", flush=True)
            index.append(bench_index(base / f"index{count}", count, args.samples))
        payloads = []
        for name, size in REAL_SIZES.items():
            count = max(8, min(args.real_max, int(args.real_gb * 1e9 // size)))
            print(f"payload: {name}, {count:,} x {size:,} bytes", flush=True)
            payloads.append(bench_payload(base / "real", name, size, count))
        rss = bench_rss(base / "rss", args.hot_mib * MIB, REAL_SIZES["Gemma 3 4B"])
        end_load = "{:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())
        return Results(date, info, free / 1e9, hashes, index, payloads, rss, end_load)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (script check only)")
    parser.add_argument("--large-count", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=20_000, help="gets timed per count")
    parser.add_argument(
        "--real-gb", type=float, default=30.0, help="disk allowance per real payload size, GB"
    )
    parser.add_argument(
        "--real-max",
        type=int,
        default=10_000,
        help="at most this many entries per real payload size",
    )
    parser.add_argument("--hot-mib", type=int, default=256)
    parser.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.large_count, args.samples, args.real_gb, args.hot_mib = 20_000, 2_000, 0.2, 16
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rss-child"]:
        rss_child(argv[1], int(argv[2]), int(argv[3]))
        return 0
    args = parse_args(argv)
    results = run(args)
    section = render(results)
    print(section)
    write_section(args.out, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
